"""Every op's sample inputs, at a ``Shape`` (a ViViT layer's sizes), in a dtype, on a device: seeded, so a test, a
benchmark, the acceptance run and ``auto``'s checks all see the same tensors for the same request. The registry's
``Op.sample_inputs`` is one of these functions: ``(shape, dtype, device, requires_grad=False, variant=None)`` ->
the op's call arguments (leaves that require grad where asked; ``variant`` picks one of the op's ``variants``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Shape", "layer_norm_inputs", "qkv_inputs", "linear_inputs", "mlp_inputs", "attention_qkv_inputs",
           "attention_inputs", "patch_embed_inputs", "bias_gelu_fast_inputs", "preprocess_video_inputs",
           "token_merge_inputs"]


@dataclass(frozen=True)
class Shape:
    """The sizes an op's sample inputs are made at: a ViViT layer's (tokens, hidden, heads x head_dim, MLP width)
    and the clip's (frames of image x image, tubelet)."""

    batch: int
    tokens: int
    hidden: int
    heads: int
    head_dim: int
    inter: int
    frames: int
    image: int
    tubelet: tuple[int, int, int] = (2, 16, 16)

    @classmethod
    def vivit_b(cls, batch: int = 1) -> Shape:
        """ViViT-B/16x2: 3137 tokens of 768, 12 heads of 64, MLP 3072, 32 frames of 224x224."""
        return cls(batch, 3137, 768, 12, 64, 3072, 32, 224)

    @classmethod
    def tiny(cls, batch: int = 1) -> Shape:
        """The acceptance dry run's sizes (67 tokens: not a tile multiple)."""
        return cls(batch, 67, 64, 2, 32, 96, 4, 32)

    @classmethod
    def awkward(cls, batch: int = 2) -> Shape:
        """The unit tests' small awkward sizes (17 tokens, head_dim 16)."""
        return cls(batch, 17, 32, 2, 16, 64, 4, 32)



def _maker(dtype: torch.dtype, device, requires_grad: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0, shift: float = 0.0, grad: bool = True) -> torch.Tensor:
        t = (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad and grad)

    return randn


def layer_norm_inputs(s: Shape, dtype, device, requires_grad=False, variant=None):
    r = _maker(dtype, device, requires_grad)
    return r(s.batch, s.tokens, s.hidden, scale=2.0, shift=0.5), r(s.hidden, scale=0.1, shift=1.0), \
        r(s.hidden, scale=0.1), 1e-6


def qkv_inputs(s: Shape, dtype, device, requires_grad=False, variant=None):
    r = _maker(dtype, device, requires_grad)
    c = s.heads * s.head_dim
    weights = [t for _ in range(3) for t in (r(c, s.hidden, scale=s.hidden**-0.5), r(c, scale=0.1))]
    return (r(s.batch, s.tokens, s.hidden), *weights)


def linear_inputs(s: Shape, dtype, device, requires_grad=False, variant=None):
    """"o_proj+residual" (hidden -> hidden, bias, residual) or "fc1+gelu_fast" (hidden -> inter, bias, gelu_fast)."""
    r = _maker(dtype, device, requires_grad)
    x = r(s.batch, s.tokens, s.hidden)
    if variant == "fc1+gelu_fast":
        return x, r(s.inter, s.hidden, scale=s.hidden**-0.5), r(s.inter, scale=0.1), "gelu_fast", None
    return x, r(s.hidden, s.hidden, scale=s.hidden**-0.5), r(s.hidden, scale=0.1), None, \
        r(s.batch, s.tokens, s.hidden)


def mlp_inputs(s: Shape, dtype, device, requires_grad=False, variant=None):
    r = _maker(dtype, device, requires_grad)
    return (r(s.batch, s.tokens, s.hidden), r(s.inter, s.hidden, scale=s.hidden**-0.5), r(s.inter, scale=0.1),
            r(s.hidden, s.inter, scale=s.inter**-0.5), r(s.hidden, scale=0.1), "gelu_fast",
            r(s.batch, s.tokens, s.hidden))


