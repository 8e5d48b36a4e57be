"""Triton GEMM with fused epilogues (linear) and the fused MLP, against their eager references, on the test
device."""

from __future__ import annotations

import pytest
import torch

from vivit_kernels.ops import _gemm, _triton
from vivit_kernels.ops import linear as lin
from vivit_kernels.ops.activations import gelu_fast as gelu_fast_ref
from vivit_kernels.ops.linear import linear, linear_ref, mlp, mlp_ref
from vivit_kernels.ops.registry import OPS
from vivit_kernels.ops.sample_inputs import Shape

from helpers import DEVICE, assert_close, check_against_reference

pytestmark = pytest.mark.triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def leaf(t: torch.Tensor) -> torch.Tensor:
    """A CPU-generated tensor as a leaf on the test device."""
    return t.to(DEVICE).requires_grad_()


def params(tokens, fan_in, fan_out, batch=2, bias=True, residual=False):
    x = leaf(torch.randn(batch, tokens, fan_in))
    w = leaf(torch.randn(fan_out, fan_in) * fan_in**-0.5)
    b = leaf(0.1 * torch.randn(fan_out)) if bias else None
    r = leaf(torch.randn(batch, tokens, fan_out)) if residual else None
    return x, w, b, r


# (tokens, in, out): tokens 1 / 17 / 197 / 3137; hidden 32 / 96 / 768; outputs that are not tile multiples
SHAPES = [(1, 32, 96), (17, 96, 288), (197, 768, 200), (3137, 32, 96), (5, 40, 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("epilogue", ["bias", "bias+gelu_fast", "bias+residual", "none"])
def test_linear(epilogue, shape, dtype):
    tokens, fan_in, fan_out = shape
    x, w, b, r = params(tokens, fan_in, fan_out, bias=epilogue != "none", residual="residual" in epilogue)
    act = "gelu_fast" if "gelu" in epilogue else None
    check_against_reference(
        lambda x, w, b, r: linear(x, w, b, act, r), lambda x, w, b, r: linear_ref(x, w, b, act, r),
        (x, w, b, r), dtype, name=epilogue,
    )


MLP_CASES = [(shape, dtype) for shape in [(17, 32, 200), (197, 96, 384), (1, 40, 100)] for dtype in DTYPES]
MLP_CASES.append(((3, 768, 3072), torch.bfloat16))  # ViViT-B's MLP (one dtype: the interpreter is slow here)


@pytest.mark.parametrize(
    "shape, dtype", MLP_CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v)
)
def test_mlp(shape, dtype):
    """fc2(gelu_fast(fc1(x))) + residual; intermediate sizes that are and are not tile multiples."""
    tokens, hidden, inter = shape
    x = leaf(torch.randn(2, tokens, hidden))
    w1 = leaf(torch.randn(inter, hidden) * hidden**-0.5)
    b1 = leaf(0.1 * torch.randn(inter))
    w2 = leaf(torch.randn(hidden, inter) * inter**-0.5)
    b2 = leaf(0.1 * torch.randn(hidden))
    r = leaf(torch.randn(2, tokens, hidden))
    check_against_reference(
        lambda *a: mlp(a[0], a[1], a[2], a[3], a[4], residual=a[5]),
        lambda *a: mlp_ref(a[0], a[1], a[2], a[3], a[4], residual=a[5]),
        (x, w1, b1, w2, b2, r), dtype, name="mlp",
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, bias", [((17, 64), True), ((197, 96), True), ((5, 40), False), ((1, 768), True)],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_qkv_projection(shape, bias, dtype):
    """Three projections in one GEMM reading the three weights in place; every input's gradient (dx over the
    three weights in one GEMM)."""
    tokens, hidden = shape
    ws = [leaf(torch.randn(hidden, hidden) * hidden**-0.5) for _ in range(3)]
    bs = [leaf(0.1 * torch.randn(hidden)) if bias else None for _ in range(3)]
    x = leaf(torch.randn(2, tokens, hidden))
    args = (x, ws[0], bs[0], ws[1], bs[1], ws[2], bs[2])
    check_against_reference(lin.qkv_projection, lin.qkv_projection_ref, args, dtype, name="qkv")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("slots", [(0, 2), (0, 1, 2, 2)], ids=["q-v", "every-projection-two-on-v"])
def test_qkv_projection_with_lora_adapters(slots, dtype):
    """LoRA adapters inside the QKV op (PEFT's update on their third) against the reference: the output and every
    input's gradient, the adapters' A and B included."""
    tokens, hidden, rank = 19, 48, 4
    ws = [leaf(torch.randn(hidden, hidden) * hidden**-0.5) for _ in range(3)]
    bs = [leaf(0.1 * torch.randn(hidden)) for _ in range(3)]
    adapters = [t for _ in slots
                for t in (leaf(torch.randn(rank, hidden) * hidden**-0.5), leaf(torch.randn(hidden, rank)))]
    scales = [2.0, 0.5, 1.0, 0.25][:len(slots)]

    def with_adapters(fn):
        def call(x, wq, bq, wk, bk, wv, bv, *ab):
            pairs = [(slot, ab[2 * i], ab[2 * i + 1], scales[i]) for i, slot in enumerate(slots)]
            return fn(x, wq, bq, wk, bk, wv, bv, adapters=pairs)
        return call

    x = leaf(torch.randn(2, tokens, hidden))
    args = (x, ws[0], bs[0], ws[1], bs[1], ws[2], bs[2], *adapters)
    check_against_reference(with_adapters(lin.qkv_projection), with_adapters(lin.qkv_projection_ref), args, dtype,
                            name="qkv+lora")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qkv_lora_adapters_with_their_own_inputs(dtype):
    """Adapters whose dropout is active get their own input (x after their dropout): the op's output and every
    gradient, those of the adapters' inputs included, against the reference."""
    tokens, hidden, rank = 11, 32, 4
    ws = [leaf(torch.randn(hidden, hidden) * hidden**-0.5) for _ in range(3)]
    a_q, b_q, a_v, b_v = (leaf(torch.randn(*shape) * 0.5) for shape in ((rank, hidden), (hidden, rank)) * 2)
    x, x_q, x_v = (leaf(torch.randn(2, tokens, hidden)) for _ in range(3))  # x_q, x_v: stand for dropout(x)

    def with_adapters(fn):
        def call(x, wq, wk, wv, a_q, b_q, a_v, b_v, x_q, x_v):
            return fn(x, wq, None, wk, None, wv, None, adapters=[(0, a_q, b_q, 2.0, x_q), (2, a_v, b_v, 0.5, x_v)])
        return call

    args = (x, *ws, a_q, b_q, a_v, b_v, x_q, x_v)
    check_against_reference(with_adapters(lin.qkv_projection), with_adapters(lin.qkv_projection_ref), args, dtype,
                            name="qkv+lora+dropout")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "own-gemms"])
