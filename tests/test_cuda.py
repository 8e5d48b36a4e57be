"""CUDA-only tests: what a GPU user's ``python -m pytest`` adds to the suite that runs everywhere.

ViViT-B shapes (3137 tokens, hidden 768, 12 heads of 64, intermediate 3072) for every op of the registry a layer
runs, forward and every input gradient, in fp32 / fp16 / bf16 at batch 1 and 8; every shipped kernel config forced
once in its own dtype; the autotuned launch against the rows it selects; the whole model against eager at ViViT-B
in bf16; inductor; CUDA-graph capture and replay. (Timings are bench/'s: no benchmark in the suite.) The same
helpers and tolerance rule as the CPU tests (tests/helpers.py): fp32 paths strict,
fp16 / bf16 within 2x PyTorch's own same-dtype error (3x for gradients).

These are skipped on machines without a GPU (our CI). They are written to be right by construction: every
comparison goes through the helpers the CPU suite proves on every run.
"""

from __future__ import annotations

import os

import pytest
import torch

import vivit_kernels as vk
from vivit_kernels.ops import _gemm, _triton
from vivit_kernels.ops import attention as attn_mod
from vivit_kernels.ops import layer_norm as ln
from vivit_kernels.ops import linear as lin
from vivit_kernels.ops import patch_embed as pe
from vivit_kernels.ops.attention import attention_ref, flash_attention_qkv
from vivit_kernels.ops.layer_norm import layer_norm, layer_norm_ref
from vivit_kernels.ops.registry import OPS
from vivit_kernels.ops.sample_inputs import Shape
from vivit_kernels.testing import grad_eps, judge, judge_outputs

from helpers import DEVICE, assert_close, assert_within_rule, check_against_reference

# VIVIT_KERNELS_DRY_RUN_CUDA_TESTS=1 runs this file on the CPU test device (Triton interpreter) at small sizes, to
# check the tests themselves where no GPU exists: `VIVIT_KERNELS_DRY_RUN_CUDA_TESTS=1 pytest tests/test_cuda.py`.
# The CUDA-only mechanisms (CUDA graphs, CUDA-event timing) are skipped then; the model tests use small presets.
DRY_RUN = os.environ.get("VIVIT_KERNELS_DRY_RUN_CUDA_TESTS") == "1"
cuda_only = pytest.mark.cuda
pytestmark = [pytest.mark.triton] if DRY_RUN else [pytest.mark.cuda, pytest.mark.triton]

SHAPE = Shape.vivit_b() if not DRY_RUN else Shape.tiny()  # the registry's: ViViT-B, or the dry run's tiny sizes
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BATCHES = [1, 8] if not DRY_RUN else [1, 2]


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEVICE).requires_grad_()


# ------------------------------------------------------------------------------------------------
# Every op at ViViT-B shapes, forward and every input gradient
# ------------------------------------------------------------------------------------------------
def _by_slices(entry, args: tuple, grad: torch.Tensor, dtype: torch.dtype):
    """The op's reference output and input gradients in ``dtype``, one batch element at a time (attention's N x N
    probabilities of a whole ViViT-B batch in fp32 would need tens of GB)."""
    outs, grads = [], None
    for b in range(grad.shape[0]):
        leaves = [a[b : b + 1].detach().to(dtype if a.is_floating_point() else a.dtype).requires_grad_(a.requires_grad)
                  if isinstance(a, torch.Tensor) else a for a in args]
        out = entry.reference(*leaves)
        out.backward(grad[b : b + 1].to(dtype))
        outs.append(out.detach())
        row = [leaf.grad if isinstance(leaf, torch.Tensor) and leaf.requires_grad else None for leaf in leaves]
        grads = [[g] for g in row] if grads is None else [acc + [g] for acc, g in zip(grads, row, strict=True)]
    return torch.cat(outs), [None if g[0] is None else torch.cat(g) for g in grads]


