"""Checkpoint I/O: ``from_pretrained`` / ``save_pretrained`` for transformers-format ViViT checkpoints.

Two key layouts exist in the wild and both load:

- transformers 4.x (the hub's ``google/vivit-b-16x2-kinetics400``):
  ``vivit.encoder.layer.N.attention.attention.query.weight``, ``...attention.output.dense``,
  ``...intermediate.dense``, ``...output.dense``;
- transformers 5.x: ``vivit.layers.N.attention.q_proj.weight``, ``...attention.o_proj``, ``...mlp.fc1``,
  ``...mlp.fc2`` (our own state_dict names).

Weights are read with safetensors or ``torch.load(weights_only=True)``, never by unpickling objects; saves go
to a temporary file that is renamed into place, so an interrupted save leaves no truncated checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from .config import VivitConfig

__all__ = ["PretrainedMixin", "CheckpointError", "convert_v4_keys", "to_v4_keys", "load_state_dict_file"]

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")

# transformers 4.x name inside a layer -> 5.x name (order matters: "attention.output.dense" before "output.dense").
_V4_TO_V5 = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
)
_V5_LAYER = re.compile(r"^((?:.*\.)?)layers\.(\d+)\.(.+)$")


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: names the keys or shapes that are wrong."""


def convert_v4_keys(state_dict: dict[str, Any], prefix: str = "") -> None:
    """Rename transformers 4.x encoder keys under ``prefix`` to 5.x names, in place."""
    head = prefix + "encoder.layer."
    for key in [k for k in state_dict if k.startswith(head)]:
        index, _, name = key[len(head) :].partition(".")
        for old, new in _V4_TO_V5:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        state_dict[f"{prefix}layers.{index}.{name}"] = state_dict.pop(key)