def test_qkv_lora_computes_and_keeps_only_what_trains(monkeypatch, fused):
    """Frozen base weights and input: only the adapters' gradients are computed, equal to the reference's; a frozen
    adapter gets None and nothing computes it; the registry's launch count of the backward is what ran. Fused: the
    adapters' products dU alone (no dx: one launch) and one grouped launch of dA_q, dB_q, dB_v; no torch GEMM.
    Unfused: one small GEMM each for dU, dA, dB."""
    from vivit_kernels.ops import formulas

    monkeypatch.setattr(_gemm, "FUSE_LORA", fused)
    torch.manual_seed(0)
    hidden, rank = 32, 4
    ws = [torch.randn(hidden, hidden, device=DEVICE) * hidden**-0.5 for _ in range(3)]
    a_q, b_q = leaf(torch.randn(rank, hidden)), leaf(torch.randn(hidden, rank))
    a_v, b_v = torch.randn(rank, hidden, device=DEVICE), leaf(torch.randn(hidden, rank))  # A of v frozen
    x = torch.randn(2, 7, hidden, device=DEVICE)
    adapters = [(0, a_q, b_q, 2.0), (2, a_v, b_v, 2.0)]
    out = lin.qkv_projection(x, ws[0], None, ws[1], None, ws[2], None, adapters=adapters)
    grad = torch.randn_like(out)
    gemms, launches = [], []
    def counting(name):
        fn = getattr(torch, name)

        def counted(*args, **kwargs):
            gemms.append(name)
            return fn(*args, **kwargs)
        return counted

    for name in ("mm", "addmm"):
        monkeypatch.setattr(torch, name, counting(name))
    bwd = lin.qkv_bwd

    def counted_bwd(*args):
        launches.append(formulas.launches("vivit_kernels::qkv_bwd", args))
        return bwd(*args)

    monkeypatch.setattr(lin, "qkv_bwd", counted_bwd)
    before = _triton.LAUNCHES.copy()
    ours = torch.autograd.grad(out, (a_q, b_q, b_v), grad)
    kernels = _triton.LAUNCHES - before
    monkeypatch.undo()
    ref = lin.qkv_projection_ref(x, ws[0], None, ws[1], None, ws[2], None, adapters=adapters)
    for mine, theirs in zip(ours, torch.autograd.grad(ref, (a_q, b_q, b_v), grad), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    if fused:  # the products s dY_q B_q, s dY_v B_v (one launch), then dA_q, dB_q, dB_v (one launch)
        assert gemms == [] and dict(kernels) == {"_gemm_kernel": 1, "_lora_grads_kernel": 1}, (gemms, kernels)
        assert launches == [2]
    else:  # q: dU, dA, dB (3 GEMMs); v: dB alone (its A is frozen and x needs no gradient); no base GEMM
        assert sorted(gemms) == ["addmm", "addmm", "addmm", "mm"], gemms
        assert launches == [4]
    assert a_v.grad is None


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "own-gemms"])
def test_qkv_lora_float32_adapters_on_bf16_activations(monkeypatch, fused):
    """PEFT's float32 adapters on a bf16 base: the op reads them as they are (fused: inside its kernels; else cast
    for its GEMMs) and returns float32 gradients (no cast by autograd); output and every gradient within the
    tolerance rule of the float32 reference (torch's own error: the reference run on the bf16 base with the
    adapters cast to bf16 for their products, as the op computes them)."""
    from vivit_kernels.testing import judge_outputs

    monkeypatch.setattr(_gemm, "FUSE_LORA", fused)
    torch.manual_seed(0)
    hidden, rank = 32, 4
    ws = [(torch.randn(hidden, hidden, device=DEVICE) * hidden**-0.5) for _ in range(3)]
    a, b = leaf(torch.randn(rank, hidden)), leaf(torch.randn(hidden, rank))
    x = leaf(torch.randn(2, 7, hidden))
    grad = torch.randn(2, 7, 3 * hidden, device=DEVICE)
    runs = []
    for fn, dtype in ((lin.qkv_projection, torch.bfloat16), (lin.qkv_projection_ref, torch.float32),
                      (lin.qkv_projection_ref, torch.bfloat16)):
        xd = x.detach().to(dtype).requires_grad_()
        wd = [w.to(dtype) for w in ws]
        out = fn(xd, wd[0], None, wd[1], None, wd[2], None, adapters=[(2, a, b, 2.0)])
        runs.append((out.float(), [g.float() for g in torch.autograd.grad(out, (a, b, xd), grad.to(dtype))]))
    for c in judge_outputs(*runs[0], runs[1], runs[2], name="qkv+fp32 lora", grad_names=["dA", "dB", "dx"]):
        assert c.ok, c.message()


