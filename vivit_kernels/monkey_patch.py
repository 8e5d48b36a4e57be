"""``apply_vivit_kernels``: put vivit_kernels' kernels behind the modules of a transformers ViViT model, in place.

It swaps the classes of the embeddings, attention, layer and LayerNorm modules for the subclasses in
``modules.py`` (and back, for attn="eager" / "sdpa"). Parameters, buffers and state-dict names do not change,
so a model loaded by transformers, wrapped by PEFT or sharded by FSDP2 keeps working. Under attn="auto" each
VivitModel also gets the whole-model guard's pre-hook (``guard.py``).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers.models.vivit import modeling_vivit as hf

from .auto.backends import Backend, OpSwitches, get_backend
from .auto.guard import guard_pre_hook
from .checkpoint import CheckpointError, atomic_save, check_local, local_dir
from .merging import merge_schedule, set_merging_hooks
from .modules import KERNEL_SUBCLASSES, KernelLayerNorm, KernelModule

__all__ = ["apply_vivit_kernels", "attn_of", "set_token_merging", "AttnMixin"]

_ALWAYS = (hf.VivitEmbeddings, hf.VivitAttention)  # swapped for every backend (input checks, head_mask, positions)
_dynamic: dict[tuple[type, type], type] = {}


def _swap_class(module: nn.Module, base: type, to_kernel: bool) -> None:
    """Give ``module`` our kernel subclass of ``base`` (or back the class it had)."""
    current = type(module)
    kernel = KERNEL_SUBCLASSES[base]
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


def _vivit_bases(model: nn.Module) -> list[nn.Module]:
    """transformers' VivitModels and the base models of the factorised ViViTs (``_vivit_base``) inside ``model``."""
    return [m for m in model.modules() if isinstance(m, hf.VivitModel) or getattr(type(m), "_vivit_base", False)]


def _check_mergeable(config) -> None:
    if getattr(config, "attention_type", "factorized_encoder") != "factorized_encoder":
        raise ValueError("token merging is for Models 1 and 2: Models 3 and 4 keep a (time x space) grid that merged "
                         "tokens no longer fill")


def apply_vivit_kernels(model: nn.Module, attn: str = "triton", pins: dict[str, str] | None = None,
                        ops: OpSwitches = None) -> nn.Module:
    """Switch a transformers ViViT model (``VivitModel`` / ``VivitForVideoClassification``, loaded by transformers
    or ours, possibly wrapped by PEFT) to ``attn`` in place, and return it.

    "triton" / "auto" put our kernels behind its modules ("auto": per op and shape the fastest implementation
    that agrees with the op's reference, measured on this GPU, and per input the faster of that and
    transformers' own sdpa modules; ``pins`` fixes some ops, e.g. {"attention_qkv": "sdpa-flash"}); "eager" / "sdpa"
    give
    transformers' attention back (keeping our input checks, head_mask and position interpolation). Parameters
    and state dict are untouched.

    ``ops`` (with "triton" / "auto") keeps chosen ops on transformers' path, as Liger's per-kernel switches do:
    the op names of the registry a layer runs (``vivit_kernels.ops.registry.backend_ops()``), either those to run
    on our kernels (``ops=["qkv", "mlp"]``) or a mapping that turns some off (``ops={"layer_norm": False}``).
    """
    bases = _vivit_bases(model)
    if not bases:
        raise ValueError(f"apply_vivit_kernels: no ViViT base model (transformers' VivitModel, or our factorised "
                         f"model) inside this {type(model).__name__}")
    backend = get_backend(attn, pins, ops)
    if attn not in (None, "eager", "sdpa") and backend is None:  # Triton missing: get_backend warned
        attn = "sdpa"
    for base in bases:
        if attn == "auto" and base is not bases[0]:
            backend = get_backend(attn, pins, ops)  # each model its own whole-model path
        if attn in ("eager", "sdpa", "auto"):  # auto: transformers' path, when its guard picks it, is sdpa's
            base.set_attn_implementation("sdpa" if attn == "auto" else attn)
        base._vivit_attn = attn or base.config._attn_implementation
        base._vivit_switches = (pins, ops)  # what set_token_merging re-applies
        merging = getattr(base.config, "token_merging", None)
        if merging:
            _check_mergeable(base.config)
        _set_guard(base, backend if attn == "auto" else None)
        set_merging_hooks(base)
        prefix = {id(m): n for n, m in model.named_modules()}.get(id(base), "")
        for index, layer in enumerate(base.layers):
            for module in layer.modules():
                if isinstance(module, hf.VivitAttention):
                    module._vivit_layer_index = index
        for name, module in base.named_modules():
            for cls in KERNEL_SUBCLASSES:
                if isinstance(module, cls) and not (
                    cls is nn.LayerNorm and type(module) not in (nn.LayerNorm, KernelLayerNorm)
                ):
                    _swap_class(module, cls, backend is not None or cls in _ALWAYS or bool(merging))
            if isinstance(module, KernelModule):  # our subclasses, and the factorised models' own modules
                module._vivit_table = backend
                module._vivit_name = f"{prefix}.{name}".strip(".") if name else prefix or type(base).__name__
    return model


