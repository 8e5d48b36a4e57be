"""Multi-head self-attention on (batch, tokens, heads, head_dim) tensors.

- ``_attn_fwd_kernel``, ``_attn_bwd_preprocess_kernel``, ``_attn_bwd_dkdv_kernel``, ``_attn_bwd_dq_kernel``:
  FlashAttention-2 in Triton. The forward keeps a running max and sum per query row (online softmax), never
  materialises the N x N scores, and saves the row logsumexp. The backward recomputes the probabilities tile
  by tile from q, k and the logsumexp: delta = rowsum(dO * O) first, then dK/dV (one program per key tile,
  looping over query tiles) and dQ (one program per query tile, looping over key tiles), so no atomics.
  Every N >= 1 works: the last query and key tiles are masked. head_dim up to 128 is padded to a power of two.
  With ``TWO_BATCH`` (a compile-time flag) the inputs are (B1, B2, N, H, D) views with a stride per batch dim, so
  the factorised models' attention over time reads ``qkv.view(B, T, S, 3, H, D).transpose(1, 2)`` in place;
  outputs and gradients are allocated in the input's memory order (``empty_in_layout``).
- ``flash_attn_fwd`` / ``flash_attn_bwd``: ``torch.library`` custom ops (with fake implementations and
  autograd), so ``torch.compile(fullgraph=True)`` and ``torch.library.opcheck`` see through them.
- ``flash_attention(q, k, v, softmax_scale=None)``: the functional API; ``flash_attention_qkv(qkv)`` the same on
  a fused (B, N, 3, H, D) projection output, with one dqkv gradient (``flash_attn_qkv_fwd`` / ``_bwd``).
- ``attention_ref``: the eager PyTorch reference (transformers' eager attention, op for op). The SDPA
  alternatives ``attn="auto"`` times against ours are registered in ``ops/registry.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._triton import (
    HAS_TRITON,
    SUPPORTED_DTYPES,
    KernelConfig,
    check_launchable,
    dot_precision,
    emulate_bf16,
    ensure_tma_allocator,
    launch,
    next_pow2,
    resolve_tf32,
    saved_outputs_only,
    tl,
    tma_compatible,
    triton,
    unit_last,
)
from .formulas import register_flop_formulas

__all__ = ["flash_attention", "flash_attention_qkv", "attention_ref", "sdpa_attention", "FWD_CONFIGS", "DKDV_CONFIGS",
           "DQ_CONFIGS", "MAX_HEAD_DIM", "SHORT_N"]

MAX_HEAD_DIM = 128
LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)


# ------------------------------------------------------------------------------------------------
# Shipped launch configurations, by padded head dim (BLOCK_D) and element size in bytes. Every entry
# compiles for sm_80 and sm_90 without register spills and within shared memory (tests/test_aot.py);
# the autotuner picks among the entries of the matching row on the GPU.
# ------------------------------------------------------------------------------------------------
def _cfgs(*rows: tuple[int, int, int, int]) -> list[KernelConfig]:
    return [KernelConfig.make(w, s, BLOCK_M=m, BLOCK_N=n) for m, n, w, s in rows]


FWD_CONFIGS: dict[tuple[int, int], list[KernelConfig]] = {
    (32, 2): _cfgs((128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)),
    (64, 2): _cfgs((128, 64, 8, 3), (64, 128, 4, 3), (128, 128, 8, 3)),
    (128, 2): _cfgs((128, 64, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3)),
    # fp32 with IEEE products runs on FMA units, whose dot layouts need far more registers: small tiles.
    (32, 4): _cfgs((64, 32, 8, 3), (32, 32, 4, 2), (16, 64, 4, 2)),
    (64, 4): _cfgs((64, 32, 8, 2), (32, 32, 8, 2), (16, 64, 4, 2)),
    (128, 4): _cfgs((16, 32, 8, 2), (32, 16, 8, 2)),
}
DKDV_CONFIGS: dict[tuple[int, int], list[KernelConfig]] = {
    (32, 2): _cfgs((64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 3)),
    (64, 2): _cfgs((64, 32, 4, 3), (32, 64, 4, 3), (32, 32, 4, 3)),
    (128, 2): _cfgs((64, 64, 8, 3), (32, 32, 4, 3)),
    (32, 4): _cfgs((32, 32, 4, 2), (16, 64, 4, 2), (32, 16, 4, 2)),
    (64, 4): _cfgs((32, 16, 8, 2), (16, 32, 8, 2)),
    (128, 4): _cfgs((16, 32, 8, 2), (32, 16, 8, 2)),
}
DQ_CONFIGS: dict[tuple[int, int], list[KernelConfig]] = {
    (32, 2): _cfgs((128, 64, 8, 2), (64, 64, 4, 3), (64, 128, 8, 3)),
    (64, 2): _cfgs((128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)),
    (128, 2): _cfgs((64, 64, 8, 3), (64, 32, 4, 3)),
    (32, 4): _cfgs((32, 32, 4, 2), (64, 32, 8, 3), (16, 32, 4, 2)),
    (64, 4): _cfgs((32, 32, 8, 2), (16, 64, 4, 2), (32, 64, 8, 2)),
    (128, 4): _cfgs((16, 32, 8, 2), (32, 16, 8, 2)),
}
# Extra choices on sm_90 (Hopper): tiles whose MMAs are wgmma and that compile there without spills but would
# spill on sm_80 (128-row tiles on 4 warps; larger dK/dV and dQ tiles). No sm_90 2-byte config has a dimension
# below 64 where the MMA's M dimension lies (BLOCK_M forward and dQ, BLOCK_N dK/dV): those compile to mma.sync.
FWD_CONFIGS_SM90: dict[tuple[int, int], list[KernelConfig]] = {
    (32, 2): _cfgs((128, 128, 8, 2), (128, 64, 4, 3), (64, 128, 4, 3)),
    (64, 2): _cfgs((128, 128, 8, 3), (128, 128, 4, 2), (64, 128, 4, 3), (128, 64, 4, 3)),
    (128, 2): _cfgs((128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 8, 3)),
}
DKDV_CONFIGS_SM90: dict[tuple[int, int], list[KernelConfig]] = {
    (32, 2): _cfgs((64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3)),
    (64, 2): _cfgs((64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3)),
    (128, 2): _cfgs((64, 64, 8, 3), (32, 64, 4, 3)),
}
DQ_CONFIGS_SM90: dict[tuple[int, int], list[KernelConfig]] = {
    (32, 2): _cfgs((128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3)),
    (64, 2): _cfgs((128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3)),
    (128, 2): _cfgs((128, 64, 8, 3), (64, 64, 4, 3)),
}


# Short sequences (at most SHORT_N tokens: the factorised encoder's 197 spatial and 17 temporal tokens, the
# factorised models' per-frame and per-position attention): tiles of 32 to 64 rows and columns, so a 17-token
# sequence is not one mostly-masked 128-wide tile. 2-byte rows only (the fp32 rows are small already); on sm_90
# the MMA's M dimension stays at 64 (BLOCK_M forward and dQ, BLOCK_N dK/dV) so that it issues wgmma.
SHORT_N = 256
FWD_SHORT: dict[tuple[int, int], list[KernelConfig]] = {
    (32, 2): _cfgs((64, 32, 4, 2), (32, 32, 4, 2), (64, 64, 4, 2)),
    (64, 2): _cfgs((64, 32, 4, 2), (32, 32, 4, 2), (64, 64, 4, 2)),
    (128, 2): _cfgs((64, 32, 4, 2), (32, 32, 4, 2)),
}
DKDV_SHORT: dict[tuple[int, int], list[KernelConfig]] = {
    (32, 2): _cfgs((32, 32, 4, 2), (32, 64, 4, 2)),
    (64, 2): _cfgs((32, 32, 4, 2), (32, 64, 4, 2)),
    (128, 2): _cfgs((32, 32, 4, 2), (32, 64, 4, 2)),
}
DQ_SHORT: dict[tuple[int, int], list[KernelConfig]] = {
    (32, 2): _cfgs((64, 32, 4, 2), (32, 32, 4, 2)),
    (64, 2): _cfgs((64, 32, 4, 2), (32, 32, 4, 2)),
    (128, 2): _cfgs((32, 32, 4, 2)),  # 64 x 32 on 4 warps spills on sm_80 at BLOCK_D 128
}
FWD_SHORT_SM90 = {k: _cfgs((64, 32, 4, 2), (64, 64, 4, 2)) for k in FWD_SHORT}
DKDV_SHORT_SM90 = {(32, 2): _cfgs((32, 64, 4, 2), (64, 64, 4, 2)), (64, 2): _cfgs((32, 64, 4, 2), (64, 64, 4, 2)),
                   (128, 2): _cfgs((32, 64, 4, 2))}  # 64 x 64 on 4 warps spills at BLOCK_D 128
DQ_SHORT_SM90 = {k: _cfgs((64, 32, 4, 2), (64, 64, 4, 2)) for k in DQ_SHORT}


def _by_arch(common: dict, sm90: dict, short: dict, short_sm90: dict) -> dict:
    """Rows keyed (BLOCK_D, element size, arch, short sequence): sm_90's 2-byte rows from ``sm90`` (``short_sm90``
    for short sequences), sm_80's from ``common`` (``short``); rows a short table lacks are the long ones."""
    out = {}
    for (block_d, size), configs in common.items():
        out[(block_d, size, 80, False)] = configs
        out[(block_d, size, 90, False)] = sm90.get((block_d, size), configs)
        out[(block_d, size, 80, True)] = short.get((block_d, size), configs)
        out[(block_d, size, 90, True)] = short_sm90.get((block_d, size), out[(block_d, size, 90, False)])
    return out