def to_v4_keys(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of a 5.x-named state dict with transformers 4.x (hub) names."""
    out = {}
    for key, value in state_dict.items():
        m = _V5_LAYER.match(key)
        if m:
            prefix, index, name = m.groups()
            for old, new in _V4_TO_V5:
                if name.startswith(new):
                    name = old + name[len(new) :]
                    break
            key = f"{prefix}encoder.layer.{index}.{name}"
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def _load_one(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if path.suffix in (".bin", ".pt", ".pth"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # pickle payloads that are not plain tensors are refused here
            raise CheckpointError(f"{path} could not be read as a weights-only checkpoint: {e}") from e
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path} does not hold a flat dict of tensors")
        return obj
    raise CheckpointError(f"unsupported weights file {path.name!r}; expected .safetensors or .bin")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file, or a sharded checkpoint's ``*.index.json``, into one CPU state dict."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        state_dict: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state_dict.update(_load_one(path.parent / shard))
        return state_dict
    return _load_one(path)


def _resolve(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) for a checkpoint directory or a weights file."""
    path = Path(path)
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                config = path / "config.json"
                return path / name, config if config.is_file() else None
        raise FileNotFoundError(f"no weights in {path}: expected one of {', '.join(WEIGHT_FILES)}")
    if path.is_file():
        config = path.parent / "config.json"
        return path, config if config.is_file() else None
    raise FileNotFoundError(
        f"{path} is neither a checkpoint directory nor a weights file (hub downloads are not done here; "
        "download the checkpoint first, e.g. with `huggingface-cli download google/vivit-b-16x2-kinetics400`)"
    )


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _resolve_dtype(dtype: Any, config_dict: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        return dtype
    if dtype == "auto":
        named = config_dict.get("dtype") or config_dict.get("torch_dtype")
        if named in _DTYPES:
            return _DTYPES[named]
        floats = [t.dtype for t in state_dict.values() if t.is_floating_point()]
        return floats[0] if floats else torch.float32
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype must be a torch dtype, 'auto' or one of {', '.join(_DTYPES)}, got {dtype!r}")


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through ``write(tmp_path)`` into a temporary file beside ``path``, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class PretrainedMixin:
    """``from_pretrained`` / ``save_pretrained`` for VivitModel and VivitForVideoClassification."""

    base_model_prefix = "vivit"

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        attn: str = "eager",
        dtype: Any = None,
        device: str | torch.device | None = None,
        config: VivitConfig | None = None,
        ignore_mismatched_sizes: bool = False,
        **config_overrides: Any,
    ):
        """Load a transformers-format ViViT checkpoint from a local directory or weights file.

        Args:
            path: a directory holding config.json and model.safetensors (or pytorch_model.bin, or a
                sharded ``*.index.json``), or one weights file (config.json is then read beside it, or
                passed as ``config``).
            attn: the backend, "eager", "sdpa" or "triton".
            dtype: torch.float32 (default), torch.float16, torch.bfloat16, their names, or "auto" (the
                dtype config.json names, else the checkpoint's).
            device: where to put the model (default CPU).
            ignore_mismatched_sizes: re-initialise parameters whose checkpoint shape differs (e.g. a new
                classifier with another ``num_labels``) instead of raising.
            config_overrides: VivitConfig fields to override, e.g. ``num_labels=10``.
        """
        weights, config_file = _resolve(path)
        config_dict: dict[str, Any] = {}
        if config is None:
            if config_file is None:
                raise FileNotFoundError(f"no config.json beside {weights}; pass config=VivitConfig(...)")
            config = VivitConfig.from_json_file(config_file)
            with open(config_file, encoding="utf-8") as f:
                config_dict = json.load(f)
        if config_overrides:
            merged = config.to_dict()
            if "num_labels" in config_overrides and "id2label" not in config_overrides:
                merged.pop("id2label", None)
                merged.pop("label2id", None)
            merged.update(config_overrides)
            config = VivitConfig.from_dict(merged)

        state_dict = load_state_dict_file(weights)
        target_dtype = _resolve_dtype(dtype, config_dict, state_dict)
        model = cls(config, attn=attn)
        model.load_checkpoint_state_dict(state_dict, source=str(weights), ignore_mismatched_sizes=ignore_mismatched_sizes)
        return model.to(device=device, dtype=target_dtype).eval()

    def load_checkpoint_state_dict(
        self, state_dict: dict[str, torch.Tensor], source: str = "state_dict", ignore_mismatched_sizes: bool = False
    ) -> None:
        """Load a checkpoint's state dict with transformers' prefix rules and named errors.

        A base model loading a classification checkpoint ignores ``classifier.*`` and keeps its freshly
        initialised ``pooler.*``; a classification model loading a base checkpoint initialises its classifier.
        Every other missing or unexpected key, and every shape mismatch, raises :class:`CheckpointError`.
        """
        state_dict = dict(state_dict)
        prefix = self.base_model_prefix + "."
        convert_v4_keys(state_dict, "")
        convert_v4_keys(state_dict, prefix)
        is_head_model = hasattr(self, self.base_model_prefix)
        has_prefix = any(k.startswith(prefix) for k in state_dict)
        ignored: set[str] = set()  # unexpected keys transformers also drops silently
        if is_head_model and not has_prefix:
            state_dict = {prefix + k: v for k, v in state_dict.items()}
            ignored = {k for k in state_dict if k.startswith(prefix + "pooler.")}
        elif not is_head_model and has_prefix:
            ignored = {k for k in state_dict if not k.startswith(prefix)}
            state_dict = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state_dict.items()}
        if not is_head_model and getattr(self, "pooler", None) is None:
            ignored |= {k for k in state_dict if k.startswith("pooler.")}
        allowed_missing = ("classifier.",) if is_head_model else ("pooler.",)

        expected = self.state_dict()
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        fatal_missing = [k for k in missing if not k.startswith(allowed_missing)]
        fatal_unexpected = [k for k in unexpected if k not in ignored]
        mismatched = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
        problems = []
        if fatal_missing:
            problems.append("missing keys: " + ", ".join(fatal_missing))
        if fatal_unexpected:
            problems.append("unexpected keys: " + ", ".join(fatal_unexpected))
        if mismatched and not ignore_mismatched_sizes:
            shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)}" for k in mismatched]
            problems.append(
                "shape mismatches: " + "; ".join(shapes) + " (ignore_mismatched_sizes=True re-initialises them)"
            )
        if problems:
            raise CheckpointError(f"{source} does not fit {type(self).__name__}:\n  " + "\n  ".join(problems))

        reinit = missing + mismatched
        for k in reinit:
            state_dict[k] = expected[k]
        if reinit:
            warnings.warn(
                f"{type(self).__name__}: newly initialised from {source} (train before use): {', '.join(reinit)}",
                stacklevel=3,
            )
        for k in unexpected:
            state_dict.pop(k)
        self.load_state_dict(state_dict, strict=True)

    def save_pretrained(self, save_directory: str | os.PathLike, layout: str = "v4") -> None:
        """Write config.json and model.safetensors that transformers' ``from_pretrained`` loads.

        ``layout="v4"`` (default) writes the hub's transformers 4.x key names, which transformers 4.x and 5.x
        both read; ``layout="v5"`` writes transformers 5.x names.
        """
        from safetensors.torch import save_file

        if layout not in ("v4", "v5"):
            raise ValueError(f"layout must be 'v4' or 'v5', got {layout!r}")
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.state_dict().items()}
        if layout == "v4":
            tensors = to_v4_keys(tensors)
        config = self.config.to_dict()
        config["architectures"] = [type(self).__name__]
        config["dtype"] = _dtype_name(next(self.parameters()).dtype)

        def write_config(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, sort_keys=True)
                f.write("\n")

        _atomic_write(directory / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        _atomic_write(directory / "config.json", write_config)