def _set_guard(base: nn.Module, backend: Backend | None) -> None:
    """The whole-model guard's pre-hook on ``base`` for attn="auto" (removed for any other attn)."""
    for key, hook in list(base._forward_pre_hooks.items()):
        if hook is guard_pre_hook:
            del base._forward_pre_hooks[key]
            base._forward_pre_hooks_with_kwargs.pop(key, None)
    base._vivit_auto_backend = backend
    if backend is not None:
        base.register_forward_pre_hook(guard_pre_hook, with_kwargs=True)


def attn_of(model: nn.Module) -> str:
    """The attn of the (first) VivitModel in ``model``."""
    bases = _vivit_bases(model)
    return getattr(bases[0], "_vivit_attn", bases[0].config._attn_implementation) if bases else "eager"


def set_token_merging(model: nn.Module, merge=None) -> nn.Module:
    """Token merging (``vivit_kernels.merging``) for every following forward of ``model`` (ours, or transformers'
    own ViViT, which gets our modules): ``merge`` is r tokens merged per layer (an int), a fraction of the tokens
    per layer (a float), a per-layer list, or a schedule's name (``merging.SCHEDULES``); None or 0 turns it off.
    Kept in ``config.token_merging``, so ``save_pretrained`` keeps it and our ``from_pretrained`` turns it on
    again. Models 1 and 2 (there in the spatial encoder, per temporal index); Models 3 and 4 refuse it. Returns
    ``model``."""
    from .presets import image_hw

    merge = None if merge in (None, 0, 0.0, "", "none", "off") else merge
    bases = _vivit_bases(model)
    if not bases:
        raise ValueError(f"set_token_merging: {type(model).__name__} holds no ViViT model")
    for base in bases:  # every check before any change: a refused call leaves the model as it was
        if merge is not None:
            _check_mergeable(base.config)
            t, p, q = base.config.tubelet_size
            h, w = image_hw(base.config)
            per_slice = (h // p) * (w // q)
            # Model 1: the whole clip; Model 2 (its spatial encoder): one temporal index's sequence
            clip = per_slice if getattr(type(base), "_vivit_base", False) else (base.config.num_frames // t) * per_slice
            merge_schedule(merge, base.config.num_hidden_layers, 1 + clip)  # a bad schedule fails now
    for base in bases:
        base.config.token_merging = list(merge) if isinstance(merge, tuple) else merge
    pins, ops = getattr(bases[0], "_vivit_switches", (None, None))
    return apply_vivit_kernels(model, attn_of(model), pins, ops)


class AttnMixin:
    """``attn``, ``set_attn``, ``from_pretrained(..., attn=...)`` and an atomic ``save_pretrained``: what our model
    classes (Model 1's in ``model.py``, the factorised ones in ``models/``) add to transformers' PreTrainedModel."""

    @classmethod
    def is_custom_code(cls) -> bool:
        """Not custom modeling: the module tree, parameters and checkpoints are transformers' own ViViT, so its
        checkpoint conversions (the hub's 4.x key names) apply to our classes as to its own."""
        return False

    @property
    def attn(self) -> str:
        """The backend every forward uses: "eager", "sdpa", "triton" or "auto"."""
        return attn_of(self)

    def set_attn(self, attn: str | None, pins: dict[str, str] | None = None, ops: OpSwitches = None):
        """Choose the backend ("eager", "sdpa", "triton", "auto") for every following forward; with "auto",
        ``pins`` fixes the implementation of some ops (see ``vivit_kernels.auto.choose``); ``ops`` keeps some ops on
        transformers' path (see ``apply_vivit_kernels``)."""
        apply_vivit_kernels(self, attn, pins, ops)
        return self

    def set_token_merging(self, merge=None):
        """Token merging for every following forward: see ``monkey_patch.set_token_merging``. Returns the model."""
        return set_token_merging(self, merge)

    @property
    def token_merging(self):
        """The merge schedule every forward uses (``set_token_merging``), or None."""
        return getattr(self.config, "token_merging", None)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, attn: str | None = None, ops: OpSwitches = None,
                        **kwargs):
        """transformers' ``from_pretrained`` (every argument of it: dtype, device_map, revision, ...), then
        ``set_attn(attn, ops=ops)``. A local directory is checked first, so errors name the file that is wrong."""
        directory = local_dir(pretrained_model_name_or_path)
        if directory is not None:
            check_local(directory)
        try:
            model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as e:
            if directory is not None and type(e).__name__ == "StrictDataclassFieldValidationError":
                raise CheckpointError(f"{directory / 'config.json'}: {' '.join(str(e).split())}") from None
            raise
        loaded = model[0] if isinstance(model, tuple) else model  # output_loading_info=True gives (model, info)
        loaded.set_attn(attn, ops=ops)
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
        return atomic_save(lambda tmp: super(AttnMixin, self).save_pretrained(tmp, *args, **kwargs), directory)
