"""Triton implicit-GEMM tubelet embedding against Conv3d + flatten + cat + add, forward and gradients, on the
test device."""

from __future__ import annotations

import pytest
import torch

from vivit_kernels.ops import patch_embed as pe
from vivit_kernels.ops.patch_embed import patch_embed, patch_embed_ref

from helpers import DEVICE, assert_close, check_against_reference

pytestmark = pytest.mark.triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def inputs(B, T, C, H, W, tubelet, D, bias=True, pixel_grad=True):
    t, p, q = tubelet
    x = torch.randn(B, T, C, H, W).to(DEVICE).requires_grad_(pixel_grad)
    w = (torch.randn(D, C, t, p, q) * (C * t * p * q) ** -0.5).to(DEVICE).requires_grad_()
    b = (0.1 * torch.randn(D)).to(DEVICE).requires_grad_() if bias else None
    n = (T // t) * (H // p) * (W // q)
    cls = torch.randn(1, 1, D).to(DEVICE).requires_grad_()
    pos = torch.randn(1, n + 1, D).to(DEVICE).requires_grad_()
    return x, w, b, cls, pos


# K = C * t * p * q for the tubelets [2,16,16], [1,16,16], [4,8,8], [2,14,14]; odd batch; non-square frames
CASES = [
    ((3, 4, 3, 32, 32), (2, 16, 16), 32),
    ((1, 3, 3, 16, 48), (1, 16, 16), 96),
    ((2, 8, 3, 16, 24), (4, 8, 8), 40),
    ((1, 4, 3, 28, 42), (2, 14, 14), 64),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape, tubelet, hidden", CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v)
)
def test_patch_embed(shape, tubelet, hidden, dtype):
    check_against_reference(patch_embed, patch_embed_ref, inputs(*shape, tubelet, hidden), dtype, name="patch_embed")


def test_vivit_b_sized_tubelets():
    """ViViT-B's tubelet and hidden size on one small clip (K = 1536, N = 2 * 2 * 2 tubelets + CLS)."""
    check_against_reference(patch_embed, patch_embed_ref, inputs(1, 4, 3, 32, 32, (2, 16, 16), 768),
                            torch.float16, name="vivit-b")


def test_strided_pixels_read_in_place():
    """A channels-last-in-memory clip, a frame-strided view, and a batch slice: no copies needed."""
    x, w, b, cls, pos = (t.detach() for t in inputs(2, 8, 3, 32, 32, (2, 16, 16), 32, pixel_grad=False))
    views = [
        x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3),
        torch.randn(2, 16, 3, 32, 32, device=DEVICE)[:, ::2],
        x[1:],
    ]
    for v in views:
        assert not v.is_contiguous() or v.data_ptr() != x.data_ptr()
        assert_close(patch_embed(v, w, b, cls, pos), patch_embed_ref(v, w, b, cls, pos), 1e-4, name="strided")


def test_no_pixel_gradient_unless_needed_and_no_bias():
    x, w, _, cls, pos = inputs(1, 4, 3, 32, 32, (2, 16, 16), 32, bias=False, pixel_grad=False)
    check_against_reference(lambda x, w, c, p: patch_embed(x, w, None, c, p),
                            lambda x, w, c, p: patch_embed_ref(x, w, None, c, p), (x, w, cls, pos), torch.float32)
    assert x.grad is None


def test_leftover_pixels_get_zero_gradient():
    """H = 36 with p = 16: Conv3d ignores the last 4 rows, and so must the gradient."""
    check_against_reference(patch_embed, patch_embed_ref, inputs(1, 4, 3, 36, 32, (2, 16, 16), 32), torch.float32)


def _shipped():
    seen = {}
    for kernel, table in pe.PATCH_CONFIGS.items():
        for configs in table.values():
            for cfg in configs:
                seen.setdefault((kernel, cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]), cfg)
    return sorted(seen.items())