def _registry_cases():
    """Every op of ours in Triton (the extension's are checked against their CPU twins), each variant of its sample
    inputs."""
    for op, entry in OPS.items():
        if entry.kernel_module.startswith("csrc/"):
            continue
        for variant in entry.variants:
            yield pytest.param(op, variant, id=op if variant is None else f"{op}-{variant}")


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op, variant", list(_registry_cases()))
def test_op_vivit_b(op, variant, batch, dtype):
    """Each op at ViViT-B shapes (the registry's sample inputs), forward and every input gradient. Attention's
    reference runs one batch element at a time."""
    entry = OPS[op]
    shape = Shape.vivit_b(batch) if not DRY_RUN else Shape.tiny(batch)
    args = entry.sample_inputs(shape, torch.float32, DEVICE, True, variant)
    if not op.startswith("attention"):
        check_against_reference(entry.ours.fn, entry.reference, args, dtype, name=op)
        return
    leaves = [a.detach().to(dtype).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
    out = entry.ours.fn(*leaves)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out.backward(grad.to(dtype))
    ref = _by_slices(entry, args, grad, torch.float32)
    low = None if dtype == torch.float32 else _by_slices(entry, args, grad, dtype)
    grads = [leaf.grad if isinstance(leaf, torch.Tensor) and leaf.requires_grad else None for leaf in leaves]
    for c in judge_outputs(out, grads, ref, low, name=op):
        assert c.ok, c.message()


# ------------------------------------------------------------------------------------------------
# Every shipped config, forced once, in the dtype of its table row
# ------------------------------------------------------------------------------------------------
def _dtype_for(size: int, precision: str = "ieee") -> tuple[torch.dtype, bool]:
    """(dtype, allow_tf32) of a table row: 2-byte rows are checked in bf16, 4-byte rows in fp32."""
    return (torch.bfloat16, False) if size == 2 else (torch.float32, precision == "tf32")


def _rows(tables):
    for table_name, table in tables.items():
        for row, configs in table.items():
            for cfg in configs:
                yield pytest.param(table_name, row, cfg, id=f"{table_name}-{row}-{cfg.label().replace(' ', '_')}")


def _tf32_reference(fn, *args):
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return fn(*args)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _check_rule(ours, inputs32, ref_fn, dtype, tf32, name, factor=2.0):
    """ours (computed in dtype) vs ref_fn in fp32, held to factor x torch's own error in dtype (or in TF32): the
    tolerance rule of vivit_kernels.testing (fp32 strict)."""
    ref = ref_fn(*inputs32)
    torch_low = None
    if tf32:
        torch_low = _tf32_reference(ref_fn, *inputs32)
    elif dtype != torch.float32:
        torch_low = ref_fn(*(t.to(dtype) if t.is_floating_point() else t for t in inputs32))
    c = judge(name, ours, ref, torch_low, factor, eps=grad_eps(ref))
    assert c.ok, c.message()


ARCH = attn_mod.arch_of(DEVICE)  # the rows this GPU launches (sm_90's differ from sm_80's)
# (BLOCK_D, element size, short sequence): the short rows where they differ from the long ones
ATTN_TABLES = {name: {(key[0], key[1], key[3]): row for key, row in rows.items()
                      if key[2] == ARCH and (not key[3] or row != rows[(*key[:3], False)])}
               for name, rows in (("fwd", attn_mod.FWD_ROWS), ("dkdv", attn_mod.DKDV_ROWS), ("dq", attn_mod.DQ_ROWS))}


def _attention_cases():
    """This GPU's rows; sm_90's 2-byte forward configs twice: through tensor descriptors (its default) and through
    pointers (layouts TMA cannot read)."""
    for param in _rows(ATTN_TABLES):
        table, row, cfg = param.values
        yield pytest.param(table, row, cfg, False, id=param.id)
        if table == "fwd" and row[1] == 2 and ARCH >= 90:
            yield pytest.param(table, row, cfg, True, id=f"{param.id}-tma")


@pytest.mark.parametrize("table, row, cfg, tma", list(_attention_cases()))
def test_attention_config_forced(table, row, cfg, tma, monkeypatch):
    block_d, size, _ = row
    monkeypatch.setattr(attn_mod, "FORCED_TMA", tma)
    head_dim = {32: 32, 64: 64, 128: 80}[block_d]
    N = 3 * max(cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]) + 5
    dtype = torch.bfloat16 if size == 2 else torch.float32
    qkv = torch.randn(2, N, 3, 3, head_dim, device=DEVICE)
    do = torch.randn(2, N, 3, head_dim, device=DEVICE)
    x = qkv.to(dtype)
    scale = head_dim**-0.5
    out, lse = attn_mod._fwd(*x.unbind(2), scale, False, config=cfg if table == "fwd" else None)
    dq, dk, dv = attn_mod._bwd(do.to(dtype), *x.unbind(2), out, lse, scale, False,
                               dkdv_config=cfg if table == "dkdv" else None, dq_config=cfg if table == "dq" else None)

    def ref(qkv, do):
        leaf_ = qkv.detach().requires_grad_()
        o = attention_ref(*leaf_.unbind(2))
        o.backward(do)
        return torch.cat([o.detach()[:, :, None], leaf_.grad], dim=2)  # (B, N, 4, H, D): out, dq, dk, dv

    ours = torch.cat([out[:, :, None], dq[:, :, None], dk[:, :, None], dv[:, :, None]], dim=2)
    _check_rule(ours, (qkv, do), ref, dtype, False, f"attention {table} {cfg.label()}", factor=3.0)


