"""Reference rows for the compile report: kernels written the way Triton's own tutorials write fast Hopper
kernels, compiled by the same harness as ours, so that our SASS has something to be compared with.

Triton's tutorial sources are not installed with the wheel and cannot be fetched offline, so these are our own
kernels following the tutorials' designs (they are reference points for the static metrics, not shipped ops):

- ``_ref_matmul_tma_persistent``: like the persistent matmul tutorial (09): tile loads through device-side tensor
  descriptors (TMA), one program per SM looping over output tiles in grouped order, the epilogue stored in two
  halves;
- ``_ref_matmul``: like the matmul tutorial (03) with 128 x 256 x 64 tiles: pointer loads (cp.async on Hopper);
- ``_ref_attention_fwd``: like the fused-attention tutorial (06): q/k/v through tensor descriptors, the running
  max over raw scores and the softmax scale folded into one multiply-add.
"""

from __future__ import annotations

from ..ops._triton import HAS_TRITON, tl, triton

if HAS_TRITON:
    from ..ops._triton import grouped_tile_order

    @triton.jit
    def _ref_matmul_tma_persistent(
        A, B, C, M, N, K,  # A (M, K), B (N, K) (K-major, as nn.Linear weights), C (M, N); row-major
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        NUM_SMS: tl.constexpr,
    ):
        a_desc = tl.make_tensor_descriptor(A, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
        b_desc = tl.make_tensor_descriptor(B, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
        c_desc = tl.make_tensor_descriptor(C, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N // 2])
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS):
            pid_m, pid_n = grouped_tile_order(tile, num_m, num_n, GROUP_M)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k in range(0, tl.cdiv(K, BLOCK_K)):
                a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
                b = b_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
                acc = tl.dot(a, b.T, acc)
            acc = tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2))
            acc = tl.permute(acc, (0, 2, 1))
            c0, c1 = tl.split(acc)
            c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], c0.to(C.dtype.element_ty))
            c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N + BLOCK_N // 2], c1.to(C.dtype.element_ty))

    @triton.jit
    def _ref_matmul(
        A, B, C, M, N, K, stride_am, stride_bn, stride_cm,  # A (M, K), B (N, K), C (M, N); unit inner strides
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        pid_m, pid_n = grouped_tile_order(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = A + offs_m[:, None] * stride_am + offs_k[None, :]
        b_ptrs = B + offs_n[None, :] * stride_bn + offs_k[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k * BLOCK_K, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k * BLOCK_K, other=0.0)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        offs_cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(C + offs_cm[:, None] * stride_cm + offs_cn[None, :], acc.to(C.dtype.element_ty),
                 mask=(offs_cm[:, None] < M) & (offs_cn[None, :] < N))

    @triton.jit
    def _ref_attention_fwd(
        Q, K, V, O, N, HD, qk_scale,  # (B * H * N, D) row-major each (one head after another); qk_scale in log2
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        start_m = tl.program_id(0)
        base = tl.program_id(1) * N
        desc_q = tl.make_tensor_descriptor(Q, shape=[HD, HEAD_DIM], strides=[HEAD_DIM, 1],
                                        block_shape=[BLOCK_M, HEAD_DIM])
        desc_k = tl.make_tensor_descriptor(K, shape=[HD, HEAD_DIM], strides=[HEAD_DIM, 1],
                                        block_shape=[BLOCK_N, HEAD_DIM])
        desc_v = tl.make_tensor_descriptor(V, shape=[HD, HEAD_DIM], strides=[HEAD_DIM, 1],
                                        block_shape=[BLOCK_N, HEAD_DIM])
        desc_o = tl.make_tensor_descriptor(O, shape=[HD, HEAD_DIM], strides=[HEAD_DIM, 1],
                                        block_shape=[BLOCK_M, HEAD_DIM])
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        q = desc_q.load([base + start_m * BLOCK_M, 0])
        for start_n in tl.range(0, N, BLOCK_N):
            k = desc_k.load([base + start_n, 0])
            qk = tl.dot(q, k.T)
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
            alpha = tl.math.exp2(m_i - m_ij)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = desc_v.load([base + start_n, 0])
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_ij
        desc_o.store([base + start_m * BLOCK_M, 0], (acc / l_i[:, None]).to(O.dtype.element_ty))


def aot_cases():
    """The reference rows: each kernel at ViViT-B-like sizes, bf16, in the configs the tutorials use on Hopper."""
    from ..ops._aot_cases import make_case

    cases = []
    for bm, bn, bk, warps, stages in ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3)):
        cases.append(make_case(__name__, _ref_matmul_tma_persistent, "_ref_matmul_tma_persistent",
                               dict(A="*bf16", B="*bf16", C="*bf16", M="i32", N="i32", K="i32"),
                               dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, NUM_SMS=132), warps, stages,
                               f"reference tutorial-09-like TMA persistent bf16 {bm}x{bn}x{bk} w{warps} s{stages}",
                               divisible=("N", "K"), archs=(90,)))
    cases.append(make_case(__name__, _ref_matmul, "_ref_matmul",
                           dict(A="*bf16", B="*bf16", C="*bf16", M="i32", N="i32", K="i32", stride_am="i32",
                                stride_bn="i32", stride_cm="i32"),
                           dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8), 8, 3,
                           "reference tutorial-03-like bf16 128x256x64 w8 s3", divisible=("N", "K")))
    for bm, bn, warps in ((128, 64, 4), (128, 128, 8)):
        cases.append(make_case(__name__, _ref_attention_fwd, "_ref_attention_fwd",
                               dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", N="i32", HD="i32", qk_scale="fp32"),
                               dict(HEAD_DIM=64, BLOCK_M=bm, BLOCK_N=bn), warps, 3,
                               f"reference tutorial-06-like TMA bf16 d=64 {bm}x{bn} w{warps} s3", archs=(90,)))
    return cases
