"""Named model configurations (fields of transformers' VivitConfig) and the arithmetic every module does on a
config (``image_hw``, ``num_tokens``). Plain Python, no imports: the command line lists the presets in --help
without importing torch or transformers."""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # google/vivit-b-16x2-kinetics400: transformers' defaults with the 400 Kinetics classes
    "vivit-b-16x2": {"num_labels": 400},
    # ViViT-L/16x2 (factorised-free): 24 layers of 1024, 16 heads
    "vivit-l-16x2": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                     "intermediate_size": 4096, "num_labels": 400},
    # the demo's model: ViViT-B's head size (64), 4 x 4 x 4 tubelets + CLS on 8 frames of 64x64
    "small": {"image_size": 64, "num_frames": 8, "hidden_size": 192, "num_hidden_layers": 4, "num_attention_heads": 3,
              "intermediate_size": 768, "num_labels": 400},
    # small enough for CPU tests: 2 x 2 x 2 tubelets + CLS = 9 tokens
    "tiny": {"image_size": 32, "num_frames": 4, "tubelet_size": [2, 16, 16], "hidden_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": 128, "num_labels": 10},
}

# The paper's Models 2, 3, 4 (vivit_kernels.models: VivitFactorizedConfig fields), under scenic's names
ATTENTION_TYPES = ("factorized_encoder", "factorized_self_attention", "factorized_dot_product")

FACTORIZED_PRESETS: dict[str, dict[str, Any]] = {
    # ViViT-B/16x2 (32 frames of 224x224: 16 temporal indices x 196 patches) as the paper trains them on Kinetics
    "vivit-b-16x2-fe": {"attention_type": "factorized_encoder", "num_temporal_layers": 4, "num_labels": 400},
    "vivit-b-16x2-fsa": {"attention_type": "factorized_self_attention", "num_labels": 400},
    "vivit-b-16x2-fdp": {"attention_type": "factorized_dot_product", "num_labels": 400},
    # for CPU tests: the tiny preset's sizes (Model 2: its 2 layers spatial, plus 1 temporal layer)
    "tiny-fe": {"attention_type": "factorized_encoder", "num_temporal_layers": 1, **PRESETS["tiny"]},
    "tiny-fsa": {"attention_type": "factorized_self_attention", **PRESETS["tiny"]},
    "tiny-fdp": {"attention_type": "factorized_dot_product", **PRESETS["tiny"]},
}


def image_hw(config) -> tuple[int, int]:
    """(height, width) of the frames a ViViT config was built for (``image_size`` is an int or a pair)."""
    size = config.image_size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def num_tokens(config) -> int:
    """Tokens per clip: the tubelet grid of the configured input, plus [CLS]."""
    t, p, q = config.tubelet_size
    h, w = image_hw(config)
    return (config.num_frames // t) * (h // p) * (w // q) + 1