def _key_bias(s: Shape, device) -> tuple:
    """"proportional": log of the tokens each key stands for (1 to 4), token merging's bias; else nothing."""
    sizes = torch.randint(1, 5, (s.batch, s.tokens), generator=torch.Generator().manual_seed(3))
    return (sizes.float().log().to(device),)


def attention_qkv_inputs(s: Shape, dtype, device, requires_grad=False, variant=None):
    r = _maker(dtype, device, requires_grad)
    bias = _key_bias(s, device) if variant == "proportional" else ()
    return r(s.batch, s.tokens, 3, s.heads, s.head_dim), s.head_dim**-0.5, *bias


def attention_inputs(s: Shape, dtype, device, requires_grad=False, variant=None):
    r = _maker(dtype, device, requires_grad)
    bias = _key_bias(s, device) if variant == "proportional" else ()
    return (*(r(s.batch, s.tokens, s.heads, s.head_dim) for _ in range(3)), s.head_dim**-0.5, *bias)


def patch_embed_inputs(s: Shape, dtype, device, requires_grad=False, variant=None):
    r = _maker(dtype, device, requires_grad)
    t, p, q = s.tubelet
    patches = (s.frames // t) * (s.image // p) * (s.image // q)
    return (r(s.batch, s.frames, 3, s.image, s.image), r(s.hidden, 3, t, p, q, scale=(3 * t * p * q) ** -0.5),
            r(s.hidden, scale=0.1), r(1, 1, s.hidden), r(1, 1 + patches, s.hidden))


def bias_gelu_fast_inputs(s: Shape, dtype, device, requires_grad=False, variant=None):
    r = _maker(dtype, device, requires_grad)
    return r(s.batch, s.tokens, s.inter), r(s.inter, scale=0.1)


def preprocess_video_inputs(s: Shape, dtype, device, requires_grad=False, variant=None):
    """uint8 frames 3/2 the model's image size (shortest edge resized to 256/224 of it, center crop)."""
    g = torch.Generator().manual_seed(0)
    height, width = s.image * 3 // 2, s.image * 2
    frames = torch.randint(0, 256, (s.batch, s.frames, height, width, 3), generator=g, dtype=torch.uint8)
    short = round(s.image * 256 / 224)
    resized = (short, int(short * width / height))
    box = [(resized[0] - s.image) // 2, (resized[1] - s.image) // 2, s.image, s.image]
    return frames.to(device), list(resized), box, 1 / 127.5, -1.0, [0.5] * 3, [0.5] * 3, dtype


def token_merge_inputs(s: Shape, dtype, device, requires_grad=False, variant=None):
    """One merge step of a clip of (temporal slices) x (the image's patches) tokens after [CLS] (about ``s.tokens``):
    tokens (only they take a gradient), keys as the QKV projection leaves them (a strided view of its (B, N, 3, H,
    D) output), sizes of 1 to 3 tokens (earlier merges), a source map from twice as many original tokens, r a
    sixth of the tokens, and the split ``variant`` ("temporal", "grouped" or "alternate")."""
    r_ = _maker(dtype, device, requires_grad)
    g = torch.Generator().manual_seed(5)
    per_slice = (s.image // s.tubelet[1]) * (s.image // s.tubelet[2])
    slices = max(2, (s.tokens - 1) // per_slice)
    n = 1 + slices * per_slice
    x = r_(s.batch, n, s.hidden)
    keys = r_(s.batch, n, 3, s.heads, s.head_dim, grad=False)[:, :, 1]
    size = torch.randint(1, 4, (s.batch, n), generator=g).float().to(device)
    source = torch.randint(0, n, (s.batch, 2 * n), generator=g).to(device)
    mode = variant or "temporal"
    odd = (slices // 2) * per_slice if mode == "grouped" else 0
    return x, keys, size, source, max(1, n // 6), mode, per_slice, odd
