"""ViViT configuration: transformers' `VivitConfig` fields, defaults and meanings, plus named presets."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["VivitConfig", "PRESETS"]

# Keys transformers writes into config.json that carry no model meaning for us; accepted and dropped.
_IGNORED_KEYS = frozenset(
    {
        "architectures",
        "transformers_version",
        "model_type",
        "dtype",
        "torch_dtype",
        "_name_or_path",
        "_attn_implementation_autoset",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "tie_word_embeddings",
        "use_cache",
    }
)


@dataclass
class VivitConfig:
    """Hyper-parameters of a ViViT model (factorised-free "model 1" of Arnab et al., as in transformers).

    Field names, defaults and meanings are those of transformers' ``VivitConfig``, so a ``config.json``
    written by transformers loads unchanged and ours loads in transformers.
    """

    image_size: int | tuple[int, int] | list[int] = 224
    num_frames: int = 32
    tubelet_size: list[int] = field(default_factory=lambda: [2, 16, 16])
    num_channels: int = 3
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu_fast"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    pooler_output_size: int | None = None
    pooler_act: str = "tanh"
    num_labels: int | None = None
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None
    # Keys we do not interpret but keep so that a round trip through config.json loses nothing.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.image_size, (list, tuple)):
            if len(self.image_size) != 2:
                raise ValueError(f"image_size must be an int or (height, width), got {self.image_size!r}")
            self.image_size = [int(s) for s in self.image_size]
        self.tubelet_size = [int(s) for s in self.tubelet_size]
        if len(self.tubelet_size) != 3:
            raise ValueError(f"tubelet_size must be [t, h, w], got {self.tubelet_size!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.pooler_output_size is None:
            self.pooler_output_size = self.hidden_size
        # Labels, as transformers' PretrainedConfig resolves them: id2label wins, then num_labels, then 2.
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            if self.num_labels is not None and self.num_labels != len(self.id2label):
                raise ValueError(
                    f"num_labels ({self.num_labels}) disagrees with id2label ({len(self.id2label)} entries)"
                )
            self.num_labels = len(self.id2label)
        else:
            self.num_labels = 2 if self.num_labels is None else int(self.num_labels)
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        self.label2id = {v: k for k, v in self.id2label.items()}
        for name in ("num_frames", "num_channels", "num_hidden_layers", "num_attention_heads", "hidden_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")

    # ----------------------------------------------------------------------------------------------
    @property
    def image_hw(self) -> tuple[int, int]:
        """(height, width) of the images the position table was built for."""
        s = self.image_size
        return (s, s) if isinstance(s, int) else (s[0], s[1])

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_grid(self) -> tuple[int, int, int]:
        """Number of tubelets along (time, height, width) for the configured input size."""
        t, p, q = self.tubelet_size
        h, w = self.image_hw
        return self.num_frames // t, h // p, w // q

    @property
    def num_patches(self) -> int:
        a, b, c = self.patch_grid
        return a * b * c

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VivitConfig":
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: d.pop(k) for k in list(d) if k in names}
        extra = {k: v for k, v in d.items() if k not in _IGNORED_KEYS}
        extra.update(d.pop("extra", {}) or {})
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "VivitConfig":
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        if d.get("model_type", "vivit") != "vivit":
            raise ValueError(f"{path} describes a {d['model_type']!r} model, expected 'vivit'")
        return cls.from_dict(d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "VivitConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
        return cls(**{**copy.deepcopy(PRESETS[name]), **overrides})

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "extra"}
        d["id2label"] = {str(k): v for k, v in self.id2label.items()}
        if self.problem_type is None:
            del d["problem_type"]
        d.update(copy.deepcopy(self.extra))
        d["model_type"] = "vivit"
        return d

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")


PRESETS: dict[str, dict[str, Any]] = {
    # google/vivit-b-16x2-kinetics400: the defaults, with the 400 Kinetics classes.
    "vivit-b-16x2": {"num_labels": 400},
    "vivit-b-16x2-kinetics400": {"num_labels": 400},
    # ViViT-L/16x2 (factorised-free): 24 layers of 1024, 16 heads.
    "vivit-l-16x2": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "num_labels": 400,
    },
    # The demo's model: ViViT-B's head size (64) and tubelets on 8 frames of 64x64 (4 x 4 x 4 tubelets + CLS).
    "small": {
        "image_size": 64,
        "num_frames": 8,
        "hidden_size": 192,
        "num_hidden_layers": 4,
        "num_attention_heads": 3,
        "intermediate_size": 768,
        "num_labels": 400,
    },
    # A model small enough for CPU tests: 2 x 2 x 2 tubelets + CLS = 9 tokens.
    "tiny": {
        "image_size": 32,
        "num_frames": 4,
        "tubelet_size": [2, 16, 16],
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "num_labels": 10,
    },
}