FWD_ROWS = _by_arch(FWD_CONFIGS, FWD_CONFIGS_SM90, FWD_SHORT, FWD_SHORT_SM90)
DKDV_ROWS = _by_arch(DKDV_CONFIGS, DKDV_CONFIGS_SM90, DKDV_SHORT, DKDV_SHORT_SM90)
DQ_ROWS = _by_arch(DQ_CONFIGS, DQ_CONFIGS_SM90, DQ_SHORT, DQ_SHORT_SM90)

# Proportional attention (HAS_BIAS: merged tokens) keeps a BLOCK_N slice of the per-key bias beside the scores.
# These configs spill with it in the compile gate (bf16: (BLOCK_D, arch, (BLOCK_M, BLOCK_N, warps, stages))) and
# are left out of the rows a biased launch tunes over (``bias_rows``); every row keeps at least one config. (The
# 128 x 64 tile on 4 warps at head dim 64 on sm_90 spills 8 bytes under Triton 3.9, 255 registers.)
FWD_BIAS_SPILLS = {(32, 80, (128, 128, 8, 2)), (64, 90, (128, 128, 4, 2)), (64, 90, (128, 64, 4, 3)),
                   (128, 90, (128, 128, 8, 2))}
DKDV_BIAS_SPILLS = {(128, 80, (64, 64, 8, 3)), (128, 80, (32, 64, 4, 2))}
DQ_BIAS_SPILLS: set = set()


def bias_rows(rows: dict, spills: set) -> dict:
    """``rows`` without the configs that spill with a per-key bias (2-byte rows; the fp32 rows are small tiles)."""
    def shape(c: KernelConfig) -> tuple:
        return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages

    out = {key: [c for c in configs if key[1] != 2 or (key[0], key[2], shape(c)) not in spills]
           for key, configs in rows.items()}
    empty = [key for key, configs in out.items() if not configs]
    if empty:
        raise ValueError(f"attention: no config left with a bias for rows {empty}")
    return out


FWD_BIAS_ROWS = bias_rows(FWD_ROWS, FWD_BIAS_SPILLS)
DKDV_BIAS_ROWS = bias_rows(DKDV_ROWS, DKDV_BIAS_SPILLS)
DQ_BIAS_ROWS = bias_rows(DQ_ROWS, DQ_BIAS_SPILLS)


def unique_configs(rows: dict, block_d: int, size: int, arch: int) -> list[KernelConfig]:
    """The configs an architecture may launch for (BLOCK_D, element size), long and short rows, each once."""
    seen: dict[str, KernelConfig] = {}
    for short in (False, True):
        for cfg in rows[(block_d, size, arch, short)]:
            seen.setdefault(cfg.label(), cfg)
    return list(seen.values())
PREPROCESS_CONFIG = KernelConfig.make(4, 1, BLOCK_M=64)
# Under the interpreter one config per kernel (autotuning would run every config, slowly, on the CPU);
# large tiles mean fewer interpreted loop iterations. Every shipped tile shape is tested separately.
INTERPRETER_CONFIG = KernelConfig.make(4, 1, BLOCK_M=128, BLOCK_N=128)


