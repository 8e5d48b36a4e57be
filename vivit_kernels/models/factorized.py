"""ViViT Model 2, the factorised encoder (Arnab et al. 2021, section 3.3), on our kernels.

A spatial encoder runs over each temporal index's tubelet tokens with a [CLS] token of its own (``num_hidden_layers``
layers); the [CLS] outputs, one per temporal index, go with a temporal [CLS] through a temporal encoder
(``num_temporal_layers`` layers); its [CLS] feeds the classifier. The layers are transformers' ``VivitLayer``s, so
``attn="triton"`` / ``"auto"`` put the same kernels behind them as behind Model 1 (``apply_vivit_kernels``), and
the tubelet embedding is our fused patch-embedding kernel reading the clip as (batch x temporal indices) clips
of one tubelet step each, in place. Scenic's name for it: ``factorized_encoder``.

``factorized_reference_forward`` is the model written out from the paper in plain torch ops over the model's
parameters: what the tests hold the modules (eager and ours) to.

Models 3 (factorised self-attention) and 4 (factorised dot-product) are not here yet: their temporal attention
reads the tokens of one spatial position across time, which our attention kernels can read in place only with
a second head index (the projections' packed layout); ``attention_type`` names them and says so.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForVideoClassification
from transformers.modeling_outputs import BaseModelOutput, ImageClassifierOutput
from transformers.models.vivit import configuration_vivit as hf_config
from transformers.models.vivit import modeling_vivit as hf

from ..modules import _KernelModule, _autocast_dtype, _plain, _w
from ..patch import AttnMixin

__all__ = ["ATTENTION_TYPES", "FACTORIZED_PRESETS", "VivitFactorizedConfig", "VivitFactorizedModel",
           "VivitFactorizedForVideoClassification", "factorized_reference_forward"]

# scenic's names for the paper's Models 2, 3, 4
ATTENTION_TYPES = ("factorized_encoder", "factorized_self_attention", "factorized_dot_product")
IMPLEMENTED = ("factorized_encoder",)

FACTORIZED_PRESETS: dict[str, dict[str, Any]] = {
    # ViViT-B/16x2 factorised encoder as the paper trains it on Kinetics: 12 spatial + 4 temporal layers
    "vivit-b-16x2-fe": {"attention_type": "factorized_encoder", "num_temporal_layers": 4, "num_labels": 400},
    # for CPU tests: the tiny preset's sizes, 2 spatial + 1 temporal layers
    "tiny-fe": {"attention_type": "factorized_encoder", "num_temporal_layers": 1, "image_size": 32, "num_frames": 4,
                "tubelet_size": [2, 16, 16], "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "intermediate_size": 128, "num_labels": 10},
}


@strict
class VivitFactorizedConfig(hf_config.VivitConfig):
    """transformers' VivitConfig plus ``attention_type`` (scenic's names) and, for the factorised encoder,
    ``num_temporal_layers`` (``num_hidden_layers`` is the spatial encoder's depth)."""

    model_type = "vivit_factorized"
    attention_type: str = "factorized_encoder"
    num_temporal_layers: int = 4

    def __post_init__(self, **kwargs):
        if self.attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type must be one of {', '.join(ATTENTION_TYPES)}, got {self.attention_type!r}")
        super().__post_init__(**kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "VivitFactorizedConfig":
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
    if config.attention_type not in IMPLEMENTED:
        raise NotImplementedError(
            f"attention_type={config.attention_type!r} (the paper's Model {3 + (config.attention_type[-3:] == 'uct')}) "
            f"is not implemented yet; available: {', '.join(IMPLEMENTED)}")
    return config


def _grid(config) -> tuple[int, int, int]:
    """(temporal indices, patches per frame in height, in width) of the configured clip."""
    t, p, q = config.tubelet_size
    size = config.image_size
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return config.num_frames // t, h // p, w // q


class FactorizedEncoderEmbeddings(_KernelModule, nn.Module):
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

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        config = self.config
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 5:
            raise ValueError("pixel_values must be a 5-D tensor (batch, frames, channels, height, width), got "
                             f"{getattr(pixel_values, 'shape', type(pixel_values).__name__)}")
        batch, frames, channels, height, width = pixel_values.shape
        t = config.tubelet_size[0]
        steps, gh, gw = _grid(config)
        size = config.image_size
        expected_hw = (size, size) if isinstance(size, int) else tuple(size)
        if frames != config.num_frames or (height, width) != tuple(expected_hw) or channels != config.num_channels:
            raise ValueError(
                f"pixel_values of {frames} frames of {channels}x{height}x{width}: the factorised model was built for "
                f"{config.num_frames} frames of {config.num_channels}x{expected_hw[0]}x{expected_hw[1]} "
                "(interpolate_pos_encoding is not supported by the factorised models)")
        proj = self.patch_embeddings.projection
        autocast = _autocast_dtype(pixel_values.device.type)  # None, or the dtype our kernels then compute in
        clips = pixel_values.to(autocast or proj.weight.dtype)
        clips = clips.reshape(batch * steps, t, channels, height, width)  # a view for a contiguous clip: no copy
        backend = self._vivit_backend
        if backend is not None and _plain(proj, nn.Conv3d, clips, "embeddings.patch_embeddings.projection"):
            out = backend.patch_embed(clips, _w(proj.weight, clips), _w(proj.bias, clips), _w(self.cls_token, clips),
                                      _w(self.position_embeddings, clips))
        else:
            tokens = self.patch_embeddings(clips)  # (batch * T', h * w, hidden)
            out = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens), 1)
            out = out + self.position_embeddings.to(out.dtype)
        return self.dropout(out)


