"""Triton flash attention against the eager reference, forward and backward, on the test device (compiled on
CUDA, interpreted on the CPU)."""

from __future__ import annotations

import pytest
import torch

from vivit_kernels.ops import attention as attn_mod
from vivit_kernels.ops.attention import attention_ref, flash_attention, flash_attention_qkv

from helpers import DEVICE, assert_close, assert_within_rule, run_without_interpreter

pytestmark = pytest.mark.triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def fused_qkv(B, N, H, D, dtype, scale=1.0):
    """q, k, v as the QKV projection gives them: strided slices of one (B, N, 3, H, D) tensor."""
    qkv = (torch.randn(B, N, 3, H, D) * scale).to(DEVICE, dtype).requires_grad_()
    return qkv


def run_all(qkv, grad, fn, dtype=None):
    """Output and gradient of the fused qkv leaf, optionally after casting the inputs to ``dtype``."""
    leaf = qkv.detach().to(dtype or qkv.dtype).requires_grad_()
    q, k, v = leaf.unbind(2)
    out = fn(q, k, v)
    out.backward(grad.to(out.device, out.dtype))
    return out.detach(), leaf.grad


def check(B, N, H, D, dtype, fn=flash_attention, scale=1.0):
    qkv = fused_qkv(B, N, H, D, dtype, scale)
    grad = torch.randn(B, N, H, D)
    out, dqkv = run_all(qkv, grad, fn)
    ref, dref = run_all(qkv, grad, attention_ref, torch.float32)
    names = ("dq", "dk", "dv")
    if dtype == torch.float32:
        assert_close(out, ref, 1e-4, name="out")
        for i, name in enumerate(names):
            assert_close(dqkv[:, :, i], dref[:, :, i], 1e-4, name=name)
    else:
        low, dlow = run_all(qkv, grad, attention_ref)
        assert_within_rule(out, ref, low, factor=2.0, name="out")
        for i, name in enumerate(names):
            assert_within_rule(dqkv[:, :, i], dref[:, :, i], dlow[:, :, i], factor=3.0, name=name)


