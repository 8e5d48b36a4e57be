"""What we add to transformers' checkpoint loading and saving: errors that name the file that is wrong (before
transformers reads it, and a weights pickle that is not plain tensors is refused, never run), and saves that a
crash cannot leave half-written (a temporary directory beside the target, renamed into place file by file)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["CheckpointError", "check_local", "atomic_save"]


class CheckpointError(ValueError):
    """A checkpoint cannot be read: names the file and what is wrong with it."""


def local_dir(path) -> Path | None:
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


def check_local(directory: Path) -> None:
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
            reason = (
                f"it references {found.group(1)}" if found else f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            )
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


def atomic_save(save: Callable[[Path], object], directory: Path):
    """``save(tmp)`` into a temporary directory beside ``directory``, then every file renamed into place."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        result = save(tmp)
        _replace_into(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result
