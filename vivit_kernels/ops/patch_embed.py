"""Tubelet patch embedding: Conv3d with stride = kernel = tubelet, then [CLS] and position embeddings.

The Conv3d is an implicit GEMM read straight from ``pixel_values`` (B, T, C, H, W) with any strides (no
transpose, unfold or contiguous copy): output row m is the tubelet (b, t', i, j), reduction column k is
(c, dt, dy, dx) of the weight (hidden, C, t, p, q), and A[m, k] = pixel_values[b, t'*t + dt, c, i*p + dy,
j*q + dx]. The epilogue adds the bias and the position embedding and writes rows 1..N of the (B, 1 + N,
hidden) output; the programs holding a clip's first tubelet also write its row 0, cls_token + pos[0].

Backward: ``_patch_embed_bwd_dw_kernel`` computes dW = dOut^T @ A with the same implicit im2col; its
reduction runs over tubelets (M = batch x tubelets), so when the (hidden, C*t*p*q) output tiles alone would
leave multiprocessors idle it is split into ranges of tubelets whose fp32 partial sums a second kernel adds in a
fixed order (deterministic). db is one column sum of dOut. ``_patch_embed_bwd_dx_kernel`` (only when
pixel_values needs a gradient) computes dOut @ W and scatters it back to pixels (tubelets do not overlap, so every
pixel gets at most one value).
The position-table gradient is the batch sum of dOut, and the [CLS] gradient its row 0.

Saved for backward: pixel_values (for dW) and the weight (for dX).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._gemm import _multiprocessors, _splits, sum_splits
from ._triton import (
    HAS_TRITON,
    SUPPORTED_DTYPES,
    KernelConfig,
    check_launchable,
    dot_precision,
    emulate_bf16,
    launch,
    resolve_tf32,
    tile_configs,
    tl,
    triton,
)
from .formulas import register_flop_formulas

__all__ = ["patch_embed", "patch_embed_ref", "PATCH_CONFIGS"]


# Shipped configs per kernel by (element size, dot precision); each compiles for sm_80 and sm_90 without
# spills and within shared memory (tests/test_aot.py). The dX kernel's scattered store keeps a 2-D tile of
# pixel addresses live, so it gets more warps per tile.
PATCH_CONFIGS: dict[str, dict[tuple[int, str], list[KernelConfig]]] = {
    "fwd": {
        (2, "ieee"): tile_configs((128, 128, 32, 8, 3), (64, 128, 32, 4, 3), (128, 64, 32, 8, 3)),
        (4, "tf32"): tile_configs((128, 64, 32, 8, 3), (64, 64, 32, 8, 3)),
        (4, "ieee"): tile_configs((64, 64, 16, 8, 2), (32, 32, 32, 4, 2)),
    },
    "dw": {  # TF32: 64 x 64 only (128 x 64 and 64 x 128 spill on sm_80 for some tubelets once split over K)
        (2, "ieee"): tile_configs((128, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 64, 64, 4, 3)),
        (4, "tf32"): tile_configs((64, 64, 32, 8, 3), (64, 64, 32, 4, 3)),
        (4, "ieee"): tile_configs((64, 64, 16, 8, 2), (64, 32, 16, 4, 2)),
    },
    "dx": {
        (2, "ieee"): tile_configs((128, 64, 32, 8, 3), (64, 64, 32, 8, 3), (64, 64, 64, 4, 3)),
        (4, "tf32"): tile_configs((64, 64, 32, 8, 3), (64, 128, 32, 8, 3)),
        (4, "ieee"): tile_configs((64, 64, 16, 8, 2), (32, 32, 32, 4, 2)),
    },
}
# Under the interpreter (no autotuning there): large tiles, as its programs run one by one in Python (every shipped
# config is still forced on its own by the *_config tests)
INTERPRETER_CONFIG = KernelConfig.make(4, 1, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)


if HAS_TRITON:
    from ._triton import autotuned, grouped_tile_order, to_output

    @triton.jit
    def _tubelet_offsets(
        offs_m, Tp, Hp, Wp, sx_b, sx_t, sx_h, sx_w, TT: tl.constexpr, P: tl.constexpr, Q: tl.constexpr
    ):
        """Pixel offset of each tubelet's first pixel, and the tubelet's index inside its clip."""
        per_clip = Tp * Hp * Wp
        b = offs_m // per_clip
        patch = offs_m % per_clip
        tt = patch // (Hp * Wp)
        ii = (patch // Wp) % Hp
        jj = patch % Wp
        off = b.to(tl.int64) * sx_b + (tt * TT) * sx_t + (ii * P) * sx_h + (jj * Q) * sx_w
        return off, b, patch

    @triton.jit
    def _column_offsets(kk, sx_c, sx_t, sx_h, sx_w, TT: tl.constexpr, P: tl.constexpr, Q: tl.constexpr):
        """Pixel offset of reduction column k = (c, dt, dy, dx) inside a tubelet."""
        c = kk // (TT * P * Q)
        r = kk % (TT * P * Q)
        return c * sx_c + (r // (P * Q)) * sx_t + ((r // Q) % P) * sx_h + (r % Q) * sx_w

    @triton.jit
    def _patch_embed_fwd_kernel(
        X,  # pixel_values (B, T, C, H, W), any strides
        W,  # weight viewed as (D, K), K = C * TT * P * Q
        BIAS,  # (D,)
        CLS,  # (D,)
        POS,  # (1 + N, D) position table (N = Tp * Hp * Wp)
        OUT,  # (B, 1 + N, D)
        M, D, K, Tp, Hp, Wp,
        sx_b, sx_t, sx_c, sx_h, sx_w,
        stride_wd, stride_wk, stride_pn, stride_pd, stride_ob, stride_on, stride_od,
        TT: tl.constexpr, P: tl.constexpr, Q: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
    ):
        pid_m, pid_n = grouped_tile_order(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(D, BLOCK_N), GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        n_mask = offs_n < D
        row_off, b, patch = _tubelet_offsets(offs_m, Tp, Hp, Wp, sx_b, sx_t, sx_h, sx_w, TT, P, Q)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            kk = k + offs_k
            k_mask = kk < K
            col_off = _column_offsets(kk, sx_c, sx_t, sx_h, sx_w, TT, P, Q)
            a = tl.load(X + row_off[:, None] + col_off[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(
                W + kk[:, None] * stride_wk + offs_n[None, :] * stride_wd,
                mask=k_mask[:, None] & n_mask[None, :],
                other=0.0,
            )
            if EMULATE_BF16:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

        mask = m_mask[:, None] & n_mask[None, :]
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        acc += tl.load(POS + (1 + patch)[:, None] * stride_pn + offs_n[None, :] * stride_pd, mask=mask, other=0.0).to(
            tl.float32
        )
        out_rows = OUT + b.to(tl.int64)[:, None] * stride_ob
        tl.store(out_rows + (1 + patch)[:, None] * stride_on + offs_n[None, :] * stride_od,
                 to_output(acc, OUT.dtype.element_ty, EMULATE_BF16), mask=mask)
        # row 0 of each clip: cls_token + pos[0], written by the program holding the clip's first tubelet
        cls = tl.load(CLS + offs_n, mask=n_mask, other=0.0).to(tl.float32) + tl.load(
            POS + offs_n * stride_pd, mask=n_mask, other=0.0
        ).to(tl.float32)
        first = mask & (patch == 0)[:, None]
        tl.store(
            out_rows + offs_n[None, :] * stride_od,
            to_output(
                tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32) + cls[None, :], OUT.dtype.element_ty, EMULATE_BF16
            ),
            mask=first,
        )

    @triton.jit
    def _patch_embed_bwd_dw_kernel(
        X, DOUT,  # pixel_values (B, T, C, H, W); dOut (B, 1 + N, D)
        DW,  # (D, K) weight gradient; with SPLIT_K (splits, D, K) fp32 partial sums, one slab per program axis 1
        M, D, K, m_split,  # m_split: the tubelets of one split (SPLIT_K; a multiple of BLOCK_K)
        Tp, Hp, Wp,
        sx_b, sx_t, sx_c, sx_h, sx_w,
        stride_ob, stride_on, stride_od, stride_wd, stride_wk,
        TT: tl.constexpr, P: tl.constexpr, Q: tl.constexpr, SPLIT_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
    ):
        """dW (D, K) = dOut_patches^T (D, M) @ im2col(X) (M, K); BLOCK_M tiles D, BLOCK_N tiles K, and the
        reduction runs over tubelets in steps of BLOCK_K (with SPLIT_K: over this program's range of them)."""
        pid_d, pid_k = grouped_tile_order(tl.program_id(0), tl.cdiv(D, BLOCK_M), tl.cdiv(K, BLOCK_N), GROUP_M)
        m_lo = 0
        m_hi = M
        if SPLIT_K:
            split = tl.program_id(1)
            m_lo = split * m_split
            m_hi = tl.minimum(M, m_lo + m_split)
            DW += split.to(tl.int64) * D * K
        offs_d = pid_d * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_kk = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_t = tl.arange(0, BLOCK_K)
        d_mask = offs_d < D
        kk_mask = offs_kk < K
        col_off = _column_offsets(offs_kk, sx_c, sx_t, sx_h, sx_w, TT, P, Q)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for m in range(m_lo, m_hi, BLOCK_K):
            tm = m + offs_t
            t_mask = tm < M  # (a split's range is a multiple of BLOCK_K: only the last one ends inside a step)
            row_off, b, patch = _tubelet_offsets(tm, Tp, Hp, Wp, sx_b, sx_t, sx_h, sx_w, TT, P, Q)
            g_off = b.to(tl.int64) * stride_ob + (1 + patch) * stride_on
            g = tl.load(
                DOUT + g_off[None, :] + offs_d[:, None] * stride_od, mask=d_mask[:, None] & t_mask[None, :], other=0.0
            )
            a = tl.load(X + row_off[:, None] + col_off[None, :], mask=t_mask[:, None] & kk_mask[None, :], other=0.0)
            if EMULATE_BF16:
                g = g.to(tl.float32)
                a = a.to(tl.float32)
            acc = tl.dot(g, a, acc, input_precision=DOT_PRECISION)
        mask = d_mask[:, None] & kk_mask[None, :]
        tl.store(DW + offs_d[:, None] * stride_wd + offs_kk[None, :] * stride_wk,
                 to_output(acc, DW.dtype.element_ty, EMULATE_BF16), mask=mask)

    @triton.jit
    def _patch_embed_bwd_dx_kernel(
        DOUT, W, DX,  # dOut (B, 1 + N, D); weight as (D, K); dX like pixel_values
        M, D, K, Tp, Hp, Wp,
        sx_b, sx_t, sx_c, sx_h, sx_w,
        stride_ob, stride_on, stride_od, stride_wd, stride_wk,
        TT: tl.constexpr, P: tl.constexpr, Q: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
    ):
        """im2col(dX) (M, K) = dOut_patches (M, D) @ W (D, K), scattered back to pixels."""
        pid_m, pid_k = grouped_tile_order(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_N), GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_kk = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        kk_mask = offs_kk < K
        row_off, b, patch = _tubelet_offsets(offs_m, Tp, Hp, Wp, sx_b, sx_t, sx_h, sx_w, TT, P, Q)
        g_rows = b.to(tl.int64) * stride_ob + (1 + patch) * stride_on
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d in range(0, D, BLOCK_K):
            dd = d + offs_d
            dd_mask = dd < D
            g = tl.load(
                DOUT + g_rows[:, None] + dd[None, :] * stride_od, mask=m_mask[:, None] & dd_mask[None, :], other=0.0
            )
            w = tl.load(
                W + dd[:, None] * stride_wd + offs_kk[None, :] * stride_wk,
                mask=dd_mask[:, None] & kk_mask[None, :],
                other=0.0,
            )
            if EMULATE_BF16:
                g = g.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(g, w, acc, input_precision=DOT_PRECISION)
        col_off = _column_offsets(offs_kk, sx_c, sx_t, sx_h, sx_w, TT, P, Q)
        tl.store(DX + row_off[:, None] + col_off[None, :], to_output(acc, DX.dtype.element_ty, EMULATE_BF16),
                 mask=m_mask[:, None] & kk_mask[None, :])

    def _row(named_args, kwargs):
        return named_args["X" if "X" in named_args else "DOUT"].element_size(), kwargs["DOT_PRECISION"]

    _KEY = ["M", "D", "K", "DOT_PRECISION", "TT", "P", "Q"]
    _fwd_tuned = autotuned(_patch_embed_fwd_kernel, PATCH_CONFIGS["fwd"], _row, _KEY)
    _dw_tuned = autotuned(_patch_embed_bwd_dw_kernel, PATCH_CONFIGS["dw"], _row, _KEY + ["m_split", "SPLIT_K"])
    _dx_tuned = autotuned(_patch_embed_bwd_dx_kernel, PATCH_CONFIGS["dx"], _row, _KEY)


# ------------------------------------------------------------------------------------------------
# Launchers and custom ops
# ------------------------------------------------------------------------------------------------
def _geometry(pixel_values: torch.Tensor, weight: torch.Tensor):
    B, T, C, H, W = pixel_values.shape
    tt, p, q = weight.shape[2:]
    grid = (T // tt, H // p, W // q)
    return B, grid, B * grid[0] * grid[1] * grid[2], C * tt * p * q


def _grid2(rows: int, cols: int):
    return lambda m: (triton.cdiv(rows, m["BLOCK_M"]) * triton.cdiv(cols, m["BLOCK_N"]),)


def _forward(pixel_values, weight, bias, cls_token, pos_embed, allow_tf32: bool, config: KernelConfig | None = None):
    B, (Tp, Hp, Wp), M, K = _geometry(pixel_values, weight)
    D = weight.shape[0]
    out = torch.empty((B, 1 + M // B, D), dtype=pixel_values.dtype, device=pixel_values.device)
    w2 = weight.reshape(D, K)
    pos = pos_embed.reshape(-1, D)
    args = (pixel_values, w2, bias if bias is not None else w2, cls_token.reshape(D), pos, out,
            M, D, K, Tp, Hp, Wp, *pixel_values.stride(), w2.stride(0), w2.stride(1), pos.stride(0), pos.stride(1),
            *out.stride())
    meta = dict(
        TT=weight.shape[2],
        P=weight.shape[3],
        Q=weight.shape[4],
        HAS_BIAS=bias is not None,
        DOT_PRECISION=dot_precision(pixel_values.dtype, allow_tf32),
        EMULATE_BF16=emulate_bf16(pixel_values.dtype),
    )
    launch(_fwd_tuned, _patch_embed_fwd_kernel, _grid2(M, D), args, meta, config, INTERPRETER_CONFIG)
    return out


@torch.library.custom_op("vivit_kernels::patch_embed_fwd", mutates_args=())
def patch_embed_fwd(
    pixel_values: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cls_token: torch.Tensor,
    pos_embed: torch.Tensor,
    allow_tf32: bool,
) -> torch.Tensor:
    return _forward(pixel_values, weight, bias, cls_token, pos_embed, allow_tf32)


@patch_embed_fwd.register_fake
def _(pixel_values, weight, bias, cls_token, pos_embed, allow_tf32):
    B, _, M, _ = _geometry(pixel_values, weight)
    return pixel_values.new_empty((B, 1 + M // B, weight.shape[0]))


def _backward_impl(grad_out, pixel_values, weight, has_bias: bool, needs_dx: bool, allow_tf32: bool,
                   dw_config: KernelConfig | None = None, dx_config: KernelConfig | None = None,
                   sms: int | None = None, needs_dw: bool = True, needs_dcls: bool = True, needs_dpos: bool = True):
    """(dx, dW, db, d cls, d pos), each computed only where wanted (``has_bias``: db is wanted), else an empty
    tensor: a frozen weight costs no dW kernel. ``sms``: the multiprocessors the weight gradient's split fills
    (default: the device's; tests pass more to force a split on small shapes)."""
    B, (Tp, Hp, Wp), M, K = _geometry(pixel_values, weight)
    D = weight.shape[0]
    tt, p, q = weight.shape[2:]
    meta = dict(TT=tt, P=p, Q=q, DOT_PRECISION=dot_precision(pixel_values.dtype, allow_tf32),
                EMULATE_BF16=emulate_bf16(pixel_values.dtype))
    dw = weight.new_empty(0)
    if needs_dw:
        dw = torch.empty_like(weight)
        dw2 = dw.view(D, K)
        # split the reduction over tubelets when the output tiles alone would not fill the GPU (counted at 128 x
        # 128, the largest shipped dW tile); fp32 partials, summed in split order
        n_splits, m_split = _splits(D, K, M, sms or _multiprocessors(pixel_values.device), tile=(128, 128))
        target = dw2 if n_splits == 1 else torch.empty((n_splits, D, K), dtype=torch.float32, device=dw.device)
        w_strides = (dw2.stride(0), dw2.stride(1)) if n_splits == 1 else (K, 1)
        args = (pixel_values, grad_out, target, M, D, K, m_split, Tp, Hp, Wp, *pixel_values.stride(),
                *grad_out.stride(), *w_strides)
        launch(_dw_tuned, _patch_embed_bwd_dw_kernel,
               lambda m: (triton.cdiv(D, m["BLOCK_M"]) * triton.cdiv(K, m["BLOCK_N"]), n_splits), args,
               dict(meta, SPLIT_K=n_splits > 1), dw_config, INTERPRETER_CONFIG)
        if n_splits > 1:
            sum_splits(target, dw2)
    # db: one column sum of the patch rows of dOut (fp32 accumulation), not a by-product of every dW program
    db = grad_out[:, 1:].sum((0, 1), dtype=torch.float32).to(weight.dtype) if has_bias else weight.new_empty(0)
    dx = pixel_values.new_empty(0)
    if needs_dx:
        T, H, W = pixel_values.shape[1], pixel_values.shape[3], pixel_values.shape[4]
        covered = (T == Tp * tt) and (H == Hp * p) and (W == Wp * q)
        dx = (torch.empty if covered else torch.zeros)(
            pixel_values.shape, dtype=pixel_values.dtype, device=pixel_values.device
        )
        w2 = weight.reshape(D, K)
        args = (grad_out, w2, dx, M, D, K, Tp, Hp, Wp, *dx.stride(), *grad_out.stride(), w2.stride(0), w2.stride(1))
        launch(_dx_tuned, _patch_embed_bwd_dx_kernel, _grid2(M, K), args, meta, dx_config, INTERPRETER_CONFIG)
    dpos = grad_out.sum(0, keepdim=True) if needs_dpos or needs_dcls else grad_out.new_empty(0)
    dcls = dpos[:, :1].clone() if needs_dcls else grad_out.new_empty(0)
    return dx, dw, db, dcls, dpos if needs_dpos else grad_out.new_empty(0)


@torch.library.custom_op("vivit_kernels::patch_embed_bwd", mutates_args=())
def patch_embed_bwd(
    grad_out: torch.Tensor,
    pixel_values: torch.Tensor,
    weight: torch.Tensor,
    needs: list[bool],
    allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d pixel_values, dW, db, d cls_token, d pos_embed), each empty where ``needs`` (pixel_values, weight, bias,
    cls_token, pos_embed) says it is not wanted."""
    needs_dx, needs_dw, needs_db, needs_dcls, needs_dpos = needs
    return _backward_impl(grad_out, pixel_values, weight, needs_db, needs_dx, allow_tf32, needs_dw=needs_dw,
                          needs_dcls=needs_dcls, needs_dpos=needs_dpos)


@patch_embed_bwd.register_fake
def _(grad_out, pixel_values, weight, needs, allow_tf32):
    D = weight.shape[0]
    shapes = (pixel_values.shape, weight.shape, (D,), (1, 1, D), (1, *grad_out.shape[1:]))
    return tuple(grad_out.new_empty(shape) if need else grad_out.new_empty(0)
                 for shape, need in zip(shapes, needs, strict=True))


def _setup_context(ctx, inputs, output):
    pixel_values, weight, bias, cls_token, pos_embed, allow_tf32 = inputs
    ctx.needs = list(ctx.needs_input_grad[:5])  # pixel_values, weight, bias, cls_token, pos_embed
    ctx.save_for_backward(pixel_values, weight)  # the clip for dW, the weight for dx (and both shapes)
    ctx.allow_tf32 = allow_tf32
    ctx.cls_shape, ctx.pos_shape = cls_token.shape, pos_embed.shape


def _backward(ctx, grad_out):
    pixel_values, weight = ctx.saved_tensors
    if not any(ctx.needs):
        return (None,) * 6
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    dx, dw, db, dcls, dpos = patch_embed_bwd(grad_out, pixel_values, weight, ctx.needs, ctx.allow_tf32)
    needs_dx, needs_dw, needs_db, needs_dcls, needs_dpos = ctx.needs
    return (dx if needs_dx else None, dw if needs_dw else None, db if needs_db else None,
            dcls.reshape(ctx.cls_shape) if needs_dcls else None, dpos.reshape(ctx.pos_shape) if needs_dpos else None,
            None)


patch_embed_fwd.register_autograd(_backward, setup_context=_setup_context)
register_flop_formulas(patch_embed_fwd, patch_embed_bwd)


def patch_embed(
    pixel_values: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cls_token: torch.Tensor,
    pos_embed: torch.Tensor,
    allow_tf32: bool | None = None,
) -> torch.Tensor:
    """Conv3d tubelet embedding + [CLS] + position embedding in one Triton implicit-GEMM launch.

    pixel_values: (B, T, C, H, W), any strides; weight: (hidden, C, t, p, q); bias: (hidden,) or None;
    cls_token: (1, 1, hidden); pos_embed: (1, 1 + (T/t)(H/p)(W/q), hidden). Returns (B, 1 + N, hidden).
    Frames and pixels past the last whole tubelet are ignored, as Conv3d does.
    """
    if pixel_values.dim() != 5 or weight.dim() != 5:
        raise ValueError(f"patch_embed: pixel_values must be (B, T, C, H, W) and weight (hidden, C, t, p, q), got "
                         f"{tuple(pixel_values.shape)} and {tuple(weight.shape)}")
    if pixel_values.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"patch_embed supports float16, bfloat16 and float32, got {pixel_values.dtype}")
    B, grid, M, K = _geometry(pixel_values, weight)
    D = weight.shape[0]
    if pixel_values.shape[2] != weight.shape[1]:
        raise ValueError(
            f"patch_embed: pixel_values has {pixel_values.shape[2]} channels, weight expects {weight.shape[1]}"
        )
    if min(grid) < 1:
        raise ValueError(
            f"patch_embed: input {tuple(pixel_values.shape)} is smaller than one tubelet {tuple(weight.shape[2:])}"
        )
    n_tokens = 1 + M // B
    if pos_embed.numel() != n_tokens * D:
        raise ValueError(f"patch_embed: pos_embed must hold (1, {n_tokens}, {D}), got {tuple(pos_embed.shape)}")
    if cls_token.numel() != D:
        raise ValueError(f"patch_embed: cls_token must hold (1, 1, {D}), got {tuple(cls_token.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("cls_token", cls_token), ("pos_embed", pos_embed)):
        if t is not None and t.dtype != pixel_values.dtype:
            raise ValueError(f"patch_embed: {name} is {t.dtype}, pixel_values is {pixel_values.dtype}; they must match")
    check_launchable(
        *(t for t in (pixel_values, weight, bias, cls_token, pos_embed) if t is not None), what="patch_embed"
    )
    tf32 = resolve_tf32(allow_tf32)
    return patch_embed_fwd(pixel_values, weight, bias, cls_token, pos_embed, tf32)


def patch_embed_ref(
    pixel_values: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cls_token: torch.Tensor,
    pos_embed: torch.Tensor,
) -> torch.Tensor:
    """The definition, written out: each whole (t, p, q) tubelet of the clip flattened in the weight's (C, t, p, q)
    order, one matrix product with the flattened weight, + bias; [CLS] first, + positions. Frames and pixels past
    the last whole tubelet are dropped (as Conv3d drops them). Independent of F.conv3d, which is a candidate
    (``patch_embed_conv3d``) checked against it.

    pixel_values: (B, T, C, H, W); weight: (hidden, C, t, p, q); bias: (hidden,); cls_token: (1, 1, hidden);
    pos_embed: (1, 1 + T/t * H/p * W/q, hidden). Returns (B, 1 + N, hidden).
    """
    B, T, C, H, W = pixel_values.shape
    D, _, t, p, q = weight.shape
    Tp, Hp, Wp = T // t, H // p, W // q
    x = pixel_values[:, : Tp * t, :, : Hp * p, : Wp * q].reshape(B, Tp, t, C, Hp, p, Wp, q)
    x = x.permute(0, 1, 4, 6, 3, 2, 5, 7).reshape(B, Tp * Hp * Wp, C * t * p * q)
    tokens = x @ weight.reshape(D, -1).t()
    if bias is not None:
        tokens = tokens + bias
    return torch.cat((cls_token.expand(B, -1, -1), tokens), dim=1) + pos_embed


def patch_embed_conv3d(
    pixel_values: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cls_token: torch.Tensor,
    pos_embed: torch.Tensor,
) -> torch.Tensor:
    """Op for op as transformers computes it (F.conv3d, cuDNN on CUDA, then [CLS] and positions): the vendor
    candidate."""
    x = F.conv3d(pixel_values.transpose(1, 2), weight, bias, stride=tuple(weight.shape[2:]))
    x = x.flatten(2).transpose(1, 2)
    cls = cls_token.expand(pixel_values.shape[0], -1, -1)
    return torch.cat((cls, x), dim=1) + pos_embed


# Tubelets the gate compiles (t, p, q are compile-time constants): ViViT-B's, and the test suite's others.
AOT_TUBELETS = ((2, 16, 16), (1, 16, 16), (4, 8, 8), (2, 14, 14))


def aot_cases():
    from ._aot_cases import make_case

    cases = []
    # pixel_values contiguous: unit stride along W (the JIT makes it a constant); the other strides are runtime
    geometry = dict(M="i32", D="i32", K="i32", Tp="i32", Hp="i32", Wp="i32", **{f"sx_{d}": "i32" for d in "btch"})
    for ty, size in (("fp16", 2), ("bf16", 2), ("fp32", 4)):
        for precision in (("ieee", "tf32") if size == 4 else ("ieee",)):
            for tt, p, q in AOT_TUBELETS:
                biases = (True, False) if (tt, p, q) == AOT_TUBELETS[0] else (True,)
                splits = ("split", "whole") if (tt, p, q) == AOT_TUBELETS[0] else ("split",)  # ViViT-B's dW splits
                tag = f"{ty}{'/tf32' if precision == 'tf32' else ''} tubelet={tt}x{p}x{q}"
                meta = dict(TT=tt, P=p, Q=q, DOT_PRECISION=precision, EMULATE_BF16=False, sx_w=1)
                kernels = (
                    ("fwd", _patch_embed_fwd_kernel, "_patch_embed_fwd_kernel",
                     dict(X=f"*{ty}", W=f"*{ty}", BIAS=f"*{ty}", CLS=f"*{ty}", POS=f"*{ty}", OUT=f"*{ty}", **geometry,
                          stride_wd="i32", stride_pn="i32", stride_ob="i32", stride_on="i32"),
                     dict(stride_wk=1, stride_pd=1, stride_od=1), biases),
                    ("dw", _patch_embed_bwd_dw_kernel, "_patch_embed_bwd_dw_kernel",
                     dict(X=f"*{ty}", DOUT=f"*{ty}", DW=f"*{ty}", **geometry, m_split="i32", stride_ob="i32",
                          stride_on="i32", stride_wd="i32"),
                     dict(stride_od=1, stride_wk=1), splits),
                    ("dx", _patch_embed_bwd_dx_kernel, "_patch_embed_bwd_dx_kernel",
                     dict(DOUT=f"*{ty}", W=f"*{ty}", DX=f"*{ty}", **geometry, stride_ob="i32", stride_on="i32",
                          stride_wd="i32"),
                     dict(stride_od=1, stride_wk=1), (None,)),
                )
                for table, fn, name, types, unit, variants in kernels:
                    for cfg in PATCH_CONFIGS[table][(size, precision)]:
                        for variant in variants:
                            sig, divisible = types, ("D", "K")
                            if variant in ("split", "whole"):  # split: fp32 partials, ranges of 64k tubelets
                                flags, extra = dict(SPLIT_K=variant == "split"), f" {variant}-K"
                                if variant == "split":
                                    sig, divisible = dict(types, DW="*fp32"), divisible + ("m_split",)
                            else:
                                flags = {} if variant is None else dict(HAS_BIAS=variant)
                                extra = "" if variant in (None, True) else " no-bias"
                            label = f"{tag}{extra} {cfg.label()}"
                            cases.append(make_case(__name__, fn, name, sig, dict(meta, **unit, **flags, **cfg.kwargs),
                                                   cfg.num_warps, cfg.num_stages, label, divisible=divisible))
    return cases
