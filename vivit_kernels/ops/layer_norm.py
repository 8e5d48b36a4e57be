"""LayerNorm over the last dimension, forward and backward in Triton.

- ``_layer_norm_fwd_kernel``: a tile of rows per program; mean and rstd in fp32, saved for the backward.
- ``_layer_norm_bwd_kernel``: each program walks a block of rows in tiles, writes dx and keeps running fp32
  sums of ``dy * x_hat`` and ``dy``; the (programs, C) partial sums are then reduced into dW and db.

Saved for backward: x, weight, and the fp32 mean and rstd per row (8 bytes a row), so x_hat is recomputed
rather than stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import (
    HAS_TRITON,
    INTERPRET,
    SUPPORTED_DTYPES,
    KernelConfig,
    check_launchable,
    emulate_bf16,
    launch,
    next_pow2,
    tl,
    triton,
)

__all__ = ["layer_norm", "layer_norm_ref", "LN_CONFIGS", "MAX_FEATURES"]

MAX_FEATURES = 8192
# Per padded row length (BLOCK_C): (warps, rows per program). Every entry compiles for sm_80 / sm_90 without
# spills (tests/test_aot.py); narrow rows are processed several at a time so each program has enough work.
LN_CONFIGS = {64: (2, 8), 128: (2, 8), 256: (4, 4), 512: (4, 4), 1024: (4, 2), 2048: (8, 1), 4096: (16, 1), 8192: (16, 1)}
# Backward: each program reduces this many rows (in tiles of BLOCK_R) into its partial dW/db row.
BWD_ROWS_PER_PROGRAM = 64
# Under the interpreter, wide tiles of rows (fewer interpreted programs); each shipped config is tested too.
INTERPRETER_ROWS = 64


def block_c_for(features: int) -> int:
    return max(64, next_pow2(features))


def config_for(features: int) -> KernelConfig:
    block_c = block_c_for(features)
    warps, rows = LN_CONFIGS[block_c]
    if INTERPRET:
        rows = max(rows, min(INTERPRETER_ROWS, 8192 // block_c))
    return KernelConfig.make(warps, 1, BLOCK_C=block_c, BLOCK_R=rows)


if HAS_TRITON:
    from ._triton import to_output

    @triton.jit
    def _layer_norm_fwd_kernel(
        X, Y, W, B, MEAN, RSTD,  # x/y: (M, C) rows with unit column stride; W/B: (C,); MEAN/RSTD: (M,) fp32
        stride_x, stride_y, M, C, eps,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, EMULATE_BF16: tl.constexpr,
    ):
        """BLOCK_R rows per program; statistics in fp32."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        row_mask = rows < M
        mask = row_mask[:, None] & (cols < C)[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, 1) / C
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, 1) / C
        rstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(W + cols, mask=cols < C, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=cols < C, other=0.0).to(tl.float32)
        y = xc * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], to_output(y, Y.dtype.element_ty, EMULATE_BF16), mask=mask)
        tl.store(MEAN + rows, mean, mask=row_mask)
        tl.store(RSTD + rows, rstd, mask=row_mask)

    @triton.jit
    def _layer_norm_bwd_kernel(
        X, DY, DX, W, MEAN, RSTD,  # (M, C) rows; W (C,); MEAN/RSTD (M,) fp32
        DW_PARTIAL, DB_PARTIAL,  # (programs, C) fp32
        stride_x, stride_dy, stride_dx, M, C, rows_per_program,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, EMULATE_BF16: tl.constexpr,
    ):
        """dx = rstd * (w dy - mean(w dy) - x_hat mean(w dy x_hat)) per row; this program's rows' sums of
        dy * x_hat and dy go to its partial dW / db row."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)
        col_mask = cols < C
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_C], dtype=tl.float32)
        db = tl.zeros([BLOCK_C], dtype=tl.float32)
        first = pid.to(tl.int64) * rows_per_program
        for r in range(0, rows_per_program, BLOCK_R):
            rows = first + r + tl.arange(0, BLOCK_R)
            row_mask = rows < M
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            wdy = w[None, :] * dy
            c1 = tl.sum(xhat * wdy, 1) / C
            c2 = tl.sum(wdy, 1) / C
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            tl.store(DX + rows[:, None] * stride_dx + cols[None, :], to_output(dx, DX.dtype.element_ty, EMULATE_BF16), mask=mask)
            dw += tl.sum(dy * xhat, 0)
            db += tl.sum(dy, 0)
        tl.store(DW_PARTIAL + pid.to(tl.int64) * C + cols, dw, mask=col_mask)
        tl.store(DB_PARTIAL + pid.to(tl.int64) * C + cols, db, mask=col_mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (M, C) with unit column stride: a view when possible, else one copy."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


@torch.library.custom_op("vivit_kernels::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd); mean and rstd are fp32, one per row."""
    x2 = _rows(x)
    M, C = x2.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # not a view of a 2-D buffer (FSDP2 warns on views)
    y2 = y.view(M, C)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M:
        launch(None, _layer_norm_fwd_kernel, lambda m: (triton.cdiv(M, m["BLOCK_R"]),),
               (x2, y2, weight, bias, mean, rstd, x2.stride(0), y2.stride(0), M, C, eps),
               dict(EMULATE_BF16=emulate_bf16(x.dtype)), config_for(C))
    return y, mean, rstd


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return torch.empty_like(x), x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("vivit_kernels::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dW, db)."""
    x2, g2 = _rows(x), _rows(grad_out)
    M, C = x2.shape
    dx = torch.empty((M, C), dtype=x.dtype, device=x.device)
    cfg = config_for(C)
    rows_per_program = max(BWD_ROWS_PER_PROGRAM, cfg.kwargs["BLOCK_R"])
    programs = max(1, triton.cdiv(M, rows_per_program))
    dw_partial = torch.empty((programs, C), dtype=torch.float32, device=x.device)  # every row is written
    db_partial = torch.empty((programs, C), dtype=torch.float32, device=x.device)
    if M:
        launch(None, _layer_norm_bwd_kernel, lambda m: (programs,),
               (x2, g2, dx, weight, mean, rstd, dw_partial, db_partial, x2.stride(0), g2.stride(0), dx.stride(0), M, C,
                rows_per_program),
               dict(EMULATE_BF16=emulate_bf16(x.dtype)), cfg)
    return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype), db_partial.sum(0).to(weight.dtype)


