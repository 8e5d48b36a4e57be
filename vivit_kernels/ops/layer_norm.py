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
    saved_outputs_only,
    tl,
    triton,
)
from .formulas import register_flop_formulas

__all__ = ["layer_norm", "layer_norm_ref", "LN_CONFIGS", "MAX_FEATURES"]

MAX_FEATURES = 8192
# Per padded row length (BLOCK_C): (warps, rows per program). Every entry compiles for sm_80 / sm_90 without
# spills (tests/test_aot.py); narrow rows are processed several at a time so each program has enough work.
LN_CONFIGS = {
    64: (2, 8),
    128: (2, 8),
    256: (4, 4),
    512: (4, 4),
    1024: (4, 2),
    2048: (8, 1),
    4096: (16, 1),
    8192: (16, 1),
}
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
        tl.store(
            Y + rows[:, None] * stride_y + cols[None, :], to_output(y, Y.dtype.element_ty, EMULATE_BF16), mask=mask
        )
        tl.store(MEAN + rows, mean, mask=row_mask)
        tl.store(RSTD + rows, rstd, mask=row_mask)

    @triton.jit
    def _layer_norm_bwd_kernel(
        X, DY, DX, W, MEAN, RSTD,  # (M, C) rows; W (C,); MEAN/RSTD (M,) fp32
        DW_PARTIAL, DB_PARTIAL,  # (programs, C) fp32
        stride_x, stride_dy, stride_dx, M, C, rows_per_program,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, EMULATE_BF16: tl.constexpr,
        NEEDS_DX: tl.constexpr = True, WEIGHT_GRADS: tl.constexpr = True,
    ):
        """dx = rstd * (w dy - mean(w dy) - x_hat mean(w dy x_hat)) per row (NEEDS_DX); this program's rows' sums
        of dy * x_hat and dy go to its partial dW / db row (WEIGHT_GRADS: only when a weight needs a gradient)."""
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
            if NEEDS_DX:
                wdy = w[None, :] * dy
                c1 = tl.sum(xhat * wdy, 1) / C
                c2 = tl.sum(wdy, 1) / C
                dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
                tl.store(
                    DX + rows[:, None] * stride_dx + cols[None, :],
                    to_output(dx, DX.dtype.element_ty, EMULATE_BF16),
                    mask=mask,
                )
            if WEIGHT_GRADS:
                dw += tl.sum(dy * xhat, 0)
                db += tl.sum(dy, 0)
        if WEIGHT_GRADS:
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
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    needs_dx: bool, needs_dw: bool, needs_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dW, db), each empty where not needed: a frozen weight and bias cost no partial sums, no reduction and
    no cast."""
    x2, g2 = _rows(x), _rows(grad_out)
    M, C = x2.shape
    dx = torch.empty((M, C), dtype=x.dtype, device=x.device) if needs_dx else x.new_empty(0)
    cfg = config_for(C)
    rows_per_program = max(BWD_ROWS_PER_PROGRAM, cfg.kwargs["BLOCK_R"])
    programs = max(1, triton.cdiv(M, rows_per_program))
    weight_grads = needs_dw or needs_db
    # every row of the partials is written (by its program) when weight gradients are needed
    partials = (programs, C) if weight_grads else (0,)
    dw_partial = torch.empty(partials, dtype=torch.float32, device=x.device)
    db_partial = torch.empty(partials, dtype=torch.float32, device=x.device)
    if M and (needs_dx or weight_grads):
        launch(None, _layer_norm_bwd_kernel, lambda m: (programs,),
               (x2, g2, dx if needs_dx else x2, weight, mean, rstd, dw_partial, db_partial, x2.stride(0), g2.stride(0),
                dx.stride(0) if needs_dx else 0, M, C, rows_per_program),
               dict(EMULATE_BF16=emulate_bf16(x.dtype), NEEDS_DX=needs_dx, WEIGHT_GRADS=weight_grads), cfg)
    dw = dw_partial.sum(0).to(weight.dtype) if needs_dw else weight.new_empty(0)
    db = db_partial.sum(0).to(weight.dtype) if needs_db else weight.new_empty(0)
    return dx.view(x.shape) if needs_dx else dx, dw, db


@layer_norm_bwd.register_fake
def _(grad_out, x, weight, mean, rstd, needs_dx, needs_dw, needs_db):
    def maybe(like, needed):
        return torch.empty_like(like) if needed else like.new_empty(0)

    return maybe(x, needs_dx), maybe(weight, needs_dw), maybe(weight, needs_db)


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.needs = ctx.needs_input_grad[:3]  # x, weight, bias
    ctx.save_for_backward(x, weight, mean, rstd)  # x and the statistics serve dx and dW alike
    saved_outputs_only(ctx, mean, rstd)


def _backward(ctx, grad_out, grad_mean, grad_rstd):
    if grad_out is None:
        return (None,) * 4
    x, weight, mean, rstd = ctx.saved_tensors
    needs_dx, needs_dw, needs_db = ctx.needs
    dx, dw, db = layer_norm_bwd(grad_out, x, weight, mean, rstd, needs_dx, needs_dw, needs_db)
    return dx if needs_dx else None, dw if needs_dw else None, db if needs_db else None, None


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)
register_flop_formulas(layer_norm_fwd, layer_norm_bwd)


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
    """The definition, written out: (x - mean) / sqrt(var + eps) * weight + bias over the last dim, in fp32
    whatever the input dtype (as every LayerNorm kernel computes), cast back. Independent of F.layer_norm, which
    is a candidate (``layer_norm_torch``) checked against it."""
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    centered = xf - mean
    var = centered.square().mean(-1, keepdim=True)
    return (centered * torch.rsqrt(var + eps) * weight.float() + bias.float()).to(x.dtype)


def layer_norm_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """torch's F.layer_norm (what transformers' nn.LayerNorm runs): the vendor candidate."""
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
            # the full backward, with frozen weight and bias (no partial sums), and without dx (a frozen input)
            for needs_dx, weight_grads in ((True, True), (True, False), (False, True)):
                flags = dict(cfg.kwargs, EMULATE_BF16=False, NEEDS_DX=needs_dx, WEIGHT_GRADS=weight_grads)
                tag = "" if needs_dx and weight_grads else (" frozen-weight" if needs_dx else " no-dx")
                cases.append(make_case(__name__, _layer_norm_bwd_kernel, "_layer_norm_bwd_kernel", bwd, flags, warps,
                                       1, label + tag, divisible=("C",)))
    return cases