def block_d_for(head_dim: int) -> int:
    """Head dims are padded (with masking) to a power of two, at least 32."""
    return max(32, next_pow2(head_dim))


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------
if HAS_TRITON:
    from ._triton import autotuned, load_operand, to_dot_operand, to_output

    _LOG2E = tl.constexpr(LOG2E)  # the kernels' copy of LOG2E (a module global a kernel may read)

    @triton.jit
    def _program_ids(N, H, B2, BLOCK: tl.constexpr, TWO_BATCH: tl.constexpr):
        """One flat grid axis (no 65535 limit on batch * heads): pid -> (tile index, batch, second batch index,
        head, flat (batch, head) index). TWO_BATCH: (B1, B2, N, H, D) inputs, two batch dimensions with a stride
        each, so one launch reads sequences that are not one stride apart in place (a factorised model's tokens of
        one spatial position across time); without it the second index is 0 and its strides are never read (the
        kernel is the one-batch-dimension kernel, its registers unchanged)."""
        pid = tl.program_id(0).to(tl.int64)
        num_tiles = tl.cdiv(N, BLOCK)
        tile = pid % num_tiles
        bh = pid // num_tiles
        b = bh // H
        if TWO_BATCH:
            b1 = b // B2
            b2 = b % B2
        else:
            b1 = b
            b2 = b * 0
        return tile, b1, b2, bh % H, bh

    @triton.jit
    def _key_bias(KB, offs_n, N, MASK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
        """The per-key bias of a key tile in log2 units (HAS_BIAS; keys past N read 0), else a placeholder."""
        if HAS_BIAS:
            if MASK_N:
                b = tl.load(KB + offs_n, mask=offs_n < N, other=0.0)
            else:
                b = tl.load(KB + offs_n)
            return b * _LOG2E
        else:
            return 0.0

    @triton.jit
    def _online_softmax_step(acc, m_i, l_i, q, k, v, offs_n, N, qk_scale, kb,
                             MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
                             DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr):
        """One key tile of the forward: scores, the running max over raw scores (qk_scale > 0), then the scale and
        the shift in one multiply-add inside exp2; MASK_N gives keys >= N probability 0. HAS_BIAS: ``kb``, the
        tile's per-key bias in log2 units, is added to the scaled scores first (proportional attention)."""
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N) raw scores
        if HAS_BIAS:
            z = s * qk_scale + kb[None, :]
            if MASK_N:
                z = tl.where(offs_n[None, :] < N, z, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(z, 1))
            p = tl.math.exp2(z - m_new[:, None])
        else:
            if MASK_N:
                s = tl.where(offs_n[None, :] < N, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(to_dot_operand(p, DTYPE, EMULATE_BF16), v, input_precision=DOT_PRECISION)
        return acc, m_new, l_i

    @triton.jit
    def _attn_fwd_tiles(
        acc, m_i, l_i, q, K, V, KB, stride_kn, stride_vn, lo, hi, N, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):
        """Online-softmax accumulation over key tiles [lo, hi) read through pointers; MASK_N masks keys >= N."""
        offs_d = tl.arange(0, BLOCK_D)
        PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask = (offs_n[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
            k = load_operand(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask, EMULATE_BF16, MASK_N or PAD_D)
            v = load_operand(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask, EMULATE_BF16, MASK_N or PAD_D)
            kb = _key_bias(KB, offs_n, N, MASK_N, HAS_BIAS)
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, offs_n, N, qk_scale, kb, MASK_N,
                                                 DOT_PRECISION, EMULATE_BF16, V.dtype.element_ty, HAS_BIAS)
        return acc, m_i, l_i

    @triton.jit
    def _attn_fwd_tiles_tma(
        acc, m_i, l_i, q, k_desc, v_desc, KB, lo, hi, N, qk_scale,
        BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
        DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):
        """The same over key tiles read through tensor descriptors (sm_90 TMA): rows past N and columns past
        head_dim arrive as zeros, so only the scores of keys >= N need masking."""
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = k_desc.load([start_n, 0])
            v = v_desc.load([start_n, 0])
            if EMULATE_BF16:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            kb = _key_bias(KB, offs_n, N, MASK_N, HAS_BIAS)
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, offs_n, N, qk_scale, kb, MASK_N,
                                                 DOT_PRECISION, EMULATE_BF16, DTYPE, HAS_BIAS)
        return acc, m_i, l_i

    @triton.jit
    def _attn_fwd_kernel(
        Q,
        K,
        V,
        O,
        LSE,  # q/k/v/o: (B, N, H, D), or (B1, B2, N, H, D) with TWO_BATCH, unit stride in D; LSE: (B, H, N) fp32
        KB,  # (B, N) fp32: a per-key bias added to the scaled scores (HAS_BIAS), e.g. log(token size)
        stride_qb,
        stride_qb2,
        stride_qn,
        stride_qh,
        stride_kb,
        stride_kb2,
        stride_kn,
        stride_kh,
        stride_vb,
        stride_vb2,
        stride_vn,
        stride_vh,
        stride_ob,
        stride_ob2,
        stride_on,
        stride_oh,
        N,
        H,
        B2,
        qk_scale,  # qk_scale = softmax_scale * log2(e); B2: the second batch dimension's size
        GRID_BUCKET,  # unused by the kernel: part of the autotuning key
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        EMULATE_BF16: tl.constexpr,
        USE_TMA: tl.constexpr = False,  # q/k/v tiles through tensor descriptors (sm_90), output through one too
        TWO_BATCH: tl.constexpr = False,  # (B1, B2, N, H, D) inputs: see _program_ids
        HAS_BIAS: tl.constexpr = False,  # proportional attention: KB's bias per key (one batch dimension only)
    ):
        tile, b, b2, h, bh = _program_ids(N, H, B2, BLOCK_M, TWO_BATCH)
        KB += b * N
        Q += b * stride_qb + b2 * stride_qb2 + h * stride_qh
        K += b * stride_kb + b2 * stride_kb2 + h * stride_kh
        V += b * stride_vb + b2 * stride_vb2 + h * stride_vh
        O += b * stride_ob + b2 * stride_ob2 + h * stride_oh
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q_mask = (offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
        row0 = (tile * BLOCK_M).to(tl.int32)
        if USE_TMA:
            # one (N, head_dim) matrix per (batch, head): zero fill past its last row and column
            q = tl.make_tensor_descriptor(Q, shape=[N, HEAD_DIM], strides=[stride_qn, 1],
                                          block_shape=[BLOCK_M, BLOCK_D]).load([row0, 0])
            k_desc = tl.make_tensor_descriptor(K, shape=[N, HEAD_DIM], strides=[stride_kn, 1],
                                               block_shape=[BLOCK_N, BLOCK_D])
            v_desc = tl.make_tensor_descriptor(V, shape=[N, HEAD_DIM], strides=[stride_vn, 1],
                                               block_shape=[BLOCK_N, BLOCK_D])
            if EMULATE_BF16:
                q = q.to(tl.float32)
        else:
            q = load_operand(Q + offs_m[:, None] * stride_qn + offs_d[None, :], q_mask, EMULATE_BF16, True)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        n_full = (N // BLOCK_N) * BLOCK_N
        if USE_TMA:
            acc, m_i, l_i = _attn_fwd_tiles_tma(acc, m_i, l_i, q, k_desc, v_desc, KB, 0, n_full, N, qk_scale, BLOCK_N,
                                                False, DOT_PRECISION, EMULATE_BF16, V.dtype.element_ty, HAS_BIAS)
            if n_full < N:
                acc, m_i, l_i = _attn_fwd_tiles_tma(acc, m_i, l_i, q, k_desc, v_desc, KB, n_full, N, N, qk_scale,
                                                    BLOCK_N, True, DOT_PRECISION, EMULATE_BF16, V.dtype.element_ty,
                                                    HAS_BIAS)
        else:
            acc, m_i, l_i = _attn_fwd_tiles(
                acc, m_i, l_i, q, K, V, KB, stride_kn, stride_vn, 0, n_full, N, qk_scale,
                HEAD_DIM, BLOCK_N, BLOCK_D, False, DOT_PRECISION, EMULATE_BF16, HAS_BIAS,
            )
            if n_full < N:
                acc, m_i, l_i = _attn_fwd_tiles(
                    acc, m_i, l_i, q, K, V, KB, stride_kn, stride_vn, n_full, N, N, qk_scale,
                    HEAD_DIM, BLOCK_N, BLOCK_D, True, DOT_PRECISION, EMULATE_BF16, HAS_BIAS,
                )
        acc = acc / l_i[:, None]
        # logsumexp of the scaled (and biased) scores, in natural-log units
        tl.store(LSE + bh * N + offs_m, (m_i + tl.math.log2(l_i)) / _LOG2E, mask=offs_m < N)
        o = to_output(acc, O.dtype.element_ty, EMULATE_BF16)
        if USE_TMA:
            # the store clips rows past N and columns past head_dim
            tl.make_tensor_descriptor(O, shape=[N, HEAD_DIM], strides=[stride_on, 1],
                                      block_shape=[BLOCK_M, BLOCK_D]).store([row0, 0], o)
        else:
            tl.store(O + offs_m[:, None] * stride_on + offs_d[None, :], o, mask=q_mask)

    @triton.jit
    def _attn_bwd_preprocess_kernel(
        O, DO, DELTA,  # o/do: (B, N, H, D); DELTA: (B, H, N) fp32
        stride_ob, stride_ob2, stride_on, stride_oh,
        stride_db, stride_db2, stride_dn, stride_dh,
        N, H, B2,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, TWO_BATCH: tl.constexpr = False,
    ):
        """delta = rowsum(dO * O), the softmax-backward correction term, in fp32."""
        tile, b, b2, h, bh = _program_ids(N, H, B2, BLOCK_M, TWO_BATCH)
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
        o = tl.load(
            O + b * stride_ob + b2 * stride_ob2 + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
            mask=mask,
            other=0.0,
        )
        do = tl.load(
            DO + b * stride_db + b2 * stride_db2 + h * stride_dh + offs_m[:, None] * stride_dn + offs_d[None, :],
            mask=mask,
            other=0.0,
        )
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + bh * N + offs_m, delta, mask=offs_m < N)

    @triton.jit
    def _attn_bwd_dkdv_tiles(
        dk, dv, k, v, kb, Q, DO, LSE, DELTA, stride_qn, stride_dn, lo, hi, N, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
        MASK_M: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):
        """Accumulate dK, dV of one key tile (``kb``: its per-key bias in log2 units, HAS_BIAS) over query tiles
        [lo, hi).

        Query rows >= N (MASK_M) load q = dO = 0 and lse = delta = 0, so their probabilities are finite and
        their contributions to dV (p * dO) and dK (p * (dP - delta) = 0) vanish without extra masking.
        """
        offs_d = tl.arange(0, BLOCK_D)
        PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask = (offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
            q = load_operand(Q + offs_m[:, None] * stride_qn + offs_d[None, :], mask, EMULATE_BF16, MASK_M or PAD_D)
            do = load_operand(DO + offs_m[:, None] * stride_dn + offs_d[None, :], mask, EMULATE_BF16, MASK_M or PAD_D)
            if MASK_M:
                lse = tl.load(LSE + offs_m, mask=offs_m < N, other=0.0)
                delta = tl.load(DELTA + offs_m, mask=offs_m < N, other=0.0)
            else:
                lse = tl.load(LSE + offs_m)
                delta = tl.load(DELTA + offs_m)
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M): scores transposed
            if HAS_BIAS:
                p_t = tl.math.exp2(s_t * qk_scale + kb[:, None] - lse[None, :] * _LOG2E)
            else:
                p_t = tl.math.exp2(s_t * qk_scale - lse[None, :] * _LOG2E)
            dv += tl.dot(to_dot_operand(p_t, DO.dtype.element_ty, EMULATE_BF16), do, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(to_dot_operand(ds_t, Q.dtype.element_ty, EMULATE_BF16), q, input_precision=DOT_PRECISION)
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV,  # (B, N, H, D) (or (B1, B2, N, H, D)) each, LSE/DELTA (B, H, N) fp32
        KB,  # (B, N) fp32 per-key bias (HAS_BIAS)
        stride_qb, stride_qb2, stride_qn, stride_qh,
        stride_kb, stride_kb2, stride_kn, stride_kh,
        stride_vb, stride_vb2, stride_vn, stride_vh,
        stride_db, stride_db2, stride_dn, stride_dh,
        stride_dkb, stride_dkb2, stride_dkn, stride_dkh,
        stride_dvb, stride_dvb2, stride_dvn, stride_dvh,
        N, H, B2, qk_scale, softmax_scale,
        GRID_BUCKET,  # unused by the kernel: part of the autotuning key
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr, TWO_BATCH: tl.constexpr = False,
        HAS_BIAS: tl.constexpr = False,
    ):
        tile, b, b2, h, bh = _program_ids(N, H, B2, BLOCK_N, TWO_BATCH)
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        kb = _key_bias(KB + b * N, offs_n, N, True, HAS_BIAS)
        offs_d = tl.arange(0, BLOCK_D)
        kv_mask = (offs_n[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
        k = load_operand(
            K + b * stride_kb + b2 * stride_kb2 + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
            kv_mask,
            EMULATE_BF16,
            True,
        )
        v = load_operand(
            V + b * stride_vb + b2 * stride_vb2 + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
            kv_mask,
            EMULATE_BF16,
            True,
        )
        Q += b * stride_qb + b2 * stride_qb2 + h * stride_qh
        DO += b * stride_db + b2 * stride_db2 + h * stride_dh
        LSE += bh * N
        DELTA += bh * N

        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        m_full = (N // BLOCK_M) * BLOCK_M
        dk, dv = _attn_bwd_dkdv_tiles(
            dk, dv, k, v, kb, Q, DO, LSE, DELTA, stride_qn, stride_dn, 0, m_full, N, qk_scale,
            HEAD_DIM, BLOCK_M, BLOCK_D, False, DOT_PRECISION, EMULATE_BF16, HAS_BIAS,
        )
        if m_full < N:
            dk, dv = _attn_bwd_dkdv_tiles(
                dk, dv, k, v, kb, Q, DO, LSE, DELTA, stride_qn, stride_dn, m_full, N, N, qk_scale,
                HEAD_DIM, BLOCK_M, BLOCK_D, True, DOT_PRECISION, EMULATE_BF16, HAS_BIAS,
            )
        dk = dk * softmax_scale
        DK += b * stride_dkb + b2 * stride_dkb2 + h * stride_dkh
        DV += b * stride_dvb + b2 * stride_dvb2 + h * stride_dvh
        tl.store(
            DK + offs_n[:, None] * stride_dkn + offs_d[None, :],
            to_output(dk, DK.dtype.element_ty, EMULATE_BF16),
            mask=kv_mask,
        )
        tl.store(
            DV + offs_n[:, None] * stride_dvn + offs_d[None, :],
            to_output(dv, DV.dtype.element_ty, EMULATE_BF16),
            mask=kv_mask,
        )

    @triton.jit
    def _attn_bwd_dq_tiles(
        dq, q, do, lse, delta, K, V, KB, stride_kn, stride_vn, lo, hi, N, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):
        """Accumulate dQ of one query tile over key tiles [lo, hi); keys >= N get probability 0."""
        offs_d = tl.arange(0, BLOCK_D)
        PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask = (offs_n[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
            k = load_operand(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask, EMULATE_BF16, MASK_N or PAD_D)
            v = load_operand(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask, EMULATE_BF16, MASK_N or PAD_D)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            if HAS_BIAS:
                kb = _key_bias(KB, offs_n, N, MASK_N, HAS_BIAS)
                p = tl.math.exp2(s * qk_scale + kb[None, :] - lse[:, None])
            else:
                p = tl.math.exp2(s * qk_scale - lse[:, None])
            if MASK_N:
                p = tl.where(offs_n[None, :] < N, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(to_dot_operand(ds, K.dtype.element_ty, EMULATE_BF16), k, input_precision=DOT_PRECISION)
        return dq

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ,
        KB,  # (B, N) fp32 per-key bias (HAS_BIAS)
        stride_qb, stride_qb2, stride_qn, stride_qh,
        stride_kb, stride_kb2, stride_kn, stride_kh,
        stride_vb, stride_vb2, stride_vn, stride_vh,
        stride_db, stride_db2, stride_dn, stride_dh,
        stride_dqb, stride_dqb2, stride_dqn, stride_dqh,
        N, H, B2, qk_scale, softmax_scale,
        GRID_BUCKET,  # unused by the kernel: part of the autotuning key
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr, TWO_BATCH: tl.constexpr = False,
        HAS_BIAS: tl.constexpr = False,
    ):
        tile, b, b2, h, bh = _program_ids(N, H, B2, BLOCK_M, TWO_BATCH)
        KB += b * N
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
        q = load_operand(
            Q + b * stride_qb + b2 * stride_qb2 + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
            mask,
            EMULATE_BF16,
            True,
        )
        do = load_operand(
            DO + b * stride_db + b2 * stride_db2 + h * stride_dh + offs_m[:, None] * stride_dn + offs_d[None, :],
            mask,
            EMULATE_BF16,
            True,
        )
        lse = tl.load(LSE + bh * N + offs_m, mask=offs_m < N, other=0.0) * _LOG2E
        delta = tl.load(DELTA + bh * N + offs_m, mask=offs_m < N, other=0.0)
        K += b * stride_kb + b2 * stride_kb2 + h * stride_kh
        V += b * stride_vb + b2 * stride_vb2 + h * stride_vh

        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        n_full = (N // BLOCK_N) * BLOCK_N
        dq = _attn_bwd_dq_tiles(
            dq, q, do, lse, delta, K, V, KB, stride_kn, stride_vn, 0, n_full, N, qk_scale,
            HEAD_DIM, BLOCK_N, BLOCK_D, False, DOT_PRECISION, EMULATE_BF16, HAS_BIAS,
        )
        if n_full < N:
            dq = _attn_bwd_dq_tiles(
                dq, q, do, lse, delta, K, V, KB, stride_kn, stride_vn, n_full, N, N, qk_scale,
                HEAD_DIM, BLOCK_N, BLOCK_D, True, DOT_PRECISION, EMULATE_BF16, HAS_BIAS,
            )
        dq = dq * softmax_scale
        DQ += b * stride_dqb + b2 * stride_dqb2 + h * stride_dqh
        tl.store(
            DQ + offs_m[:, None] * stride_dqn + offs_d[None, :],
            to_output(dq, DQ.dtype.element_ty, EMULATE_BF16),
            mask=mask,
        )

    def _row(named_args, kwargs):
        """The row of a launch: (BLOCK_D, element size, arch, short sequence), + "bias" with a per-key bias."""
        q = named_args["Q"]
        row = kwargs["BLOCK_D"], q.element_size(), arch_of(q.device), int(named_args["N"]) <= SHORT_N
        return (*row, "bias") if kwargs.get("HAS_BIAS") else row

    def _with_bias(rows: dict, biased: dict) -> dict:
        return {**rows, **{(*key, "bias"): configs for key, configs in biased.items()}}

    # GRID_BUCKET (the programs of the launch, to a power of two): a first call at batch 1 does not fix the tiles of
    # batch 8
    _KEY = ["N", "HEAD_DIM", "DOT_PRECISION", "GRID_BUCKET"]
    _attn_fwd_tuned = autotuned(_attn_fwd_kernel, _with_bias(FWD_ROWS, FWD_BIAS_ROWS), _row,
                                _KEY + ["USE_TMA", "TWO_BATCH", "HAS_BIAS"])
    _attn_bwd_dkdv_tuned = autotuned(_attn_bwd_dkdv_kernel, _with_bias(DKDV_ROWS, DKDV_BIAS_ROWS), _row,
                                     _KEY + ["TWO_BATCH", "HAS_BIAS"])
    _attn_bwd_dq_tuned = autotuned(_attn_bwd_dq_kernel, _with_bias(DQ_ROWS, DQ_BIAS_ROWS), _row,
                                   _KEY + ["TWO_BATCH", "HAS_BIAS"])


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------
def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch, second batch, token, head) strides of a (B, N, H, D) or (B1, B2, N, H, D) tensor."""
    if t.dim() == 4:
        return t.stride(0), 0, t.stride(1), t.stride(2)
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _dims(q: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(B1, B2, N, H, D) of a (B, N, H, D) (B2 = 1) or (B1, B2, N, H, D) tensor."""
    if q.dim() == 4:
        B, N, H, D = q.shape
        return B, 1, N, H, D
    return tuple(q.shape)


def empty_in_layout(shape, ref: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty tensor of ``shape`` (as many dims as ``ref``) whose dims lie in memory in the order of ``ref``'s
    strides, the last innermost: the output of an attention over a permuted view (the tokens of one spatial
    position across time) lands in the token order of the tensor the view reads, so the next GEMM reads it as
    rows without a copy. For an ordinary (B, N, H, D) view it is the contiguous (B, N, H, D) tensor."""
    nd = len(shape)
    order = sorted(range(nd - 1), key=lambda d: -ref.stride(d)) + [nd - 1]  # stable: ties keep their order
    buf = ref.new_empty([shape[d] for d in order], dtype=dtype or ref.dtype)
    return buf.permute([order.index(d) for d in range(nd)])


def flat_grid(N: int, B: int, H: int, block: int) -> tuple[int]:
    """All (tile, batch, head) programs on grid axis 0, whose limit (2^31 - 1) is far above axes 1 and 2's
    65535, so any batch * heads fits."""
    programs = triton.cdiv(N, block) * B * H
    if programs > 2**31 - 1:
        raise ValueError(f"flash_attention: {programs} programs exceed the CUDA grid limit (B={B}, H={H}, N={N})")
    return (programs,)


def grid_bucket(B: int, H: int, N: int) -> int:
    """The launch's programs at 64-row tiles, rounded up to a power of two (an autotuning key)."""
    return next_pow2(B * H * triton.cdiv(N, 64))


def arch_of(device: torch.device) -> int:
    """Which config rows a device uses: 90 from Hopper on (wgmma), else 80."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        return 90
    return 80


def _launch(
    tuned, plain, grid_block: str, B: int, H: int, N: int, args: tuple, meta: dict, config: KernelConfig | None
):
    launch(tuned, plain, lambda m: flat_grid(N, B, H, m[grid_block]), args, meta, config, INTERPRETER_CONFIG)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flash_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() not in (4, 5):
            raise ValueError(f"flash_attention: {name} must be (batch, tokens, heads, head_dim) or (batch, batch2, "
                             f"tokens, heads, head_dim), got shape {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"flash_attention: q, k, v must have one shape (batch, tokens, heads, head_dim), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"flash_attention supports float16, bfloat16 and float32, got {q.dtype}")
    if min(q.shape) < 1:
        raise ValueError(f"flash_attention: every dimension must be >= 1, got {tuple(q.shape)}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"flash_attention supports head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}")
    check_launchable(q, k, v, what="flash_attention")


def _check_extent(*tensors: torch.Tensor) -> None:
    """Offsets inside one (batch, head) slice are 32-bit in the kernels; batch/head offsets are 64-bit."""
    for t in tensors:
        if (t.shape[-3] - 1) * t.stride(-3) + t.shape[-1] >= 2**31:
            raise ValueError(
                f"flash_attention: one (batch, head) slice spans {t.shape[-3]} x stride {t.stride(-3)} elements, "
                "more than 32-bit offsets allow"
            )


# Tests set this to force the forward's tensor-descriptor path on (True, which also runs in the interpreter) or
# off; None: on where the GPU and the layout allow (sm_90+, 2-byte elements, 16-byte aligned strides).
FORCED_TMA: bool | None = None


def _fwd(q, k, v, softmax_scale: float, allow_tf32: bool, config: KernelConfig | None = None,
         bias: torch.Tensor | None = None):
    """(out, lse (B1 * B2, H, N) fp32) for q, k, v (B, N, H, D) or (B1, B2, N, H, D); out is laid out in q's
    memory order (``empty_in_layout``). ``bias``: (B, N) fp32 contiguous, added to every query's scaled scores of
    that key (proportional attention)."""
    B1, B2, N, H, D = _dims(q)
    B = B1 * B2
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    _check_extent(q, k, v)
    out = empty_in_layout(q.shape, q)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    use_tma = FORCED_TMA if FORCED_TMA is not None else (q.element_size() == 2 and tma_compatible(q, k, v, out))
    meta = dict(
        HEAD_DIM=D, BLOCK_D=block_d_for(D), DOT_PRECISION=dot_precision(q.dtype, allow_tf32),
        EMULATE_BF16=emulate_bf16(q.dtype), USE_TMA=use_tma, TWO_BATCH=q.dim() == 5, HAS_BIAS=bias is not None,
    )
    if use_tma:
        ensure_tma_allocator()
    args = (q, k, v, out, lse, bias if bias is not None else lse, *_strides(q), *_strides(k), *_strides(v),
            *_strides(out), N, H, B2, softmax_scale * LOG2E, grid_bucket(B, H, N))
    _launch(_attn_fwd_tuned, _attn_fwd_kernel, "BLOCK_M", B, H, N, args, meta, config)
    return out, lse


def _bwd(
    do, q, k, v, out, lse, softmax_scale: float, allow_tf32: bool,
    dkdv_config: KernelConfig | None = None, dq_config: KernelConfig | None = None,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, bias: torch.Tensor | None = None,
):
    """(dq, dk, dv), written into ``grads`` (e.g. the three slices of one dqkv tensor) when given; ``bias`` as the
    forward's (it is a constant: no gradient)."""
    B1, B2, N, H, D = _dims(q)
    B = B1 * B2
    do, q, k, v = unit_last(do), unit_last(q), unit_last(k), unit_last(v)
    _check_extent(do, q, k, v, out)
    block_d = block_d_for(D)
    delta = torch.empty_like(lse)
    _launch(
        None, _attn_bwd_preprocess_kernel, "BLOCK_M", B, H, N,
        (out, do, delta, *_strides(out), *_strides(do), N, H, B2),
        dict(HEAD_DIM=D, BLOCK_D=block_d, TWO_BATCH=q.dim() == 5), PREPROCESS_CONFIG,
    )
    dq, dk, dv = grads if grads is not None else (empty_in_layout(t.shape, t) for t in (q, k, v))
    meta = dict(
        HEAD_DIM=D, BLOCK_D=block_d, DOT_PRECISION=dot_precision(q.dtype, allow_tf32),
        EMULATE_BF16=emulate_bf16(q.dtype), TWO_BATCH=q.dim() == 5, HAS_BIAS=bias is not None,
    )
    kb = bias if bias is not None else lse
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    scales = (N, H, B2, softmax_scale * LOG2E, softmax_scale, grid_bucket(B, H, N))
    _launch(
        _attn_bwd_dkdv_tuned, _attn_bwd_dkdv_kernel, "BLOCK_N", B, H, N,
        (q, k, v, do, lse, delta, dk, dv, kb, *common, *_strides(dk), *_strides(dv), *scales), meta, dkdv_config,
    )
    _launch(
        _attn_bwd_dq_tuned, _attn_bwd_dq_kernel, "BLOCK_M", B, H, N,
        (q, k, v, do, lse, delta, dq, kb, *common, *_strides(dq), *scales), meta, dq_config,
    )
    return dq, dk, dv


# ------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("vivit_kernels::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, allow_tf32: bool,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, N, H, D) or (B1, B2, N, H, D) in q's memory order, logsumexp (B1 * B2, H, N) fp32) of
    softmax(q k^T * scale + bias) v; ``bias`` (B, N) fp32 per key, or None."""
    return _fwd(q, k, v, softmax_scale, allow_tf32, bias=bias)


def _fake_fwd(q):
    B1, B2, N, H, D = _dims(q)
    return empty_in_layout(q.shape, q), q.new_empty((B1 * B2, H, N), dtype=torch.float32)


@flash_attn_fwd.register_fake
def _(q, k, v, softmax_scale, allow_tf32, bias=None):
    torch._check(k.shape == q.shape and v.shape == q.shape, lambda: "q, k, v must have one shape")
    return _fake_fwd(q)


@torch.library.custom_op("vivit_kernels::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
    allow_tf32: bool,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the output gradient and what the forward saved (q, k, v, out, logsumexp, bias)."""
    return _bwd(grad_out, q, k, v, out, lse, softmax_scale, allow_tf32, bias=bias)


@flash_attn_bwd.register_fake
def _(grad_out, q, k, v, out, lse, softmax_scale, allow_tf32, bias=None):
    return tuple(empty_in_layout(t.shape, t) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, allow_tf32, bias = inputs
    out, lse = output
    # Saved for backward: the inputs (views, no copies), the output and the fp32 row logsumexp: O(N) per
    # row instead of the N x N probabilities eager attention keeps; the per-key bias (B x N) when there is one.
    ctx.save_for_backward(q, k, v, out, lse, bias)
    saved_outputs_only(ctx, lse)
    ctx.softmax_scale = softmax_scale
    ctx.allow_tf32 = allow_tf32


def _backward(ctx, grad_out, grad_lse):
    if grad_out is None:
        return (None,) * 6
    q, k, v, out, lse, bias = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(grad_out, q, k, v, out, lse, ctx.softmax_scale, ctx.allow_tf32, bias)
    return dq, dk, dv, None, None, None


flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)
register_flop_formulas(flash_attn_fwd, flash_attn_bwd)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    bias: torch.Tensor | None = None,
    allow_tf32: bool | None = None,
) -> torch.Tensor:
    """softmax(q k^T * softmax_scale + bias) v with the Triton FlashAttention-2 kernels (forward and backward).

    Args:
        q, k, v: (batch, tokens, heads, head_dim) in float16, bfloat16 or float32, on a CUDA device (or on
            the CPU under TRITON_INTERPRET=1). Strided views, e.g. slices of one fused qkv tensor, are read
            in place; a tensor whose last dimension is not contiguous is copied once. head_dim <= 128.
            (batch, batch2, tokens, heads, head_dim) views take two batch dimensions with a stride each: the
            tokens of one spatial position across time, ``x.view(B, T, S, H, D).transpose(1, 2)``, in place.
        softmax_scale: defaults to head_dim ** -0.5.
        bias: (batch, tokens) per-key additive bias, the same for every query and head (proportional attention
            of merged tokens: log of the tokens each key stands for); one batch dimension only. No gradient flows
            to it (it is a constant of the merging).
        allow_tf32: float32 products: None (default) follows torch's matmul precision setting, as every op
            does (strict IEEE under torch's default "highest", so results match an fp32 reference); True lets the
            tensor cores use TF32, False never.
    Returns:
        q's shape in the input dtype, its dims in q's memory order (``empty_in_layout``): contiguous for the
        usual (batch, tokens, heads, head_dim) views, (B, T, S, H, D) memory for the transposed view above.
    """
    _check_inputs(q, k, v)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):  # the kernel takes the max of unscaled scores
        raise ValueError(f"flash_attention: softmax_scale must be finite and positive, got {softmax_scale}")
    return flash_attn_fwd(q, k, v, float(softmax_scale), resolve_tf32(allow_tf32), _key_bias_of(q, bias))[0]


def _key_bias_of(q: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The per-key bias as the kernels read it: (B, N) fp32, contiguous; a clear error for another shape."""
    if bias is None:
        return None
    if q.dim() != 4:
        raise ValueError("flash_attention: a per-key bias takes one batch dimension, (batch, tokens, heads, head_dim)")
    if tuple(bias.shape) != (q.shape[0], q.shape[1]):
        raise ValueError(f"flash_attention: bias must be (batch, tokens) = {(q.shape[0], q.shape[1])}, got "
                         f"{tuple(bias.shape)}")
    if bias.device != q.device:
        raise ValueError(f"flash_attention: bias is on {bias.device}, q on {q.device}")
    return bias.detach().float().contiguous()


# The same attention on the fused (B, N, 3, H, D) projection output (or a (B1, B2, N, 3, H, D) view of it): the
# backward writes dq, dk and dv into one dqkv tensor (the three slices the forward read), so autograd has no
# separate gradients to stack.
@torch.library.custom_op("vivit_kernels::flash_attn_qkv_fwd", mutates_args=())
def flash_attn_qkv_fwd(qkv: torch.Tensor, softmax_scale: float, allow_tf32: bool,
                       bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (..., N, H, D), logsumexp (B1 * B2, H, N) fp32) for q, k, v = qkv.unbind(-3); ``bias`` as
    flash_attn_fwd's."""
    return _fwd(*qkv.unbind(-3), softmax_scale, allow_tf32, bias=bias)


@flash_attn_qkv_fwd.register_fake
def _(qkv, softmax_scale, allow_tf32, bias=None):
    torch._check(qkv.shape[-3] == 3, lambda: "qkv must be (B, N, 3, H, D) or (B1, B2, N, 3, H, D)")
    return _fake_fwd(qkv.unbind(-3)[0])


@torch.library.custom_op("vivit_kernels::flash_attn_qkv_bwd", mutates_args=())
def flash_attn_qkv_bwd(
    grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, softmax_scale: float,
    allow_tf32: bool, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """dqkv (qkv's shape and memory order): dq, dk, dv written straight into its three slices."""
    dqkv = empty_in_layout(qkv.shape, qkv)
    _bwd(grad_out, *qkv.unbind(-3), out, lse, softmax_scale, allow_tf32, grads=dqkv.unbind(-3), bias=bias)
    return dqkv


@flash_attn_qkv_bwd.register_fake
def _(grad_out, qkv, out, lse, softmax_scale, allow_tf32, bias=None):
    return empty_in_layout(qkv.shape, qkv)


def _qkv_setup_context(ctx, inputs, output):
    qkv, softmax_scale, allow_tf32, bias = inputs
    out, lse = output
    # Saved for backward: the qkv tensor (not a copy), the output and the fp32 row logsumexp (and the bias).
    ctx.save_for_backward(qkv, out, lse, bias)
    saved_outputs_only(ctx, lse)
    ctx.softmax_scale, ctx.allow_tf32 = softmax_scale, allow_tf32


def _qkv_backward(ctx, grad_out, grad_lse):
    if grad_out is None:
        return (None,) * 4
    qkv, out, lse, bias = ctx.saved_tensors
    return flash_attn_qkv_bwd(grad_out, qkv, out, lse, ctx.softmax_scale, ctx.allow_tf32, bias), None, None, None


flash_attn_qkv_fwd.register_autograd(_qkv_backward, setup_context=_qkv_setup_context)
register_flop_formulas(flash_attn_qkv_fwd, flash_attn_qkv_bwd)


def flash_attention_qkv(
    qkv: torch.Tensor, softmax_scale: float | None = None, bias: torch.Tensor | None = None,
    allow_tf32: bool | None = None,
) -> torch.Tensor:
    """:func:`flash_attention` of ``q, k, v = qkv.unbind(-3)`` for a fused projection output qkv (B, N, 3, H, D),
    or a (B1, B2, N, 3, H, D) view of one (e.g. ``qkv.view(B, T, S, 3, H, D).transpose(1, 2)``: attention over
    time per spatial position, read in place); its backward returns one dqkv tensor (in qkv's memory order)
    instead of three gradients that autograd would stack into one. ``bias``: as flash_attention's."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() not in (5, 6) or qkv.shape[-3] != 3:
        shape = tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__
        raise ValueError("flash_attention_qkv: qkv must be (batch, tokens, 3, heads, head_dim) or (batch, batch2, "
                         f"tokens, 3, heads, head_dim), got {shape}")
    q, k, v = qkv.unbind(-3)
    _check_inputs(q, k, v)
    if softmax_scale is None:
        softmax_scale = qkv.shape[-1] ** -0.5
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):  # the kernel takes the max of unscaled scores
        raise ValueError(f"flash_attention_qkv: softmax_scale must be finite and positive, got {softmax_scale}")
    return flash_attn_qkv_fwd(qkv, float(softmax_scale), resolve_tf32(allow_tf32), _key_bias_of(q, bias))[0]


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    head_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    return_probs: bool = False,
):
    """softmax(q k^T * scale + bias + attention_mask) v, computed the way transformers' eager ViViT attention does.

    q, k, v: (B, N, H, D). bias: (B, N), one additive term per key (proportional attention). attention_mask:
    additive, broadcastable to (B, H, N, N). head_mask: broadcastable to
    (B, H, N, N) (e.g. (1, H, 1, 1)); it multiplies the attention probabilities after dropout, as transformers
    4.x did. Returns the output (B, N, H, D), and with ``return_probs`` also the probabilities (B, H, N, N)
    after dropout and head mask.
    """
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    q, k, v = (t.transpose(-3, -2) for t in (q, k, v))  # (..., H, N, D): one or two batch dims
    scores = torch.matmul(q, k.transpose(-1, -2)) * softmax_scale
    if bias is not None:
        scores = scores + bias[:, None, None, :].to(scores.dtype)
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    if head_mask is not None:
        probs = probs * head_mask
    out = torch.matmul(probs, v).transpose(-3, -2)
    return (out, probs) if return_probs else out


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None,
                   bias: torch.Tensor | None = None, dropout_p: float = 0.0,
                   backend: str | None = None) -> torch.Tensor:
    """torch's ``scaled_dot_product_attention`` on (B, N, H, D) or (B1, B2, N, H, D) q, k, v (a second batch dim
    folded into the first: a copy where the view does not fold), restricted to one SDPA ``backend``
    ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH") when given. The vendor candidates of the
    attention ops, and the model's attention when no kernel runs. ``bias`` (B, N): an additive mask per key."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    shape = q.shape
    q, k, v = (t.reshape(-1, *shape[-3:]).transpose(1, 2) for t in (q, k, v))
    mask = None if bias is None else bias[:, None, None, :].to(q.dtype)
    with sdpa_kernel(getattr(SDPBackend, backend)) if backend else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=softmax_scale)
    return out.transpose(1, 2).reshape(shape)


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (vivit_kernels.aot): every shipped config, dtype and head_dim
# ------------------------------------------------------------------------------------------------
AOT_HEAD_DIMS = (32, 64, 80, 128)
_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_cases(head_dims=AOT_HEAD_DIMS):
    from ._aot_cases import make_case

    cases = []
    for dtype, ty in _TRITON_TYPES.items():
        size = torch.tensor([], dtype=dtype).element_size()
        precisions = ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)
        for head_dim in head_dims:
            block_d = block_d_for(head_dim)
            base = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, TWO_BATCH=False)
            strides = lambda *ts: {f"stride_{t}{d}": "i32" for t in ts for d in ("b", "b2", "n", "h")}  # noqa: E731
            pre = dict(O=f"*{ty}", DO=f"*{ty}", DELTA="*fp32", N="i32", H="i32", B2="i32", **strides("o", "d"))
            for two in (False, True) if dtype == torch.bfloat16 else (False,):
                cases.append(
                    make_case(
                        __name__,
                        _attn_bwd_preprocess_kernel,
                        "_attn_bwd_preprocess_kernel",
                        pre,
                        {**base, **PREPROCESS_CONFIG.kwargs, "TWO_BATCH": two},
                        PREPROCESS_CONFIG.num_warps,
                        PREPROCESS_CONFIG.num_stages,
                        f"{ty} d={head_dim} {'2-batch ' if two else ''}{PREPROCESS_CONFIG.label()}",
                    )
                )
            for precision in precisions:
                meta = dict(base, DOT_PRECISION=precision, EMULATE_BF16=False, HAS_BIAS=False)
                tag = f"{ty}{'/tf32' if precision == 'tf32' else ''} d={head_dim}"
                fwd = dict(Q=f"*{ty}", K=f"*{ty}", V=f"*{ty}", O=f"*{ty}", LSE="*fp32", KB="*fp32", N="i32", H="i32",
                           B2="i32", qk_scale="fp32", GRID_BUCKET="i32", **strides("q", "k", "v", "o"))
                bwd = dict(
                    Q=f"*{ty}",
                    K=f"*{ty}",
                    V=f"*{ty}",
                    DO=f"*{ty}",
                    LSE="*fp32",
                    DELTA="*fp32",
                    KB="*fp32",
                    N="i32",
                    H="i32",
                    B2="i32",
                    qk_scale="fp32",
                    softmax_scale="fp32",
                    GRID_BUCKET="i32",
                    **strides("q", "k", "v", "d"),
                )
                dkdv = dict(bwd, DK=f"*{ty}", DV=f"*{ty}", **strides("dk", "dv"))
                dq = dict(bwd, DQ=f"*{ty}", **strides("dq"))
                for arch in (80, 90):  # each architecture compiles the rows it launches
                    for kernel, name, sig, rows, biased in (
                        (_attn_fwd_kernel, "_attn_fwd_kernel", fwd, FWD_ROWS, FWD_BIAS_ROWS),
                        (_attn_bwd_dkdv_kernel, "_attn_bwd_dkdv_kernel", dkdv, DKDV_ROWS, DKDV_BIAS_ROWS),
                        (_attn_bwd_dq_kernel, "_attn_bwd_dq_kernel", dq, DQ_ROWS, DQ_BIAS_ROWS),
                    ):
                        # the forward on sm_90 with 2-byte elements: the tensor-descriptor variant (the default
                        # there) and the pointer one (inputs whose strides TMA cannot take)
                        tma_too = kernel is _attn_fwd_kernel and arch == 90 and size == 2
                        for use_tma in (True, False) if tma_too else (False,):
                            tma_meta = {"USE_TMA": use_tma} if kernel is _attn_fwd_kernel else {}
                            for cfg in unique_configs(rows, block_d, size, arch):
                                cases.append(make_case(
                                    __name__, kernel, name, sig, {**meta, **cfg.kwargs, **tma_meta},
                                    cfg.num_warps, cfg.num_stages, f"{tag} {'tma ' if use_tma else ''}{cfg.label()}",
                                    archs=(arch,)))
                            # two batch dimensions (the factorised models' views): the short rows they launch, in
                            # bf16 (what they run in on a GPU; fp16's registers are the same, fp32's rows are not
                            # gated in this variant: the gate's time)
                            for cfg in rows[(block_d, size, arch, True)] if dtype == torch.bfloat16 else ():
                                cases.append(make_case(
                                    __name__, kernel, name, sig, {**meta, **cfg.kwargs, **tma_meta, "TWO_BATCH": True},
                                    cfg.num_warps, cfg.num_stages,
                                    f"{tag} 2-batch {'tma ' if use_tma else ''}{cfg.label()}", archs=(arch,)))
                            # proportional attention (a per-key bias: merged tokens), every config of the bias
                            # rows, in bf16 (what merged models run in on a GPU; fp16's registers are the same)
                            for cfg in unique_configs(biased, block_d, size, arch) if dtype == torch.bfloat16 else ():
                                cases.append(make_case(
                                    __name__, kernel, name, sig, {**meta, **cfg.kwargs, **tma_meta, "HAS_BIAS": True},
                                    cfg.num_warps, cfg.num_stages,
                                    f"{tag} bias {'tma ' if use_tma else ''}{cfg.label()}", archs=(arch,)))
    return cases