@pytest.mark.parametrize("table, row, cfg", list(_rows({"pointer": _gemm.GEMM_CONFIGS, "tma": _gemm.TMA_CONFIGS})))
def test_gemm_config_forced(table, row, cfg):
    """Each config of both GEMM kernels (the tensor-descriptor one on sm_90 only) in its row's dtype."""
    if table == "tma" and ARCH != 90:
        pytest.skip("the tensor-descriptor GEMM is sm_90's")
    path = "tma" if table == "tma" else "pointer"
    size, precision, kind = row
    dtype, tf32 = _dtype_for(size, precision)
    M, K, N = 3 * cfg.kwargs["BLOCK_M"] + 5, 4 * cfg.kwargs["BLOCK_K"] + 16, 2 * cfg.kwargs["BLOCK_N"] + 16
    a32, b32 = torch.randn(M, K, device=DEVICE), torch.randn(K, N, device=DEVICE) * K**-0.5
    a, b = a32.to(dtype), b32.to(dtype)
    out = torch.empty(M, N, device=DEVICE, dtype=dtype)
    if kind == "dgelu":
        h32 = torch.randn(M, N, device=DEVICE)
        act = torch.empty_like(out)
        _gemm.gemm(a, b, out, dgelu_of=h32.to(dtype), pre=act, allow_tf32=tf32, config=cfg, path=path)
        _check_rule(out, (a32, b32, h32), lambda a, b, h: lin.gelu_fast_backward_ref(a @ b, h), dtype, tf32, "dgelu")
        return
    bias32 = torch.randn(N, device=DEVICE)
    if kind == "grouped":  # the QKV projection (three B side by side) and its dX (three K segments)
        more32 = [torch.randn(K, N, device=DEVICE) * K**-0.5 for _ in range(2)]
        biases32 = [torch.randn(N, device=DEVICE) for _ in range(2)]
        out3 = torch.empty(M, 3 * N, device=DEVICE, dtype=dtype)
        _gemm.gemm(a, b, out3, bias=bias32.to(dtype), groups="n", more_b=tuple(t.to(dtype) for t in more32),
                 more_bias=tuple(t.to(dtype) for t in biases32), allow_tf32=tf32, config=cfg, path=path)
        _check_rule(out3, (a32, b32, *more32, bias32, *biases32),
                    lambda a, b0, b1, b2, c0, c1, c2: torch.cat([a @ b0 + c0, a @ b1 + c1, a @ b2 + c2], 1),
                    dtype, tf32, "n groups")
        a3_32 = torch.randn(M, 3 * K, device=DEVICE)
        _gemm.gemm(a3_32.to(dtype), b, out, groups="k", more_b=tuple(t.to(dtype) for t in more32), allow_tf32=tf32,
                 config=cfg, path=path)
        _check_rule(out, (a3_32, b32, *more32), lambda a, b0, b1, b2: a @ torch.cat([b0, b1, b2]), dtype, tf32,
                    "k segments")
        return
    pre = torch.empty_like(out)
    _gemm.gemm(
        a, b, out, bias=bias32.to(dtype), activation="gelu_fast", pre=pre, allow_tf32=tf32, config=cfg, path=path
    )
    from vivit_kernels.ops.activations import gelu_fast

    _check_rule(out, (a32, b32, bias32), lambda a, b, c: gelu_fast(a @ b + c), dtype, tf32, "gelu_fast")
    tokens = 4 * 512 + 37  # the weight gradient: A read transposed, K split in ranges summed in order
    dy32, x32 = torch.randn(tokens, M, device=DEVICE), torch.randn(tokens, N, device=DEVICE)
    dw = torch.empty(M, N, device=DEVICE, dtype=dtype)
    _gemm.gemm(dy32.to(dtype).t(), x32.to(dtype), dw, split_k=True, allow_tf32=tf32, config=cfg, path=path, sms=1000)
    _check_rule(dw, (dy32, x32), lambda d, x: d.t() @ x, dtype, tf32, "dW split over K")


