"""attn="auto": every candidate implementation of every op equals the reference; the selection (with an injected
timer) picks the fastest, keeps it in memory and in a cache file that survives a restart and shrugs off bad
files and concurrent writers; never measures while torch.compile traces; an auto model equals eager."""

from __future__ import annotations

import json
import logging
import multiprocessing
import warnings

import pytest
import torch

import vivit_kernels as vk
from vivit_kernels.auto import cache, choose
from vivit_kernels.ops import _triton
from vivit_kernels.ops.registry import OPS, backend_ops
from vivit_kernels.ops.sample_inputs import Shape

from helpers import DEVICE, assert_close, check_against_reference

pytestmark = pytest.mark.usefixtures("private_implementation_cache")  # each test its own cache file, empty memory


def _cases():
    for op, entry in OPS.items():
        for name in entry.implementations:
            marks = [pytest.mark.triton] if name == "triton" else []
            for dtype in entry.dtypes:
                for variant in entry.variants:
                    yield pytest.param(
                        op,
                        name,
                        dtype,
                        variant,
                        marks=marks,
                        id=f"{op}-{name}-{str(dtype).removeprefix('torch.')}" + (f"-{variant}" if variant else ""),
                    )


@pytest.mark.parametrize("op, name, dtype, variant", list(_cases()))
def test_every_candidate_equals_the_reference(op, name, dtype, variant):
    """Every registered implementation of every op against the op's reference (an independent definition: no
    candidate is the reference itself, tests/test_guard.py), on the registry's sample inputs at small awkward
    shapes, forward and every input gradient."""
    entry = OPS[op]
    impl = entry.implementations[name]
    why = impl.available(DEVICE)
    if why is not None:
        pytest.skip(f"{op}/{name} cannot run on {DEVICE.type}: {why}")
    args = entry.sample_inputs(Shape.awkward(), torch.float32, DEVICE, True, variant)
    check_against_reference(impl.fn, entry.reference, args, dtype, name=f"{op}/{name}")


# ------------------------------------------------------------------------------------------------
# selection with an injected timer
# ------------------------------------------------------------------------------------------------
class FakeTimer:
    """Times candidates by name from a table (ms); counts the calls."""

    def __init__(self, op: str, times: dict[str, float]):
        self.by_fn = {OPS[op].implementations[n].fn: t for n, t in times.items()}
        self.calls = 0

    def __call__(self, fn, args, training, device):
        self.calls += 1
        if hasattr(fn, "vivit_path"):  # the whole-model guard: keep the per-op path these tests are about
            return 1.0 if fn.vivit_path == "kernels" else 2.0
        return self.by_fn.get(fn, 5.0)


def _x(shape=(2, 9, 48), dtype=torch.float32):
    return (torch.randn(*shape, device=DEVICE, dtype=dtype), torch.ones(shape[-1], device=DEVICE, dtype=dtype),
            torch.zeros(shape[-1], device=DEVICE, dtype=dtype), 1e-6)


@pytest.mark.triton
def test_picks_the_fastest_and_breaks_ties_in_candidate_order():
    with choose.timer(FakeTimer("layer_norm", {"triton": 3.0, "torch": 1.0})):
        assert choose.choose("layer_norm", _x(), {}) == "torch"
    choose.forget()
    with choose.timer(FakeTimer("layer_norm", {"triton": 2.0, "torch": 2.0})):
        assert choose.choose("layer_norm", _x((3, 9, 48)), {}) == "triton"  # a tie: ours, the first candidate


def test_keys_separate_shapes_dtypes_grad_modes_devices_and_versions(monkeypatch):
    timer = FakeTimer("layer_norm", {"torch": 1.0})
    with choose.timer(timer):
        choose.choose("layer_norm", _x(), {})
        choose.choose("layer_norm", _x(), {})
        assert timer.calls == len(choose.available("layer_norm", DEVICE))  # the same key: measured once
        n = timer.calls
        choose.choose("layer_norm", _x((2, 10, 48)), {})  # another shape
        choose.choose("layer_norm", _x(dtype=torch.bfloat16), {})  # another dtype
        x, w, b, eps = _x()
        choose.choose("layer_norm", (x.requires_grad_(), w, b, eps), {})  # training: forward + backward timed
        assert timer.calls == 4 * n
    described = tuple(cache.describe(a) for a in _x())
    base = cache.make_key("layer_norm", described, False, "cpu")
    assert cache.make_key("layer_norm", described, False, "meta") != base  # another device
    monkeypatch.setattr(cache, "versions", lambda: "torch=0 triton=0 vivit_kernels=0")
    assert cache.make_key("layer_norm", described, False, "cpu") != base  # other versions


