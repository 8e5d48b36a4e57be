"""LoRA adapters inside our GEMMs (ops/_gemm.py's LORA variants, ops/linear.py's qkv and linear ops): the forward's
x A^T in the base GEMM's K loop and its product with B^T in the epilogue, the input gradient's dY B and its product
with A inside the dx GEMM, and every adapter's dA and dB in one grouped launch. Against the eager reference with
the tolerance rule (fp32 strict; bf16 with PEFT's float32 adapters within 2x / 3x torch's own bf16 error), on the
test device; PEFT on transformers' model is tests/test_ecosystem.py's."""

from __future__ import annotations

import pytest
import torch

from vivit_kernels.ops import _gemm, _triton
from vivit_kernels.ops import linear as lin
from vivit_kernels.ops.activations import gelu_fast
from vivit_kernels.testing import judge_outputs

from helpers import DEVICE

pytestmark = pytest.mark.triton

RANKS = [1, 8, 64]
DTYPES = [torch.float32, torch.bfloat16]  # bf16: a bf16 base, PEFT's float32 adapters


def _run(fn, base: list, adapters: list, dtype: torch.dtype, grad: torch.Tensor):
    """fn(*base in dtype, *adapters as they are) and the gradients of every leaf that requires one (base inputs
    cast to dtype keep their requires_grad), as float32."""
    base = [t.detach().to(dtype).requires_grad_(t.requires_grad) if t is not None else None for t in base]
    out = fn(*base, *adapters)
    leaves = [t for t in (*base, *adapters) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    return out.float(), [g.float() for g in grads]


def _judge(ours, ref, base, adapters, dtype, name):
    """ours in dtype against ref in float32 (float64 adapters for a strict fp32 reference), torch's own error from
    ref in dtype (its adapter products in dtype, as PEFT's cast); every output and gradient within the rule."""
    g = torch.Generator().manual_seed(3)
    probe = ours(*[t.detach().to(dtype) if t is not None else None for t in base], *adapters)
    grad = torch.randn(probe.shape, generator=g).to(DEVICE)
    mine = _run(ours, base, adapters, dtype, grad)
    ref32 = _run(ref, base, adapters, torch.float32, grad)
    low = None if dtype == torch.float32 else _run(ref, base, adapters, dtype, grad)
    for c in judge_outputs(*mine, ref32, low, name=name):
        assert c.ok, c.message()


def _assert_inside_the_gemms(call, leaves):
    """``call()``'s forward is one GEMM launch and its backward takes the grouped adapter-gradient launch, with no
    torch matmul anywhere (the adapters run inside our kernels)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    matmuls = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "aten" and func.__name__.split(".")[0] in ("mm", "addmm", "bmm", "matmul", "linear"):
                matmuls.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with Recorder():
        before = _triton.LAUNCHES.copy()
        out = call()
        forward = dict(_triton.LAUNCHES - before)
        before = _triton.LAUNCHES.copy()
        torch.autograd.grad(out, leaves, torch.ones_like(out))
        backward = dict(_triton.LAUNCHES - before)
    assert forward == {"_gemm_kernel": 1} and backward.get("_lora_grads_kernel") == 1 and not matmuls, \
        (forward, backward, matmuls)


def _adapter(rank, fan_in, fan_out, requires_a=True, requires_b=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(rank, fan_in, generator=g) * fan_in**-0.5).to(DEVICE).requires_grad_(requires_a)
    b = (torch.randn(fan_out, rank, generator=g) * rank**-0.5).to(DEVICE).requires_grad_(requires_b)
    return a, b


def _leaf(*shape, seed, scale=1.0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(DEVICE).requires_grad_(requires_grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("epilogue", ["bias+residual", "bias+gelu_fast"])
def test_linear_with_an_adapter_inside_the_gemm(epilogue, rank, dtype):
    """o_proj / fc2 (+ residual) and fc1 (+ gelu_fast, the adapter's update before it): output and the gradients of
    x, W, b, A and B; one GEMM forward (no launch of the adapter's own)."""
    tokens, fan_in, fan_out = 37, 48, 80
    x, w = _leaf(2, tokens, fan_in, seed=1), _leaf(fan_out, fan_in, seed=2, scale=fan_in**-0.5)
    b = _leaf(fan_out, seed=3, scale=0.1)
    r = _leaf(2, tokens, fan_out, seed=4) if "residual" in epilogue else None
    act = "gelu_fast" if "gelu" in epilogue else None
    a, bb = _adapter(rank, fan_in, fan_out)

    def ours(x, w, b, r, a, bb):
        return lin.linear(x, w, b, act, r, adapters=[(a, bb, 2.0)])

    def ref(x, w, b, r, a, bb):
        y = lin.linear_ref(x, w, b) + lin.lora_ref(x, a, bb, 2.0)
        y = gelu_fast(y) if act else y
        return y + r if r is not None else y

    _judge(ours, ref, [x, w, b, r], [a, bb], dtype, f"linear+lora {epilogue} r={rank}")
    _assert_inside_the_gemms(lambda: ours(x, w, b, r, a, bb), [x, w, a, bb])


SLOTS = {"q": (0,), "q-v": (0, 2), "q-k-v": (0, 1, 2)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("slots", list(SLOTS), ids=str)
def test_qkv_with_adapters_inside_the_gemm(slots, rank, dtype):
    """The QKV op with adapters on some of q, k, v: output and every gradient (x, the three weights and biases, each
    A and B); one GEMM forward."""
    tokens, hidden = 21, 48
    x = _leaf(2, tokens, hidden, seed=1)
    ws = [_leaf(hidden, hidden, seed=10 + i, scale=hidden**-0.5) for i in range(3)]
    bs = [_leaf(hidden, seed=20 + i, scale=0.1) for i in range(3)]
    pairs = [_adapter(rank, hidden, hidden, seed=30 + s) for s in SLOTS[slots]]
    scales = [2.0, 0.5, 1.0]

    def call(fn):
        def run(x, wq, bq, wk, bk, wv, bv, *ab):
            adapters = [(s, ab[2 * i], ab[2 * i + 1], scales[i]) for i, s in enumerate(SLOTS[slots])]
            return fn(x, wq, bq, wk, bk, wv, bv, adapters=adapters)
        return run

    base = [x, ws[0], bs[0], ws[1], bs[1], ws[2], bs[2]]
    _judge(call(lin.qkv_projection), call(lin.qkv_projection_ref), base, [t for p in pairs for t in p], dtype,
           f"qkv+lora {slots} r={rank}")
    _assert_inside_the_gemms(lambda: call(lin.qkv_projection)(*base, *[t for p in pairs for t in p]),
                             [x, *[t for p in pairs for t in p]])


@pytest.mark.parametrize("frozen", ["A of q", "B of v", "x and the base", "every adapter"])
def test_qkv_frozen_parts_get_no_gradient_and_the_rest_is_right(frozen):
    """Frozen parts (a frozen adapter matrix, a frozen base and input: the first layer of a LoRA step) get None and
    the rest equals the reference, fp32 strict."""
    tokens, hidden, rank = 13, 32, 8
    base_grad = frozen != "x and the base"
    x = _leaf(2, tokens, hidden, seed=1, requires_grad=base_grad)
    ws = [_leaf(hidden, hidden, seed=10 + i, scale=hidden**-0.5, requires_grad=base_grad) for i in range(3)]
    a_q, b_q = _adapter(rank, hidden, hidden, requires_a=frozen not in ("A of q", "every adapter"),
                        requires_b=frozen != "every adapter", seed=1)
    a_v, b_v = _adapter(rank, hidden, hidden, requires_a=frozen != "every adapter",
                        requires_b=frozen not in ("B of v", "every adapter"), seed=2)

    def call(fn):
        return fn(x, ws[0], None, ws[1], None, ws[2], None, adapters=[(0, a_q, b_q, 2.0), (2, a_v, b_v, 0.5)])

    leaves = [t for t in (x, *ws, a_q, b_q, a_v, b_v) if t.requires_grad]
    if frozen != "every adapter":
        _assert_inside_the_gemms(lambda: call(lin.qkv_projection), leaves)
    out, ref = call(lin.qkv_projection), call(lin.qkv_projection_ref)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for mine, theirs in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, leaves, grad),
                            strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    for t in (x, *ws, a_q, b_q, a_v, b_v):
        assert t.grad is None


def test_adapter_gradients_split_over_rows_sum_in_order():
    """Many rows (the adapters' gradients reduce over every token): the grouped launch splits the rows into ranges
    whose fp32 partials a second launch adds in a fixed order; dA and dB equal a float64 reference, and two runs
    are bit for bit the same."""
    rows, hidden, rank = 2 * 1200, 32, 8
    _, n_splits, _ = _gemm.lora_grad_plan(rows, hidden, hidden, 2, 2, _gemm._multiprocessors(DEVICE), 4)
    assert n_splits > 1, "the test wants the split path"
    x = _leaf(2, 1200, hidden, seed=1, requires_grad=False)
    ws = [_leaf(hidden, hidden, seed=10 + i, scale=hidden**-0.5, requires_grad=False) for i in range(3)]
    a_q, b_q = _adapter(rank, hidden, hidden, seed=1)
    a_v, b_v = _adapter(rank, hidden, hidden, seed=2)
    adapters = [(0, a_q, b_q, 2.0), (2, a_v, b_v, 0.5)]
    grad = torch.randn(2, 1200, 3 * hidden, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    runs = []
    for _ in range(2):
        before = _triton.LAUNCHES.copy()
        out = lin.qkv_projection(x, ws[0], None, ws[1], None, ws[2], None, adapters=adapters)
        runs.append(torch.autograd.grad(out, (a_q, b_q, a_v, b_v), grad))
        assert (_triton.LAUNCHES - before)["_lora_sum_kernel"] == 1
    doubles = [t.detach().double().requires_grad_() for t in (a_q, b_q, a_v, b_v)]
    ref = lin.qkv_projection_ref(x.double(), *(t for w in ws for t in (w.double(), None)),
                                 adapters=[(0, doubles[0], doubles[1], 2.0), (2, doubles[2], doubles[3], 0.5)])
    for mine, again, theirs in zip(*runs, torch.autograd.grad(ref, doubles, grad.double()), strict=True):
        torch.testing.assert_close(mine, again, rtol=0, atol=0)
        torch.testing.assert_close(mine.double(), theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())