def test_qkv_projection_opcheck_and_errors():
    x = leaf(torch.randn(2, 5, 32))
    ws = [leaf(torch.randn(32, 32)) for _ in range(3)]
    bs = [leaf(torch.randn(32)) for _ in range(3)]
    torch.library.opcheck(torch.ops.vivit_kernels.qkv_fwd.default,
                          (x, ws[0], bs[0], ws[1], bs[1], ws[2], bs[2], False, [], [], [], [], []))
    a, b = leaf(torch.randn(4, 32)), leaf(torch.randn(32, 4))
    torch.library.opcheck(torch.ops.vivit_kernels.qkv_fwd.default,
                          (x, ws[0], bs[0], ws[1], bs[1], ws[2], bs[2], False, [a], [b], [2], [0.5], [x.new_empty(0)]))
    dropped = leaf(torch.randn(2, 5, 32))
    torch.library.opcheck(torch.ops.vivit_kernels.qkv_fwd.default,
                          (x, ws[0], bs[0], ws[1], bs[1], ws[2], bs[2], False, [a], [b], [0], [2.0], [dropped]))
    with pytest.raises(ValueError, match=r"adapter 0 must have A \(rank, 32\) and B \(32, rank\)"):
        lin.qkv_projection(x, *[t for w, bb in zip(ws, bs, strict=True) for t in (w, bb)], adapters=[(0, b, a, 1.0)])
    with pytest.raises(ValueError, match="projection must be 0 \\(q\\), 1 \\(k\\) or 2 \\(v\\), got 3"):
        lin.qkv_projection(x, *[t for w, bb in zip(ws, bs, strict=True) for t in (w, bb)], adapters=[(3, a, b, 1.0)])
    with pytest.raises(ValueError, match="give all three biases or none"):
        lin.qkv_projection(x, ws[0], bs[0], ws[1], None, ws[2], bs[2])
    with pytest.raises(ValueError, match=r"wk is \(16, 32\), wq is \(32, 32\)"):
        lin.qkv_projection(x, ws[0], None, ws[1][:16], None, ws[2], None)