SHAPES = [
    (1, 1, 1, 32),  # a single token: softmax over one key
    (3, 17, 5, 64),  # odd batch and heads, one partial tile
    (2, 197, 3, 80),  # ViT-sized sequence, head_dim padded 80 -> 128
    (1, 130, 2, 128),  # two full tiles + 2 rows
    (5, 33, 1, 32),
    (1, 64, 3, 16),  # head_dim below the minimum tile: padded to 32
    (2, 50, 2, 100),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype):
    check(*shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vivit_sequence_length(dtype):
    """ViViT-B's 3137 tokens = 49 * 64 + 1: the last query and key tiles hold a single row."""
    check(1, 3137, 1, 64, dtype)


def test_large_scores_stay_finite():
    """Scores far from zero: the online softmax must not overflow (fp16 inputs scaled by 8)."""
    check(2, 100, 2, 64, torch.float16, scale=8.0)


def test_contiguous_and_strided_inputs_agree():
    qkv = torch.randn(2, 40, 3, 3, 32, device=DEVICE)
    q, k, v = qkv.unbind(2)
    strided = flash_attention(q, k, v)
    contiguous = flash_attention(q.contiguous(), k.contiguous(), v.contiguous())
    assert torch.equal(strided, contiguous)
    # a last dimension that is not contiguous is copied once, with the same result
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert qt.stride(-1) != 1
    assert torch.equal(flash_attention(qt, k, v), strided)


def test_softmax_scale_and_tf32_flag():
    q, k, v = torch.randn(3, 1, 25, 2, 32, device=DEVICE).unbind(0)
    assert_close(flash_attention(q, k, v, softmax_scale=0.3), attention_ref(q, k, v, 0.3), 1e-5, name="scale 0.3")
    # TF32 products on a GPU are held to the rule against torch's own TF32 matmuls (the interpreter computes
    # fp32 products, and torch's CPU matmuls ignore the TF32 switch: both errors are then ~0)
    ref = attention_ref(q, k, v)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        torch_tf32 = attention_ref(q, k, v)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert_within_rule(flash_attention(q, k, v, allow_tf32=True), ref, torch_tf32, 2.0, name="tf32")


def _shipped_tiles():
    """Every distinct (kernel, BLOCK_D, BLOCK_M, BLOCK_N) the autotuner may pick on a GPU."""
    seen = {}
    tables = (("fwd", attn_mod.FWD_ROWS), ("dkdv", attn_mod.DKDV_ROWS), ("dq", attn_mod.DQ_ROWS))
    for table_name, table in tables:
        for (block_d, _size, _arch, _short), configs in table.items():  # sm_80's rows and sm_90's, long and short
            for cfg in configs:
                seen[(table_name, block_d, cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"])] = cfg
    return sorted(seen.items())


def _forced_tile(key, cfg, two_batch: bool):
    table, block_d, bm, bn = key
    head_dim = block_d if block_d != 128 else 80
    N = 2 * max(bm, bn) + 3
    if two_batch:  # (1, 2, N, 3, 2, D): the transposed view the factorised models' attention over time reads
        qkv = torch.randn(1, N, 2, 3, 2, head_dim, device=DEVICE).transpose(1, 2)
    else:
        qkv = torch.randn(1, N, 3, 2, head_dim, device=DEVICE)
    q, k, v = qkv.unbind(-3)
    do = torch.randn(q.shape, device=DEVICE)
    ref = qkv.detach().clone().requires_grad_()
    out_ref = attention_ref(*ref.unbind(-3))
    out_ref.backward(do)
    out, lse = attn_mod._fwd(q, k, v, head_dim**-0.5, False, config=cfg if table == "fwd" else None)
    assert_close(out, out_ref, 1e-4, name="out")
    scores = torch.einsum("...nhd,...mhd->...hnm", q, k) * head_dim**-0.5
    assert_close(lse, torch.logsumexp(scores, -1).reshape(lse.shape), 1e-4, name="logsumexp")
    dq, dk, dv = attn_mod._bwd(
        do, q, k, v, out, lse, head_dim**-0.5, False,
        dkdv_config=cfg if table == "dkdv" else None, dq_config=cfg if table == "dq" else None,
    )
    for i, (name, g) in enumerate((("dq", dq), ("dk", dk), ("dv", dv))):
        assert_close(g, ref.grad.select(-3, i), 1e-4, name=name)


@pytest.mark.parametrize(
    "key, cfg", _shipped_tiles(), ids=lambda x: "-".join(map(str, x)) if isinstance(x, tuple) else ""
)
def test_every_shipped_tile_config(key, cfg):
    """Each shipped tile shape, forced (no autotuning), forward and backward against the reference; N spans
    full tiles and a partial one for both the query and the key tiles."""
    _forced_tile(key, cfg, two_batch=False)


def _two_batch_tiles():
    """The tile shapes the compile gate compiles with TWO_BATCH: the 2-byte short rows."""
    seen = {}
    for table_name, table in (("fwd", attn_mod.FWD_ROWS), ("dkdv", attn_mod.DKDV_ROWS), ("dq", attn_mod.DQ_ROWS)):
        for (block_d, size, _arch, short), configs in table.items():
            if size == 2 and short:
                for cfg in configs:
                    seen[(table_name, block_d, cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"])] = cfg
    return sorted(seen.items())


@pytest.mark.parametrize(
    "key, cfg", _two_batch_tiles(), ids=lambda x: "-".join(map(str, x)) if isinstance(x, tuple) else ""
)
def test_every_two_batch_tile_config(key, cfg):
    """The same with two batch dimensions, on a transposed view (B2 = 2, the second batch stride smaller than the
    token stride)."""
    _forced_tile(key, cfg, two_batch=True)


@pytest.mark.cpu_only
def test_grid_is_one_flat_axis():
    """Programs for every (tile, batch, head) go on grid axis 0 (limit 2^31 - 1), not axes 1/2 (65535)."""
    assert attn_mod.flat_grid(3137, 8192, 12, 64) == (50 * 8192 * 12,)
    with pytest.raises(ValueError, match="exceed the CUDA grid limit"):
        attn_mod.flat_grid(3137, 2**22, 16, 64)


@pytest.mark.cuda
def test_cuda_many_batch_heads():
    """B * H above 65535 (the CUDA limit of grid axes y and z) runs on a real GPU."""
    B, H = 16385, 4
    q, k, v = torch.randn(3, B, 3, H, 32, device=DEVICE, dtype=torch.float16).unbind(0)
    assert_close(flash_attention(q, k, v), attention_ref(q, k, v), 2e-3, name="out")


def test_opcheck():
    qkv = torch.randn(2, 19, 3, 3, 32, device=DEVICE, requires_grad=True)
    q, k, v = qkv.unbind(2)
    torch.library.opcheck(torch.ops.vivit_kernels.flash_attn_fwd.default, (q, k, v, 0.2, False))
    out, lse = torch.ops.vivit_kernels.flash_attn_fwd(q.detach(), k.detach(), v.detach(), 0.2, False)
    do = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.vivit_kernels.flash_attn_bwd.default, (do, q.detach(), k.detach(), v.detach(), out, lse, 0.2, False)
    )


def test_compile_fullgraph_forward_backward():
    torch._dynamo.reset()

    def block(qkv):
        q, k, v = qkv.unbind(2)
        return flash_attention(q, k, v).sum(-1)

    qkv = torch.randn(2, 21, 3, 2, 32, device=DEVICE)
    a = qkv.clone().requires_grad_()
    b = qkv.clone().requires_grad_()
    eager = block(a)
    eager.sum().backward()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(b)
    compiled.sum().backward()
    assert_close(compiled, eager, 1e-6, name="out")
    assert_close(b.grad, a.grad, 1e-6, name="grad")


@pytest.mark.parametrize(
    "args, exc, match",
    [
        (
            (torch.randn(1, 4, 2, 32), torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 32)),
            ValueError,
            "must have one shape",
        ),
        ((torch.randn(4, 2, 32),) * 3, ValueError, r"must be \(batch, tokens, heads, head_dim\) or \(batch, batch2"),
        ((torch.randn(1, 4, 2, 160),) * 3, ValueError, "head_dim <= 128, got 160"),
        ((torch.ones(1, 4, 2, 32, dtype=torch.int32),) * 3, ValueError, "supports float16, bfloat16 and float32"),
        (
            (torch.randn(1, 4, 2, 32), torch.randn(1, 4, 2, 32).half(), torch.randn(1, 4, 2, 32)),
            ValueError,
            "share a dtype",
        ),
        ((torch.randn(1, 0, 2, 32),) * 3, ValueError, "every dimension must be >= 1"),
    ],
)
def test_bad_inputs(args, exc, match):
    with pytest.raises(exc, match=match):
        flash_attention(*(a.to(DEVICE) for a in args))


@pytest.mark.cpu_only
def test_cpu_without_interpreter_is_a_clear_error():
    code = (
        "import torch\n"
        "from vivit_kernels.ops.attention import flash_attention\n"
        "q = torch.randn(1, 4, 2, 32)\n"
        "try:\n"
        "    flash_attention(q, q, q)\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
    )
    out = run_without_interpreter(code)
    if torch.cuda.is_available():
        pytest.skip("with a GPU present CPU tensors still error, but this test targets GPU-less machines")
    assert "ERR" in out.stdout, out.stderr
    assert "need a CUDA device" in out.stdout and "TRITON_INTERPRET=1" in out.stdout


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 3137, 12, 64), (8, 197, 12, 64), (2, 1025, 4, 80), (3, 17, 5, 128)])
def test_cuda_matches_reference(shape, dtype):
    B, N, H, D = shape
    qkv = torch.randn(B, N, 3, H, D, device=DEVICE, dtype=dtype, requires_grad=True)
    grad = torch.randn(B, N, H, D, device=DEVICE)
    out, dqkv = run_all(qkv, grad, flash_attention)
    ref, dref = run_all(qkv, grad, attention_ref, torch.float32)
    if dtype == torch.float32:
        assert_close(out, ref, 1e-4, name="out")
        assert_close(dqkv, dref, 1e-4, name="dqkv")
    else:
        low, dlow = run_all(qkv, grad, attention_ref)
        assert_within_rule(out, ref, low, 2.0, name="out")
        assert_within_rule(dqkv, dref, dlow, 3.0, name="dqkv")


