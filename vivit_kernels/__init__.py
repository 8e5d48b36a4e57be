"""vivit_kernels: ViViT for NVIDIA GPUs with our own Triton and CUDA kernels behind transformers' modules.

Names are imported on first use, so ``import vivit_kernels`` is cheap and the command line can configure
Triton (e.g. its interpreter on machines without a GPU) before any kernel is defined.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.3.0"

_EXPORTS = {
    "VivitConfig": "model",
    "PRESETS": "presets",
    "VivitModel": "model",
    "VivitForVideoClassification": "model",
    "apply_vivit_kernels": "monkey_patch",
    "CheckpointError": "checkpoint",
    "VivitFactorizedConfig": "models",
    "VivitFactorizedModel": "models",
    "VivitFactorizedForVideoClassification": "models",
    "VideoProcessor": "processing",
    "read_video": "video",
    "ops": None,
    "functional": None,
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vivit_kernels' has no attribute {name!r}")
    module = _EXPORTS[name]
    value = importlib.import_module(f".{name}" if module is None else f".{module}", __name__)
    if module is not None:
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # pragma: no cover
    from . import functional, ops
    from .checkpoint import CheckpointError
    from .model import VivitConfig, VivitForVideoClassification, VivitModel
    from .models import VivitFactorizedConfig, VivitFactorizedForVideoClassification, VivitFactorizedModel
    from .monkey_patch import apply_vivit_kernels
    from .presets import PRESETS
    from .processing import VideoProcessor
    from .video import read_video