def _gemm_ops():
    """The registry's ops on the shared GEMM engine, each variant of its sample inputs."""
    for op, entry in OPS.items():
        if entry.kernel_module == _gemm.__name__:
            for variant in entry.variants:
                yield pytest.param(op, variant, id=op if variant is None else f"{op}-{variant}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op, variant", list(_gemm_ops()))
def test_ops_on_the_tma_path(op, variant, dtype, monkeypatch):
    """The GEMM ops, forward and every gradient (dX, dW split over K, db), with every GEMM on the sm_90
    tensor-descriptor kernel (on sm_90 the default where the layout allows; here forced, in the interpreter)."""
    _tma_here("tma")
    monkeypatch.setattr(_gemm, "FORCED_PATH", "tma")
    # 1400 rows: the weight gradients split over K
    shape = Shape(batch=2, tokens=700, hidden=64, heads=2, head_dim=32, inter=96, frames=4, image=32)
    entry = OPS[op]
    args = entry.sample_inputs(shape, torch.float32, DEVICE, True, variant)
    check_against_reference(entry.ours.fn, entry.reference, args, dtype, name=f"{op} {variant or ''} (tma)")


@pytest.mark.parametrize("activation", ["gelu", "relu", "gelu_new"])
def test_other_activations_run_through_torch(activation):
    x, w, b, r = params(9, 32, 48, residual=True)
    check_against_reference(
        lambda x, w, b, r: linear(x, w, b, activation, r), lambda x, w, b, r: linear_ref(x, w, b, activation, r),
        (x, w, b, r), torch.float32, name=activation,
    )
    w2 = leaf(torch.randn(32, 48))
    check_against_reference(
        lambda x, w, b, w2: mlp(x, w, b, w2, None, activation),
        lambda x, w, b, w2: mlp_ref(x, w, b, w2, None, activation),
        (x, w, b, w2),
        torch.float32,
        name=f"mlp {activation}",
    )


def test_strided_input_and_no_grad_inputs():
    """A non-contiguous (but row-collapsible) x, and inputs that need no gradient."""
    base = torch.randn(2, 7, 64, device=DEVICE)
    x = base[:, :, :32]  # row stride 64
    w, b = torch.randn(48, 32, device=DEVICE), torch.randn(48, device=DEVICE)
    assert_close(linear(x, w, b), linear_ref(x, w, b), 1e-4, name="strided x")
    w.requires_grad_()
    y = linear(x, w, b, "gelu_fast")
    y.sum().backward()
    wr = w.detach().clone().requires_grad_()
    linear_ref(x, wr, b, "gelu_fast").sum().backward()
    assert_close(w.grad, wr.grad, 1e-4, name="dW only")


def _shipped_gemm_configs():
    """Every distinct (kernel path, epilogue kind, tile) a GPU may launch: the pointer kernel's and the sm_90
    tensor-descriptor kernel's (the interpreter runs tensor descriptors too)."""
    seen = {}
    for path, table in (("pointer", _gemm.GEMM_CONFIGS), ("tma", _gemm.TMA_CONFIGS)):
        for (_size, _precision, kind), configs in table.items():
            for cfg in configs:
                seen.setdefault((path, kind, cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]), cfg)
    return sorted(seen.items())


