"""The shared GEMM engine of the linear, qkv and mlp ops (ops/linear.py) and the patch embedding's split-K sum.

Two GEMM kernels compute ``C = epilogue(A @ B)`` for strided A (M, K) and B (K, N): ``_gemm_kernel`` (pointer
loads, cp.async; sm_80 and layouts TMA cannot read) and ``_gemm_tma_kernel`` (sm_90: tensor descriptors, a
persistent grid), chosen at launch (``gemm``). Epilogue, in order: ``+ bias`` (per column); store the
pre-activation; ``gelu_fast``; the gelu_fast backward (multiply by gelu_fast'(AUX), and store gelu_fast(AUX));
``+ residual``. Weight gradients may split K into ranges whose fp32 partials ``_splitk_sum_kernel`` adds in a
fixed order (deterministic); bias gradients are one column sum of dY (``_linear_grads``).

Also here: the shipped configs (``GEMM_CONFIGS``, ``TMA_CONFIGS``) and the ahead-of-time compile cases of both
kernels (``aot_cases``) for every way the ops launch them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _triton
from ._triton import (
    HAS_TRITON,
    KernelConfig,
    dot_precision,
    emulate_bf16,
    ensure_tma_allocator,
    launch,
    tile_configs,
    tl,
    triton,
)

__all__ = ["gemm", "sum_splits", "GEMM_CONFIGS", "TMA_CONFIGS", "KERNEL_ACTIVATIONS", "aot_cases", "LoraOperands",
           "lora_grads", "lora_grad_plan", "lora_input_products", "fused_lora", "FUSE_LORA", "lora_rank_pad",
           "LORA_MAX_RANK", "LORA_BLOCK_N"]

# Activations fused into the GEMM epilogue; any other is applied by torch after the kernel.
KERNEL_ACTIVATIONS = ("gelu_fast",)


# Shipped configs by (element size, dot precision, epilogue kind). Each compiles for sm_80 and sm_90 in every
# variant of its kind without spills and within shared memory (tests/test_aot.py). The gelu-backward
# epilogue ("dgelu") holds two more tiles in registers at the end, so it gets smaller tiles / more warps.
GEMM_CONFIGS: dict[tuple[int, str, str], list[KernelConfig]] = {
    (2, "ieee", "main"): tile_configs((128, 128, 64, 8, 3), (128, 64, 32, 4, 4), (64, 128, 64, 4, 3)),
    (2, "ieee", "dgelu"): tile_configs((128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 64, 4, 4)),
    (4, "tf32", "main"): tile_configs((128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 64, 32, 4, 3)),
    (4, "tf32", "dgelu"): tile_configs((128, 64, 32, 8, 3), (64, 64, 32, 4, 3)),
    # fp32 with IEEE products runs on FMA units: small tiles. (64 x 64 x 32 on 8 warps spills 8-12 bytes in the
    # forward under Triton 3.9: left out.)
    (4, "ieee", "main"): tile_configs((64, 64, 16, 4, 2), (32, 64, 32, 4, 2)),
    (4, "ieee", "dgelu"): tile_configs((64, 64, 32, 8, 2), (32, 64, 32, 4, 2)),
    # the grouped GEMMs of the QKV projection (three weights; dX over three K segments) select pointers per
    # group / unroll the K loop per segment, which costs registers: the 4-byte rows drop the tiles that spill
    (2, "ieee", "grouped"): tile_configs((128, 128, 64, 8, 3), (128, 64, 32, 4, 4), (64, 128, 64, 4, 3)),
    (4, "tf32", "grouped"): tile_configs((128, 128, 32, 8, 3), (64, 64, 32, 4, 3)),
    (4, "ieee", "grouped"): tile_configs((64, 64, 16, 4, 2)),
    # LoRA inside the GEMM (ops/linear.py): a (BLOCK_M, rank) accumulator and the adapters' tiles beside the base
    # GEMM's. Every row 128 columns wide: the x A^T product is repeated per column block, and the cost formulas
    # count it at that width (ops/formulas.py). The QKV input gradient (three K segments, each with its adapter's
    # loop) is the tightest: 64-deep K tiles, or 3 stages, spill there on sm_80 at rank 64; the 4-byte rows keep the
    # configs with no spill under Triton 3.6, 3.8 and 3.9 (128 x 128 x 16 TF32 and 16 x 128 x 8 IEEE spill 8-16 B
    # under 3.9, 16 x 128 x 16 IEEE 4 B under 3.6, 32 x 128 x 16 IEEE 284 B at rank 64 under 3.9)
    (2, "ieee", "lora"): tile_configs((128, 128, 32, 8, 2)),
    (4, "tf32", "lora"): tile_configs((64, 128, 16, 8, 3)),
    (4, "ieee", "lora"): tile_configs((16, 128, 32, 8, 1)),
}
# The sm_90 tensor-descriptor kernel (2-byte elements, or TF32 products). Larger tiles than the pointer kernel:
# TMA leaves the registers to the accumulator, and the epilogue runs in two halves.
TMA_CONFIGS: dict[tuple[int, str, str], list[KernelConfig]] = {
    (2, "ieee", "main"): tile_configs((128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4)),
    (2, "ieee", "dgelu"): tile_configs((128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4)),
    (2, "ieee", "grouped"): tile_configs((128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4)),
    (4, "tf32", "main"): tile_configs((128, 128, 32, 8, 3), (128, 64, 32, 4, 4)),
    (4, "tf32", "dgelu"): tile_configs((128, 128, 32, 8, 3), (128, 64, 32, 4, 4)),
    (4, "tf32", "grouped"): tile_configs((128, 128, 32, 8, 3), (128, 64, 32, 4, 4)),
}
# Under the interpreter (no autotuning there): large tiles, as its programs run one by one in Python (every shipped
# config is still forced on its own by the *_config tests)
INTERPRETER_CONFIG = KernelConfig.make(4, 1, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------
if HAS_TRITON:
    from ._triton import autotuned, grouped_tile_order, to_output

    @triton.jit
    def _tanh(x):
        e = tl.math.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -t, t)

    @triton.jit
    def _gelu_fast_tanh(x):
        """tanh(0.7978845608 x (1 + 0.044715 x^2)): transformers' FastGELUActivation, as in activations.gelu_fast
        and csrc/gelu.h."""
        return _tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))

    @triton.jit
    def gelu_fast(x):
        """gelu_fast(x) in fp32."""
        return 0.5 * x * (1.0 + _gelu_fast_tanh(x))

    @triton.jit
    def gelu_fast_and_grad(x):
        """(gelu_fast(x), d/dx gelu_fast(x)) in fp32, sharing one tanh."""
        t = _gelu_fast_tanh(x)
        grad = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608 * (1.0 + 3.0 * 0.044715 * x * x)
        return 0.5 * x * (1.0 + t), grad

    @triton.jit
    def _gemm_epilogue(
        acc, rows, cols, row_mask, col_mask,  # rows: 64-bit row indices, cols: column indices of the tile
        C, BIAS, AUX, RES, PRE,
        stride_cm, stride_cn, stride_xm, stride_xn, stride_rm, stride_rn, stride_pm, stride_pn,
        HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RES: tl.constexpr, SAVE_PRE: tl.constexpr,
        DGELU: tl.constexpr, EMULATE_BF16: tl.constexpr,
    ):
        """+ bias; store the pre-activation (SAVE_PRE); activation; the gelu_fast backward (x gelu_fast'(AUX), and
        with SAVE_PRE store gelu_fast(AUX)); + residual; store. Shared by both GEMM kernels (and their epilogue
        halves)."""
        mask = row_mask[:, None] & col_mask[None, :]
        if HAS_BIAS:
            acc += tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if SAVE_PRE and not DGELU:
            tl.store(PRE + rows[:, None] * stride_pm + cols[None, :] * stride_pn,
                     to_output(acc, PRE.dtype.element_ty, EMULATE_BF16), mask=mask)
        if ACTIVATION == "gelu_fast":
            acc = gelu_fast(acc)
        if DGELU:
            g, dg = gelu_fast_and_grad(
                tl.load(AUX + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0).to(
                    tl.float32
                )
            )
            acc = acc * dg
            if SAVE_PRE:  # gelu_fast(AUX), for the weight gradient of the GEMM after the activation
                tl.store(PRE + rows[:, None] * stride_pm + cols[None, :] * stride_pn,
                         to_output(g, PRE.dtype.element_ty, EMULATE_BF16), mask=mask)
        if HAS_RES:
            acc += tl.load(RES + rows[:, None] * stride_rm + cols[None, :] * stride_rn, mask=mask, other=0.0).to(
                tl.float32
            )
        tl.store(
            C + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
            to_output(acc, C.dtype.element_ty, EMULATE_BF16),
            mask=mask,
        )

    @triton.jit
    def _gemm_kernel(
        A, B, C,  # A (M, K), B (K, N), C (M, N); any strides
        BIAS,  # (N,) added to every row (HAS_BIAS)
        AUX,  # (M, N) a gelu_fast pre-activation: C = (A @ B) * gelu_fast'(AUX) (DGELU)
        RES,  # (M, N) added after the activation (HAS_RES)
        PRE,  # (M, N) receives the pre-activation (SAVE_PRE), or gelu_fast(AUX) (SAVE_PRE with DGELU)
        B1, B2,  # the second and third (K, N) B matrix of a grouped GEMM (N_GROUPS or K_GROUPS = 3), B's strides
        BIAS1, BIAS2,  # the second and third bias (N_GROUPS = 3)
        LA0, LA1, LA2,  # LoRA: each group's / K segment's adapter A (rank, in_features), row-major, any float dtype
        LB0, LB1, LB2,  # LoRA: the adapters' B (out_features, rank), row-major
        LD,  # LoRA: (M, groups, LORA_RP) in A's dtype, receives the forward's s x A^T or the input gradient's s dY B
        M, N, K, k_split,  # k_split: the K range of one split (SPLIT_K; a multiple of BLOCK_K)
        rank, stride_ld, ls0, ls1, ls2,  # LoRA: the adapters' rank, LD's row stride, each adapter's scale s
        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
        stride_xm, stride_xn, stride_rm, stride_rn, stride_pm, stride_pn,
        HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RES: tl.constexpr, SAVE_PRE: tl.constexpr,
        DGELU: tl.constexpr, N_GROUPS: tl.constexpr, K_GROUPS: tl.constexpr, SPLIT_K: tl.constexpr,
        LORA: tl.constexpr, LORA_SLOTS: tl.constexpr, LORA_RP: tl.constexpr, LORA_STORE: tl.constexpr,
        LORA_ONLY: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
    ):
        """C = epilogue(A @ B) with pointer loads (cp.async on sm_80). N_GROUPS = 3: C (M, 3N) = [A @ B + BIAS,
        A @ B1 + BIAS1, A @ B2 + BIAS2] (the QKV projection reading three weights in place). K_GROUPS = 3: A is
        (M, 3K) and C = A[:, :K] @ B + A[:, K:2K] @ B1 + A[:, 2K:] @ B2 (its input gradient). SPLIT_K: program
        axis 1 picks a K range and C is an fp32 workspace (splits, M, N) of partial sums (summed in a fixed order
        afterwards: deterministic).

        LoRA adapters on the groups / segments of bit mask LORA_SLOTS (rank <= LORA_RP, a power of two >= 16):
        LORA = 1 (forward): the K loop that reads each x tile also accumulates x A^T (BLOCK_M, LORA_RP); the
        epilogue adds (s x A^T) B^T before the bias's epilogue (so before gelu_fast and the residual). LORA = 2 (the
        input gradient dY W): the K loop of segment g also accumulates dY_g B_g; its end adds (s dY_g B_g) A_g. The
        column block 0 programs store the rank-wide products into LD (LORA_STORE) for the adapters' gradients.
        LORA_ONLY: those products alone (no base GEMM, no C; one column block)."""
        pid = tl.program_id(0)
        group = 0
        if N_GROUPS > 1:
            # the groups of one output tile are neighbouring programs: they read the same A tile from L2
            group = pid % N_GROUPS
            pid = pid // N_GROUPS
            B = tl.where(group == 0, B, tl.where(group == 1, B1, B2))
            BIAS = tl.where(group == 0, BIAS, tl.where(group == 1, BIAS1, BIAS2))
            C += (group * N).to(tl.int64) * stride_cn
        k_lo = 0
        k_hi = K
        if SPLIT_K:
            split = tl.program_id(1)
            k_lo = split * k_split
            k_hi = tl.minimum(K, k_lo + k_split)
            C += split.to(tl.int64) * M * N
        pid_m, pid_n = grouped_tile_order(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

        # 64-bit tile origins (M * stride may pass 2^31), 32-bit offsets inside the tile
        row0 = (pid_m * BLOCK_M).to(tl.int64)
        col0 = (pid_n * BLOCK_N).to(tl.int64)
        lm = tl.arange(0, BLOCK_M)
        ln = tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = pid_m * BLOCK_M + lm < M
        n_mask = pid_n * BLOCK_N + ln < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if LORA > 0:
            lr = tl.arange(0, LORA_RP)
            low_ty = A.dtype.element_ty  # the adapters' products run in x's dtype, as PEFT's weights cast to it
        if LORA == 1:  # this group's adapter (none: its loads are masked off, the products zero)
            la = tl.where(group == 0, LA0, tl.where(group == 1, LA1, LA2))
            lb = tl.where(group == 0, LB0, tl.where(group == 1, LB1, LB2))
            ls = tl.where(group == 0, ls0, tl.where(group == 1, ls1, ls2))
            # (vector conditions only: Triton 3.9's interpreter refuses a mask that ands a vector with a scalar)
            r_mask = (lr < rank) & (((LORA_SLOTS >> (lr * 0 + group)) & 1) != 0)
            acc_r = tl.zeros([BLOCK_M, LORA_RP], dtype=tl.float32)
        for segment in tl.static_range(K_GROUPS):
            b_base = B
            if segment == 1:
                b_base = B1
            if segment == 2:
                b_base = B2
            a_ptrs = (
                A + row0 * stride_am + (lm[:, None] * stride_am + (segment * K + k_lo + offs_k)[None, :] * stride_ak)
            )
            b_ptrs = b_base + col0 * stride_bn + ((k_lo + offs_k)[:, None] * stride_bk + ln[None, :] * stride_bn)
            if LORA == 1:  # A^T's (BLOCK_K, rank) tile
                l_ptrs = la + (k_lo + offs_k)[:, None] + lr[None, :] * K
            if LORA == 2 and ((LORA_SLOTS >> segment) & 1) == 1:  # this segment's adapter: B_g's (BLOCK_K, rank) tile
                lb = LB0
                if segment == 1:
                    lb = LB1
                if segment == 2:
                    lb = LB2
                l_ptrs = lb + (k_lo + offs_k)[:, None] * rank + lr[None, :]
                acc_r = tl.zeros([BLOCK_M, LORA_RP], dtype=tl.float32)
            for k in range(k_lo, k_hi, BLOCK_K):
                k_mask = offs_k < k_hi - k
                a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                if EMULATE_BF16:
                    a = a.to(tl.float32)
                if not LORA_ONLY:
                    b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                    if EMULATE_BF16:
                        b = b.to(tl.float32)
                    acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
                if LORA == 1 or (LORA == 2 and ((LORA_SLOTS >> segment) & 1) == 1):
                    if LORA == 1:
                        l_mask = k_mask[:, None] & r_mask[None, :]
                    else:
                        l_mask = k_mask[:, None] & (lr < rank)[None, :]
                    low = to_output(tl.load(l_ptrs, mask=l_mask, other=0.0).to(tl.float32), low_ty, EMULATE_BF16)
                    if EMULATE_BF16:
                        low = low.to(tl.float32)
                    acc_r = tl.dot(a, low, acc_r, input_precision=DOT_PRECISION)
                    if LORA == 1:
                        l_ptrs += BLOCK_K
                    else:
                        l_ptrs += BLOCK_K * rank
                a_ptrs += BLOCK_K * stride_ak
                b_ptrs += BLOCK_K * stride_bk
            if LORA == 2 and ((LORA_SLOTS >> segment) & 1) == 1:  # + (s dY_g B_g) A_g[:, cols]
                ls = ls0
                la = LA0
                if segment == 1:
                    ls = ls1
                    la = LA1
                if segment == 2:
                    ls = ls2
                    la = LA2
                acc = _lora_expand(acc, acc_r, ls, la + lr[:, None] * N + (col0 + ln)[None, :],
                                   (lr < rank)[:, None] & n_mask[None, :], LD + segment * LORA_RP, row0 + lm, lr,
                                   m_mask & (lm * 0 + pid_n == 0), stride_ld, low_ty, LORA_STORE, LORA_ONLY,
                                   DOT_PRECISION,
                                   EMULATE_BF16)
        if LORA == 1:  # + (s x A^T) B^T[:, cols]
            acc = _lora_expand(acc, acc_r, ls, lb + (col0 + ln)[None, :] * rank + lr[:, None],
                               r_mask[:, None] & n_mask[None, :], LD + group * LORA_RP, row0 + lm, lr,
                               m_mask & (lm * 0 + pid_n == 0), stride_ld, low_ty,  # (no adapter: zeros)
                               LORA_STORE, LORA_ONLY, DOT_PRECISION, EMULATE_BF16)
        if not LORA_ONLY:
            _gemm_epilogue(acc, row0 + lm, col0 + ln, m_mask, n_mask, C, BIAS, AUX, RES, PRE,
                           stride_cm, stride_cn, stride_xm, stride_xn, stride_rm, stride_rn, stride_pm, stride_pn,
                           HAS_BIAS, ACTIVATION, HAS_RES, SAVE_PRE, DGELU, EMULATE_BF16)

    @triton.jit
    def _lora_expand(acc, acc_r, scale, up_ptrs, up_mask, LD, rows, lr, store_mask, stride_ld, low_ty: tl.constexpr,
                     STORE: tl.constexpr, ONLY: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     EMULATE_BF16: tl.constexpr):
        """acc + (scale acc_r) @ up: the rank-wide product scaled and rounded to x's dtype (as an unfused GEMM writes
        it), stored to LD where ``store_mask`` (for the adapters' gradients), times the (LORA_RP, BLOCK_N) tile of
        the adapter's other matrix."""
        down = to_output(acc_r * scale, low_ty, EMULATE_BF16)
        if STORE:
            tl.store(LD + rows[:, None] * stride_ld + lr[None, :], down, mask=store_mask[:, None])
        if not ONLY:
            up = to_output(tl.load(up_ptrs, mask=up_mask, other=0.0).to(tl.float32), low_ty, EMULATE_BF16)
            if EMULATE_BF16:
                down = down.to(tl.float32)
                up = up.to(tl.float32)
            acc = tl.dot(down, up, acc, input_precision=DOT_PRECISION)
        return acc

    @triton.jit
    def _descriptor(ptr, rows, cols, stride, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, TRANSPOSED: tl.constexpr):
        """A tensor descriptor of a logical (rows, cols) operand stored row-major, or stored as (cols, rows)
        row-major when TRANSPOSED (its tiles are then loaded (BLOCK_C, BLOCK_R) and transposed)."""
        if TRANSPOSED:
            return tl.make_tensor_descriptor(
                ptr, shape=[cols, rows], strides=[stride, 1], block_shape=[BLOCK_C, BLOCK_R]
            )
        else:
            return tl.make_tensor_descriptor(
                ptr, shape=[rows, cols], strides=[stride, 1], block_shape=[BLOCK_R, BLOCK_C]
            )

    @triton.jit
    def _tma_segment(acc, a_desc, b_desc, pid_m, pid_n, a_col0, k_lo, k_hi,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, A_KM: tl.constexpr,
                     B_NK: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
        """acc += A[:, a_col0 + k_lo : a_col0 + k_hi] @ B[k_lo:k_hi, :] for one output tile (no masks: the
        descriptors read zeros past the end of B, which zeroes whatever A holds there)."""
        for k in range(k_lo, k_hi, BLOCK_K):
            if A_KM:
                a = a_desc.load([a_col0 + k, pid_m * BLOCK_M]).T
            else:
                a = a_desc.load([pid_m * BLOCK_M, a_col0 + k])
            if B_NK:
                b = b_desc.load([pid_n * BLOCK_N, k]).T
            else:
                b = b_desc.load([k, pid_n * BLOCK_N])
            if EMULATE_BF16:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        return acc

    @triton.jit
    def _halves(acc, ROWS: tl.constexpr, COLS: tl.constexpr):
        """The left and right halves (columns) of a (ROWS, COLS) tile."""
        return tl.split(tl.permute(tl.reshape(acc, (ROWS, 2, COLS // 2)), (0, 2, 1)))

    @triton.jit
    def _tma_epilogue(acc, col0, rows, row_mask, N, C, BIAS, AUX, RES, PRE, stride_cm, stride_xm, stride_rm,
                      stride_pm, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                      HAS_RES: tl.constexpr, SAVE_PRE: tl.constexpr, DGELU: tl.constexpr, EMULATE_BF16: tl.constexpr):
        cols = col0 + tl.arange(0, WIDTH)
        _gemm_epilogue(acc, rows, cols, row_mask, cols < N, C, BIAS, AUX, RES, PRE, stride_cm, 1, stride_xm, 1,
                       stride_rm, 1, stride_pm, 1, HAS_BIAS, ACTIVATION, HAS_RES, SAVE_PRE, DGELU, EMULATE_BF16)

    @triton.jit
    def _tma_epilogue_quarters(acc, col0, rows, row_mask, N, C, BIAS, AUX, RES, PRE, stride_cm, stride_xm, stride_rm,
                               stride_pm, ROWS: tl.constexpr, COLS: tl.constexpr, HAS_BIAS: tl.constexpr,
                               ACTIVATION: tl.constexpr, HAS_RES: tl.constexpr, SAVE_PRE: tl.constexpr,
                               DGELU: tl.constexpr, EMULATE_BF16: tl.constexpr):
        """The epilogue of a (ROWS, COLS) half tile in two quarters; in four eighths for the gelu_fast backward and
        for the training forward that also stores the pre-activation (with quarters, fp16 128 x 256 tiles spill
        under Triton 3.6)."""
        left, right = _halves(acc, ROWS, COLS)
        if DGELU or SAVE_PRE:
            ll, lr = _halves(left, ROWS, COLS // 2)
            rl, rr = _halves(right, ROWS, COLS // 2)
            _tma_epilogue(
                ll,
                col0,
                rows,
                row_mask,
                N,
                C,
                BIAS,
                AUX,
                RES,
                PRE,
                stride_cm,
                stride_xm,
                stride_rm,
                stride_pm,
                COLS // 4,
                HAS_BIAS,
                ACTIVATION,
                HAS_RES,
                SAVE_PRE,
                DGELU,
                EMULATE_BF16,
            )
            _tma_epilogue(lr, col0 + COLS // 4, rows, row_mask, N, C, BIAS, AUX, RES, PRE, stride_cm, stride_xm,
                          stride_rm, stride_pm, COLS // 4, HAS_BIAS, ACTIVATION, HAS_RES, SAVE_PRE, DGELU, EMULATE_BF16)
            _tma_epilogue(rl, col0 + COLS // 2, rows, row_mask, N, C, BIAS, AUX, RES, PRE, stride_cm, stride_xm,
                          stride_rm, stride_pm, COLS // 4, HAS_BIAS, ACTIVATION, HAS_RES, SAVE_PRE, DGELU, EMULATE_BF16)
            _tma_epilogue(rr, col0 + 3 * (COLS // 4), rows, row_mask, N, C, BIAS, AUX, RES, PRE, stride_cm, stride_xm,
                          stride_rm, stride_pm, COLS // 4, HAS_BIAS, ACTIVATION, HAS_RES, SAVE_PRE, DGELU, EMULATE_BF16)
        else:
            _tma_epilogue(left, col0, rows, row_mask, N, C, BIAS, AUX, RES, PRE, stride_cm, stride_xm, stride_rm,
                          stride_pm, COLS // 2, HAS_BIAS, ACTIVATION, HAS_RES, SAVE_PRE, DGELU, EMULATE_BF16)
            _tma_epilogue(right, col0 + COLS // 2, rows, row_mask, N, C, BIAS, AUX, RES, PRE, stride_cm, stride_xm,
                          stride_rm, stride_pm, COLS // 2, HAS_BIAS, ACTIVATION, HAS_RES, SAVE_PRE, DGELU, EMULATE_BF16)

    @triton.jit
    def _gemm_tma_kernel(
        A,  # (M, K) row-major, or (K, M) row-major with A_KM (the weight gradient reads dY as it is)
        B,  # (K, N) row-major, or (N, K) row-major with B_NK (an nn.Linear weight read as it is)
        C, BIAS, AUX, RES, PRE, B1, B2, BIAS1, BIAS2,  # as in _gemm_kernel; C, AUX, RES, PRE with unit column stride
        M, N, K, k_split,
        stride_a, stride_b, stride_cm, stride_xm, stride_rm, stride_pm,  # row strides (the inner ones are 1)
        HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RES: tl.constexpr, SAVE_PRE: tl.constexpr,
        DGELU: tl.constexpr, N_GROUPS: tl.constexpr, K_GROUPS: tl.constexpr, SPLIT_K: tl.constexpr,
        A_KM: tl.constexpr, B_NK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
    ):
        """The same GEMM for sm_90: A and B tiles through tensor descriptors (TMA; rows and columns past the end
        read as zeros, so the K loop has no masks), a persistent grid (each program loops over output tiles, and
        over split-K ranges with SPLIT_K), and the epilogue in two halves of the tile's columns (fewer live
        registers). Program axis 1 is the group (N_GROUPS): each program serves one weight."""
        group = tl.program_id(1)
        if N_GROUPS > 1:
            B = tl.where(group == 0, B, tl.where(group == 1, B1, B2))
            BIAS = tl.where(group == 0, BIAS, tl.where(group == 1, BIAS1, BIAS2))
            C += (group * N).to(tl.int64)
        a_desc = _descriptor(A, M, K * K_GROUPS, stride_a, BLOCK_M, BLOCK_K, A_KM)
        b_desc0 = _descriptor(B, K, N, stride_b, BLOCK_K, BLOCK_N, B_NK)
        b_desc1 = b_desc0
        b_desc2 = b_desc0
        if K_GROUPS > 1:
            b_desc1 = _descriptor(B1, K, N, stride_b, BLOCK_K, BLOCK_N, B_NK)
            b_desc2 = _descriptor(B2, K, N, stride_b, BLOCK_K, BLOCK_N, B_NK)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        n_splits = 1
        if SPLIT_K:
            n_splits = tl.cdiv(K, k_split)
        for tile in tl.range(tl.program_id(0), num_m * num_n * n_splits, tl.num_programs(0)):
            split = tile % n_splits
            pid_m, pid_n = grouped_tile_order(tile // n_splits, num_m, num_n, GROUP_M)
            k_lo = split * k_split
            k_hi = tl.minimum(K, k_lo + k_split)
            out = C + split.to(tl.int64) * M * N
            if not SPLIT_K:
                k_lo = 0
                k_hi = K
                out = C
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc = _tma_segment(acc, a_desc, b_desc0, pid_m, pid_n, 0, k_lo, k_hi, BLOCK_M, BLOCK_N, BLOCK_K, A_KM, B_NK,
                               DOT_PRECISION, EMULATE_BF16)
            if K_GROUPS > 1:
                acc = _tma_segment(acc, a_desc, b_desc1, pid_m, pid_n, K, k_lo, k_hi, BLOCK_M, BLOCK_N, BLOCK_K, A_KM,
                                   B_NK, DOT_PRECISION, EMULATE_BF16)
                acc = _tma_segment(
                    acc,
                    a_desc,
                    b_desc2,
                    pid_m,
                    pid_n,
                    2 * K,
                    k_lo,
                    k_hi,
                    BLOCK_M,
                    BLOCK_N,
                    BLOCK_K,
                    A_KM,
                    B_NK,
                    DOT_PRECISION,
                    EMULATE_BF16,
                )
            rows = (pid_m * BLOCK_M).to(tl.int64) + tl.arange(0, BLOCK_M)
            row_mask = rows < M
            left, right = _halves(acc, BLOCK_M, BLOCK_N)
            col0 = pid_n * BLOCK_N
            if ACTIVATION == "gelu_fast" or DGELU:  # the activation's temporaries: quarters, not halves
                _tma_epilogue_quarters(left, col0, rows, row_mask, N, out, BIAS, AUX, RES, PRE, stride_cm, stride_xm,
                                       stride_rm, stride_pm, BLOCK_M, BLOCK_N // 2, HAS_BIAS, ACTIVATION, HAS_RES,
                                       SAVE_PRE, DGELU, EMULATE_BF16)
                _tma_epilogue_quarters(right, col0 + BLOCK_N // 2, rows, row_mask, N, out, BIAS, AUX, RES, PRE,
                                       stride_cm, stride_xm, stride_rm, stride_pm, BLOCK_M, BLOCK_N // 2, HAS_BIAS,
                                       ACTIVATION, HAS_RES, SAVE_PRE, DGELU, EMULATE_BF16)
            else:
                _tma_epilogue(left, col0, rows, row_mask, N, out, BIAS, AUX, RES, PRE, stride_cm, stride_xm, stride_rm,
                              stride_pm, BLOCK_N // 2, HAS_BIAS, ACTIVATION, HAS_RES, SAVE_PRE, DGELU, EMULATE_BF16)
                _tma_epilogue(right, col0 + BLOCK_N // 2, rows, row_mask, N, out, BIAS, AUX, RES, PRE, stride_cm,
                              stride_xm, stride_rm, stride_pm, BLOCK_N // 2, HAS_BIAS, ACTIVATION, HAS_RES, SAVE_PRE,
                              DGELU, EMULATE_BF16)

    @triton.jit
    def _splitk_sum_kernel(
        WS, C,  # WS (splits, M, N) fp32 partial sums, C (M, N) any strides
        M, N, n_splits, stride_cm, stride_cn,
        BLOCK: tl.constexpr, EMULATE_BF16: tl.constexpr,
    ):
        """C = the sum of the split-K partials in split order (deterministic), cast to C's dtype."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M * N
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(0, n_splits):
            total += tl.load(WS + s * M * N + offs, mask=mask, other=0.0)
        rows, cols = offs // N, offs % N
        tl.store(C + rows * stride_cm + cols * stride_cn, to_output(total, C.dtype.element_ty, EMULATE_BF16), mask=mask)

    @triton.jit
    def _lora_grad_target(job, f, j, K_IN, N_OUT, rank, DA0, DA1, DA2, DB0, DB1, DB2):
        """(pointers, mask) of the (BLOCK_F, LORA_RP) tile (features f, rank j) of job ``job``'s gradient: jobs 0-2
        are the dA (rank, K_IN) of slots 0-2 (stored transposed), jobs 3-5 their dB (N_OUT, rank)."""
        base = tl.where(job == 0, DA0, tl.where(job == 1, DA1, tl.where(job == 2, DA2, tl.where(
            job == 3, DB0, tl.where(job == 4, DB1, DB2)))))
        is_a = job < 3
        offs = tl.where(is_a, j[None, :] * K_IN + f[:, None], f[:, None] * rank + j[None, :])
        mask = (f < tl.where(is_a, K_IN, N_OUT))[:, None] & (j < rank)[None, :]
        return base + offs, mask

    @triton.jit
    def _lora_grads_kernel(
        X, DY, DYB, DOWN,  # x (M, K_IN); dY (M, slots * N_OUT); LD buffers (M, 3, LORA_RP): s dY_g B_g, s x A_g^T
        WS,  # (splits, 6, FMAX, LORA_RP) fp32 partial sums (SPLIT)
        DA0, DA1, DA2, DB0, DB1, DB2,  # the gradients (dA (rank, K_IN), dB (N_OUT, rank), contiguous)
        M, K_IN, N_OUT, rank, m_split, tiles, FMAX,
        stride_xm, stride_ym, stride_lm,
        JOBS: tl.constexpr,  # bit g: dA of slot g; bit 3 + g: dB of slot g
        LORA_RP: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT: tl.constexpr,
        DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr, ROUND_OUT: tl.constexpr,
    ):
        """Every adapter gradient of one op in one launch: dA_g^T = x^T (s dY_g B_g) (K_IN, rank) and dB_g = dY_g^T
        (s x A_g^T) (N_OUT, rank), the long reduction over the M rows, one (BLOCK_F, LORA_RP) tile per program
        (axis 0: job x feature tile), axis 1 a range of rows (SPLIT: fp32 partials into WS, summed in split order by
        _lora_sum_kernel; deterministic)."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        job = pid // tiles
        tile = pid % tiles
        slot = job % 3
        is_a = job < 3
        present = ((JOBS >> job) & 1) != 0
        q_base = tl.where(is_a, X, DY + slot * N_OUT)
        stride_q = tl.where(is_a, stride_xm, stride_ym)
        p_base = tl.where(is_a, DYB, DOWN) + slot * LORA_RP
        f = tile * BLOCK_F + tl.arange(0, BLOCK_F)
        f_mask = (f < tl.where(is_a, K_IN, N_OUT)) & (((JOBS >> (f * 0 + job)) & 1) != 0)  # (vector conditions)
        j = tl.arange(0, LORA_RP)
        lm = tl.arange(0, BLOCK_M)
        m_lo = split * m_split
        m_hi = tl.where(present, tl.minimum(M, m_lo + m_split), m_lo)
        acc = tl.zeros([BLOCK_F, LORA_RP], dtype=tl.float32)
        for m in range(m_lo, m_hi, BLOCK_M):
            rows = m + lm
            r_mask = rows < m_hi
            rows = rows.to(tl.int64)
            q = tl.load(q_base + rows[None, :] * stride_q + f[:, None], mask=f_mask[:, None] & r_mask[None, :],
                        other=0.0)
            p = tl.load(p_base + rows[:, None] * stride_lm + j[None, :], mask=r_mask[:, None], other=0.0)
            if EMULATE_BF16:
                q = q.to(tl.float32)
                p = p.to(tl.float32)
            acc = tl.dot(q, p, acc, input_precision=DOT_PRECISION)
        if SPLIT:
            ws = WS + ((split * 6 + job) * FMAX).to(tl.int64) * LORA_RP
            tl.store(ws + f[:, None] * LORA_RP + j[None, :], acc, mask=f_mask[:, None])
        else:
            ptrs, mask = _lora_grad_target(job, f, j, K_IN, N_OUT, rank, DA0, DA1, DA2, DB0, DB1, DB2)
            tl.store(ptrs, to_output(acc, DA0.dtype.element_ty, ROUND_OUT), mask=mask & f_mask[:, None])

    @triton.jit
    def _lora_sum_kernel(WS, DA0, DA1, DA2, DB0, DB1, DB2, n_splits, K_IN, N_OUT, rank, FMAX,
                         JOBS: tl.constexpr, LORA_RP: tl.constexpr, BLOCK_F: tl.constexpr,
                         ROUND_OUT: tl.constexpr):
        """The adapter gradients: the sum of _lora_grads_kernel's partials in split order (one tile a program)."""
        job = tl.program_id(0)
        f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        j = tl.arange(0, LORA_RP)
        present = ((JOBS >> (f * 0 + job)) & 1) != 0  # (a vector condition, as in _lora_grads_kernel)
        total = tl.zeros([BLOCK_F, LORA_RP], dtype=tl.float32)
        offs = f[:, None] * LORA_RP + j[None, :]
        in_ws = ((f < FMAX) & present)[:, None] & (j >= 0)[None, :]
        for s in range(0, n_splits):
            total += tl.load(WS + ((s * 6 + job) * FMAX).to(tl.int64) * LORA_RP + offs, mask=in_ws, other=0.0)
        ptrs, mask = _lora_grad_target(job, f, j, K_IN, N_OUT, rank, DA0, DA1, DA2, DB0, DB1, DB2)
        tl.store(ptrs, to_output(total, DA0.dtype.element_ty, ROUND_OUT), mask=mask & present[:, None])

    def _row(named_args, kwargs):
        return named_args["A"].element_size(), kwargs["DOT_PRECISION"], _kind(kwargs)

    _GEMM_KEY = ["M", "N", "K", "k_split", "HAS_BIAS", "ACTIVATION", "HAS_RES", "SAVE_PRE", "DGELU", "N_GROUPS",
                 "K_GROUPS", "SPLIT_K", "DOT_PRECISION"]
    _LORA_KEY = ["LORA", "LORA_SLOTS", "LORA_RP", "LORA_STORE", "LORA_ONLY"]
    _gemm_tuned = autotuned(_gemm_kernel, GEMM_CONFIGS, _row, _GEMM_KEY + _LORA_KEY)
    _gemm_tma_tuned = autotuned(_gemm_tma_kernel, TMA_CONFIGS, _row, _GEMM_KEY + ["A_KM", "B_NK"])


def _kind(flags: dict) -> str:
    if flags.get("LORA", 0):
        return "lora"
    if flags["DGELU"]:
        return "dgelu"
    return "grouped" if flags.get("N_GROUPS", 1) > 1 or flags.get("K_GROUPS", 1) > 1 else "main"


# ------------------------------------------------------------------------------------------------
# Launcher
# ------------------------------------------------------------------------------------------------
def gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    pre: torch.Tensor | None = None,
    dgelu_of: torch.Tensor | None = None,
    allow_tf32: bool = False,
    config: KernelConfig | None = None,
    groups: str | None = None,
    more_b: tuple[torch.Tensor, ...] = (),
    more_bias: tuple[torch.Tensor | None, ...] = (),
    split_k: bool = False,
    path: str | None = None,
    sms: int | None = None,
    lora: LoraOperands | None = None,
) -> torch.Tensor:
    """out (M, N) = epilogue(a @ b) for 2-D strided a (M, K), b (K, N).

    Epilogue, in order: ``+ bias``; store the pre-activation into ``pre``; ``activation``; with ``dgelu_of``
    (M, N): multiply by gelu_fast'(dgelu_of) and store gelu_fast(dgelu_of) into ``pre``; ``+ residual``.
    An activation and a residual do not combine in one launch (the model never needs both; it keeps the
    kernel's register budget for the common variants).

    Grouped GEMMs over ``b`` and the two (K, N) matrices ``more_b`` (read in place, no concatenation):
    ``groups="n"``: out (M, 3N) = [a @ b + bias, a @ more_b[0] + more_bias[0], a @ more_b[1] + more_bias[1]];
    ``groups="k"``: a is (M, 3K) and out = a[:, :K] @ b + a[:, K:2K] @ more_b[0] + a[:, 2K:] @ more_b[1].

    ``split_k`` (weight gradients: few output tiles, a long K): when the output tiles do not fill the GPU's
    ``sms`` multiprocessors, K is cut into ranges whose fp32 partial sums are added in a fixed order by a second
    kernel (deterministic). ``path`` "tma" (sm_90: tensor descriptors, persistent) or "pointer" (sm_80's
    cp.async kernel); by default "tma" where the device and the operands' layout and alignment allow it.
    ``lora``: LoRA adapters added inside this GEMM (``LoraOperands``: the forward's x A^T in the K loop and its
    product with B^T in the epilogue, or the input gradient's dY B and its product with A); on the pointer kernel.
    """
    M = a.shape[0]
    K, N = b.shape
    n_groups = 3 if groups == "n" else 1
    k_groups = 3 if groups == "k" else 1
    if groups is not None:
        if groups not in ("n", "k") or len(more_b) != 2:
            raise ValueError("gemm: groups is 'n' or 'k' with two more B matrices")
        if any(t.shape != b.shape or t.stride() != b.stride() for t in more_b):
            raise ValueError("gemm: grouped B matrices must share one shape and strides")
        if activation is not None or residual is not None or dgelu_of is not None or pre is not None or split_k:
            raise ValueError("gemm: grouped GEMMs take a bias only")
    if split_k and (bias is not None or activation is not None or residual is not None or dgelu_of is not None
                    or pre is not None):
        raise ValueError("gemm: split_k takes no epilogue")
    if a.shape[1] != k_groups * K:
        raise ValueError(f"gemm: a has {a.shape[1]} columns, b {K} rows (x {k_groups} groups)")
    if activation is not None and residual is not None:
        raise ValueError("gemm: an activation and a residual do not combine in one launch")
    if lora is not None and (split_k or dgelu_of is not None):
        raise ValueError("gemm: LoRA adapters do not combine with split_k or the gelu_fast backward")
    if M == 0 or N == 0:
        return out
    if K == 0:
        raise ValueError("gemm: the reduction dimension is empty")
    sms = sms or _multiprocessors(a.device)
    n_splits, k_split = _splits(M, N, K, sms) if split_k else (1, K)
    target = out
    if n_splits > 1:  # fp32 partial sums, one (M, N) slab per K range
        target = torch.empty((n_splits, M, N), dtype=torch.float32, device=out.device)
    operands = [a, b, target, *more_b] + [t for t in (dgelu_of, residual, pre) if t is not None]
    path = path or FORCED_PATH or ("tma" if _tma_ok(a, operands, (a, b, *more_b), allow_tf32) else "pointer")
    if lora is not None:
        path = "pointer"  # (the tensor-descriptor kernel has no LoRA variant)
    x = dgelu_of if dgelu_of is not None else target
    r = residual if residual is not None else target
    p = pre if pre is not None else target
    b1, b2 = more_b if more_b else (b, b)
    bias0 = bias if bias is not None else target
    bias1, bias2 = (t if t is not None else bias0 for t in more_bias) if more_bias else (bias0, bias0)
    meta = dict(
        HAS_BIAS=bias is not None, ACTIVATION=activation or "none", HAS_RES=residual is not None,
        SAVE_PRE=pre is not None, DGELU=dgelu_of is not None, N_GROUPS=n_groups,
        K_GROUPS=k_groups, SPLIT_K=n_splits > 1, DOT_PRECISION=dot_precision(a.dtype, allow_tf32),
        EMULATE_BF16=emulate_bf16(a.dtype),
    )
    lora_meta = dict(LORA=0, LORA_SLOTS=0, LORA_RP=16, LORA_STORE=False, LORA_ONLY=False)
    lora_args = (target,) * 7 + (M, N, K, k_split, 0, 0, 0.0, 0.0, 0.0)
    if lora is not None:
        lora_meta, lora_args = lora.kernel_args(target, M, N, K, k_split)
    c_strides = (N, 1) if n_splits > 1 else (target.stride(0), target.stride(1))
    if path == "tma":
        a_km = a.stride(0) == 1 and a.stride(1) != 1  # e.g. dY^T: read dY (K, M) as it is
        b_nk = b.stride(0) == 1 and b.stride(1) != 1  # e.g. W^T: read the (N, K) weight as it is
        args = (a.t() if a_km else a, b.t() if b_nk else b, target, bias0, x, r, p, b1.t() if b_nk else b1,
                b2.t() if b_nk else b2, bias1, bias2, M, N, K, k_split,
                (a.t() if a_km else a).stride(0), (b.t() if b_nk else b).stride(0), c_strides[0], x.stride(0),
                r.stride(0), p.stride(0))
        ensure_tma_allocator()
        tiles = lambda m: triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]) * n_splits  # noqa: E731
        launch(_gemm_tma_tuned, _gemm_tma_kernel,
               lambda m: (max(1, min(triton.cdiv(sms, n_groups), tiles(m))), n_groups), args,
               dict(meta, A_KM=a_km, B_NK=b_nk), config, INTERPRETER_CONFIG)
    else:
        args = (a, b, target, bias0, x, r, p, b1, b2, bias1, bias2, *lora_args[:7], *lora_args[7:11],
                *lora_args[11:], a.stride(0), a.stride(1), b.stride(0), b.stride(1), *c_strides,
                x.stride(0), x.stride(1), r.stride(0), r.stride(1), p.stride(0), p.stride(1))
        launch(_gemm_tuned, _gemm_kernel,
               lambda m: (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]) * n_groups, n_splits), args,
               dict(meta, **lora_meta), config, INTERPRETER_CONFIG)
    if n_splits > 1:
        sum_splits(target, out)
    return out


LORA_BLOCK_N = 128  # the width of every "lora" config: the forward repeats x A^T once per column block
LORA_MAX_RANK = 64  # the rank-wide accumulators' width: a larger rank runs the adapters as GEMMs of their own


# Off: the ops run LoRA adapters as GEMMs of their own (the path dropout and the cases below still take); tests
# and measure_lora_budget compare the two
FUSE_LORA = True


def fused_lora(lora_a, lora_b, lora_slots, lora_x) -> bool:
    """Whether an op's LoRA adapters run inside its GEMMs (LoraOperands): no adapter with an input of its own
    (dropout), at most one per projection, one rank of at most LORA_MAX_RANK, A and B contiguous in one dtype.
    Otherwise each adapter is two GEMMs of its own forward (and its float32 weights are cast)."""
    if not (FUSE_LORA and lora_a) or any(own.numel() for own in lora_x) or len(set(lora_slots)) != len(lora_slots):
        return False
    tensors = (*lora_a, *lora_b)
    return all(a.shape[0] == lora_a[0].shape[0] for a in lora_a) and lora_a[0].shape[0] <= LORA_MAX_RANK and \
        len({t.dtype for t in tensors}) == 1 and all(t.is_contiguous() for t in tensors)


def lora_rank_pad(rank: int) -> int:
    """The kernels' LORA_RP: the rank rounded up to a power of two, at least 16 (the smallest tensor-core tile)."""
    return max(16, triton.next_power_of_2(rank))


@dataclass
class LoraOperands:
    """LoRA adapters one ``gemm`` call adds inside its GEMM. ``mode`` 1: the forward of x @ W^T (a group of a
    groups="n" GEMM, or the only one): adds s (x A^T) B^T; 2: the input gradient dY @ W (a K segment of a
    groups="k" GEMM, or the only one): adds (s dY B) A. ``a``, ``b``, ``scales``: per group / segment the adapter's
    A (rank, in), B (out, rank) (contiguous; x's dtype or float32, read as they are) and s, or None / 0 where it has
    none; every adapter of one call has one rank. ``saved`` (M, groups, lora_rank_pad(rank)) in x's dtype receives
    s x A^T (mode 1) or s dY B (mode 2) for the adapters' gradients, or None. ``only``: those products alone (no
    base product: ``b`` of the gemm call is a stand-in and ``out`` is not written)."""

    mode: int
    a: tuple
    b: tuple
    scales: tuple
    saved: torch.Tensor | None = None
    only: bool = False

    @property
    def rank(self) -> int:
        return next(t.shape[0] for t in self.a if t is not None)

    def kernel_args(self, stand_in: torch.Tensor, M: int, N: int, K: int, k_split: int) -> tuple[dict, tuple]:
        slots = sum(1 << g for g, t in enumerate(self.a) if t is not None)
        present = next(t for t in self.a if t is not None)
        a = [t if t is not None else present for t in self.a] + [present] * (3 - len(self.a))
        lb = next(t for t in self.b if t is not None)
        b = [t if t is not None else lb for t in self.b] + [lb] * (3 - len(self.b))
        scales = [float(c) for c in self.scales] + [0.0] * (3 - len(self.scales))
        saved = self.saved if self.saved is not None else stand_in
        meta = dict(LORA=self.mode, LORA_SLOTS=slots, LORA_RP=lora_rank_pad(self.rank),
                    LORA_STORE=self.saved is not None, LORA_ONLY=self.only)
        return meta, (*a, *b, saved, M, N, K, k_split, self.rank, saved.stride(0), *scales)


def lora_input_products(g2: torch.Tensor, lora: LoraOperands, n_out: int) -> None:
    """``lora.saved[:, g] = s_g dY_g B_g`` for each adapter, dY_g the g-th (M, n_out) column block of g2: the input
    gradient GEMM's LoRA products alone, one launch (when the input gradient itself is not wanted)."""
    gemm(g2, g2.new_empty((n_out, 1)), lora.saved, groups="k" if len(lora.a) == 3 else None,
         more_b=(g2.new_empty((n_out, 1)),) * 2 if len(lora.a) == 3 else (), lora=lora)


def lora_grad_splits(M: int, programs: int, sms: int, block_m: int = 128, min_rows: int = 1024) -> tuple[int, int]:
    """(ranges of rows, rows per range) of the adapters' gradient launch: enough that its ``programs`` (jobs x
    feature tiles) fill ``sms`` multiprocessors, each range at least ``min_rows`` long, at most 32."""
    want = min(triton.cdiv(sms, programs), M // min_rows, 32)
    if want <= 1:
        return 1, M
    m_split = triton.cdiv(triton.cdiv(M, want), block_m) * block_m
    return triton.cdiv(M, m_split), m_split


# the adapters' gradient launch by element size (4-byte tiles at 128 rows spill at rank 64)
LORA_GRAD_CONFIGS = {2: KernelConfig.make(4, 3, BLOCK_F=64, BLOCK_M=64), 4: KernelConfig.make(4, 2, BLOCK_F=64,
                                                                                               BLOCK_M=32)}


def lora_grad_plan(M: int, k_in: int, n_out: int, n_a: int, n_b: int, sms: int = 132, element_size: int = 2
                   ) -> tuple[int, int, int]:
    """(feature tiles per job, ranges of rows, rows per range) of ``lora_grads`` for ``n_a`` dA and ``n_b`` dB
    jobs (also what the cost formulas count: a second launch where the rows split)."""
    cfg = LORA_GRAD_CONFIGS[element_size]
    block_f, block_m = cfg.kwargs["BLOCK_F"], cfg.kwargs["BLOCK_M"]
    busy = n_a * triton.cdiv(k_in, block_f) + n_b * triton.cdiv(n_out, block_f)
    return (triton.cdiv(max(k_in, n_out), block_f), *lora_grad_splits(M, max(busy, 1), sms, block_m))


def lora_grads(x2: torch.Tensor | None, g2: torch.Tensor, dy_b: torch.Tensor | None, x_a: torch.Tensor | None,
               a: tuple, b: tuple, needs_a: tuple, needs_b: tuple, sms: int | None = None
               ) -> tuple[list, list]:
    """The adapters' weight gradients of one op in one launch (two where the rows are split): for each group g
    with an adapter, dA_g = (s dY_g B_g)^T x (rank, in) where ``needs_a[g]`` and dB_g = dY_g^T (s x A_g^T) (out,
    rank) where ``needs_b[g]``, in the adapters' dtype (float32 for PEFT's). ``dy_b`` / ``x_a``: (M, groups,
    lora_rank_pad(rank)) products the input-gradient and forward GEMMs stored; g2 (M, groups * out). Returns per
    group (dA or None, dB or None)."""
    present = next(t for t in a if t is not None)
    rank, k_in = present.shape
    n_out = next(t for t in b if t is not None).shape[0]
    M = g2.shape[0]
    d_a = [torch.empty_like(t) if t is not None and need else None for t, need in zip(a, needs_a, strict=True)]
    d_b = [torch.empty_like(t) if t is not None and need else None for t, need in zip(b, needs_b, strict=True)]
    jobs = sum(1 << g for g, t in enumerate(d_a) if t is not None) + \
        sum(1 << (3 + g) for g, t in enumerate(d_b) if t is not None)
    if jobs == 0:
        return d_a, d_b
    outs = [t if t is not None else present.new_empty(0) for t in d_a + [None] * (3 - len(d_a))] + \
        [t if t is not None else present.new_empty(0) for t in d_b + [None] * (3 - len(d_b))]
    if M == 0:
        for t in outs:
            t.zero_()
        return d_a, d_b
    cfg = LORA_GRAD_CONFIGS[g2.element_size()]
    f_max = max(k_in, n_out)
    tiles, n_splits, m_split = lora_grad_plan(M, k_in, n_out, sum(t is not None for t in d_a),
                                              sum(t is not None for t in d_b), sms or _multiprocessors(g2.device),
                                              g2.element_size())
    rp = lora_rank_pad(rank)
    ws = torch.empty((n_splits, 6, f_max, rp), dtype=torch.float32, device=g2.device) if n_splits > 1 \
        else outs[0]
    x_in = x2 if x2 is not None else g2
    x_in = x_in if x_in.stride(-1) == 1 else x_in.contiguous()  # (the kernel reads features at unit stride)
    p_a = dy_b if dy_b is not None else x_a
    p_b = x_a if x_a is not None else dy_b
    args = (x_in, g2, p_a, p_b, ws, *(t if t.numel() else present for t in outs),
            M, k_in, n_out, rank, m_split, tiles, f_max, x_in.stride(0), g2.stride(0), p_a.stride(0))
    meta = dict(JOBS=jobs, LORA_RP=rp, SPLIT=n_splits > 1, DOT_PRECISION=dot_precision(g2.dtype, False),
                EMULATE_BF16=emulate_bf16(g2.dtype), ROUND_OUT=emulate_bf16(present.dtype))
    # (products of x's dtype: float32 x takes IEEE products here, as torch's default float32 matmul)
    launch(None, _lora_grads_kernel, lambda m: (6 * tiles, n_splits), args, meta, cfg)
    if n_splits > 1:
        launch(None, _lora_sum_kernel, lambda m: (6, tiles),
               (ws, *(t if t.numel() else present for t in outs), n_splits, k_in, n_out, rank, f_max),
               dict(JOBS=jobs, LORA_RP=rp, ROUND_OUT=emulate_bf16(present.dtype)),
               KernelConfig.make(4, 1, BLOCK_F=cfg.kwargs["BLOCK_F"]))
    return d_a, d_b


def sum_splits(partials: torch.Tensor, out: torch.Tensor) -> None:
    """out (M, N, any strides) = the sum of the fp32 ``partials`` (splits, M, N) in split order (deterministic)."""
    n_splits, M, N = partials.shape
    block = 1024
    launch(None, _splitk_sum_kernel, lambda m: (triton.cdiv(M * N, block),),
           (partials, out, M, N, n_splits, out.stride(0), out.stride(1)),
           dict(EMULATE_BF16=emulate_bf16(out.dtype)), KernelConfig.make(4, 1, BLOCK=block))


# Tests set this to run every GEMM of the ops on one path ("tma" also runs under the interpreter).
FORCED_PATH: str | None = None


def _multiprocessors(device: torch.device) -> int:
    """The GPU's multiprocessor count (what a persistent grid and split-K fill); 132 (an H100) off the GPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def _splits(
    M: int, N: int, K: int, sms: int, tile: tuple[int, int] = (128, 256), min_rows: int = 256
) -> tuple[int, int]:
    """(number of K ranges, rows per range): enough ranges that the output tiles (counted at the largest shipped
    tile, 128 x 256) times the ranges fill ``sms`` multiprocessors, each range at least ``min_rows`` long and a
    multiple of 64 (of every BLOCK_K), at most 32 ranges."""
    tiles = triton.cdiv(M, tile[0]) * triton.cdiv(N, tile[1])
    want = min(triton.cdiv(sms, tiles), K // min_rows, 32)
    if want <= 1:
        return 1, K
    k_split = triton.cdiv(triton.cdiv(K, want), 64) * 64
    return triton.cdiv(K, k_split), k_split


def _tma_ok(a: torch.Tensor, tensors: list, transposable: tuple, allow_tf32: bool) -> bool:
    """Whether the sm_90 tensor-descriptor kernel can take these operands: a Hopper (or newer) GPU, 2-byte
    elements or TF32 products, and every operand with a unit inner stride (the A and B matrices in
    ``transposable`` either way round), a 16-byte aligned base and 16-byte aligned row strides (what TMA needs)."""
    if _triton.INTERPRET or a.device.type != "cuda" or torch.cuda.get_device_capability(a.device)[0] < 9:
        return False
    if not (a.element_size() == 2 or (a.dtype == torch.float32 and allow_tf32)):
        return False
    either_way = {id(t) for t in transposable}
    for t in tensors:
        if t.dim() == 3:  # the split-K workspace: contiguous fp32
            continue
        if t.stride(-1) == 1:
            row = t.stride(0)
        elif id(t) in either_way and t.stride(0) == 1:
            row = t.stride(1)
        else:
            return False
        if t.data_ptr() % 16 or (row * t.element_size()) % 16:
            return False
    return True


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (M, K) as a view where the leading dims collapse (a copy only where they cannot)."""
    return t.reshape(-1, t.shape[-1])


def _bias_grad(g2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bias gradient, the column sums of the (M, out) output gradient, once (fp32 sums, torch's
    deterministic reduction) rather than inside every program of the weight-gradient GEMM."""
    return g2.sum(0, dtype=torch.float32).to(dtype)


def _weight_grad(g2: torch.Tensor, x2: torch.Tensor, allow_tf32: bool) -> torch.Tensor:
    """dW = g^T @ x (out, in): few output tiles and a K of every token, so split over K to fill the GPU."""
    dw = torch.empty((g2.shape[1], x2.shape[1]), dtype=x2.dtype, device=x2.device)
    gemm(g2.t(), x2, dw, allow_tf32=allow_tf32, split_k=True)
    return dw


def _linear_grads(g2: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor | None, needs_dx: bool,
                  needs_dw: bool, needs_db: bool, allow_tf32: bool, x_shape=None):
    """(dx, dW, db) of x @ W^T + b from the (M, out) gradient g2 of that output, each computed only where needed
    (else an empty tensor): dx = g @ W (needs ``weight``; ``x_shape`` when ``x`` was not kept), dW = g^T @ x (split
    over K; needs ``x``), db the column sums of g."""
    dx = g2.new_empty(0)  # every output its own tensor (outputs of a custom op may not alias)
    if needs_dx:
        shape = tuple(x.shape) if x is not None else tuple(x_shape)
        dx2 = torch.empty((g2.shape[0], weight.shape[1]), dtype=g2.dtype, device=g2.device)
        gemm(g2, weight, dx2, allow_tf32=allow_tf32)
        dx = dx2.view(shape)
    dw = _weight_grad(g2, _as_2d(x), allow_tf32) if needs_dw else g2.new_empty(0)
    db = _bias_grad(g2, g2.dtype) if needs_db else g2.new_empty(0)
    return dx, dw, db


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compile cases: every config of every (element size, precision) row, for each way the
# launchers call the kernel: the variant (epilogue flags) and the operand layouts, whose unit strides the
# JIT specialises to constants exactly as below.
# ------------------------------------------------------------------------------------------------
# GEMM sizes that are feature counts (multiples of 16 in ViViT), by role; the remaining one counts tokens.
_DIVISIBLE = {"fwd": ("N", "K"), "dx": ("N", "K"), "dw": ("M", "N")}
_UNIT_STRIDES = {
    # forward: A = x (M, K) row-major, B = W^T (W is (N, K) row-major), C / residual / pre-activation row-major
    "fwd": ("stride_ak", "stride_bk", "stride_cn", "stride_xn", "stride_rn", "stride_pn"),
    # dX = dY @ W: A = dY (M, N) row-major, B = W (N, K) row-major; epilogue operands row-major
    "dx": ("stride_ak", "stride_bn", "stride_cn", "stride_xn", "stride_rn", "stride_pn"),
    # dW = dY^T @ X: A = dY^T (a column-major view), B = X row-major
    "dw": ("stride_am", "stride_bn", "stride_cn", "stride_xn", "stride_rn", "stride_pn"),
}


def gemm_launch_variants() -> list[tuple[str, dict]]:
    """(role, constexpr flags) for every kernel variant ``linear``, ``qkv_projection``, ``mlp`` and their
    backwards launch."""
    off = dict(HAS_BIAS=False, ACTIVATION="none", HAS_RES=False, SAVE_PRE=False, DGELU=False, N_GROUPS=1,
               K_GROUPS=1, SPLIT_K=False, LORA=0, LORA_SLOTS=0, LORA_RP=16, LORA_STORE=False, LORA_ONLY=False)
    out = []
    for has_bias in (False, True):
        for has_res in (False, True):
            out.append(("fwd", dict(off, HAS_BIAS=has_bias, HAS_RES=has_res)))
        for save_pre in (False, True):
            out.append(("fwd", dict(off, HAS_BIAS=has_bias, ACTIVATION="gelu_fast", SAVE_PRE=save_pre)))
        out.append(("fwd", dict(off, HAS_BIAS=has_bias, N_GROUPS=3)))
    out.append(("dx", dict(off)))
    out.append(("dx", dict(off, K_GROUPS=3)))
    # the MLP's first backward GEMM: storing gelu_fast(H) for dW2, or not (W2 frozen)
    out.append(("dx", dict(off, DGELU=True, SAVE_PRE=True)))
    out.append(("dx", dict(off, DGELU=True)))
    out.append(("dw", dict(off)))
    out.append(("dw", dict(off, SPLIT_K=True)))
    # LoRA inside the GEMM: QKV with adapters on q and v (rank 8 and rank 64's widths), o_proj (+ residual), fc1
    # (+ gelu_fast, storing the pre-activation) and fc2; their dx GEMMs storing s dY B, and those products alone
    lora = dict(off, LORA_STORE=True)
    for rp in (16, 64):
        out.append(("fwd", dict(lora, HAS_BIAS=True, N_GROUPS=3, LORA=1, LORA_SLOTS=5, LORA_RP=rp)))
        out.append(("dx", dict(lora, K_GROUPS=3, LORA=2, LORA_SLOTS=5, LORA_RP=rp)))
    out.append(("fwd", dict(lora, HAS_BIAS=True, HAS_RES=True, LORA=1, LORA_SLOTS=1)))
    out.append(("fwd", dict(lora, HAS_BIAS=True, ACTIVATION="gelu_fast", SAVE_PRE=True, LORA=1, LORA_SLOTS=1)))
    out.append(("dx", dict(lora, LORA=2, LORA_SLOTS=1)))
    out.append(("dx", dict(lora, K_GROUPS=3, LORA=2, LORA_SLOTS=5, LORA_ONLY=True)))
    return out


def _variant_label(role: str, v: dict) -> str:
    parts = [k.lower() for k, val in v.items() if val is True]
    if v["ACTIVATION"] != "none":
        parts.append(v["ACTIVATION"])
    parts += [f"{k.lower()}={v[k]}" for k in ("N_GROUPS", "K_GROUPS") if v[k] > 1]
    if v["LORA"]:
        parts.append(f"lora{v['LORA']}:slots={v['LORA_SLOTS']}:rp={v['LORA_RP']}")
    return f"{role}:" + ("+".join(parts) or "plain")


# The TMA kernel reads each role's operands as they are laid out: the forward's B is the (N, K) weight, the weight
# gradient's A is dY (K, M).
_TMA_LAYOUT = {
    "fwd": dict(A_KM=False, B_NK=True),
    "dx": dict(A_KM=False, B_NK=False),
    "dw": dict(A_KM=True, B_NK=False),
}


def aot_cases():
    from ._aot_cases import make_case

    types = {"fp16": 2, "bf16": 2, "fp32": 4}
    strides = ("am", "ak", "bk", "bn", "cm", "cn", "xm", "xn", "rm", "rn", "pm", "pn")
    cases = []
    for ty, size in types.items():
        for precision in (("ieee", "tf32") if size == 4 else ("ieee",)):
            pointers = {n: f"*{ty}" for n in ("A", "B", "C", "BIAS", "AUX", "RES", "PRE", "B1", "B2", "BIAS1", "BIAS2",
                                              "LD")}
            # PEFT's adapters: float32 (on every base dtype)
            pointers.update({n: "*fp32" for n in ("LA0", "LA1", "LA2", "LB0", "LB1", "LB2")})
            for role, variant in gemm_launch_variants():
                kind = _kind(variant)
                c_type = "*fp32" if variant["SPLIT_K"] else f"*{ty}"  # split-K writes fp32 partial sums
                tag = f"{ty}{'/tf32' if precision == 'tf32' else ''} {_variant_label(role, variant)}"
                unit = _UNIT_STRIDES[role]
                sig = dict(pointers, C=c_type, M="i32", N="i32", K="i32", k_split="i32", rank="i32", stride_ld="i32",
                           ls0="fp32", ls1="fp32", ls2="fp32",
                           **{f"stride_{n}": "i32" for n in strides if f"stride_{n}" not in unit})
                for cfg in GEMM_CONFIGS[(size, precision, kind)]:
                    constexprs = dict(variant, DOT_PRECISION=precision, EMULATE_BF16=False, **cfg.kwargs)
                    constexprs.update({name: 1 for name in unit})
                    cases.append(make_case(__name__, _gemm_kernel, "_gemm_kernel", sig, constexprs, cfg.num_warps,
                                           cfg.num_stages, f"{tag} {cfg.label()}",
                                           divisible=_DIVISIBLE[role] + ("k_split",)))
                tma_sig = dict(pointers, C=c_type, M="i32", N="i32", K="i32", k_split="i32", stride_a="i32",
                               stride_b="i32", stride_cm="i32", stride_xm="i32", stride_rm="i32", stride_pm="i32")
                tma_variant = {k: val for k, val in variant.items() if not k.startswith("LORA")}
                for cfg in TMA_CONFIGS.get((size, precision, kind), []):
                    constexprs = dict(tma_variant, **_TMA_LAYOUT[role], DOT_PRECISION=precision, EMULATE_BF16=False,
                                      **cfg.kwargs)
                    cases.append(make_case(__name__, _gemm_tma_kernel, "_gemm_tma_kernel", tma_sig, constexprs,
                                           cfg.num_warps, cfg.num_stages, f"{tag} {cfg.label()}",
                                           divisible=_DIVISIBLE[role] + ("k_split",), archs=(90,)))
    # the adapters' gradients, from x / dY of each dtype into PEFT's float32 (whole rows, and split)
    for ty in types:
        for rp in (16, 64):
            for split in (False, True):
                sig = dict(X=f"*{ty}", DY=f"*{ty}", DYB=f"*{ty}", DOWN=f"*{ty}", WS="*fp32",
                           **{n: "*fp32" for n in ("DA0", "DA1", "DA2", "DB0", "DB1", "DB2")},
                           M="i32", K_IN="i32", N_OUT="i32", rank="i32", m_split="i32", tiles="i32", FMAX="i32",
                           stride_xm="i32", stride_ym="i32", stride_lm="i32")
                cfg = LORA_GRAD_CONFIGS[types[ty]]
                constexprs = dict(JOBS=45, LORA_RP=rp, SPLIT=split, DOT_PRECISION="ieee", EMULATE_BF16=False,
                                  ROUND_OUT=False, **cfg.kwargs)
                cases.append(make_case(__name__, _lora_grads_kernel, "_lora_grads_kernel", sig, constexprs,
                                       cfg.num_warps, cfg.num_stages, f"{ty} lora grads rp={rp} split={split}",
                                       divisible=("K_IN", "N_OUT", "m_split", "FMAX")))
    return cases

