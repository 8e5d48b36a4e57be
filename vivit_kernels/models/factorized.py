"""ViViT Models 2, 3 and 4 (Arnab et al. 2021, section 3.3) on our kernels; scenic's names ``factorized_encoder``,
``factorized_self_attention``, ``factorized_dot_product`` (``VivitFactorizedConfig.attention_type``).

- Model 2, the factorised encoder: a spatial encoder runs over each temporal index's tubelet tokens with a [CLS]
  token of its own (``num_hidden_layers`` layers); the [CLS] outputs, one per temporal index, go with a temporal
  [CLS] through a temporal encoder (``num_temporal_layers`` layers), whose [CLS] feeds the classifier. Its layers
  are transformers' ``VivitLayer``s, and the tubelet embedding is our fused patch-embedding kernel reading the
  clip as (batch x temporal indices) clips of one tubelet step each, in place.
- Model 3, factorised self-attention: every block runs self-attention over the S tokens of each temporal index,
  then over the T tokens of each spatial position (each with its own LayerNorm and residual), then the MLP.
- Model 4, factorised dot-product attention: transformers' ``VivitLayer`` blocks whose attention gives half the
  heads the S tokens of their temporal index and the other half the T tokens of their spatial position; the two
  head groups' outputs are concatenated before the output projection.
  Models 3 and 4 have no [CLS] token (as the paper): the classifier reads the mean of the final tokens.

With ``attn="triton"`` / ``"auto"`` the attention of every group runs through our flash attention on views of
the fused projection output: (batch, T, S, 3, heads, head_dim) for the spatial groups and its transpose
(batch, S, T, ...) for the temporal ones, read in place through the kernels' second batch index, the outputs
written in (time, space) token order so the output projection reads them as rows; LayerNorm, the GEMM epilogues
and the patch embedding are the same kernels as Model 1's.

``factorized_reference_forward`` is each model written out from the paper in plain torch ops over the model's
parameters: what the tests hold the modules (eager and ours) to.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForVideoClassification
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, ImageClassifierOutput
from transformers.models.vivit import configuration_vivit as hf_config
from transformers.models.vivit import modeling_vivit as hf

from ..merging import merging_sequences, refuse_checkpointing
from ..modules import KernelModule, check_clip_size, kernel_mlp, resize_positions
from ..monkey_patch import AttnMixin
from ..plain_modules import autocast_dtype, compute_weight, has_hooks, plain
from ..presets import ATTENTION_TYPES, FACTORIZED_PRESETS, image_hw  # plain Python (the command line lists them)

__all__ = ["VivitFactorizedConfig", "VivitFactorizedModel", "pool_tokens",
           "VivitFactorizedForVideoClassification", "factorized_reference_forward"]


@strict
class VivitFactorizedConfig(hf_config.VivitConfig):
    """transformers' VivitConfig plus ``attention_type`` (scenic's names: Models 2, 3, 4) and, for the factorised
    encoder, ``num_temporal_layers`` (there ``num_hidden_layers`` is the spatial encoder's depth; for Models 3
    and 4 it is the number of blocks, and ``num_temporal_layers`` is unused)."""

    model_type = "vivit_factorized"
    attention_type: str = "factorized_encoder"
    num_temporal_layers: int = 4

    def __post_init__(self, **kwargs):
        if self.attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type must be one of {', '.join(ATTENTION_TYPES)}, got {self.attention_type!r}")
        if self.attention_type == "factorized_dot_product" and self.num_attention_heads % 2:
            raise ValueError("factorized_dot_product splits the heads in two halves (space, time): "
                             f"num_attention_heads must be even, got {self.num_attention_heads}")
        super().__post_init__(**kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> VivitFactorizedConfig:
        if name not in FACTORIZED_PRESETS:
            raise ValueError(f"unknown factorised preset {name!r}; available: {', '.join(FACTORIZED_PRESETS)}")
        return cls(**{**FACTORIZED_PRESETS[name], **overrides})


def _resolve(config) -> VivitFactorizedConfig:
    if config is None:
        config = VivitFactorizedConfig()
    elif isinstance(config, str):
        config = VivitFactorizedConfig.from_preset(config)
    if not isinstance(config, VivitFactorizedConfig):
        raise TypeError(f"config must be a VivitFactorizedConfig or a preset name ({', '.join(FACTORIZED_PRESETS)}), "
                        f"got {type(config).__name__}")
    return config


def _grid(config) -> tuple[int, int, int]:
    """(temporal indices, patches per frame in height, in width) of the configured clip."""
    t, p, q = config.tubelet_size
    h, w = image_hw(config)
    return config.num_frames // t, h // p, w // q


def _check_clip(config, pixel_values, interpolate_pos_encoding: bool = False) -> tuple[int, int, int]:
    """The (T', h, w) tubelet grid of the clip (the configured one without interpolation), or a clear error where
    the model cannot read it (check_clip_size's rules, as for Model 1)."""
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 5:
        raise ValueError("pixel_values must be a 5-D tensor (batch, frames, channels, height, width), got "
                         f"{getattr(pixel_values, 'shape', type(pixel_values).__name__)}")
    _, frames, channels, height, width = pixel_values.shape
    if channels != config.num_channels:
        raise ValueError(f"pixel_values has {channels} channels in dim 2, expected num_channels={config.num_channels} "
                         f"(layout is (batch, frames, channels, height, width); got shape {tuple(pixel_values.shape)})")
    t, p, q = config.tubelet_size
    check_clip_size(tuple(pixel_values.shape), (config.num_frames, *image_hw(config)), (t, p, q),
                    interpolate_pos_encoding)
    return frames // t, height // p, width // q


_PROJECTION = "embeddings.patch_embeddings.projection"


class FactorizedEncoderEmbeddings(KernelModule, nn.Module):
    """Tubelet tokens of each temporal index with that index's spatial [CLS] and the spatial position table (shared
    by every temporal index): (batch, frames, channels, H, W) -> (batch * T', 1 + h * w, hidden)."""

    def __init__(self, config: VivitFactorizedConfig):
        super().__init__()
        _, gh, gw = _grid(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.patch_embeddings = hf.VivitTubeletEmbeddings(config)
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + gh * gw, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.config = config

    def forward(self, pixel_values: torch.Tensor, grid: tuple[int, int, int] | None = None) -> torch.Tensor:
        """``grid``: the clip's (T', h, w) tubelet grid where it is not the configured one (interpolate_pos_encoding:
        the spatial table resized to (h, w); a clip whose frames are not a tubelet multiple loses the rest)."""
        config = self.config
        grid = _check_clip(config, pixel_values) if grid is None else grid
        steps, gh, gw = grid
        t = config.tubelet_size[0]
        if pixel_values.shape[1] != steps * t:
            pixel_values = pixel_values[:, : steps * t]
        batch, frames, channels, height, width = pixel_values.shape
        proj = self.patch_embeddings.projection
        autocast = autocast_dtype(pixel_values.device.type)  # None, or the dtype our kernels then compute in
        clips = pixel_values.to(autocast or proj.weight.dtype)
        clips = clips.reshape(batch * steps, t, channels, height, width)  # a view for a contiguous clip: no copy
        table = self.position_embeddings
        _, h0, w0 = _grid(config)
        if (gh, gw) != (h0, w0):
            table = torch.cat((table[:, :1], resize_positions(table[:, 1:], (1, h0, w0), (1, gh, gw))), 1)
        backend = self._vivit_backend
        if backend is not None and backend.patch_embed is not None and plain(proj, nn.Conv3d, clips, _PROJECTION):
            w = [compute_weight(t, clips) for t in (proj.weight, proj.bias, self.cls_token, table)]
            out = backend.patch_embed(clips, *w)
        else:
            tokens = self.patch_embeddings(clips)  # (batch * T', h * w, hidden)
            out = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens), 1)
            out = out + table.to(out.dtype)
        return self.dropout(out)


class FactorizedTokenEmbeddings(KernelModule, nn.Module):
    """Models 3 and 4: the clip's T' x h x w tubelet tokens in (time, space) order plus one position table, no [CLS]:
    (batch, frames, channels, H, W) -> (batch, T' * h * w, hidden)."""

    def __init__(self, config: VivitFactorizedConfig):
        super().__init__()
        steps, gh, gw = _grid(config)
        self.patch_embeddings = hf.VivitTubeletEmbeddings(config)
        self.position_embeddings = nn.Parameter(torch.zeros(1, steps * gh * gw, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.config = config

    def forward(self, pixel_values: torch.Tensor, grid: tuple[int, int, int] | None = None) -> torch.Tensor:
        """``grid``: the clip's (T', h, w) tubelet grid where it is not the configured one (interpolate_pos_encoding:
        the table resized to it; the patch embedding reads the grid's frames and pixels, in place)."""
        grid = _check_clip(self.config, pixel_values) if grid is None else grid
        table = resize_positions(self.position_embeddings, _grid(self.config), grid)
        proj = self.patch_embeddings.projection
        autocast = autocast_dtype(pixel_values.device.type)
        clips = pixel_values.to(autocast or proj.weight.dtype)
        backend = self._vivit_backend
        if backend is not None and backend.patch_embed is not None and plain(proj, nn.Conv3d, clips, _PROJECTION):
            # the fused kernel writes a [CLS] row first: a zero one, with a zero position, dropped after
            pos = compute_weight(table, clips)
            pos = torch.cat((pos.new_zeros(1, 1, pos.shape[-1]), pos), 1)
            out = backend.patch_embed(clips, compute_weight(proj.weight, clips), compute_weight(proj.bias, clips),
                                      pos.new_zeros(1, 1, pos.shape[-1]), pos)
            out = out[:, 1:].contiguous()  # one copy of the tokens per forward, so every layer reads plain rows
        else:
            out = self.patch_embeddings(clips) + table.to(clips.dtype)
        return self.dropout(out)


class VivitFactorizedSelfAttentionLayer(KernelModule, GradientCheckpointingLayer):
    """Model 3's block: LayerNorm + self-attention over each temporal index's S tokens + residual, LayerNorm +
    self-attention over each spatial position's T tokens + residual, LayerNorm + MLP + residual. Its attention and
    MLP are transformers' ``VivitAttention`` / ``VivitMLP`` (LoRA and other wrappers find the usual names)."""

    def __init__(self, config: VivitFactorizedConfig):
        super().__init__()
        steps = _grid(config)[0]
        eps = config.layer_norm_eps
        self.layernorm_spatial = nn.LayerNorm(config.hidden_size, eps=eps)
        self.spatial_attention = hf.VivitAttention(config)
        self.layernorm_temporal = nn.LayerNorm(config.hidden_size, eps=eps)
        self.temporal_attention = hf.VivitAttention(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = hf.VivitMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.spatial_attention._vivit_axes = (steps, config.num_attention_heads)  # every head over space
        self.temporal_attention._vivit_axes = (steps, 0)  # every head over time

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        backend = self._vivit_backend
        fuse = backend is not None and not (self.training and self.dropout.p > 0)
        x = hidden_states
        for norm, attention in ((self.layernorm_spatial, self.spatial_attention),
                                (self.layernorm_temporal, self.temporal_attention)):
            if fuse and hasattr(attention, "attend") and not has_hooks(attention):
                x, _ = attention.attend(norm(x), residual=x)  # the residual in the output projection's epilogue
            else:
                x = self.dropout(attention(norm(x))[0]) + x
        if backend is None:
            return self.dropout(self.mlp(self.layernorm_after(x))) + x
        return kernel_mlp(self, backend, self.layernorm_after(x), x, fuse)


class VivitFactorizedPreTrainedModel(hf.VivitPreTrainedModel):
    config_class = VivitFactorizedConfig
    config: VivitFactorizedConfig
    _no_split_modules = ["FactorizedEncoderEmbeddings", "FactorizedTokenEmbeddings", "VivitLayer",
                         "VivitFactorizedSelfAttentionLayer"]
    _can_compile_fullgraph = False

    @classmethod
    def is_custom_code(cls) -> bool:
        return False

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, FactorizedEncoderEmbeddings):
            nn.init.zeros_(module.cls_token)
            nn.init.zeros_(module.position_embeddings)
        elif isinstance(module, FactorizedTokenEmbeddings):
            nn.init.zeros_(module.position_embeddings)
        elif isinstance(module, VivitFactorizedModel) and module.config.attention_type == "factorized_encoder":
            nn.init.zeros_(module.temporal_cls_token)
            nn.init.zeros_(module.temporal_position_embeddings)


class VivitFactorizedModel(AttnMixin, VivitFactorizedPreTrainedModel):
    """The base model of Models 2, 3 and 4 (``config.attention_type``). ``last_hidden_state`` (after the final
    LayerNorm): Model 2's temporal encoder output, [CLS] first, then one token per temporal index; Models 3 and
    4's T' x h x w tokens in (time, space) order.

    Args:
        config: a VivitFactorizedConfig, a preset name (``FACTORIZED_PRESETS``) or None for Model 2's defaults.
        attn: "eager", "sdpa", "triton" or "auto", as for Model 1.
    """

    _vivit_base = True  # apply_vivit_kernels treats it as it treats transformers' VivitModel

    def __init__(self, config=None, attn: str | None = None):
        config = _resolve(config)
        super().__init__(config)
        steps, _, _ = _grid(config)
        kind = config.attention_type
        if kind == "factorized_encoder":
            self.embeddings = FactorizedEncoderEmbeddings(config)
            self.spatial_layers = nn.ModuleList([hf.VivitLayer(config) for _ in range(config.num_hidden_layers)])
            self.spatial_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.temporal_cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
            self.temporal_position_embeddings = nn.Parameter(torch.zeros(1, 1 + steps, config.hidden_size))
            self.temporal_layers = nn.ModuleList([hf.VivitLayer(config) for _ in range(config.num_temporal_layers)])
        else:
            self.embeddings = FactorizedTokenEmbeddings(config)
            if kind == "factorized_self_attention":
                blocks = [VivitFactorizedSelfAttentionLayer(config) for _ in range(config.num_hidden_layers)]
            else:  # factorized_dot_product: transformers' block, half the heads over space, half over time
                blocks = [hf.VivitLayer(config) for _ in range(config.num_hidden_layers)]
                for block in blocks:
                    block.attention._vivit_axes = (steps, config.num_attention_heads // 2)
            self.layer = nn.ModuleList(blocks)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()
        self.set_attn(attn)

    @property
    def layers(self) -> list:
        """Every encoder layer in order (Model 2: spatial then temporal; what apply_vivit_kernels numbers)."""
        if self.config.attention_type == "factorized_encoder":
            return [*self.spatial_layers, *self.temporal_layers]
        return list(self.layer)

    def get_input_embeddings(self):
        return self.embeddings.patch_embeddings

    def forward(self, pixel_values: torch.Tensor | None = None, interpolate_pos_encoding: bool = False,
                attention_mask: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> BaseModelOutput:
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        if attention_mask is not None or kwargs.get("head_mask") is not None:
            raise ValueError("the factorised models take no attention_mask or head_mask (videos have no padding)")
        grid = _check_clip(self.config, pixel_values, interpolate_pos_encoding)
        self._set_grid(grid)
        hidden = [] if output_hidden_states else None
        x = self.embeddings(pixel_values, grid)
        model_2 = self.config.attention_type == "factorized_encoder"
        encoders = [self.spatial_layers, self.temporal_layers] if model_2 else [self.layer]
        # token merging: Model 2 only (apply_vivit_kernels refuses it for Models 3 and 4 when it is switched on)
        merge = getattr(self.config, "token_merging", None) if model_2 else None
        if merge:
            refuse_checkpointing(self)
        for i, layers in enumerate(encoders):
            if i == 1:  # Model 2: the spatial encoder's [CLS] outputs become the temporal encoder's tokens
                x = self._temporal_tokens(x, pixel_values.shape[0], grid[0])
            # Model 2's spatial encoder merges tokens within each temporal index's sequence; its [CLS] never merges
            with merging_sequences(merge if i == 0 else None, len(layers), x.shape[1]) as state:
                for layer in layers:
                    x = layer(x)  # rebinds x: no layer's input outlives its layer (the peak of live activations)
                    if hidden is not None:  # full length, as every token state a merging model returns
                        hidden.append(x if state is None else state.unmerge(x))
        out = BaseModelOutput(last_hidden_state=self.layernorm(x), hidden_states=tuple(hidden) if hidden else None)
        return out if return_dict is not False else out.to_tuple()

    def _temporal_tokens(self, x: torch.Tensor, batch: int, steps: int) -> torch.Tensor:
        """Model 2: the temporal [CLS] and one normalised spatial [CLS] per temporal index, with their positions
        (the temporal table resized to ``steps`` temporal indices where that is not the configured number)."""
        frames = self.spatial_layernorm(x)[:, 0].reshape(batch, steps, -1)
        cls = self.temporal_cls_token.expand(batch, -1, -1).to(frames.dtype)
        table = self.temporal_position_embeddings
        trained = _grid(self.config)[0]
        if steps != trained:
            table = torch.cat((table[:, :1], resize_positions(table[:, 1:], (trained, 1, 1), (steps, 1, 1))), 1)
        return torch.cat((cls, frames), 1) + table.to(frames.dtype)

    def _set_grid(self, grid: tuple[int, int, int]) -> None:
        """Models 3 and 4: tell their attention modules the (time, space) token grid of this forward (the
        configured one unless interpolate_pos_encoding changed it); a backward that recomputes a layer (gradient
        checkpointing) after a forward at another grid is an error there, not a wrong result."""
        if self.config.attention_type == "factorized_encoder" or getattr(self, "_vivit_grid", None) == grid:
            return
        steps, gh, gw = grid
        for module in self.modules():
            axes = getattr(module, "_vivit_axes", None)
            if axes is not None:
                module._vivit_axes = (steps, axes[1])
                module._vivit_tokens = steps * gh * gw
        self._vivit_grid = grid


def pool_tokens(config, tokens: torch.Tensor) -> torch.Tensor:
    """What a ViViT's classifier reads from its last hidden state (batch, tokens, hidden): the [CLS] token (Models 1
    and 2), or the mean of the tokens (Models 3 and 4, which have no [CLS])."""
    if getattr(config, "attention_type", "factorized_encoder") == "factorized_encoder":
        return tokens[:, 0]
    return tokens.mean(1)


class VivitFactorizedForVideoClassification(AttnMixin, VivitFactorizedPreTrainedModel):
    """Models 2, 3, 4 with a linear classifier: on Model 2's temporal [CLS], on the mean of Models 3 and 4's
    tokens (they have no [CLS], as the paper)."""

    def __init__(self, config=None, attn: str | None = None):
        config = _resolve(config)
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vivit = VivitFactorizedModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()
        self.set_attn(attn)

    def forward(self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                interpolate_pos_encoding: bool = False, return_dict: bool | None = None, **kwargs):
        outputs = self.vivit(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True,
                             **kwargs)
        logits = self.classifier(pool_tokens(self.config, outputs.last_hidden_state))
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        out = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
        return out if return_dict is not False else out.to_tuple()


# ------------------------------------------------------------------------------------------------
# The reference: the paper's Models 2, 3, 4 in plain torch ops over a model's parameters
# ------------------------------------------------------------------------------------------------
def _linear_p(p: dict, name: str, v: torch.Tensor) -> torch.Tensor:
    return F.linear(v, p[f"{name}.weight"], p.get(f"{name}.bias"))


def _norm_p(p: dict, name: str, v: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(v, v.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"], eps)


def _mha_p(p: dict, prefix: str, h: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head self-attention over the middle axis of h (sequences, tokens, hidden), output projection included."""
    b, n, d = h.shape
    q, k, v = (_linear_p(p, f"{prefix}.{m}_proj", h).view(b, n, heads, d // heads).transpose(1, 2) for m in "qkv")
    weights = (q @ k.transpose(-1, -2) * (d // heads) ** -0.5).softmax(-1)
    return _linear_p(p, f"{prefix}.o_proj", (weights @ v).transpose(1, 2).reshape(b, n, d))


def _mlp_p(p: dict, prefix: str, x: torch.Tensor, eps: float, act) -> torch.Tensor:
    return _linear_p(
        p, f"{prefix}.mlp.fc2", act(_linear_p(p, f"{prefix}.mlp.fc1", _norm_p(p, f"{prefix}.layernorm_after", x, eps)))
    )


def _reference_layer(p: dict, prefix: str, x: torch.Tensor, heads: int, eps: float, act) -> torch.Tensor:
    """transformers' pre-norm block over (sequences, tokens, hidden)."""
    x = x + _mha_p(p, f"{prefix}.attention", _norm_p(p, f"{prefix}.layernorm_before", x, eps), heads)
    return x + _mlp_p(p, prefix, x, eps, act)


def _reference_self_attention_block(p: dict, prefix: str, x: torch.Tensor, heads: int, eps: float, act):
    """Model 3 on x (batch, T, S, hidden): attention within each temporal index, then within each spatial position."""
    b, t, s, d = x.shape
    h = _norm_p(p, f"{prefix}.layernorm_spatial", x, eps).reshape(b * t, s, d)
    x = x + _mha_p(p, f"{prefix}.spatial_attention", h, heads).reshape(b, t, s, d)
    h = _norm_p(p, f"{prefix}.layernorm_temporal", x, eps).transpose(1, 2).reshape(b * s, t, d)
    x = x + _mha_p(p, f"{prefix}.temporal_attention", h, heads).reshape(b, s, t, d).transpose(1, 2)
    return x + _mlp_p(p, prefix, x, eps, act)


def _reference_dot_product_block(p: dict, prefix: str, x: torch.Tensor, heads: int, eps: float, act):
    """Model 4 on x (batch, T, S, hidden): heads [0, H/2) attend over space, [H/2, H) over time, concatenated."""
    b, t, s, d = x.shape
    half, dh = heads // 2, d // heads
    h = _norm_p(p, f"{prefix}.layernorm_before", x, eps)
    q, k, v = (_linear_p(p, f"{prefix}.attention.{m}_proj", h).view(b, t, s, heads, dh) for m in "qkv")
    scale = dh ** -0.5
    qs, ks, vs = (u[..., :half, :] for u in (q, k, v))
    w = (torch.einsum("btshc,btrhc->bthsr", qs, ks) * scale).softmax(-1)
    spatial = torch.einsum("bthsr,btrhc->btshc", w, vs)
    qt, kt, vt = (u[..., half:, :] for u in (q, k, v))
    w = (torch.einsum("btshc,bushc->bshtu", qt, kt) * scale).softmax(-1)
    temporal = torch.einsum("bshtu,bushc->btshc", w, vt)
    context = torch.cat((spatial, temporal), 3).reshape(b, t, s, d)
    x = x + _linear_p(p, f"{prefix}.attention.o_proj", context)
    return x + _mlp_p(p, prefix, x, eps, act)


def factorized_reference_forward(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """A factorised model's logits (or, for a base model, its last hidden state) computed from the paper's
    definition with plain torch ops over ``model``'s parameters (eval mode: no dropout)."""
    from transformers.activations import ACT2FN

    base = model.vivit if isinstance(model, VivitFactorizedForVideoClassification) else model
    config = base.config
    p = {n: t for n, t in base.named_parameters()}
    act, heads, eps = ACT2FN[config.hidden_act], config.num_attention_heads, config.layer_norm_eps
    batch, frames, channels, height, width = pixel_values.shape
    x = pixel_values.to(p["layernorm.weight"].dtype).permute(0, 2, 1, 3, 4)  # (batch, channels, frames, H, W)
    tokens = F.conv3d(x, p["embeddings.patch_embeddings.projection.weight"],
                      p["embeddings.patch_embeddings.projection.bias"], stride=config.tubelet_size)
    steps = frames // config.tubelet_size[0]
    tokens = tokens.flatten(3).permute(0, 2, 3, 1)  # (batch, T', h * w, hidden): per temporal index
    d = tokens.shape[-1]
    if config.attention_type == "factorized_encoder":
        spatial = torch.cat((p["embeddings.cls_token"].expand(batch * steps, 1, d),
                             tokens.reshape(batch * steps, -1, d)), 1) + p["embeddings.position_embeddings"]
        for i in range(config.num_hidden_layers):
            spatial = _reference_layer(p, f"spatial_layers.{i}", spatial, heads, eps, act)
        spatial = F.layer_norm(spatial, (d,), p["spatial_layernorm.weight"], p["spatial_layernorm.bias"], eps)
        temporal = torch.cat((p["temporal_cls_token"].expand(batch, 1, d), spatial[:, 0].reshape(batch, steps, d)), 1)
        out = temporal + p["temporal_position_embeddings"]
        for i in range(config.num_temporal_layers):
            out = _reference_layer(p, f"temporal_layers.{i}", out, heads, eps, act)
    else:
        block = (_reference_self_attention_block if config.attention_type == "factorized_self_attention"
                 else _reference_dot_product_block)
        out = tokens + p["embeddings.position_embeddings"].view(1, steps, -1, d)
        for i in range(config.num_hidden_layers):
            out = block(p, f"layer.{i}", out, heads, eps, act)
        out = out.reshape(batch, -1, d)
    out = F.layer_norm(out, (d,), p["layernorm.weight"], p["layernorm.bias"], eps)
    if base is model:
        return out
    return F.linear(pool_tokens(config, out), model.classifier.weight, model.classifier.bias)


AutoConfig.register(VivitFactorizedConfig.model_type, VivitFactorizedConfig, exist_ok=True)
AutoModel.register(VivitFactorizedConfig, VivitFactorizedModel, exist_ok=True)
AutoModelForVideoClassification.register(VivitFactorizedConfig, VivitFactorizedForVideoClassification, exist_ok=True)