@pytest.mark.parametrize("key, cfg", _shipped(), ids=lambda v: "-".join(map(str, v)) if isinstance(v, tuple) else "")
def test_every_shipped_tile(key, cfg):
    """Each shipped tile of each kernel, forced, with partial tiles along every dimension."""
    kernel = key[0]
    x, w, b, cls, pos = (t.detach() for t in inputs(3, 4, 3, 32, 48, (2, 8, 8), cfg.kwargs["BLOCK_N"] + 24))
    ref = patch_embed_ref(x, w, b, cls, pos)
    out = pe._forward(x, w, b, cls, pos, False, config=cfg if kernel == "fwd" else None)
    assert_close(out, ref, 1e-4, name="forward")
    g = torch.randn_like(ref)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    patch_embed_ref(xr, wr, br, cls, pos).backward(g)
    dx, dw, db, _, _ = pe._backward_impl(g, x, w, True, True, False, dw_config=cfg if kernel == "dw" else None,
                                         dx_config=cfg if kernel == "dx" else None)
    assert_close(dw, wr.grad, 1e-4, name="dW")
    assert_close(db, br.grad, 1e-4, name="db")
    assert_close(dx, xr.grad, 1e-4, name="dx")
    if kernel == "dw":  # the same tile with the reduction over 512 tubelets split in two ranges
        x, w, b, cls, pos = (t.detach() for t in inputs(4, 8, 3, 32, 64, (2, 8, 8), 40))
        M, K = 4 * 4 * 4 * 8, 3 * 2 * 8 * 8
        assert pe._splits(40, K, M, 10_000, tile=(128, 128))[0] == 2
        g = torch.randn(4, 1 + M // 4, 40, device=DEVICE)
        wr = w.clone().requires_grad_()
        patch_embed_ref(x, wr, b, cls, pos).backward(g)
        _, dw_split, *_ = pe._backward_impl(g, x, w, True, False, False, dw_config=cfg, sms=10_000)
        assert_close(dw_split, wr.grad, 1e-4, name="dW split")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_gradient_split_over_tubelets(dtype):
    """When the output tiles alone would not fill the GPU, dW's reduction over tubelets is split in ranges summed
    in a fixed order: right (by the rule), deterministic (two runs equal bit for bit), and the ranges really
    split (here 1728 tubelets, a 64 x 96 output: one tile for 132 SMs)."""
    x, w, b, cls, pos = inputs(4, 6, 3, 48, 48, (2, 4, 4), 64)
    M, K = 4 * 3 * 12 * 12, 3 * 2 * 4 * 4
    n_splits, _ = pe._splits(64, K, M, 132, tile=(128, 128))
    assert n_splits > 1
    check_against_reference(patch_embed, patch_embed_ref, (x, w, b, cls, pos), dtype, name="split dW")
    g = torch.randn(4, 1 + M // 4, 64, device=DEVICE).to(dtype)
    xd, wd = x.detach().to(dtype), w.detach().to(dtype)
    first = pe._backward_impl(g, xd, wd, True, False, False)
    second = pe._backward_impl(g, xd, wd, True, False, False)
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])


def test_opcheck():
    x, w, b, cls, pos = inputs(2, 4, 3, 16, 16, (2, 8, 8), 32)
    torch.library.opcheck(torch.ops.vivit_kernels.patch_embed_fwd.default, (x, w, b, cls, pos, False))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: (a[0][:, :, :2], *a[1:]), "pixel_values has 2 channels, weight expects 3"),
        (lambda a: (a[0][:, :1], *a[1:]), "smaller than one tubelet"),
        (lambda a: (*a[:4], a[4][:, :3]), r"pos_embed must hold \(1, 9, 32\)"),
        (lambda a: (a[0].half(), *a[1:]), "weight is torch.float32, pixel_values is torch.float16"),
    ],
)
def test_bad_inputs(mutate, match):
    args = tuple(t.detach() if t is not None else None for t in inputs(1, 4, 3, 32, 32, (2, 16, 16), 32))
    with pytest.raises(ValueError, match=match):
        patch_embed(*mutate(args))
