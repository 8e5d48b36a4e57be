"""ViViT as transformers' own model, with vivit_kernels' kernels behind its modules.

``VivitModel`` and ``VivitForVideoClassification`` are transformers' classes (``PreTrainedModel``: the same
module tree, state dict, config, loading, saving, output classes, gradient checkpointing) with:

- ``attn``: "eager" or "sdpa" (transformers' own attention), "triton" (our kernels behind the modules) or "auto"
  (per op, the fastest implementation measured on this GPU); ``set_attn`` changes it;
- ``head_mask`` (keyword-only): the seed's argument, with transformers 4.x's meaning (5.x removed it);
- ``interpolate_pos_encoding`` over the (T', h, w) tubelet grid (transformers reads the ViViT table as one square
  2-D grid), and inputs that are not tubelet multiples, whose remainder is dropped as Conv3d drops it.

``apply_vivit_kernels(model, attn)`` does the same to a ViViT model transformers loaded (possibly wrapped by
PEFT): it swaps the classes of the embeddings, attention, layer and LayerNorm modules for subclasses whose
``forward`` runs our kernels. Parameters, buffers and state-dict names do not change. A layer fuses work across
modules (the three projections in one GEMM, the residual into the output projection, the MLP into two GEMMs)
only where the modules are the plain ones it knows (nn.Linear, nn.LayerNorm, nn.Conv3d, transformers' ViViT
modules) without hooks; a wrapped or replaced module (a LoRA layer, a quantized linear, a hooked module) runs
its own forward, the rest stays on our kernels, and one log line says what fell back and why.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_state
from transformers.activations import FastGELUActivation
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.vivit import configuration_vivit as hf_config
from transformers.models.vivit import modeling_vivit as hf

from .backends import ATTN_CHOICES, Backend, get_backend
from .ops.attention import attention_ref
from ._compat import ActivationCheckpointingNames
from .presets import PRESETS

__all__ = ["VivitConfig", "VivitModel", "VivitForVideoClassification", "apply_vivit_kernels", "PRESETS",
           "CheckpointError", "image_hw", "num_tokens"]

logger = logging.getLogger("vivit_kernels")


# --------------------------------------------------------------------------------------------------
# Config: transformers' VivitConfig, plus named presets
# --------------------------------------------------------------------------------------------------
class VivitConfig(hf_config.VivitConfig):
    """transformers' ``VivitConfig`` (same fields, defaults and config.json), with named presets."""

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "VivitConfig":
        """A preset ("vivit-b-16x2", "vivit-l-16x2", "small", "tiny") with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})


def image_hw(config) -> tuple[int, int]:
    """(height, width) of the frames a ViViT config was built for."""
    size = config.image_size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def num_tokens(config) -> int:
    """Tokens per clip: the tubelet grid of the configured input, plus [CLS]."""
    t, p, q = config.tubelet_size
    h, w = image_hw(config)
    return (config.num_frames // t) * (h // p) * (w // q) + 1


def _resolve_config(config) -> hf_config.VivitConfig:
    if config is None:
        return VivitConfig()
    if isinstance(config, str):
        return VivitConfig.from_preset(config)
    if not isinstance(config, hf_config.VivitConfig):
        raise TypeError(f"config must be a VivitConfig or a preset name ({', '.join(PRESETS)}), got {type(config).__name__}")
    return config


# --------------------------------------------------------------------------------------------------
# What may be fused: plain modules without hooks
# --------------------------------------------------------------------------------------------------
_logged: set[str] = set()


def _log_once(key: str, message: str) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.warning(message)


def _is_capture_hook(hook) -> bool:
    """transformers' output-capturing hooks (hidden states, attentions) stay installed once used and do
    nothing unless outputs are being collected; they do not make a module 'hooked'."""
    return getattr(hook, "__name__", "") == "output_capturing_hook"


def _hooks(module: nn.Module) -> bool:
    """Whether calling around ``module`` (instead of calling it) would skip hooks someone relies on."""
    if module._forward_pre_hooks or any(not _is_capture_hook(h) for h in module._forward_hooks.values()):
        return True
    return bool(_module_state._global_forward_hooks or _module_state._global_forward_pre_hooks)


def _collecting_attentions() -> bool:
    """Whether transformers is collecting attention probabilities in this forward (output_attentions)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - another transformers layout: be safe, treat as collecting
        return True
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