def test_the_cache_file_survives_a_restart():
    with choose.timer(FakeTimer("layer_norm", {"torch": 1.0, "triton": 9.0})):
        first = choose.choose("layer_norm", _x(), {})
    entries = cache.load_cache()
    assert len(entries) == 1 and next(iter(entries.values()))["choice"] == first
    choose.forget()  # a new process: memory empty, the file stays
    never = FakeTimer("layer_norm", {})
    with choose.timer(never):
        assert choose.choose("layer_norm", _x(), {}) == first
    assert never.calls == 0


@pytest.mark.parametrize("content", ['{"format": "vivit_kernels-implementations", "version": 2, "entries": {"layer_no',
                                     "\x00\x01garbage", '{"some": "other tool"}', "[1, 2, 3]",
                                     '{"format": "vivit_kernels-implementations", "version": 2, "entries": '
                                     '{"layer_norm(x) infer | cpu | v": {"op": "layer_norm", "choice": "rm -rf", '
                                     '"medians_ms": {}}}}',
                                     '{"format": "vivit_kernels-implementations", "version": 1, "entries": {}}'],
                         ids=["truncated", "garbled", "foreign", "list", "unknown-implementation", "older-version"])
def test_bad_cache_files_are_ignored_with_a_warning(content):
    path = cache.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.warns(UserWarning, match="ignoring the implementation cache"):
        assert cache.load_cache() == {}
    timer = FakeTimer("layer_norm", {"torch": 1.0})
    with choose.timer(timer), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert choose.choose("layer_norm", _x(), {}) == "torch"  # measured, not trusted
    assert timer.calls > 0
    assert len(cache.load_cache()) == 1  # and the file is valid again


def _write_entries(cache_dir: str, worker: int, n: int) -> None:
    import os

    from vivit_kernels.auto import cache

    os.environ[cache.CACHE_ENV] = cache_dir
    for i in range(n):
        cache.store(f"layer_norm(w{worker}-{i}) infer | cpu | v",
                    cache.entry("layer_norm", (), False, "cpu", {"torch": 1.0}, "torch", {}, lambda name: name))


