"""Named model configurations (fields of transformers' VivitConfig). Plain data, no imports: the command line
lists them in --help without importing torch or transformers."""

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