def _why_not_plain(module: nn.Module, kind: type, x: torch.Tensor) -> Optional[str]:
    """None when ``module`` is exactly ``kind`` (or our kernel subclass of it), has no hooks and matches x's
    dtype and device; otherwise why not."""
    if not (type(module) is kind or type(module) in _KERNEL_CLASSES.get(kind, ())):
        return f"is a {type(module).__module__}.{type(module).__qualname__}, not a plain {kind.__name__}"
    if _hooks(module):
        return "has forward hooks"
    weight = getattr(module, "weight", None)
    if weight is None or weight.dtype != x.dtype or weight.device != x.device:
        return f"holds {None if weight is None else weight.dtype} weights for {x.dtype} inputs (autocast or a dtype mix)"
    return None


def _plain(module: nn.Module, kind: type, x: torch.Tensor, where: str) -> bool:
    """Whether ``module`` (at ``where`` in the model) may be computed around instead of called; logs once why not."""
    why = _why_not_plain(module, kind, x)
    if why is not None:
        where = re.sub(r"\.layers\.\d+\.", ".layers.*.", where)  # one line for that module of every layer
        _log_once(f"{where}:{why}", f"vivit_kernels: {where} {why}: it runs its own forward; the rest of the layer "
                                    "stays on vivit_kernels' kernels")
    return why is None


def _name(module: nn.Module, child: str) -> str:
    return f"{getattr(module, '_vivit_name', type(module).__name__)}.{child}"