class VivitFactorizedPreTrainedModel(hf.VivitPreTrainedModel):
    config_class = VivitFactorizedConfig
    config: VivitFactorizedConfig
    _no_split_modules = ["FactorizedEncoderEmbeddings", "VivitLayer"]
    _can_compile_fullgraph = False

    @classmethod
    def is_custom_code(cls) -> bool:
        return False

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, FactorizedEncoderEmbeddings):
            nn.init.zeros_(module.cls_token)
            nn.init.zeros_(module.position_embeddings)
        elif isinstance(module, VivitFactorizedModel):
            nn.init.zeros_(module.temporal_cls_token)
            nn.init.zeros_(module.temporal_position_embeddings)


class VivitFactorizedModel(AttnMixin, VivitFactorizedPreTrainedModel):
    """The factorised encoder's base model: ``last_hidden_state`` is the temporal encoder's output (after its
    LayerNorm), [CLS] first, then one token per temporal index.

    Args:
        config: a VivitFactorizedConfig, a preset name ("vivit-b-16x2-fe", "tiny-fe") or None for the defaults.
        attn: "eager", "sdpa", "triton" or "auto", as for Model 1.
    """

    _vivit_base = True  # apply_vivit_kernels treats it as it treats transformers' VivitModel

    def __init__(self, config=None, attn: Optional[str] = None):
        config = _resolve(config)
        super().__init__(config)
        steps, _, _ = _grid(config)
        self.embeddings = FactorizedEncoderEmbeddings(config)
        self.spatial_layers = nn.ModuleList([hf.VivitLayer(config) for _ in range(config.num_hidden_layers)])
        self.spatial_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.temporal_cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.temporal_position_embeddings = nn.Parameter(torch.zeros(1, 1 + steps, config.hidden_size))
        self.temporal_layers = nn.ModuleList([hf.VivitLayer(config) for _ in range(config.num_temporal_layers)])
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()
        self.set_attn(attn)

    @property
    def layers(self) -> list:
        """Every encoder layer, spatial then temporal (what apply_vivit_kernels numbers)."""
        return [*self.spatial_layers, *self.temporal_layers]

    def get_input_embeddings(self):
        return self.embeddings.patch_embeddings

    def forward(self, pixel_values: Optional[torch.Tensor] = None, interpolate_pos_encoding: bool = False,
                attention_mask: Optional[torch.Tensor] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None, **kwargs) -> BaseModelOutput:
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        if interpolate_pos_encoding:
            raise ValueError("interpolate_pos_encoding is not supported by the factorised models: build the model for "
                             "the clip size (num_frames, image_size) it will see")
        if attention_mask is not None or kwargs.get("head_mask") is not None:
            raise ValueError("the factorised models take no attention_mask or head_mask (videos have no padding)")
        batch = pixel_values.shape[0]
        steps = _grid(self.config)[0]
        hidden = [] if output_hidden_states else None
        x = self.embeddings(pixel_values)
        for layer in self.spatial_layers:
            x = layer(x)
            if hidden is not None:
                hidden.append(x)
        frames = self.spatial_layernorm(x)[:, 0].reshape(batch, steps, -1)
        cls = self.temporal_cls_token.expand(batch, -1, -1).to(frames.dtype)
        y = torch.cat((cls, frames), 1) + self.temporal_position_embeddings.to(frames.dtype)
        for layer in self.temporal_layers:
            y = layer(y)
            if hidden is not None:
                hidden.append(y)
        out = BaseModelOutput(last_hidden_state=self.layernorm(y), hidden_states=tuple(hidden) if hidden else None)
        return out if return_dict is not False else out.to_tuple()


