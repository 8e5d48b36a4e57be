"""A ViViT (Model 1) initialised from an image ViT, as the paper's section 3.4 does.

    from vivit_kernels.inflate import vivit_from_vit
    model = vivit_from_vit("google/vit-base-patch16-224", num_frames=32, tubelet_time=2, inflate="central",
                           id2label={0: "walk", 1: "run"})

- the tubelet embedding inflates the ViT's 2-D patch filter over the tubelet's ``t`` time steps: "central"
  puts the filter in the middle slice (index ``t // 2``) and zeros in the others, "average" puts ``filter / t``
  in every slice (a static video then embeds exactly as the image does);
- the position embeddings repeat the ViT's spatial table over the temporal grid (token ``k * n + s`` gets
  the ViT's row ``s``; [CLS] keeps its row);
- the encoder (attention, MLP, LayerNorms) and the final LayerNorm are the ViT's; the classifier is new.

The ViViT config takes the ViT's sizes, activation, LayerNorm epsilon and qkv bias. So with "average", a
static video embeds, at every temporal step, exactly as its frame does in the ViT, and a clip of one tubelet
step gives the ViT's features; with "central", each step embeds as the ViT embeds the step's middle frame.
(With several steps the features differ from the image's: [CLS] is one token among repeated patch tokens.)
"""

from __future__ import annotations

import os
from typing import Any, Optional

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
                   id2label: Optional[dict[int, str]] = None, attn: Optional[str] = None, **config_overrides: Any):
    """A ``VivitForVideoClassification`` initialised from ``vit`` (a transformers ViT model or a checkpoint
    path / hub name that ``ViTModel.from_pretrained`` reads). ``id2label`` names the new classifier's labels."""
    import transformers

    from .model import VivitConfig, VivitForVideoClassification

    if inflate not in INFLATE_CHOICES:
        raise ValueError(f"inflate must be one of {', '.join(INFLATE_CHOICES)}, got {inflate!r}")
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
    config = VivitConfig(**fields)
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if getattr(config, name) != getattr(vc, name):
            raise ValueError(f"{name}: the ViT has {getattr(vc, name)}, the ViViT config asks for "
                             f"{getattr(config, name)}; the encoder weights cannot be copied")
    if list(config.tubelet_size[1:]) != [patch, patch]:
        raise ValueError(f"patch size: the ViT's patches are {patch}x{patch}, the tubelets' are "
                         f"{config.tubelet_size[1]}x{config.tubelet_size[2]}")
    model = VivitForVideoClassification(config)
    target = model.vivit
    source = base.state_dict()
    state = {}
    grid = config.num_frames // config.tubelet_size[0]
    for name, value in target.state_dict().items():
        if name == "embeddings.patch_embeddings.projection.weight":
            state[name] = inflate_patch_filter(source[name], config.tubelet_size[0], inflate)
        elif name == "embeddings.position_embeddings":
            vit_table = source[name]
            if vit_table.shape[1] * grid - (grid - 1) != value.shape[1]:
                raise ValueError(f"position embeddings: the ViT has {vit_table.shape[1] - 1} patches per image, the "
                                 f"ViViT's {grid} temporal steps need {(value.shape[1] - 1) // grid} per step "
                                 f"(image_size {config.image_size} vs the ViT's {size})")
            state[name] = repeat_position_table(vit_table, grid)
        elif name in source:
            if source[name].shape != value.shape:
                raise ValueError(f"{name}: the ViT's is {tuple(source[name].shape)}, the ViViT's {tuple(value.shape)}")
            state[name] = source[name]
        else:
            raise ValueError(f"{name}: the ViViT has this parameter and the ViT does not (ViT keys such as "
                             f"{next(iter(source))!r}); is this a transformers ViT checkpoint?")
    target.load_state_dict(state)
    model.set_attn(attn)
    return model