def _linear(backend: Backend, module: nn.Module, where: str, x: torch.Tensor, activation_fn=None,
            residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``residual + activation_fn(module(x))`` for a linear submodule: one GEMM with the bias, gelu_fast and the
    residual in its epilogue when it is a plain nn.Linear (another activation runs after it in torch), else the
    module's own forward followed by the activation and the residual."""
    fused_gelu = isinstance(activation_fn, FastGELUActivation)
    if _plain(module, nn.Linear, x, where):
        if activation_fn is None or fused_gelu:
            return backend.linear(x, module.weight, module.bias, "gelu_fast" if fused_gelu else None, residual)
        y = activation_fn(backend.linear(x, module.weight, module.bias))
    else:
        y = module(x)
        if activation_fn is not None:
            y = activation_fn(y)
    return y if residual is None else y + residual


# --------------------------------------------------------------------------------------------------
# Modules: transformers' ViViT modules with a kernel forward (same parameters and names)
# --------------------------------------------------------------------------------------------------
class KernelLayerNorm(nn.LayerNorm):
    """nn.LayerNorm that runs the backend's LayerNorm kernel (same parameters; eps and affine as configured)."""

    _vivit_backend: Backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or self.bias is None or len(self.normalized_shape) != 1 or x.dtype != self.weight.dtype:
            return super().forward(x)
        return self._vivit_backend.layer_norm(x, self.weight, self.bias, self.eps)


class KernelVivitEmbeddings(hf.VivitEmbeddings):
    """transformers' embeddings with clear input errors, the (T', h, w) position interpolation, Conv3d's handling
    of sizes that are not tubelet multiples, and (with a kernel backend) the fused patch-embedding kernel."""

    _vivit_backend: Optional[Backend] = None

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        pixel_values = self._checked(pixel_values, interpolate_pos_encoding)
        batch, frames, _, height, width = pixel_values.shape
        t, p, q = self._tubelet
        pos = self.position_table((frames // t, height // p, width // q)) if interpolate_pos_encoding else self.position_embeddings
        backend = self._vivit_backend
        tubelets, proj = self.patch_embeddings, self.patch_embeddings.projection
        if backend is not None and self._fusable(tubelets, proj, pixel_values):
            embeddings = backend.patch_embed(pixel_values, proj.weight, proj.bias, self.cls_token, pos)
        else:
            embeddings = torch.cat((self.cls_token.expand(batch, -1, -1), tubelets(pixel_values)), dim=1) + pos
        return self.dropout(embeddings)

    @property
    def _tubelet(self) -> tuple[int, int, int]:
        return tuple(self.patch_embeddings.projection.kernel_size)

    def _fusable(self, tubelets: nn.Module, proj: nn.Module, x: torch.Tensor) -> bool:
        if type(tubelets) is not hf.VivitTubeletEmbeddings or _hooks(tubelets):
            _log_once("patch_embeddings", "vivit_kernels: the patch embeddings module is replaced or hooked: it runs "
                                          "its own forward")
            return False
        if not _plain(proj, nn.Conv3d, x, _name(self, "patch_embeddings.projection")):
            return False
        return (tuple(proj.stride) == tuple(proj.kernel_size) and proj.padding in ((0, 0, 0), "valid")
                and tuple(proj.dilation) == (1, 1, 1) and proj.groups == 1 and proj.padding_mode == "zeros")

    def _checked(self, pixel_values, interpolate_pos_encoding: bool) -> torch.Tensor:
        """Errors that say what was expected and what was given; the input cast to the model's dtype."""
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.dim() != 5:
            raise ValueError("pixel_values must be 5-D (batch, frames, channels, height, width), "
                             f"got shape {tuple(pixel_values.shape)}")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be a floating-point tensor, got dtype {pixel_values.dtype}")
        _, frames, channels, height, width = pixel_values.shape
        expected_channels = self.patch_embeddings.projection.in_channels
        if channels != expected_channels:
            raise ValueError(
                f"pixel_values has {channels} channels in dim 2, expected num_channels={expected_channels} "
                f"(layout is (batch, frames, channels, height, width); got shape {tuple(pixel_values.shape)})")
        t, p, q = self._tubelet
        if interpolate_pos_encoding:
            if frames < t or height < p or width < q:
                raise ValueError(f"pixel_values of {frames} frames of {height}x{width} is smaller than one tubelet "
                                 f"({t} frames of {p}x{q})")
        else:
            h0, w0 = self.image_size
            if (height, width) != (h0, w0):
                raise ValueError(f"input image size ({height}*{width}) doesn't match the model ({h0}*{w0}); pass "
                                 "interpolate_pos_encoding=True to run at another size")
            t0 = (self.position_embeddings.shape[1] - 1) // ((h0 // p) * (w0 // q))
            if frames // t != t0:
                raise ValueError(f"input has {frames} frames, the model expects num_frames={t0 * t}; pass "
                                 "interpolate_pos_encoding=True to run on another number of frames")
        weight = self.patch_embeddings.projection.weight
        if pixel_values.device != weight.device and weight.device.type != "meta":
            raise ValueError(f"pixel_values is on {pixel_values.device}, the model is on {weight.device}")
        if self._vivit_backend is not None:
            if self._vivit_backend.check_inputs is not None:
                self._vivit_backend.check_inputs(pixel_values)
            if torch.is_autocast_enabled(pixel_values.device.type):
                _log_once("autocast", "vivit_kernels: autocast is on, but our kernels compute in the model's own dtype "
                                      f"({weight.dtype}); cast the model (model.to(torch.bfloat16)) for bf16 kernels")
        return pixel_values.to(weight.dtype)

    def position_table(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """The position table for a (T', h, w) tubelet grid, (1, 1 + T'*h*w, hidden).

        Unchanged for the configured grid. Otherwise its patch part is read as the (T0', h0, w0) grid it was
        trained on, resized bicubically in space (each frame slice, align_corners=False) and linearly in time; the
        [CLS] entry is kept.
        """
        table = self.position_embeddings
        t, p, q = self._tubelet
        h0, w0 = self.image_size[0] // p, self.image_size[1] // q
        t0 = (table.shape[1] - 1) // (h0 * w0)
        t1, h1, w1 = grid
        if (t1, h1, w1) == (t0, h0, w0):
            return table
        dim = table.shape[-1]
        g = table[:, 1:].float().reshape(t0, h0, w0, dim).permute(0, 3, 1, 2)  # (t0, D, h0, w0)
        if (h1, w1) != (h0, w0):
            g = F.interpolate(g, size=(h1, w1), mode="bicubic", align_corners=False)
        if t1 != t0:
            g = g.permute(1, 2, 3, 0).reshape(1, dim * h1 * w1, t0)
            g = F.interpolate(g, size=t1, mode="linear", align_corners=False)
            g = g.reshape(dim, h1, w1, t1).permute(3, 0, 1, 2)
        patch = g.permute(0, 2, 3, 1).reshape(1, t1 * h1 * w1, dim).to(table.dtype)
        return torch.cat((table[:, :1], patch), dim=1)


class KernelVivitAttention(hf.VivitAttention):
    """transformers' attention, plus ``head_mask`` and attention probabilities from any backend, and (with a
    kernel backend) the three projections in one GEMM that reads the three weights in place and flash attention."""

    _vivit_backend: Optional[Backend] = None
    _vivit_layer_index: int = 0

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                head_mask: Optional[torch.Tensor] = None, **kwargs):
        layer_mask = None if head_mask is None else head_mask[self._vivit_layer_index]
        probabilities = _collecting_attentions() and self.config._attn_implementation != "eager"
        if self._vivit_backend is None and layer_mask is None and not probabilities:
            return super().forward(hidden_states, attention_mask, **kwargs)  # transformers', unchanged
        return self.attend(hidden_states, attention_mask, layer_mask)

    def attend(self, h: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
               head_mask: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None):
        """(o_proj(attention(h)) + residual, probabilities or None)."""
        backend = self._vivit_backend
        batch, tokens, _ = h.shape
        heads, head_dim = self.num_attention_heads, self.head_dim
        shape = (batch, tokens, heads, head_dim)
        q_, k_, v_ = self.q_proj, self.k_proj, self.v_proj
        fused = backend is not None and all(_plain(m, nn.Linear, h, _name(self, n))
                                            for m, n in ((q_, "q_proj"), (k_, "k_proj"), (v_, "v_proj")))
        fused = fused and (q_.bias is None) == (k_.bias is None) == (v_.bias is None)
        if fused:
            qkv = backend.qkv(h, q_.weight, q_.bias, k_.weight, k_.bias, v_.weight, v_.bias).view(batch, tokens, 3, heads, head_dim)
            q, k, v = qkv.unbind(2)
        else:
            q, k, v = (self._project(name, h).view(shape) for name in ("q_proj", "k_proj", "v_proj"))
        dropout = self.attention_dropout if self.training else 0.0
        why = ("head_mask" if head_mask is not None else "output_attentions" if _collecting_attentions()
               else "an attention mask" if attention_mask is not None else "attention dropout" if dropout > 0 else None)
        if backend is None or why is not None:
            if backend is not None:
                _log_once(f"eager:{why}", f"vivit_kernels: attention with {why} runs eager attention (the flash kernel "
                                          "returns no probabilities and applies no mask or dropout)")
            context, probs = attention_ref(q, k, v, self.scaling, dropout, head_mask, attention_mask, return_probs=True)
        else:
            context = backend.attention_qkv(qkv, self.scaling) if fused else backend.attention(q, k, v, self.scaling)
            probs = None
        context = context.reshape(batch, tokens, heads * head_dim)
        if backend is None:
            out = self.o_proj(context)
            return (out if residual is None else out + residual), probs
        return _linear(backend, self.o_proj, _name(self, "o_proj"), context, residual=residual), probs

    def _project(self, name: str, h: torch.Tensor) -> torch.Tensor:
        if self._vivit_backend is None:
            return getattr(self, name)(h)
        return _linear(self._vivit_backend, getattr(self, name), _name(self, name), h)


class KernelVivitLayer(hf.VivitLayer):
    """transformers' pre-norm block on our kernels: LayerNorm, QKV GEMM, flash attention, output projection with
    the residual in its epilogue, LayerNorm, and the MLP in two GEMMs (bias + gelu_fast, bias + residual):
    7 launches when the modules are plain."""

    _vivit_backend: Backend

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        if kwargs.pop(_UNMASKED, False):
            attention_mask = None  # the all-visible mask transformers materialises while exporting (no padding)
        backend = self._vivit_backend
        fuse_residual = not (self.training and self.dropout.p > 0)
        h = self.layernorm_before(hidden_states)
        attention = self.attention
        if isinstance(attention, KernelVivitAttention) and not _hooks(attention) and fuse_residual \
                and not _collecting_attentions():
            head_mask = kwargs.get("head_mask")
            layer_mask = None if head_mask is None else head_mask[attention._vivit_layer_index]
            x, _ = attention.attend(h, attention_mask, layer_mask, residual=hidden_states)
        else:
            out, _ = attention(h, attention_mask, **kwargs)
            x = self.dropout(out) + hidden_states
        del h  # not kept alive through the MLP (the peak of live activations)
        return self._mlp(backend, self.layernorm_after(x), x, fuse_residual)

    def _mlp(self, backend: Backend, h: torch.Tensor, residual: torch.Tensor, fuse_residual: bool) -> torch.Tensor:
        mlp = self.mlp
        if type(mlp) is not hf.VivitMLP or _hooks(mlp):
            _log_once("mlp", "vivit_kernels: the MLP module is replaced or hooked: it runs its own forward")
            return self.dropout(mlp(h)) + residual
        gelu = isinstance(mlp.activation_fn, FastGELUActivation)
        res = residual if fuse_residual else None
        fc1, fc2 = _name(self, "mlp.fc1"), _name(self, "mlp.fc2")
        if gelu and _plain(mlp.fc1, nn.Linear, h, fc1) and _plain(mlp.fc2, nn.Linear, h, fc2):
            out = backend.mlp(h, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, "gelu_fast", res)
        else:
            hidden = _linear(backend, mlp.fc1, fc1, h, activation_fn=mlp.activation_fn)
            out = _linear(backend, mlp.fc2, fc2, hidden, residual=res)
        return out if fuse_residual else self.dropout(out) + residual


# Passed down by our forwards when the caller gave no attention mask: videos have no padding, so the layers may
# ignore the all-visible mask transformers builds anyway while torch.export traces (and keep flash attention).
_UNMASKED = "_vivit_unmasked"
# Our subclasses of each plain class, which count as that class when deciding what may be fused.
_KERNEL_CLASSES: dict[type, tuple[type, ...]] = {nn.LayerNorm: (KernelLayerNorm,)}
_SWAPS = {hf.VivitEmbeddings: KernelVivitEmbeddings, hf.VivitAttention: KernelVivitAttention,
          hf.VivitLayer: KernelVivitLayer, nn.LayerNorm: KernelLayerNorm}
_ALWAYS = (hf.VivitEmbeddings, hf.VivitAttention)  # swapped for every backend (input checks, head_mask, positions)
_dynamic: dict[tuple[type, type], type] = {}


def _swap_class(module: nn.Module, base: type, to_kernel: bool) -> None:
    """Give ``module`` our kernel subclass of ``base`` (or back the class it had)."""
    current = type(module)
    kernel = _SWAPS[base]
    if to_kernel:
        if issubclass(current, kernel):
            return
        if current is base:
            module.__class__ = kernel
            return
        # a subclass someone else made (e.g. FSDP2's FSDP<Layer>): our forward on top of it
        key = (current, kernel)
        if key not in _dynamic:
            _dynamic[key] = type(f"Kernel{current.__name__}", (kernel, current), {"__module__": __name__})
        module.__class__ = _dynamic[key]
        return
    if current is kernel:
        module.__class__ = base
    elif issubclass(current, kernel):
        module.__class__ = next(c for c in current.__mro__[1:] if issubclass(c, base) and not issubclass(c, kernel))


def _vivit_bases(model: nn.Module) -> list[hf.VivitModel]:
    return [m for m in model.modules() if isinstance(m, hf.VivitModel)]


def apply_vivit_kernels(model: nn.Module, attn: str = "triton", pins: Optional[dict[str, str]] = None) -> nn.Module:
    """Switch a transformers ViViT model (``VivitModel`` / ``VivitForVideoClassification``, loaded by transformers
    or ours, possibly wrapped by PEFT) to ``attn`` in place, and return it.

    "triton" / "auto" put our kernels behind its modules ("auto": per op and shape the fastest implementation
    measured on this GPU; ``pins`` fixes some, e.g. {"attention_qkv": "sdpa-flash"}); "eager" / "sdpa" give
    transformers' attention back (keeping our input checks, head_mask and position interpolation). Parameters
    and state dict are untouched.
    """
    bases = _vivit_bases(model)
    if not bases:
        raise ValueError(f"apply_vivit_kernels: no transformers VivitModel inside this {type(model).__name__}")
    backend = get_backend(attn, pins)
    if attn not in (None, "eager", "sdpa") and backend is None:  # Triton missing: get_backend warned
        attn = "sdpa"
    for base in bases:
        if attn in ("eager", "sdpa"):
            base.set_attn_implementation(attn)
        base._vivit_attn = attn or base.config._attn_implementation
        prefix = {id(m): n for n, m in model.named_modules()}.get(id(base), "")
        for index, layer in enumerate(base.layers):
            for module in layer.modules():
                if isinstance(module, hf.VivitAttention):
                    module._vivit_layer_index = index
        for name, module in base.named_modules():
            for cls in _SWAPS:
                if isinstance(module, cls) and not (cls is nn.LayerNorm and type(module) not in (nn.LayerNorm, KernelLayerNorm)):
                    _swap_class(module, cls, backend is not None or cls in _ALWAYS)
                    if isinstance(module, _SWAPS[cls]):
                        module._vivit_backend = backend
                        module._vivit_name = f"{prefix}.{name}".strip(".") if name else prefix or type(base).__name__
    return model


def _attn_of(model: nn.Module) -> str:
    bases = _vivit_bases(model)
    return getattr(bases[0], "_vivit_attn", bases[0].config._attn_implementation) if bases else "eager"


def _expand_head_mask(config, head_mask, device, dtype) -> Optional[torch.Tensor]:
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


class CheckpointError(ValueError):
    """A checkpoint cannot be read: names the file and what is wrong with it."""


def _local_dir(path) -> Optional[Path]:
    """``path`` as a local checkpoint directory, None when it names a hub repository; an error when it is
    plainly meant as a local path (absolute, ./, ../, ~) that does not exist (instead of asking the hub)."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    text = os.fspath(path)
    local = Path(text).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise CheckpointError(f"{text} is a file; from_pretrained takes a checkpoint directory (config.json + weights)")
    if os.path.isabs(text) or text.startswith((".", "~")) or isinstance(path, os.PathLike):
        raise FileNotFoundError(f"no checkpoint directory {text} (hub downloads are not attempted for local paths)")
    return None


def _check_local_checkpoint(directory: Path) -> None:
    """Errors that name the file, before transformers reads it: config.json that is not a JSON object, weights
    that are not safetensors or a weights-only (plain tensors) pickle."""
    config = directory / "config.json"
    if config.is_file():
        try:
            content = json.loads(config.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{config} is not valid JSON: {e}") from None
        if not isinstance(content, dict):
            raise CheckpointError(f"{config} must hold a JSON object of config fields, got a {type(content).__name__}")
    for weights in sorted(directory.glob("*.safetensors")):
        from safetensors import safe_open

        try:
            with safe_open(str(weights), "pt"):
                pass
        except Exception as e:  # noqa: BLE001 - every way a file can fail to be safetensors
            raise CheckpointError(f"{weights} is not a readable safetensors file ({e})") from None
    for weights in sorted(directory.glob("pytorch_model*.bin")):
        try:
            torch.load(str(weights), map_location="meta", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001
            # torch's message suggests weights_only=False: never offered here; keep only what it found
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            reason = f"it references {found.group(1)}" if found else f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            raise CheckpointError(
                f"{weights} is not a weights-only checkpoint of plain tensors and is refused ({reason}): loading it "
                "could run code stored in the file. Convert a file you trust to safetensors.") from None


def _replace_into(tmp: Path, directory: Path) -> None:
    """Move every file of ``tmp`` into ``directory`` (each an atomic rename), and drop weight files of an older
    save that the new one does not have (e.g. shards)."""
    new = {f.name for f in tmp.iterdir()}
    for f in tmp.iterdir():
        os.replace(f, directory / f.name)
    for old in directory.iterdir():
        stale = old.name not in new and old.is_file() and (
            old.name.startswith(("model-", "pytorch_model-")) or old.name.endswith(".index.json")
            or old.name in ("model.safetensors", "pytorch_model.bin"))
        if stale:
            old.unlink()


class _AttnMixin:
    """``attn``, ``set_attn``, ``from_pretrained(..., attn=...)`` and an atomic ``save_pretrained``."""

    @classmethod
    def is_custom_code(cls) -> bool:
        """Not custom modeling: the module tree, parameters and checkpoints are transformers' own ViViT, so its
        checkpoint conversions (the hub's 4.x key names) apply to our classes as to its own."""
        return False

    @property
    def attn(self) -> str:
        """The backend every forward uses: "eager", "sdpa", "triton" or "auto"."""
        return _attn_of(self)

    def set_attn(self, attn: Optional[str], pins: Optional[dict[str, str]] = None):
        """Choose the backend ("eager", "sdpa", "triton", "auto") for every following forward; with "auto",
        ``pins`` fixes the provider of some ops (see ``vivit_kernels.providers``)."""
        apply_vivit_kernels(self, attn, pins)
        return self

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, attn: Optional[str] = None, **kwargs):
        """transformers' ``from_pretrained`` (every argument of it: dtype, device_map, revision, ...), then
        ``set_attn(attn)``. A local directory is checked first, so errors name the file that is wrong."""
        directory = _local_dir(pretrained_model_name_or_path)
        if directory is not None:
            _check_local_checkpoint(directory)
        try:
            model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as e:
            if directory is not None and type(e).__name__ == "StrictDataclassFieldValidationError":
                raise CheckpointError(f"{directory / 'config.json'}: {' '.join(str(e).split())}") from None
            raise
        loaded = model[0] if isinstance(model, tuple) else model  # output_loading_info=True gives (model, info)
        loaded.set_attn(attn)
        return model

    def save_pretrained(self, save_directory, *args, save_original_format: bool = False, **kwargs):
        """transformers' ``save_pretrained``, written into a temporary directory beside ``save_directory`` and
        renamed into place file by file: an interrupted save never leaves a truncated file.

        Weights are saved under the model's own (transformers 5.x) names by default: transformers 5.24 writes the
        hub's 4.x names, which its Trainer cannot resume from (it reloads checkpoints with a plain
        ``load_state_dict``). ``save_original_format=True`` writes the 4.x names, for transformers 4.x readers.
        """
        kwargs["save_original_format"] = save_original_format
        directory = Path(save_directory)
        if kwargs.get("push_to_hub"):  # transformers names the repo after the directory it saves into: not ours
            kwargs.setdefault("repo_id", directory.resolve().name)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
        try:
            result = super().save_pretrained(tmp, *args, **kwargs)
            _replace_into(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return result


class VivitModel(_AttnMixin, ActivationCheckpointingNames, hf.VivitModel):
    """transformers' ``VivitModel`` with ``attn`` (see the module docstring).

    Args:
        config: a VivitConfig, a preset name ("vivit-b-16x2", "tiny", ...) or None for the defaults.
        add_pooling_layer: add the [CLS] dense + tanh pooler (``pooler_output``).
        attn: "eager", "sdpa", "triton" or "auto"; None keeps transformers' attention implementation.
    """

    config_class = VivitConfig

    def __init__(self, config=None, add_pooling_layer: bool = True, attn: Optional[str] = None):
        super().__init__(_resolve_config(config), add_pooling_layer)
        self.set_attn(attn)

    def forward(self, pixel_values: Optional[torch.Tensor] = None, interpolate_pos_encoding: bool = False,
                attention_mask: Optional[torch.Tensor] = None, *, head_mask: Optional[torch.Tensor] = None, **kwargs):
        """transformers' forward; ``head_mask`` (num_heads,) or (num_hidden_layers, num_heads) multiplies each
        layer's attention probabilities (transformers 4.x's meaning), with eager attention for that call."""
        if head_mask is not None:
            kwargs["head_mask"] = _expand_head_mask(self.config, head_mask, self.device, self.dtype)
        if attention_mask is None:
            kwargs[_UNMASKED] = True
        return super().forward(pixel_values, interpolate_pos_encoding, attention_mask, **kwargs)


class VivitForVideoClassification(_AttnMixin, ActivationCheckpointingNames, hf.VivitForVideoClassification):
    """transformers' ``VivitForVideoClassification`` with ``attn`` (see the module docstring)."""

    config_class = VivitConfig

    def __init__(self, config=None, attn: Optional[str] = None):
        super().__init__(_resolve_config(config))
        self.set_attn(attn)

    def forward(self, pixel_values: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                interpolate_pos_encoding: bool = False, *, head_mask: Optional[torch.Tensor] = None, **kwargs):
        """transformers' forward (``labels`` second, as in transformers 5); ``head_mask`` as in VivitModel.

        Written out (ten lines) instead of calling transformers' because transformers 5.24's forward fails with
        ``config.return_dict=False``: its base model then returns a tuple the head reads as an output object."""
        return_dict = kwargs.pop("return_dict", None)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if head_mask is not None:
            kwargs["head_mask"] = _expand_head_mask(self.config, head_mask, self.device, self.dtype)
        if kwargs.get("attention_mask") is None:
            kwargs[_UNMASKED] = True
        outputs = self.vivit(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs)
        logits = self.classifier(outputs.last_hidden_state[:, 0, :])
        loss = self.loss_function(labels, logits, self.config, **kwargs) if labels is not None else None
        out = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                    attentions=outputs.attentions)
        return out if return_dict else out.to_tuple()