def test_concurrent_writers_leave_a_valid_file_with_every_entry(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_entries, args=(str(tmp_path / "shared"), w, 15)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    data = json.loads((tmp_path / "shared" / "implementations.json").read_text())
    assert len(data["entries"]) == 45


def test_pins_from_the_environment_and_by_argument(monkeypatch):
    monkeypatch.setenv(choose.PINS_ENV, "layer_norm=torch, attention_qkv=sdpa-flash")
    assert choose.pins_from_env() == {"layer_norm": "torch", "attention_qkv": "sdpa-flash"}
    timer = FakeTimer("layer_norm", {"triton": 0.1})
    with choose.timer(timer):
        assert choose.choose("layer_norm", _x(), choose.pins_from_env()) == "torch"
    assert timer.calls == 0
    with pytest.raises(ValueError, match="unknown implementation 'cudnn' of layer_norm"):
        choose.parse_pins("layer_norm=cudnn")
    with pytest.raises(ValueError, match="unknown op 'softmax'"):
        choose.parse_pins({"softmax": "torch"})
    with pytest.raises(ValueError, match="pins choose implementations for attn='auto'"):
        vk.VivitModel("tiny", attn="triton").set_attn("triton", pins={"layer_norm": "torch"})


# ------------------------------------------------------------------------------------------------
# the auto model
# ------------------------------------------------------------------------------------------------
def _pair():
    cfg = vk.VivitConfig.from_preset("tiny")
    eager = vk.VivitForVideoClassification(cfg, attn="eager")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    auto = vk.VivitForVideoClassification(cfg, attn="auto")
    auto.load_state_dict(eager.state_dict())
    x = torch.randn(2, 4, 3, 32, 32, generator=g)
    return eager.to(DEVICE), auto.to(DEVICE), x.to(DEVICE), torch.tensor([1, 3], device=DEVICE)


class Favour:
    """A timer that makes one named implementation the fastest for every op that has it (others by order)."""

    def __init__(self, name: str):
        self.name = name
        self.calls = 0

    def __call__(self, fn, args, training, device):
        self.calls += 1
        if hasattr(fn, "vivit_path"):  # the whole-model guard: keep the per-op path these tests are about
            return 1.0 if fn.vivit_path == "kernels" else 2.0
        names = {impl.fn: n for op in OPS.values() for n, impl in op.implementations.items()}
        return 1.0 if names.get(fn) == self.name else 2.0


@pytest.mark.parametrize("favour", [pytest.param("triton", marks=pytest.mark.triton), "cublas", "torch", "sdpa-flash"])
def test_auto_model_equals_eager(favour):
    eager, auto, x, labels = _pair()
    with choose.timer(Favour(favour)):
        out_a = auto(x, labels=labels)
    out_e = eager(x, labels=labels)
    assert_close(out_a.logits, out_e.logits, 1e-4, name="logits")
    out_a.loss.backward()
    out_e.loss.backward()
    grads = dict(auto.named_parameters())
    for n, p in eager.named_parameters():
        assert_close(grads[n].grad, p.grad, 1e-4, rtol=1e-4, name=n)
    chosen = {e["choice"] for e in cache.load_cache().values()}
    if favour != "triton" or DEVICE.type == "cuda" or _triton.INTERPRET:
        assert favour in chosen, chosen


def test_no_measurement_while_torch_compile_traces(caplog):
    torch._dynamo.reset()
    eager, auto, x, _ = _pair()
    auto.eval()
    timer = Favour("torch")
    with choose.timer(timer), caplog.at_level(logging.WARNING, logger="vivit_kernels"):
        compiled = torch.compile(auto, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            out = compiled(x).logits
    assert timer.calls == 0, "measured while tracing"
    assert any("while torch.compile traces" in r.message for r in caplog.records)
    with torch.no_grad():
        assert_close(out, eager.eval()(x).logits, 1e-4, name="compiled auto")
    # once measured outside, a new trace uses the measured choices
    torch._dynamo.reset()
    with choose.timer(timer), torch.no_grad():
        auto(x)
        measured = timer.calls
        assert measured > 0
        out = torch.compile(auto, fullgraph=True, backend="aot_eager")(x).logits
    assert timer.calls == measured
    assert_close(out, eager(x).logits, 1e-4, name="compiled auto, measured")


@pytest.mark.cuda
def test_no_measurement_during_cuda_graph_capture():
    eager, auto, x, _ = _pair()
    auto.eval()
    timer = Favour("cublas")
    with choose.timer(timer), torch.no_grad():
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            with torch.cuda.graph(graph):
                out = auto(x).logits
        assert timer.calls == 0
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, eager.eval()(x).logits, 1e-3, name="captured auto")


@pytest.mark.cpu_only
def test_tune_command_fills_the_cache_and_info_shows_it(tmp_path):
    """`vivit-kernels tune` on this machine's CPU (torch's candidates; CPU on purpose: the command's host path) and
    `vivit-kernels info`: the table, the stored choices, and what a model then uses without measuring."""
    import os
    import subprocess
    import sys

    env = {**os.environ, cache.CACHE_ENV: str(tmp_path / "tuned"), "TRITON_INTERPRET": "0"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "vivit_kernels",
            "tune",
            "--preset",
            "tiny",
            "--batch",
            "2",
            "--dtype",
            "float32",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert table[0] == "| op | shapes | mode | candidate | what ran | median ms | chosen |"
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table[1:]]
    assert {r[0] for r in rows} == set(backend_ops()) - {"attention"} | {"model"}  # q, k, v fused: no "attention"
    # every column names what ran on this device, never a GPU library the CPU does not have
    assert all(r[4].endswith("on cpu") for r in rows if r[0] != "model"), rows
    assert not any("cuBLAS" in r[4] or "cuDNN" in r[4] for r in rows)
    # one chosen candidate per call; the whole model once per mode, against transformers' own modules
    calls = {(r[0], r[1], r[2]) for r in rows}
    assert sum(r[6] == "**yes**" for r in rows) == len(calls) == 14
    assert {(r[3], r[2]) for r in rows if r[0] == "model"} == {(p, m) for p in ("kernels", "transformers")
                                                              for m in ("infer", "train")}
    assert "14 choices stored in" in out.stdout and "12 op calls, 2 whole-model" in out.stdout
    data = json.loads((tmp_path / "tuned" / "implementations.json").read_text())
    assert len(data["entries"]) == 14
    info = subprocess.run([sys.executable, "-m", "vivit_kernels", "info"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert "(14 entries)" in info.stdout and "attention_qkv  infer" in info.stdout, info.stdout
    assert "model          infer  2x4x3x32x32" in info.stdout, info.stdout
    # a model at the tuned shapes now runs on the stored choices (per op and whole-model), measuring nothing
    stored = (tmp_path / "tuned" / "implementations.json").read_text()
    code = ("import torch, vivit_kernels as vk\n"
            "from vivit_kernels.auto import choose\n"
            "calls = []\n"
            "def never(*a):\n    calls.append(a)\n    raise AssertionError('measured')\n"
            "with choose.timer(never), torch.no_grad():\n"
            "    vk.VivitForVideoClassification('tiny', attn='auto').eval()(torch.randn(2, 4, 3, 32, 32))\n"
            "assert not calls, calls\n"
            "print('ok')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr
    assert (tmp_path / "tuned" / "implementations.json").read_text() == stored


def test_every_implementation_takes_its_references_defaults():
    """auto drops trailing arguments equal to the reference's defaults (one cache key however a caller spells a
    call), so every implementation must default them the same way: an op's defaults live in its reference."""
    import inspect

    for op, entry in OPS.items():
        # the op's call signature: as many arguments as its sample inputs have (the reference may take more)
        arity = max(len(entry.sample_inputs(Shape.awkward(), torch.float32, "cpu", False, v)) for v in entry.variants)
        reference = list(inspect.signature(entry.reference).parameters.values())[:arity]
        for name, impl in entry.implementations.items():
            params = list(inspect.signature(impl.fn).parameters.values())
            if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
                continue  # a wrapper that passes its arguments on (SDPA's): checked by running it, below
            assert len(params) >= len(reference), f"{op}/{name} takes fewer arguments than the op's call"
            for ours, theirs in zip(params, reference, strict=False):
                assert ours.default == theirs.default or theirs.default is inspect.Parameter.empty, \
                    f"{op}/{name}: {ours.name} defaults to {ours.default!r}, the reference's {theirs.name} to " \
                    f"{theirs.default!r}"


def test_auto_keys_a_call_one_way_however_its_defaults_are_spelt():
    from vivit_kernels.auto.backends import auto_backend

    entry = OPS["linear"]
    x, w, b, _, _ = entry.sample_inputs(Shape.awkward(), torch.float32, DEVICE, False, "fc1+gelu_fast")
    auto = auto_backend()
    with choose.timer(FakeTimer("linear", {"triton": 2.0, "cublas": 1.0, "cublas+ext": 3.0})), torch.no_grad():
        short = auto.linear(x, w, b)
        spelt = auto.linear(x, w, b, None, None)
    assert torch.equal(short, spelt)
    assert len([e for e in cache.load_cache().values() if e["op"] == "linear"]) == 1
    q, k, v, scale = OPS["attention"].sample_inputs(Shape.awkward(), torch.float32, DEVICE, False)[:4]
    for name in ("sdpa-flash",):  # a wrapper given no scale uses the reference's default, head_dim ** -0.5
        assert torch.allclose(OPS["attention"].implementations[name].fn(q, k, v), OPS["attention"].reference(q, k, v),
                              atol=1e-5)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="on the CPU the only vendor attention (SDPA's flash kernel) refuses a "
                                                 "per-key bias with gradients; a GPU has other vendor paths")
def test_auto_runs_ours_where_no_vendor_path_takes_the_inputs():
    """attn="auto" training merged tokens on the CPU: SDPA refuses the proportional-attention bias with gradients,
    and ours, no speed candidate when interpreted, is chosen rather than the call failing."""
    args = OPS["attention"].sample_inputs(Shape.awkward(), torch.float32, DEVICE, True, "proportional")
    with torch.enable_grad():
        assert choose.choose("attention", args, {}) == "triton"


def test_the_old_pins_variable_is_not_read_and_says_so(monkeypatch, caplog):
    monkeypatch.setenv("VIVIT_KERNELS_PROVIDERS", "layer_norm=torch")
    with caplog.at_level(logging.WARNING, logger="vivit_kernels"):
        assert choose.pins_from_env() == {}
    assert "VIVIT_KERNELS_PROVIDERS is ignored: it was renamed VIVIT_KERNELS_IMPLEMENTATIONS" in caplog.text
