"""A ViViT initialised from an image ViT, as the paper's section 3.4 does: Model 1 (transformers' ViViT) or, with
``attention_type``, the factorised Models 2, 3, 4 (``vivit_kernels.models``).

    from vivit_kernels.inflate import vivit_from_vit
    model = vivit_from_vit("google/vit-base-patch16-224", num_frames=32, tubelet_time=2, inflate="central",
                           id2label={0: "walk", 1: "run"})
    fsa = vivit_from_vit("google/vit-base-patch16-224", attention_type="factorized_self_attention")

- the tubelet embedding inflates the ViT's 2-D patch filter over the tubelet's ``t`` time steps: "central"
  puts the filter in the middle slice (index ``t // 2``) and zeros in the others, "average" puts ``filter / t``
  in every slice (a static video then embeds exactly as the image does);
- the position embeddings repeat the ViT's spatial table over the temporal grid (token ``k * n + s`` gets
  the ViT's row ``s``; [CLS] keeps its row; Models 3 and 4 have no [CLS]); Model 2's spatial encoder takes the
  ViT's table as it is (its tokens are one frame's);
- the encoder (attention, MLP, LayerNorms) and the final LayerNorm are the ViT's; the classifier is new.
  Model 2: the ViT's layers and final LayerNorm become the spatial encoder; the temporal encoder starts anew.
  Model 3: each block's spatial and temporal attention both take the ViT layer's attention and LayerNorm, and
  the temporal attention's output projection starts at zero, so every block computes exactly the ViT's block at
  initialisation (the paper zeroes the temporal attention; zeroing only its output projection gives the same
  function and leaves every weight a gradient). Model 4: the ViT's blocks as they are.

The ViViT config takes the ViT's sizes, activation, LayerNorm epsilon and qkv bias. So with "average", a
static video embeds, at every temporal step, exactly as its frame does in the ViT, and a clip of one tubelet
step gives the ViT's features; with "central", each step embeds as the ViT embeds the step's middle frame.
(With several steps the features differ from the image's: [CLS] is one token among repeated patch tokens.)
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["vivit_from_vit", "inflate_patch_filter", "repeat_position_table", "INFLATE_CHOICES"]

INFLATE_CHOICES = ("central", "average")


def inflate_patch_filter(weight: torch.Tensor, tubelet_time: int, how: str) -> torch.Tensor:
    """(D, C, p, q) image filter -> (D, C, t, p, q) tubelet filter ("central" or "average")."""
    if how not in INFLATE_CHOICES:
        raise ValueError(f"inflate must be one of {', '.join(INFLATE_CHOICES)}, got {how!r}")
    if weight.dim() != 4:
        raise ValueError(f"the ViT patch filter must be (hidden, channels, p, q), got shape {tuple(weight.shape)}")
    if how == "average":
        return (weight / tubelet_time).unsqueeze(2).repeat(1, 1, tubelet_time, 1, 1)
    out = weight.new_zeros(weight.shape[0], weight.shape[1], tubelet_time, *weight.shape[2:])
    out[:, :, tubelet_time // 2] = weight
    return out


def repeat_position_table(table: torch.Tensor, temporal_tokens: int) -> torch.Tensor:
    """(1, 1 + n, D) ViT table ([CLS] first) -> (1, 1 + temporal_tokens * n, D), time-major like ViViT's tokens."""
    cls, spatial = table[:, :1], table[:, 1:]
    return torch.cat([cls, spatial.repeat(1, temporal_tokens, 1)], dim=1)


def _vit_base(vit: Any):
    """The ViTModel inside a ViTForImageClassification (or the ViTModel itself)."""
    import transformers

    if isinstance(vit, transformers.ViTModel):
        return vit
    base = getattr(vit, "vit", None)
    if isinstance(base, transformers.ViTModel):
        return base
    raise TypeError(f"expected a transformers ViTModel or ViTForImageClassification, got {type(vit).__name__}")