class VivitFactorizedForVideoClassification(AttnMixin, VivitFactorizedPreTrainedModel):
    """The factorised encoder with a linear classifier on the temporal [CLS]."""

    def __init__(self, config=None, attn: Optional[str] = None):
        config = _resolve(config)
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vivit = VivitFactorizedModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()
        self.set_attn(attn)

    def forward(self, pixel_values: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                interpolate_pos_encoding: bool = False, return_dict: Optional[bool] = None, **kwargs):
        outputs = self.vivit(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True,
                             **kwargs)
        logits = self.classifier(outputs.last_hidden_state[:, 0])
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        out = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
        return out if return_dict is not False else out.to_tuple()


# ------------------------------------------------------------------------------------------------
# The reference: the paper's Model 2 in plain torch ops over a model's parameters
# ------------------------------------------------------------------------------------------------
def _reference_layer(p: dict[str, torch.Tensor], prefix: str, x: torch.Tensor, heads: int, eps: float,
                     act) -> torch.Tensor:
    def linear(name, v):
        return F.linear(v, p[f"{prefix}.{name}.weight"], p.get(f"{prefix}.{name}.bias"))

    def norm(name, v):
        return F.layer_norm(v, v.shape[-1:], p[f"{prefix}.{name}.weight"], p[f"{prefix}.{name}.bias"], eps)

    b, n, d = x.shape
    h = norm("layernorm_before", x)
    q, k, v = (linear(f"attention.{m}_proj", h).view(b, n, heads, d // heads).transpose(1, 2) for m in "qkv")
    weights = (q @ k.transpose(-1, -2) * (d // heads) ** -0.5).softmax(-1)
    x = x + linear("attention.o_proj", (weights @ v).transpose(1, 2).reshape(b, n, d))
    return x + linear("mlp.fc2", act(linear("mlp.fc1", norm("layernorm_after", x))))


def factorized_reference_forward(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The factorised encoder's logits (or, for a base model, its last hidden state) computed from the paper's
    definition with plain torch ops over ``model``'s parameters (eval mode: no dropout)."""
    from transformers.activations import ACT2FN

    base = model.vivit if isinstance(model, VivitFactorizedForVideoClassification) else model
    config = base.config
    p = {n: t for n, t in base.named_parameters()}
    act, heads, eps = ACT2FN[config.hidden_act], config.num_attention_heads, config.layer_norm_eps
    batch, frames, channels, height, width = pixel_values.shape
    t = config.tubelet_size[0]
    x = pixel_values.to(p["layernorm.weight"].dtype).permute(0, 2, 1, 3, 4)  # (batch, channels, frames, H, W)
    tokens = F.conv3d(x, p["embeddings.patch_embeddings.projection.weight"],
                      p["embeddings.patch_embeddings.projection.bias"], stride=config.tubelet_size)
    steps = frames // t
    tokens = tokens.flatten(3).permute(0, 2, 3, 1)  # (batch, T', h * w, hidden): per temporal index
    d = tokens.shape[-1]
    spatial = torch.cat((p["embeddings.cls_token"].expand(batch * steps, 1, d),
                         tokens.reshape(batch * steps, -1, d)), 1) + p["embeddings.position_embeddings"]
    for i in range(config.num_hidden_layers):
        spatial = _reference_layer(p, f"spatial_layers.{i}", spatial, heads, eps, act)
    spatial = F.layer_norm(spatial, (d,), p["spatial_layernorm.weight"], p["spatial_layernorm.bias"], eps)
    temporal = torch.cat((p["temporal_cls_token"].expand(batch, 1, d), spatial[:, 0].reshape(batch, steps, d)), 1)
    temporal = temporal + p["temporal_position_embeddings"]
    for i in range(config.num_temporal_layers):
        temporal = _reference_layer(p, f"temporal_layers.{i}", temporal, heads, eps, act)
    out = F.layer_norm(temporal, (d,), p["layernorm.weight"], p["layernorm.bias"], eps)
    if base is model:
        return out
    return F.linear(out[:, 0], model.classifier.weight, model.classifier.bias)


AutoConfig.register(VivitFactorizedConfig.model_type, VivitFactorizedConfig, exist_ok=True)
AutoModel.register(VivitFactorizedConfig, VivitFactorizedModel, exist_ok=True)
AutoModelForVideoClassification.register(VivitFactorizedConfig, VivitFactorizedForVideoClassification, exist_ok=True)