@layer_norm_bwd.register_fake
def _(grad_out, x, weight, mean, rstd):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)


def _backward(ctx, grad_out, grad_mean, grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = layer_norm_bwd(grad_out, x, weight, mean, rstd)
    return dx, dw, db, None


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm of x (..., C) over C with weight and bias (C,), in Triton (forward and backward).
    C <= 8192; statistics in fp32."""
    C = x.shape[-1] if x.dim() else 0
    if x.dim() < 1 or C < 1:
        raise ValueError(f"layer_norm: x must be (..., features) with features >= 1, got {tuple(x.shape)}")
    if C > MAX_FEATURES:
        raise ValueError(f"layer_norm supports at most {MAX_FEATURES} features, got {C}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"layer_norm supports float16, bfloat16 and float32, got {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if tuple(t.shape) != (C,):
            raise ValueError(f"layer_norm: {name} must be ({C},), got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise ValueError(f"layer_norm: {name} is {t.dtype}, x is {x.dtype}; they must match")
    check_launchable(x, weight, bias, what="layer_norm")
    return layer_norm_fwd(x, weight, bias, float(eps))[0]


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def aot_cases():
    from ._aot_cases import make_case

    cases = []
    for ty in ("fp16", "bf16", "fp32"):
        for block_c, (warps, rows) in LN_CONFIGS.items():
            cfg = KernelConfig.make(warps, 1, BLOCK_C=block_c, BLOCK_R=rows)
            label = f"{ty} {cfg.label()}"
            fwd = dict(X=f"*{ty}", Y=f"*{ty}", W=f"*{ty}", B=f"*{ty}", MEAN="*fp32", RSTD="*fp32", stride_x="i32",
                       stride_y="i32", M="i32", C="i32", eps="fp32")
            cases.append(make_case(__name__, _layer_norm_fwd_kernel, "_layer_norm_fwd_kernel", fwd,
                                   dict(cfg.kwargs, EMULATE_BF16=False), warps, 1, label, divisible=("C",)))
            bwd = dict(X=f"*{ty}", DY=f"*{ty}", DX=f"*{ty}", W=f"*{ty}", MEAN="*fp32", RSTD="*fp32",
                       DW_PARTIAL="*fp32", DB_PARTIAL="*fp32", stride_x="i32", stride_dy="i32", stride_dx="i32",
                       M="i32", C="i32", rows_per_program="i32")
            cases.append(make_case(__name__, _layer_norm_bwd_kernel, "_layer_norm_bwd_kernel", bwd,
                                   dict(cfg.kwargs, EMULATE_BF16=False), warps, 1, label, divisible=("C",)))
    return cases