def vivit_from_vit(vit: Any, num_frames: int = 32, tubelet_time: int = 2, inflate: str = "central",
                   id2label: dict[int, str] | None = None, attn: str | None = None,
                   attention_type: str | None = None, **config_overrides: Any):
    """A ``VivitForVideoClassification`` (or, with ``attention_type``, a ``VivitFactorizedForVideoClassification``
    of that type) initialised from ``vit`` (a transformers ViT model or a checkpoint path / hub name that
    ``ViTModel.from_pretrained`` reads). ``id2label`` names the new classifier's labels."""
    import transformers

    from .model import VivitConfig, VivitForVideoClassification
    from .models import VivitFactorizedConfig, VivitFactorizedForVideoClassification
    from .presets import ATTENTION_TYPES

    if inflate not in INFLATE_CHOICES:
        raise ValueError(f"inflate must be one of {', '.join(INFLATE_CHOICES)}, got {inflate!r}")
    if attention_type not in (None, *ATTENTION_TYPES):
        raise ValueError(f"attention_type must be None (Model 1) or one of {', '.join(ATTENTION_TYPES)}, "
                         f"got {attention_type!r}")
    if isinstance(vit, (str, os.PathLike)):
        vit = transformers.ViTModel.from_pretrained(str(vit), add_pooling_layer=False)
    base = _vit_base(vit)
    vc = base.config
    size = vc.image_size
    patch = vc.patch_size
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            raise ValueError(f"the ViT's patch_size {patch} is not square; ViViT's tubelets are (t, p, p) here")
        patch = patch[0]
    if num_frames % tubelet_time:
        raise ValueError(f"num_frames ({num_frames}) must be a multiple of the tubelet's time steps ({tubelet_time})")
    if vc.num_channels != 3:
        raise ValueError(f"the ViT takes {vc.num_channels} channels; ViViT takes RGB video (3)")
    labels = id2label or {0: "LABEL_0", 1: "LABEL_1"}
    fields = dict(image_size=size, num_frames=num_frames, tubelet_size=[tubelet_time, patch, patch],
                  hidden_size=vc.hidden_size, num_hidden_layers=vc.num_hidden_layers,
                  num_attention_heads=vc.num_attention_heads, intermediate_size=vc.intermediate_size,
                  hidden_act=vc.hidden_act, hidden_dropout_prob=vc.hidden_dropout_prob,
                  attention_probs_dropout_prob=vc.attention_probs_dropout_prob,
                  initializer_range=vc.initializer_range, layer_norm_eps=vc.layer_norm_eps, qkv_bias=vc.qkv_bias,
                  id2label={int(k): v for k, v in labels.items()}, label2id={v: int(k) for k, v in labels.items()})
    fields.update(config_overrides)
    if attention_type is None:
        config = VivitConfig(**fields)
    else:
        config = VivitFactorizedConfig(attention_type=attention_type, **fields)
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if getattr(config, name) != getattr(vc, name):
            raise ValueError(f"{name}: the ViT has {getattr(vc, name)}, the ViViT config asks for "
                             f"{getattr(config, name)}; the encoder weights cannot be copied")
    if list(config.tubelet_size[1:]) != [patch, patch]:
        raise ValueError(f"patch size: the ViT's patches are {patch}x{patch}, the tubelets' are "
                         f"{config.tubelet_size[1]}x{config.tubelet_size[2]}")
    model = (VivitForVideoClassification(config) if attention_type is None
             else VivitFactorizedForVideoClassification(config))
    target = model.vivit
    source = base.state_dict()
    grid = config.num_frames // config.tubelet_size[0]
    state = {name: _from_vit(name, value, source, config, attention_type, grid, inflate)
             for name, value in target.state_dict().items()}
    target.load_state_dict({k: v for k, v in state.items() if v is not None}, strict=False)  # None: keeps its init
    model.set_attn(attn)
    return model


def _from_vit(name: str, value: torch.Tensor, source: dict, config, attention_type: str | None, grid: int,
              inflate: str) -> torch.Tensor | None:
    """The ViT's weight for the ViViT's parameter ``name`` (None: it keeps its initialisation)."""
    if name == "embeddings.patch_embeddings.projection.weight":
        return inflate_patch_filter(source[name], config.tubelet_size[0], inflate)
    if name == "embeddings.position_embeddings":
        vit_table = source[name]
        patches = vit_table.shape[1] - 1
        has_cls = attention_type in (None, "factorized_encoder")
        per_step = (value.shape[1] - has_cls) // (1 if attention_type == "factorized_encoder" else grid)
        if patches != per_step:
            raise ValueError(f"position embeddings: the ViT has {patches} patches per image, the ViViT needs "
                             f"{per_step} per temporal step (image_size {config.image_size} vs the ViT's)")
        if attention_type is None:
            return repeat_position_table(vit_table, grid)
        if attention_type == "factorized_encoder":
            return vit_table  # the spatial encoder's tokens are one temporal index's: the image's table
        return vit_table[:, 1:].repeat(1, grid, 1)  # no [CLS]
    if attention_type == "factorized_encoder":
        if name.startswith(("temporal_", "layernorm.")):
            return None  # the temporal encoder and the final LayerNorm start anew
        key = name.replace("spatial_layers.", "layers.", 1).replace("spatial_layernorm.", "layernorm.", 1)
    elif attention_type == "factorized_self_attention":
        if name.endswith(("temporal_attention.o_proj.weight", "temporal_attention.o_proj.bias")):
            return torch.zeros_like(value)  # the temporal attention adds nothing at initialisation
        key = name.replace("layer.", "layers.", 1) if name.startswith("layer.") else name
        key = key.replace("spatial_attention.", "attention.").replace("temporal_attention.", "attention.")
        key = key.replace("layernorm_spatial.", "layernorm_before.").replace("layernorm_temporal.", "layernorm_before.")
    elif attention_type == "factorized_dot_product":
        key = name.replace("layer.", "layers.", 1) if name.startswith("layer.") else name
    else:
        key = name
    if key not in source:
        raise ValueError(f"{name}: the ViViT has this parameter and the ViT has no {key!r} (ViT keys such as "
                         f"{next(iter(source))!r}); is this a transformers ViT checkpoint?")
    if source[key].shape != value.shape:
        raise ValueError(f"{name}: the ViT's {key} is {tuple(source[key].shape)}, the ViViT's {tuple(value.shape)}")
    return source[key]
