"""ViViT as transformers' own model, with vivit_kernels' kernels behind its modules.

``VivitModel`` and ``VivitForVideoClassification`` are transformers' classes (``PreTrainedModel``: the same
module tree, state dict, config, loading, saving, output classes, gradient checkpointing) with:

- ``attn``: "eager" or "sdpa" (transformers' own attention), "triton" (our kernels behind the modules) or "auto"
  (per op, the fastest implementation measured on this GPU); ``set_attn`` changes it;
- ``head_mask`` (keyword-only): the seed's argument, with transformers 4.x's meaning (5.x removed it);
- ``interpolate_pos_encoding`` over the (T', h, w) tubelet grid (transformers reads the ViViT table as one square
  2-D grid), and inputs that are not tubelet multiples, whose remainder is dropped as Conv3d drops it.

``apply_vivit_kernels(model, attn)`` (``monkey_patch.py``) does the same to a ViViT model transformers loaded
(possibly wrapped by PEFT). Where things live: the kernel-backed module subclasses in ``modules.py``,
which modules they compute around in ``plain_modules.py`` (PEFT's LoRA in ``peft_lora.py``), the class swap in
``monkey_patch.py``, checkpoint hardening in ``checkpoint.py``, the ops in
``ops/registry.py``; this file holds the public classes, presets and the forwards transformers gets wrong.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.vivit import configuration_vivit as hf_config
from transformers.models.vivit import modeling_vivit as hf

from ._compat import ActivationCheckpointingNames
from .modules import _UNMASKED
from .monkey_patch import AttnMixin
from .presets import PRESETS

__all__ = ["VivitConfig", "VivitModel", "VivitForVideoClassification"]



# --------------------------------------------------------------------------------------------------
# Config: transformers' VivitConfig, plus named presets
# --------------------------------------------------------------------------------------------------
class VivitConfig(hf_config.VivitConfig):
    """transformers' ``VivitConfig`` (same fields, defaults and config.json), with named presets."""

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> VivitConfig:
        """A preset ("vivit-b-16x2", "vivit-l-16x2", "small", "tiny") with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})


def resolve_config(config) -> hf_config.VivitConfig:
    """A VivitConfig from a config, a preset name, or None (the defaults); a clear error otherwise."""
    if config is None:
        return VivitConfig()
    if isinstance(config, str):
        return VivitConfig.from_preset(config)
    if not isinstance(config, hf_config.VivitConfig):
        raise TypeError(
            f"config must be a VivitConfig or a preset name ({', '.join(PRESETS)}), got {type(config).__name__}"
        )
    return config


def _expand_head_mask(config, head_mask, device, dtype) -> torch.Tensor | None:
    """(H,) or (layers, H) -> (layers, 1, H, 1, 1), transformers 4.x's rule; None stays None."""
    if head_mask is None:
        return None
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    head_mask = torch.as_tensor(head_mask, device=device)
    if head_mask.dim() == 1 and head_mask.shape[0] == heads:
        head_mask = head_mask.expand(layers, heads)
    if tuple(head_mask.shape) != (layers, heads):
        raise ValueError(f"head_mask must be shaped (num_heads,)=({heads},) or (num_hidden_layers, num_heads)="
                         f"({layers}, {heads}), got {tuple(head_mask.shape)}")
    return head_mask.to(dtype).view(layers, 1, heads, 1, 1)


class VivitModel(AttnMixin, ActivationCheckpointingNames, hf.VivitModel):
    """transformers' ``VivitModel`` with ``attn`` (see the module docstring).

    Args:
        config: a VivitConfig, a preset name ("vivit-b-16x2", "tiny", ...) or None for the defaults.
        add_pooling_layer: add the [CLS] dense + tanh pooler (``pooler_output``).
        attn: "eager", "sdpa", "triton" or "auto"; None keeps transformers' attention implementation.
    """

    config_class = VivitConfig

    def __init__(self, config=None, add_pooling_layer: bool = True, attn: str | None = None):
        super().__init__(resolve_config(config), add_pooling_layer)
        self.set_attn(attn)

    def forward(self, pixel_values: torch.Tensor | None = None, interpolate_pos_encoding: bool = False,
                attention_mask: torch.Tensor | None = None, *, head_mask: torch.Tensor | None = None, **kwargs):
        """transformers' forward; ``head_mask`` (num_heads,) or (num_hidden_layers, num_heads) multiplies each
        layer's attention probabilities (transformers 4.x's meaning), with eager attention for that call."""
        if head_mask is not None:
            kwargs["head_mask"] = _expand_head_mask(self.config, head_mask, self.device, self.dtype)
        if attention_mask is None:
            kwargs[_UNMASKED] = True
        return super().forward(pixel_values, interpolate_pos_encoding, attention_mask, **kwargs)


class VivitForVideoClassification(AttnMixin, ActivationCheckpointingNames, hf.VivitForVideoClassification):
    """transformers' ``VivitForVideoClassification`` with ``attn`` (see the module docstring)."""

    config_class = VivitConfig

    def __init__(self, config=None, attn: str | None = None):
        super().__init__(resolve_config(config))
        self.set_attn(attn)

    def forward(self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                interpolate_pos_encoding: bool = False, *, head_mask: torch.Tensor | None = None, **kwargs):
        """transformers' forward (``labels`` second, as in transformers 5); ``head_mask`` as in VivitModel.

        Written out (ten lines) instead of calling transformers' because transformers 5.24's forward fails with
        ``config.return_dict=False``: its base model then returns a tuple the head reads as an output object."""
        return_dict = kwargs.pop("return_dict", None)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if head_mask is not None:
            kwargs["head_mask"] = _expand_head_mask(self.config, head_mask, self.device, self.dtype)
        if kwargs.get("attention_mask") is None:
            kwargs[_UNMASKED] = True
        outputs = self.vivit(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs
        )
        logits = self.classifier(outputs.last_hidden_state[:, 0, :])
        loss = self.loss_function(labels, logits, self.config, **kwargs) if labels is not None else None
        out = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                    attentions=outputs.attentions)
        return out if return_dict else out.to_tuple()


# the paper's factorised models, registered with transformers' Auto classes whenever our model classes are used
from . import models as _factorized_models  # noqa: E402,F401