@pytest.mark.parametrize("table, row, cfg", list(_rows(pe.PATCH_CONFIGS)))
def test_patch_embed_config_forced(table, row, cfg):
    """Each config; the dW ones with the reduction over 640 tubelets split in two (as if the GPU had more SMs)."""
    size, precision = row
    dtype, tf32 = _dtype_for(size, precision)
    D = 2 * cfg.kwargs["BLOCK_N"] + 32
    B = 8 if table == "dw" else 3
    x32 = torch.randn(B, 8, 3, 64, 80, device=DEVICE)
    w32 = torch.randn(D, 3, 2, 16, 16, device=DEVICE) * 1536**-0.5
    b32, cls32 = torch.randn(D, device=DEVICE), torch.randn(1, 1, D, device=DEVICE)
    pos32 = torch.randn(1, 1 + 4 * 4 * 5, D, device=DEVICE)
    g32 = torch.randn(B, 1 + 4 * 4 * 5, D, device=DEVICE)
    cast = [t.to(dtype) for t in (x32, w32, b32, cls32, pos32)]
    out = pe._forward(*cast, tf32, config=cfg if table == "fwd" else None)
    if table == "dw":
        assert pe._splits(D, 1536, B * 80, 10_000, tile=(128, 128))[0] == 2
    dx, dw, db, _, _ = pe._backward_impl(
        g32.to(dtype),
        cast[0],
        cast[1],
        True,
        True,
        tf32,
        dw_config=cfg if table == "dw" else None,
        dx_config=cfg if table == "dx" else None,
        sms=10_000 if table == "dw" else None,
    )

    def ref(x, w, b, c, p, g):
        leaves = [t.detach().requires_grad_() for t in (x, w, b)]
        o = pe.patch_embed_ref(*leaves, c, p)
        o.backward(g)
        return torch.cat([o.detach().flatten(), *(t.grad.flatten() for t in leaves)])

    ours = torch.cat([out.flatten(), dx.flatten(), dw.flatten(), db.flatten()])
    _check_rule(ours, (x32, w32, b32, cls32, pos32, g32), ref, dtype, tf32, f"patch_embed {table}", factor=3.0)