@pytest.mark.cpu_only
@pytest.mark.parametrize("kernel, table", [
    ("_attn_fwd_tuned", "FWD_ROWS"), ("_attn_bwd_dkdv_tuned", "DKDV_ROWS"), ("_attn_bwd_dq_tuned", "DQ_ROWS"),
])
def test_autotuner_benchmarks_only_the_matching_table_row(kernel, table, monkeypatch):
    """On a GPU the autotuner times only the shipped configs of the call's (BLOCK_D, element size, architecture)
    row; the architecture is the device's, read at launch (here made each in turn)."""
    tuner, rows = getattr(attn_mod, kernel), getattr(attn_mod, table)
    for (block_d, size, arch, short), row in rows.items():
        monkeypatch.setattr(attn_mod, "arch_of", lambda device, arch=arch: arch)
        dtype = torch.float16 if size == 2 else torch.float32
        n = attn_mod.SHORT_N if short else attn_mod.SHORT_N + 1  # the short rows up to SHORT_N tokens
        pruned = tuner.early_config_prune(tuner.configs, {"Q": torch.empty(1, dtype=dtype), "N": n}, BLOCK_D=block_d)
        got = sorted((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in pruned)
        want = sorted((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in row)
        assert got == want, (block_d, size, arch, short)
    # a 17-token temporal sequence and a 197-token spatial one take the short rows' tiles on sm_90
    monkeypatch.setattr(attn_mod, "arch_of", lambda device: 90)
    for n in (17, 197):
        pruned = tuner.early_config_prune(
            tuner.configs, {"Q": torch.empty(1, dtype=torch.bfloat16), "N": n}, BLOCK_D=64
        )
        assert max(max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in pruned) <= 64, n
    assert attn_mod.arch_of.__name__ == "<lambda>"  # (the real one reads the device's compute capability)


def test_grid_bucket_separates_batch_sizes():
    assert attn_mod.grid_bucket(1, 12, 3137) != attn_mod.grid_bucket(8, 12, 3137)
    assert attn_mod.grid_bucket(8, 12, 3137) == 8192  # 8 * 12 * 50 programs at 64-row tiles -> 4800 -> 8192


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 197, 3, 64), (1, 17, 5, 80)], ids=lambda s: "x".join(map(str, s)))
def test_fused_qkv_op(shape, dtype):
    """flash_attention_qkv: same values as flash_attention, and its backward is one dqkv tensor."""
    B, N, H, D = shape
    qkv = fused_qkv(B, N, H, D, dtype)
    grad = torch.randn(B, N, H, D, device=DEVICE)
    out, dqkv = run_all(qkv, grad, lambda q, k, v: flash_attention_qkv(torch.stack((q, k, v), 2)))
    sep, dsep = run_all(qkv, grad, flash_attention)
    assert torch.equal(out, sep) and torch.equal(dqkv, dsep)
    check(B, N, H, D, dtype, fn=lambda q, k, v: flash_attention_qkv(torch.stack((q, k, v), 2)))
    leaf = qkv.detach().clone().requires_grad_()
    out = flash_attention_qkv(leaf)
    assert "flash_attn_qkv_fwd" in out.grad_fn.name()
    assert out.grad_fn.next_functions[0][0].variable is leaf  # no unbind / stack between the op and the leaf
    out.backward(grad.to(dtype))
    assert leaf.grad.shape == (B, N, 3, H, D)


