"""ViViT (Arnab et al. 2021, unfactorised "model 1"), as transformers' ``VivitModel`` computes it.

Module and state_dict names are transformers 5.x's (``vivit.layers.N.attention.q_proj`` ...), so the model
is a drop-in replacement. Internally the attention keeps one fused ``qkv`` projection (one GEMM instead of
three); state_dict hooks split it on save and fuse it on load, and transformers 4.x names
(``vivit.encoder.layer.N.attention.attention.query`` ...) are accepted on load as well.

Every layer calls the functions of one :class:`~vivit_kernels.backends.Backend` ("eager", "sdpa", "triton");
nothing backend-specific lives in the layers.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .backends import Backend, get_backend
from .checkpoint import PretrainedMixin, convert_v4_keys
from .config import VivitConfig
from .ops.activations import get_activation
from .ops.attention import attention_ref

__all__ = [
    "VivitModel",
    "VivitForVideoClassification",
    "VivitModelOutput",
    "VivitClassifierOutput",
]


# --------------------------------------------------------------------------------------------------
# Outputs: attribute access, and transformers' ModelOutput behaviour for indexing and to_tuple()
# (fields that are None are skipped).
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _ModelOutput:
    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None)

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self.to_tuple())


@dataclasses.dataclass
class VivitModelOutput(_ModelOutput):
    last_hidden_state: Optional[torch.Tensor] = None
    pooler_output: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None
    attentions: Optional[tuple[torch.Tensor, ...]] = None


@dataclasses.dataclass
class VivitClassifierOutput(_ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None
    attentions: Optional[tuple[torch.Tensor, ...]] = None


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


# --------------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------------
class VivitTubeletEmbeddings(nn.Module):
    """Holds the Conv3d tubelet projection (weight (hidden, C, t, p, q)); the computation is the backend's."""

    def __init__(self, config: VivitConfig):
        super().__init__()
        self.projection = nn.Conv3d(
            config.num_channels, config.hidden_size, kernel_size=config.tubelet_size, stride=config.tubelet_size
        )