@pytest.mark.parametrize("block_c", sorted(ln.LN_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_config(block_c, dtype):
    """Each shipped LayerNorm config (chosen by width, not autotuned) at a width that selects it."""
    features = block_c // 2 + 3 if block_c > 64 else 33
    args = (
        leaf(torch.randn(2, 300, features)),
        leaf(1 + 0.1 * torch.randn(features)),
        leaf(0.1 * torch.randn(features)),
    )
    check_against_reference(lambda x, w, b: layer_norm(x, w, b, 1e-5), lambda x, w, b: layer_norm_ref(x, w, b, 1e-5),
                            args, dtype, name=f"BLOCK_C={block_c}")


# ------------------------------------------------------------------------------------------------
# The autotuned launch itself
# ------------------------------------------------------------------------------------------------
def _wall_clock_timer(kernel_call, quantiles):
    import time

    start = time.perf_counter()
    kernel_call()
    ms = (time.perf_counter() - start) * 1e3
    return [ms, ms, ms]


def _chosen(tuner) -> set:
    return {_triton.config_key(c) for c in tuner.cache.values()}


def _keys(configs) -> set:
    return {_triton.config_key(c) for c in configs}


@pytest.mark.parametrize("tokens", [197, 300], ids=["short", "long"])  # either side of attention's SHORT_N
def test_autotuned_launches_pick_a_shipped_config_of_their_row(tokens):
    """Real autotuning (CUDA events): each tuner times the configs of the row its launch selects (attention: the
    short-sequence rows up to SHORT_N tokens, this GPU's architecture; GEMMs: the tensor-descriptor kernel's rows
    on sm_90, the pointer kernel's elsewhere) and keeps one of them."""
    tuners = (_gemm._gemm_tuned, _gemm._gemm_tma_tuned, attn_mod._attn_fwd_tuned, attn_mod._attn_bwd_dkdv_tuned,
              attn_mod._attn_bwd_dq_tuned)
    for tuner in tuners:
        tuner.cache.clear()
    hidden, heads, head_dim = SHAPE.hidden, SHAPE.heads, SHAPE.head_dim
    x = leaf(torch.randn(2, tokens, hidden).to(torch.bfloat16))
    w = leaf((torch.randn(3 * hidden, hidden) * hidden**-0.5).to(torch.bfloat16))
    # on a GPU Triton's own benchmarker (CUDA events); in a dry run on the CPU, wall-clock time of the interpreter
    with _triton.autotuning(_wall_clock_timer if DRY_RUN else None):
        qkv = lin.linear(x, w).view(2, tokens, 3, heads, head_dim)
        out = flash_attention_qkv(qkv)
        out.float().sum().backward()
    gemm_ran, gemm_idle, table = ((_gemm._gemm_tma_tuned, _gemm._gemm_tuned, _gemm.TMA_CONFIGS) if ARCH == 90
                                  and not _triton.INTERPRET else (_gemm._gemm_tuned, _gemm._gemm_tma_tuned,
                                                                   _gemm.GEMM_CONFIGS))
    assert gemm_ran.cache and not gemm_idle.cache, "the GEMMs took the other kernel than this architecture's"
    assert _chosen(gemm_ran) <= _keys(table[(2, "ieee", "main")])
    short = tokens <= attn_mod.SHORT_N
    for tuner, rows in ((attn_mod._attn_fwd_tuned, attn_mod.FWD_ROWS), (attn_mod._attn_bwd_dkdv_tuned,
                                                                        attn_mod.DKDV_ROWS),
                        (attn_mod._attn_bwd_dq_tuned, attn_mod.DQ_ROWS)):
        assert len(tuner.cache) == 1
        assert _chosen(tuner) <= _keys(rows[(attn_mod.block_d_for(head_dim), 2, ARCH, short)])
        assert getattr(tuner, "configs_timings", None), "the autotuner timed nothing"
    ref = attention_ref(*qkv.detach().float().unbind(2))
    low = attention_ref(*qkv.detach().unbind(2))
    assert_within_rule(out, ref, low, 2.0, name="tuned attention")


# ------------------------------------------------------------------------------------------------
# The whole model
# ------------------------------------------------------------------------------------------------
def _vivit_b_pair():
    cfg = vk.VivitConfig.from_preset("vivit-b-16x2" if not DRY_RUN else "tiny")
    torch.manual_seed(0)
    eager = vk.VivitForVideoClassification(cfg, attn="eager")
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(0.02 * torch.randn_like(p))
    tri = vk.VivitForVideoClassification(cfg, attn="triton")
    tri.load_state_dict(eager.state_dict())
    return cfg, eager.to(DEVICE), tri.to(DEVICE)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_vivit_b_triton_matches_eager_bf16_batch2():
    cfg, eager, tri = _vivit_b_pair()
    x = torch.randn(2, cfg.num_frames, 3, *vk.presets.image_hw(cfg), device=DEVICE)
    labels = torch.tensor([3, 7], device=DEVICE)
    ref = eager(x, labels=labels)  # the fp32 reference (eager attention: about 30 GB at this size)
    ref.loss.backward()
    ref_logits = ref.logits.detach()
    ref_grads = _grads(eager)
    eager.zero_grad()
    eager.to(torch.bfloat16)
    tri.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    low = eager(xb, labels=labels)
    low.loss.backward()
    ours = tri(xb, labels=labels)
    ours.loss.backward()
    low_grads, our_grads = _grads(eager), _grads(tri)
    assert set(our_grads) == set(ref_grads)
    names = list(ref_grads)
    checks = judge_outputs(ours.logits, [our_grads[n] for n in names], (ref_logits, [ref_grads[n] for n in names]),
                           (low.logits, [low_grads[n] for n in names]), grad_names=names)
    bad = [c.message() for c in checks if not c.ok]
    assert not bad, bad


def _tiny_pair():
    cfg = vk.VivitConfig.from_preset("small" if not DRY_RUN else "tiny")
    torch.manual_seed(0)
    eager = vk.VivitForVideoClassification(cfg, attn="eager").to(DEVICE).eval()
    tri = vk.VivitForVideoClassification(cfg, attn="triton").to(DEVICE).eval()
    tri.load_state_dict(eager.state_dict())
    h, w = vk.presets.image_hw(cfg)
    return eager, tri, torch.randn(2, cfg.num_frames, 3, h, w, device=DEVICE)


def test_torch_compile_inductor():
    torch._dynamo.reset()
    eager, tri, x = _tiny_pair()
    compiled = torch.compile(tri, fullgraph=True)  # inductor
    with torch.no_grad():
        assert_close(compiled(x).logits, eager(x).logits, 1e-3, name="inductor logits")
    tri.train()
    xg = x.clone().requires_grad_()
    compiled(xg).logits.sum().backward()
    xe = x.clone().requires_grad_()
    eager.train()(xe).logits.sum().backward()
    assert_close(xg.grad, xe.grad, 1e-3, name="inductor input grad")


@cuda_only
def test_cuda_graph_capture_and_replay():
    eager, tri, x = _tiny_pair()
    static_x = x.clone()
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compile and autotune outside the capture
                tri(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = tri(static_x).logits
        for seed in (1, 2):
            new = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
            static_x.copy_(new)
            graph.replay()
            torch.cuda.synchronize()
            assert_close(static_out, eager(new).logits, 1e-3, name=f"replay {seed}")


def test_token_merging_matches_eager_and_waits_for_the_gpu_nowhere():
    """Merged triton against merged eager (same schedule), and the merged forward with torch's sync debug mode
    on "error": the merge step makes its index sets on the device (a host copy or .item() per layer would make
    the CPU wait for the GPU at every layer)."""
    eager, tri, x = _tiny_pair()
    for model in (eager, tri):
        model.set_token_merging("fraction-20")
    with torch.no_grad():
        ref = eager(x).logits
        tri(x)  # compile and autotune outside the check
        if not DRY_RUN:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            out = tri(x).logits
        finally:
            if not DRY_RUN:
                torch.cuda.set_sync_debug_mode(0)
    assert_close(out, ref, 1e-3, name="merged triton vs merged eager")