def _tma_here(path: str) -> None:
    if path == "tma" and DEVICE.type == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the tensor-descriptor kernel is sm_90's; this GPU runs the pointer kernel")


@pytest.mark.parametrize(
    "key, cfg", _shipped_gemm_configs(), ids=lambda v: "-".join(map(str, v)) if isinstance(v, tuple) else ""
)
def test_every_shipped_gemm_tile(key, cfg):
    """Each shipped tile shape of both kernels, forced, on sizes that leave partial tiles in M, N and K, in each
    epilogue kind: forward (+ bias, pre-activation, gelu_fast), residual, the gelu backward, the grouped QKV
    GEMMs, and the weight gradient split over K (A read transposed)."""
    path, kind = key[0], key[1]
    _tma_here(path)
    M, K, N = 2 * cfg.kwargs["BLOCK_M"] + 5, 2 * cfg.kwargs["BLOCK_K"] + 16, cfg.kwargs["BLOCK_N"] + 16
    a, bmat = torch.randn(M, K, device=DEVICE), torch.randn(K, N, device=DEVICE) * K**-0.5
    bias, res = torch.randn(N, device=DEVICE), torch.randn(M, N, device=DEVICE)
    ab = a @ bmat
    if kind == "dgelu":
        h = torch.randn(M, N, device=DEVICE)
        out, act = torch.empty(M, N, device=DEVICE), torch.empty(M, N, device=DEVICE)
        _gemm.gemm(a, bmat, out, dgelu_of=h, pre=act, config=cfg, path=path)
        assert_close(out, lin.gelu_fast_backward_ref(ab, h), 1e-4, name="dgelu")
        assert_close(act, gelu_fast_ref(h), 1e-5, name="gelu(aux)")
        return
    if kind == "grouped":  # the QKV projection (three B matrices side by side) and its dX (three K segments)
        b1, b2 = torch.randn(2, K, N, device=DEVICE) * K**-0.5
        bias1, bias2 = torch.randn(2, N, device=DEVICE)
        out3 = torch.empty(M, 3 * N, device=DEVICE)
        _gemm.gemm(
            a, bmat, out3, bias=bias, groups="n", more_b=(b1, b2), more_bias=(bias1, bias2), config=cfg, path=path
        )
        assert_close(out3, torch.cat([ab + bias, a @ b1 + bias1, a @ b2 + bias2], 1), 1e-4, name="n groups")
        a3 = torch.randn(M, 3 * K, device=DEVICE)
        out = torch.empty(M, N, device=DEVICE)
        _gemm.gemm(a3, bmat, out, groups="k", more_b=(b1, b2), config=cfg, path=path)
        assert_close(out, a3 @ torch.cat([bmat, b1, b2]), 1e-4, name="k segments")
        return
    w = (torch.randn(N, K, device=DEVICE) * K**-0.5)  # the forward reads an nn.Linear weight as it is (B = W^T)
    out, pre = torch.empty(M, N, device=DEVICE), torch.empty(M, N, device=DEVICE)
    _gemm.gemm(a, w.t(), out, bias=bias, activation="gelu_fast", pre=pre, config=cfg, path=path)
    assert_close(pre, a @ w.t() + bias, 1e-4, name="pre-activation")
    assert_close(out, gelu_fast_ref(a @ w.t() + bias), 1e-4, name="gelu_fast")
    _gemm.gemm(a, bmat, out, bias=bias, residual=res, config=cfg, path=path)
    assert_close(out, ab + bias + res, 1e-4, name="residual")
    tokens = 3 * 512 + 37  # a weight gradient: dY^T @ X with K = tokens, split in ranges of at least 512 rows
    dy, x = torch.randn(tokens, N, device=DEVICE), torch.randn(tokens, K, device=DEVICE)
    dw = torch.empty(N, K, device=DEVICE)
    _gemm.gemm(dy.t(), x, dw, split_k=True, config=cfg, path=path, sms=1000)
    assert _gemm._splits(N, K, tokens, 1000)[0] >= 2  # the split path really runs
    assert_close(dw, dy.t() @ x, 1e-4 * tokens**0.5, name="dW split over K")