def test_fused_qkv_opcheck_and_errors():
    qkv = torch.randn(2, 19, 3, 2, 32, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.vivit_kernels.flash_attn_qkv_fwd.default, (qkv, 0.2, False))
    out, lse = torch.ops.vivit_kernels.flash_attn_qkv_fwd(qkv.detach(), 0.2, False)
    torch.library.opcheck(torch.ops.vivit_kernels.flash_attn_qkv_bwd.default,
                          (torch.randn_like(out), qkv.detach(), out, lse, 0.2, False))
    with pytest.raises(ValueError, match=r"qkv must be \(batch, tokens, 3, heads, head_dim\)"):
        flash_attention_qkv(torch.randn(2, 19, 2, 2, 32, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("grid", [(2, 4, 9, 2, 64), (1, 16, 5, 3, 80)],
                         ids=lambda g: "x".join(map(str, g)))
@pytest.mark.parametrize("over", ["space", "time", "half-heads"])
def test_two_batch_dimensions_read_factorised_views_in_place(grid, over, dtype):
    """(B1, B2, N, 3, H, D) views of one (B, T, S, 3, H, D) projection output: per temporal index over space (B2 = T),
    per spatial position over time (the transpose, B2 = S), and a head slice of the latter (Model 4). Values and the
    dqkv gradient follow the flash-attention tolerance rule against the reference on the same views; the output lands
    in the (time, space) memory order of the tensor the view reads; opcheck agrees with the fake's strides."""
    B, T, S, H, D = grid
    base = torch.randn(B, T, S, 3, H, D).to(DEVICE, dtype).requires_grad_()
    view = {"space": lambda t: t, "time": lambda t: t.transpose(1, 2),
            "half-heads": lambda t: t.transpose(1, 2)[..., H // 2:, :]}[over]
    grad = torch.randn(view(base).unbind(-3)[0].shape, device=DEVICE)

    def run(fn, cast=None):
        leaf = base.detach().to(cast or dtype).requires_grad_()
        out = fn(view(leaf))
        out.backward(grad.to(out.dtype))
        return out.detach(), leaf.grad

    out, dqkv = run(flash_attention_qkv)
    ref_fn = lambda qkv: attention_ref(*qkv.unbind(-3))  # noqa: E731
    ref, dref = run(ref_fn, torch.float32)
    if dtype == torch.float32:
        assert_close(out, ref, 1e-4, name="out")
        assert_close(dqkv, dref, 1e-4, name="dqkv")
    else:
        low, dlow = run(ref_fn)
        assert_within_rule(out, ref, low, factor=2.0, name="out")
        assert_within_rule(dqkv, dref, dlow, factor=3.0, name="dqkv")
    if over != "space":  # written in (time, space) order: transposing back gives contiguous memory
        assert out.transpose(1, 2).is_contiguous(), out.stride()
    torch.library.opcheck(torch.ops.vivit_kernels.flash_attn_qkv_fwd.default, (view(base.detach()), 0.2, False))


def _record_tma(monkeypatch) -> list[bool]:
    """The USE_TMA value of every forward launch from now on."""
    seen, launch = [], attn_mod._launch

    def recording(tuned, plain, *rest):
        if plain is attn_mod._attn_fwd_kernel:
            seen.append(rest[-2]["USE_TMA"])  # (..., args, meta, config)
        return launch(tuned, plain, *rest)

    monkeypatch.setattr(attn_mod, "_launch", recording)
    return seen


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape", [(2, 77, 2, 64), (1, 130, 3, 80), (1, 33, 1, 32)], ids=lambda s: "x".join(map(str, s))
)
def test_forward_through_tensor_descriptors(shape, dtype, monkeypatch):
    """The sm_90 forward (its default for fp16 / bf16 when strides allow), forced: q, k, v are strided slices of the
    fused (B, N, 3, H, D) tensor, the descriptors zero-fill rows past N and columns past head_dim (80 -> 128), the
    output is stored through a descriptor; forward and backward against the reference."""
    if DEVICE.type == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need sm_90 or newer; this GPU runs the pointer forward")
    monkeypatch.setattr(attn_mod, "FORCED_TMA", True)
    seen = _record_tma(monkeypatch)
    check(*shape, dtype)
    assert seen and all(seen)


@pytest.mark.cuda
def test_cuda_forward_picks_tensor_descriptors_where_it_can(monkeypatch):
    """On sm_90+ the bf16 forward of the fused layout goes through TMA; a base that is not 16-byte aligned does not."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need sm_90 or newer")
    seen = _record_tma(monkeypatch)
    qkv = torch.randn(1, 197, 3, 2, 64, device=DEVICE, dtype=torch.bfloat16)
    flash_attention(*qkv.unbind(2))
    odd = torch.randn(1 * 197 * 3 * 2 * 64 + 1, device=DEVICE, dtype=torch.bfloat16)[1:].view(1, 197, 3, 2, 64)
    flash_attention(*odd.unbind(2))
    assert seen == [True, False]


def test_tma_allocator_is_set_per_thread(monkeypatch):
    """Triton keeps its allocator per context: a thread that never set one (autograd's CUDA backward threads)
    gets torch's before a tensor-descriptor launch; a thread whose user set their own keeps it."""
    import threading

    from triton.runtime import _allocation

    from vivit_kernels.ops import _triton

    monkeypatch.setattr(_triton, "INTERPRET", False)  # under the interpreter descriptors need no scratch memory
    results = {}

    def fresh():
        results["before"] = _allocation._allocator.get()
        _triton.ensure_tma_allocator()
        results["after"] = _allocation._allocator.get()

    def users_own():
        mine = lambda size, alignment, stream: torch.empty(size, dtype=torch.int8)  # noqa: E731
        import triton

        triton.set_allocator(mine)
        _triton.ensure_tma_allocator()
        results["kept"] = _allocation._allocator.get() is mine

    for target in (fresh, users_own):
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
    assert isinstance(results["before"], _allocation.NullAllocator)
    assert not isinstance(results["after"], _allocation.NullAllocator)
    assert results["kept"]