class VivitEmbeddings(nn.Module):
    def __init__(self, config: VivitConfig):
        super().__init__()
        self.config = config
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.patch_embeddings = VivitTubeletEmbeddings(config)
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def position_table(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """The position table for a (T', h, w) tubelet grid, shaped (1, 1 + T'*h*w, hidden).

        The table is returned unchanged when the grid is the configured one. Otherwise its patch part is
        read as the (T0', h0, w0) grid it was trained on, resized bicubically in space (align_corners=False,
        each frame slice separately) and linearly in time, and the [CLS] entry is kept.
        """
        table = self.position_embeddings
        t0, h0, w0 = self.config.patch_grid
        t, h, w = grid
        if (t, h, w) == (t0, h0, w0):
            return table
        dim = table.shape[-1]
        g = table[:, 1:].float().reshape(t0, h0, w0, dim).permute(0, 3, 1, 2)  # (t0, D, h0, w0)
        if (h, w) != (h0, w0):
            g = F.interpolate(g, size=(h, w), mode="bicubic", align_corners=False)
        if t != t0:
            g = g.permute(1, 2, 3, 0).reshape(1, dim * h * w, t0)
            g = F.interpolate(g, size=t, mode="linear", align_corners=False)
            g = g.reshape(dim, h, w, t).permute(3, 0, 1, 2)
        patch = g.permute(0, 2, 3, 1).reshape(1, t * h * w, dim).to(table.dtype)
        return torch.cat((table[:, :1], patch), dim=1)

    def forward(self, pixel_values: torch.Tensor, backend: Backend, interpolate_pos_encoding: bool) -> torch.Tensor:
        t, p, q = self.config.tubelet_size
        _, frames, _, height, width = pixel_values.shape
        grid = (frames // t, height // p, width // q)
        pos = self.position_table(grid) if interpolate_pos_encoding else self.position_embeddings
        proj = self.patch_embeddings.projection
        embeddings = backend.patch_embed(pixel_values, proj.weight, proj.bias, self.cls_token, pos)
        return self.dropout(embeddings)


# --------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------
class VivitAttention(nn.Module):
    """Self-attention with one fused [Wq; Wk; Wv] projection; q_proj/k_proj/v_proj in the state_dict."""

    def __init__(self, config: VivitConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.dropout_prob = config.attention_probs_dropout_prob
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.register_state_dict_post_hook(_split_qkv)
        self.register_load_state_dict_pre_hook(_fuse_qkv)

    def forward(
        self, x: torch.Tensor, backend: Backend, head_mask: Optional[torch.Tensor], output_attentions: bool
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Returns the attention context (B, N, hidden), before o_proj, and the probabilities if asked."""
        batch, tokens, hidden = x.shape
        qkv = backend.linear(x, self.qkv.weight, self.qkv.bias).view(batch, tokens, 3, self.num_heads, self.head_dim)
        dropout_p = self.dropout_prob if self.training else 0.0
        needs_eager = output_attentions or head_mask is not None or (dropout_p > 0 and not backend.attention_dropout)
        if needs_eager:
            if backend.name != "eager":
                _warn_once(
                    f"attn={backend.name!r} cannot return attention probabilities, apply head_mask or attention "
                    "dropout; falling back to eager attention for those calls"
                )
            context, probs = attention_ref(*qkv.unbind(2), self.scaling, dropout_p, head_mask, return_probs=True)
        else:
            context, probs = backend.attention(qkv, self.scaling, dropout_p), None
        return context.reshape(batch, tokens, hidden), probs


def _split_qkv(module: VivitAttention, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for suffix in ("weight", "bias"):
        fused = state_dict.pop(prefix + "qkv." + suffix, None)
        if fused is not None:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), fused.chunk(3, dim=0)):
                state_dict[f"{prefix}{name}.{suffix}"] = part


def _fuse_qkv(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for suffix in ("weight", "bias"):
        names = [f"{prefix}{n}.{suffix}" for n in ("q_proj", "k_proj", "v_proj")]
        if all(n in state_dict for n in names):
            state_dict[f"{prefix}qkv.{suffix}"] = torch.cat([state_dict.pop(n) for n in names], dim=0)


class VivitMLP(nn.Module):
    def __init__(self, config: VivitConfig):
        super().__init__()
        self.activation = config.hidden_act
        get_activation(self.activation)  # fail at construction, not at the first forward
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)


class VivitLayer(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: VivitConfig):
        super().__init__()
        self.eps = config.layer_norm_eps
        self.attention = VivitAttention(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VivitMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def _project_add(self, backend: Backend, x: torch.Tensor, proj: nn.Linear, residual: torch.Tensor):
        """residual + dropout(proj(x)); the residual is fused into the projection when dropout is off."""
        if self.training and self.dropout.p > 0:
            return self.dropout(backend.linear(x, proj.weight, proj.bias)) + residual
        return backend.linear(x, proj.weight, proj.bias, residual=residual)

    def forward(
        self,
        x: torch.Tensor,
        backend: Backend,
        head_mask: Optional[torch.Tensor] = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        ln = self.layernorm_before
        h = backend.layer_norm(x, ln.weight, ln.bias, self.eps)
        context, probs = self.attention(h, backend, head_mask, output_attentions)
        x = self._project_add(backend, context, self.attention.o_proj, x)

        ln = self.layernorm_after
        h = backend.layer_norm(x, ln.weight, ln.bias, self.eps)
        fc1, fc2, act = self.mlp.fc1, self.mlp.fc2, self.mlp.activation
        if self.training and self.dropout.p > 0:
            return self.dropout(backend.mlp(h, fc1.weight, fc1.bias, fc2.weight, fc2.bias, act)) + x, probs
        return backend.mlp(h, fc1.weight, fc1.bias, fc2.weight, fc2.bias, act, residual=x), probs


class VivitPooler(nn.Module):
    def __init__(self, config: VivitConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.pooler_output_size)
        self.activation = get_activation(config.pooler_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------
class _VivitBase(PretrainedMixin, nn.Module):
    config: VivitConfig

    def _init_weights(self, module: nn.Module) -> None:
        """transformers' initialisation: N(0, initializer_range) weights, zero biases, unit LayerNorm."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv3d)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, VivitEmbeddings):
            nn.init.zeros_(module.cls_token)
            nn.init.zeros_(module.position_embeddings)

    def init_weights(self) -> None:
        with torch.no_grad():
            self.apply(self._init_weights)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def _resolve_config(config: VivitConfig | str | None) -> VivitConfig:
    if config is None:
        return VivitConfig()
    if isinstance(config, str):
        return VivitConfig.from_preset(config)
    if not isinstance(config, VivitConfig):
        raise TypeError(f"config must be a VivitConfig or a preset name, got {type(config).__name__}")
    return config


class VivitModel(_VivitBase):
    """The ViViT encoder: tubelet embeddings, ``num_hidden_layers`` blocks, final LayerNorm, optional pooler.

    Args:
        config: a :class:`VivitConfig`, a preset name ("vivit-b-16x2", "tiny", ...) or None for the defaults.
        add_pooling_layer: add the [CLS] dense + tanh pooler (``pooler_output``).
        attn: "eager", "sdpa" or "triton"; change it later with :meth:`set_attn`.
    """

    def __init__(self, config: VivitConfig | str | None = None, add_pooling_layer: bool = True, attn: str = "eager"):
        super().__init__()
        self.config = _resolve_config(config)
        self.embeddings = VivitEmbeddings(self.config)
        self.layers = nn.ModuleList([VivitLayer(self.config) for _ in range(self.config.num_hidden_layers)])
        self.layernorm = nn.LayerNorm(self.config.hidden_size, eps=self.config.layer_norm_eps)
        self.pooler = VivitPooler(self.config) if add_pooling_layer else None
        self.gradient_checkpointing = False
        self.register_load_state_dict_pre_hook(_accept_v4_keys)
        self.set_attn(attn)
        self.init_weights()

    # -- configuration -----------------------------------------------------------------------------
    def set_attn(self, attn: str) -> "VivitModel":
        """Choose the backend ("eager", "sdpa", "triton") for every following forward."""
        self.backend = get_backend(attn)
        return self

    @property
    def attn(self) -> str:
        return self.backend.name

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each layer in the backward pass instead of keeping its activations (training only)."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    # -- input checks ------------------------------------------------------------------------------
    def _check_pixel_values(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> torch.Tensor:
        cfg = self.config
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.dim() != 5:
            raise ValueError(
                "pixel_values must be 5-D (batch, frames, channels, height, width), "
                f"got shape {tuple(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be a floating-point tensor, got dtype {pixel_values.dtype}")
        _, frames, channels, height, width = pixel_values.shape
        if channels != cfg.num_channels:
            raise ValueError(
                f"pixel_values has {channels} channels in dim 2, expected num_channels={cfg.num_channels} "
                f"(layout is (batch, frames, channels, height, width); got shape {tuple(pixel_values.shape)})"
            )
        t, p, q = cfg.tubelet_size
        if interpolate_pos_encoding:
            if frames % t or height % p or width % q or frames < t or height < p or width < q:
                raise ValueError(
                    f"with interpolate_pos_encoding, frames/height/width must be positive multiples of the "
                    f"tubelet size {cfg.tubelet_size}, got {frames}x{height}x{width}"
                )
        else:
            if (height, width) != cfg.image_hw:
                raise ValueError(
                    f"input image size ({height}*{width}) doesn't match the model ({cfg.image_hw[0]}*"
                    f"{cfg.image_hw[1]}); pass interpolate_pos_encoding=True to run at another size"
                )
            if frames != cfg.num_frames:
                raise ValueError(
                    f"input has {frames} frames, the model expects num_frames={cfg.num_frames}; pass "
                    "interpolate_pos_encoding=True to run on another number of frames"
                )
        if pixel_values.device != self.device:
            raise ValueError(f"pixel_values is on {pixel_values.device}, the model is on {self.device}")
        return pixel_values.to(self.dtype)

    def _expand_head_mask(self, head_mask: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        """(H,) or (layers, H) -> one (1, H, 1, 1) mask per layer, in the model's dtype (transformers' rule)."""
        layers, heads = self.config.num_hidden_layers, self.config.num_attention_heads
        if head_mask is None:
            return [None] * layers
        head_mask = torch.as_tensor(head_mask, device=self.device)
        if head_mask.dim() == 1 and head_mask.shape[0] == heads:
            head_mask = head_mask.expand(layers, heads)
        if tuple(head_mask.shape) != (layers, heads):
            raise ValueError(
                f"head_mask must be shaped (num_heads,)=({heads},) or (num_hidden_layers, num_heads)="
                f"({layers}, {heads}), got {tuple(head_mask.shape)}"
            )
        return list(head_mask.to(self.dtype).view(layers, 1, heads, 1, 1).unbind(0))

    # -- forward -----------------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: torch.Tensor,
        head_mask: Optional[torch.Tensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        interpolate_pos_encoding: bool = False,
        return_dict: Optional[bool] = None,
    ):
        pixel_values = self._check_pixel_values(pixel_values, interpolate_pos_encoding)
        backend = self.backend
        if backend.check_inputs is not None:
            backend.check_inputs(pixel_values)
        head_masks = self._expand_head_mask(head_mask)
        output_attentions = bool(output_attentions)

        hidden_states = self.embeddings(pixel_values, backend, interpolate_pos_encoding)
        all_hidden: list[torch.Tensor] = [hidden_states] if output_hidden_states else []
        all_attentions: list[torch.Tensor] = []
        for layer, layer_head_mask in zip(self.layers, head_masks):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden_states, probs = checkpoint(
                    layer, hidden_states, backend, layer_head_mask, output_attentions, use_reentrant=False
                )
            else:
                hidden_states, probs = layer(hidden_states, backend, layer_head_mask, output_attentions)
            if output_hidden_states:
                all_hidden.append(hidden_states)
            if output_attentions:
                all_attentions.append(probs)

        ln = self.layernorm
        sequence_output = backend.layer_norm(hidden_states, ln.weight, ln.bias, self.config.layer_norm_eps)
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        out = VivitModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
        )
        return out if return_dict is None or return_dict else out.to_tuple()


def _accept_v4_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    convert_v4_keys(state_dict, prefix)


class VivitForVideoClassification(_VivitBase):
    """ViViT with a linear classifier on the final [CLS] state (400 Kinetics classes for the hub model)."""

    def __init__(self, config: VivitConfig | str | None = None, attn: str = "eager"):
        super().__init__()
        self.config = _resolve_config(config)
        self.num_labels = self.config.num_labels
        self.vivit = VivitModel(self.config, add_pooling_layer=False, attn=attn)
        self.classifier = (
            nn.Linear(self.config.hidden_size, self.num_labels) if self.num_labels > 0 else nn.Identity()
        )
        self.init_weights()

    def set_attn(self, attn: str) -> "VivitForVideoClassification":
        self.vivit.set_attn(attn)
        return self

    @property
    def attn(self) -> str:
        return self.vivit.attn

    def gradient_checkpointing_enable(self) -> None:
        self.vivit.gradient_checkpointing_enable()

    def gradient_checkpointing_disable(self) -> None:
        self.vivit.gradient_checkpointing_disable()

    def forward(
        self,
        pixel_values: torch.Tensor,
        head_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        interpolate_pos_encoding: bool = False,
        return_dict: Optional[bool] = None,
    ):
        outputs = self.vivit(
            pixel_values,
            head_mask=head_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        logits = self.classifier(outputs.last_hidden_state[:, 0, :])
        loss = self._loss(logits, labels) if labels is not None else None
        out = VivitClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return out if return_dict is None or return_dict else out.to_tuple()

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """transformers' rule: MSE for one label, cross-entropy for integer labels, else multi-label BCE."""
        problem_type = self.config.problem_type
        if problem_type is None:
            if self.num_labels == 1:
                problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem_type = "single_label_classification"
            else:
                problem_type = "multi_label_classification"
        labels = labels.to(logits.device)
        if problem_type == "regression":
            if self.num_labels == 1:
                return F.mse_loss(logits.squeeze().float(), labels.squeeze().float())
            return F.mse_loss(logits.float(), labels.float())
        if problem_type == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1))
        if problem_type == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        raise ValueError(f"unknown problem_type {problem_type!r}")