@pytest.mark.cpu_only
@pytest.mark.parametrize("kernel_row", sorted(_gemm.GEMM_CONFIGS), ids=str)
def test_autotuner_prunes_to_the_row(kernel_row):
    size, precision, kind = kernel_row
    tuner = _gemm._gemm_tuned
    dtype = torch.float16 if size == 2 else torch.float32
    flags = dict(DOT_PRECISION=precision, DGELU=kind == "dgelu", N_GROUPS=3 if kind == "grouped" else 1, K_GROUPS=1,
                 LORA=int(kind == "lora"))
    pruned = tuner.early_config_prune(tuner.configs, {"A": torch.empty(1, dtype=dtype)}, **flags)
    assert sorted(map(_triton.config_key, pruned)) == sorted(map(_triton.config_key, _gemm.GEMM_CONFIGS[kernel_row]))
    if kernel_row in _gemm.TMA_CONFIGS:
        tma = _gemm._gemm_tma_tuned
        pruned = tma.early_config_prune(tma.configs, {"A": torch.empty(1, dtype=dtype)}, **flags)
        assert sorted(map(_triton.config_key, pruned)) == sorted(map(_triton.config_key, _gemm.TMA_CONFIGS[kernel_row]))


def test_opcheck():
    x, w, b, r = params(5, 32, 48, residual=True)
    torch.library.opcheck(torch.ops.vivit_kernels.linear_fwd.default, (x, w, b, r, "none", False, False, [], [], []))
    torch.library.opcheck(torch.ops.vivit_kernels.linear_fwd.default,
                          (x, w, b, None, "gelu_fast", True, False, [], [], []))
    a, bb = leaf(torch.randn(4, 32)), leaf(torch.randn(48, 4))  # a LoRA adapter inside the GEMM
    torch.library.opcheck(torch.ops.vivit_kernels.linear_fwd.default,
                          (x, w, b, None, "gelu_fast", True, False, [a], [bb], [2.0]))
    w2 = leaf(torch.randn(32, 48))
    torch.library.opcheck(
        torch.ops.vivit_kernels.mlp_fwd.default, (x, w, b, w2, None, x.detach().clone().requires_grad_(), True, False)
    )


def test_compile_fullgraph():
    torch._dynamo.reset()
    x, w, b, _ = params(7, 32, 48)
    w2 = leaf(torch.randn(32, 48))
    wq = leaf(torch.randn(32, 32) * 0.2)
    leaves = (x, w, b, w2, wq)

    def block(x, w, b, w2, wq):
        y = linear(x, wq, None, residual=x)
        return mlp(y, w, b, w2, None, residual=y).sum()

    eager = block(*leaves)
    eager.backward()
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(*leaves)
    compiled.backward()
    assert_close(compiled, eager, 1e-3, name="out")
    for g, t in zip(grads, leaves, strict=True):
        assert_close(t.grad, g, 1e-4, name="grad")


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: linear(torch.randn(3, 8), torch.randn(4, 9)),
            r"weight must be \(out_features, 8\) to take 8 input features, got \(4, 9\)",
        ),
        (lambda: linear(torch.randn(3, 8), torch.randn(4, 8), torch.randn(5)), r"bias must be \(4,\)"),
        (lambda: linear(torch.randn(3, 8), torch.randn(4, 8).half()), "must be torch.float32 like x"),
        (lambda: linear(torch.ones(3, 8, dtype=torch.int64), torch.ones(4, 8, dtype=torch.int64)), "supports float16"),
        (
            lambda: linear(torch.randn(3, 8), torch.randn(4, 8), residual=torch.randn(3, 5)),
            r"residual must be \(3, 4\)",
        ),
        (
            lambda: mlp(torch.randn(3, 8), torch.randn(16, 8), None, torch.randn(8, 15), None),
            r"w2 must be \(out_features, 16\)",
        ),
    ],
)
def test_bad_inputs(call, match):
    with torch.device(DEVICE), pytest.raises(ValueError, match=match):
        call()
