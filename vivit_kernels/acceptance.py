"""``vivit-kernels acceptance --out DIR``: the first thing to run on a GPU, in one command, bounded in time.

Ordered by value; each section is cut short when the time budget (``--budget-s``, default 480) runs out, and
what was skipped is listed with the reason:

1. environment: GPU name, SM count, clocks, driver, CUDA, the versions, and the peaks the speed figures are
   compared with, measured here (a large bf16 matmul's TFLOP/s, a device-to-device copy's GB/s);
2. correctness at ViViT-B shapes: every op's forward and every input gradient against its eager reference (the
   test suite's tolerance rule, vivit_kernels.testing), the whole model in bf16 and fp32 against transformers'
   eager attention, the extension's CUDA ops against their CPU twins. Any failure makes the command exit 1,
   with the op, shape, dtype and error in the report;
3. per-op speed: ours against every vendor candidate attn="auto" chooses between (cuBLAS(Lt), SDPA flash /
   cuDNN / memory-efficient, cuDNN Conv3d, F.layer_norm) and the auto dispatcher itself, each checked against
   the reference before its time counts: median ms, TFLOP/s or GB/s, and the fraction of the measured peak;
4. the seed's tables on this GPU: inference at batch 1 / 2 / 4 / 8 in bf16 and fp32, training steps at batch 1
   and 8 in bf16, for triton, auto, transformers' eager and sdpa models and torch.compile of the latter, with
   speedup and memory saving as the seed page computes them (base / value - 1, against transformers' eager);
5. what attn="auto" chose, per op and shape.

Triton's compilations (count and compiler time, from Triton's own listener) and each step's first-call
overhead (compilation, autotuning, auto's measurements: the first call's time beyond a steady call) are reported
on their own lines. Writes ``results.json`` (versions, every figure, the command; rewritten after every step,
so an interrupted run keeps what it measured), ``report.md`` and plots into DIR.

``--dry-run`` runs the same plumbing on the CPU at tiny shapes, with the Triton kernels in the interpreter (a
correctness run; its timings are CPU timings, labelled so). The test suite runs it, so the command cannot rot
while no GPU runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from ._files import atomic_write_text

SECTIONS = ("environment", "correctness", "ops", "seed", "auto")
# Where each section must end, as a fraction of the budget from the start (cumulative): a section may use what
# earlier ones left, but never starves the later ones; the last one may use everything that is left.
SECTION_ENDS = {"environment": 0.05, "correctness": 0.50, "ops": 0.72, "seed": 0.97, "auto": 1.0}
FORMAT = "vivit_kernels-acceptance"
DEFAULT_BUDGET_S = 480.0
DTYPE_NAMES = ("bf16", "fp16", "fp32")
# the seed's tables: our backends and transformers' own models, as bench/test_bench_model.py names them
SEED_PROVIDERS = ("triton", "auto", "transformers-eager", "transformers-sdpa")
COMPILED = "transformers-sdpa-compiled"


@dataclasses.dataclass(frozen=True)
class Plan:
    """Shapes and counts of a run: ViViT-B/16x2 on a GPU, tiny ones under --dry-run. ``estimate_s`` is how long
    a step of each kind may take (cold caches included): a step starts only if the budget has that much left."""

    preset: str
    correct_batch: int
    ops_batch: int
    tokens: int
    hidden: int
    heads: int
    head_dim: int
    inter: int
    frames: int
    image: int
    correct_dtypes: tuple[str, ...]
    model_batch: int
    infer_batches: tuple[int, ...]
    infer_dtypes: tuple[str, ...]
    infer_rounds: int
    train_batches: tuple[int, ...]
    train_dtype: str
    train_steps: int
    matmul_n: int
    copy_mib: int
    warmup: int
    repeats: int
    estimate_s: dict


GPU_PLAN = Plan(
    preset="vivit-b-16x2", correct_batch=2, ops_batch=8, tokens=3137, hidden=768, heads=12, head_dim=64, inter=3072,
    frames=32, image=224, correct_dtypes=("bf16", "fp32", "fp16"), model_batch=1, infer_batches=(1, 2, 4, 8),
    infer_dtypes=("bf16", "fp32"), infer_rounds=20, train_batches=(1, 8), train_dtype="bf16", train_steps=20,
    matmul_n=8192, copy_mib=1024, warmup=3, repeats=15,
    estimate_s={"environment": 20, "op": 10, "model": 40, "extension": 10, "speed": 6, "seed": 10, "train": 30,
                "compiled": 120, "auto": 1},
)
DRY_PLAN = Plan(
    preset="tiny", correct_batch=1, ops_batch=2, tokens=67, hidden=64, heads=2, head_dim=32, inter=96, frames=4,
    image=32, correct_dtypes=("bf16", "fp32"), model_batch=1, infer_batches=(1, 2), infer_dtypes=("fp32",),
    infer_rounds=2, train_batches=(1,), train_dtype="fp32", train_steps=2, matmul_n=256, copy_mib=16, warmup=0,
    repeats=1,
    estimate_s={"environment": 2, "op": 2, "model": 5, "extension": 1, "speed": 1, "seed": 2, "train": 5,
                "compiled": 60, "auto": 0},
)


def ops_dtype(device) -> str:
    """The dtype of the per-op timings and of the matmul peak they are compared with: bf16 on a GPU (what users
    should run), fp32 on the CPU (--dry-run; the CPU's bf16 matmul is no reference for anything)."""
    return "bf16" if device.type == "cuda" else "fp32"


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:400]}" if text else type(e).__name__


# ------------------------------------------------------------------------------------------------
# The run: budget, steps, results kept on disk as they come
# ------------------------------------------------------------------------------------------------
class Acceptance:
    def __init__(self, out: Path, plan: Plan, device, budget_s: float, dry_run: bool, command: str,
                 sections: tuple[str, ...] = SECTIONS):
        self.out, self.plan, self.device, self.sections = out, plan, device, sections
        self.started = time.monotonic()
        self.budget_s = budget_s
        self.deadline = self.started + budget_s
        self.section_deadline = self.deadline
        self.data: dict[str, Any] = {
            "format": FORMAT, "version": 1, "command": command, "dry_run": dry_run, "budget_s": budget_s,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "plan": dataclasses.asdict(plan), "environment": {}, "correctness": [], "ops": [], "seed": [],
            "auto": [], "skipped": [], "failures": [], "first_call_overhead_s": {}, "compilations": {},
            "elapsed_s": 0.0, "finished": False,
        }

    # -- budget and steps
    def left(self) -> float:
        """Seconds left for the current section (see SECTION_ENDS)."""
        return min(self.deadline, self.section_deadline) - time.monotonic()

    def enter(self, section: str) -> None:
        self.section_deadline = self.started + SECTION_ENDS[section] * self.budget_s

    def skip(self, section: str, name: str, why: str) -> None:
        self.data["skipped"].append({"section": section, "name": name, "why": why})

    def step(self, section: str, name: str, kind: str, fn: Callable[[], Any], **fields) -> Any:
        """Run one step if the budget allows it; an exception is a failure (recorded, the run goes on)."""
        need = self.plan.estimate_s[kind]
        if self.left() < need:
            self.skip(section, name, f"time budget: {max(self.left(), 0):.0f} s left for this section, this step takes "
                                     f"about {need} s")
            return None
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - report and go on to the next step
            if type(e).__name__ == "OutOfMemoryError":  # a GPU smaller than this step: listed, not a wrong result
                self.skip(section, name, f"out of GPU memory on this device: {_first_line(e)[:200]}")
            else:
                self.fail(section, name, _first_line(e), traceback=traceback.format_exc(limit=6)[-2000:], **fields)
            return None
        finally:
            self._cleanup()
            self.save()

    def fail(self, section: str, name: str, error: str, **fields) -> None:
        self.data["failures"].append({"section": section, "name": name, "error": error, **fields})

    def overhead(self, section: str, seconds: float) -> None:
        d = self.data["first_call_overhead_s"]
        d[section] = d.get(section, 0.0) + max(0.0, seconds)

    def _cleanup(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- files
    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.started, 2)
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "results.json", json.dumps(self.data, indent=1, default=str) + "\n")
        atomic_write_text(self.out / "report.md", render_report(self.data))

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)



def _median_ms(run: Acceptance, fn: Callable[[], Any], training: bool = False, args: tuple = ()) -> float:
    """Median milliseconds of ``fn(*args)`` (CUDA events on a GPU, wall clock on the CPU), with the inputs
    rotated through copies larger than the L2 cache (the timer attn='auto' uses)."""
    from .providers import cuda_event_timer

    return cuda_event_timer(fn, args, training, run.device, warmup=run.plan.warmup, repeats=run.plan.repeats)


# ------------------------------------------------------------------------------------------------
# 1. Environment
# ------------------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    from . import __version__
    from ._compat import installed_versions

    names = ("torch", "triton", "transformers", "huggingface_hub", "accelerate", "peft", "numpy", "av")
    return {"python": platform.python_version(), "vivit_kernels": __version__, **installed_versions(names)}


def _nvidia_smi(index: int) -> dict[str, str]:
    fields = ("driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem", "power.limit", "pstate")
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader", "-i", str(index)],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return {"nvidia-smi": f"not available ({type(e).__name__})"}
    if out.returncode != 0:
        return {"nvidia-smi": f"failed: {out.stderr.strip()[:200]}"}
    return dict(zip(fields, (v.strip() for v in out.stdout.strip().split(","))))


def section_environment(run: Acceptance) -> None:
    import torch

    from .ops import _extension, _triton

    env = run.data["environment"]
    env["versions"] = versions()
    env["torch_cuda"] = torch.version.cuda or "none (CPU build)"
    env["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none"
    env["extension"] = list(_extension.status().values())
    env["triton_interpreter"] = bool(_triton.INTERPRET)
    env["host"] = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    if run.device.type == "cuda":
        props = torch.cuda.get_device_properties(run.device)
        env["device"] = props.name
        env["gpu"] = {
            "name": props.name, "compute_capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_cache_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
            **{k: getattr(props, k) for k in ("clock_rate", "memory_clock_rate", "memory_bus_width") if hasattr(props, k)},
            **_nvidia_smi(run.device.index or 0),
        }
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    run.save()

    def peaks():
        n, dtype = run.plan.matmul_n, ops_dtype(run.device)  # the per-op figures' dtype
        a = torch.randn(n, n, device=run.device, dtype=_torch_dtype(dtype))
        b = torch.randn(n, n, device=run.device, dtype=_torch_dtype(dtype))
        ms = _median_ms(run, lambda: a @ b)
        env["peak_matmul_tflops"] = 2 * n**3 / (ms * 1e-3) / 1e12
        env["peak_matmul"] = f"{dtype} {n}x{n}x{n}"
        nbytes = run.plan.copy_mib * 2**20
        src = torch.empty(nbytes, dtype=torch.uint8, device=run.device)
        dst = torch.empty_like(src)
        ms = _median_ms(run, lambda: dst.copy_(src))
        env["peak_copy_gbps"] = 2 * nbytes / (ms * 1e-3) / 1e9  # read + write
        env["peak_copy_bytes"] = nbytes

    run.step("environment", "measured peaks", "environment", peaks)


# ------------------------------------------------------------------------------------------------
# 2. Correctness
# ------------------------------------------------------------------------------------------------
def _op_modules():
    """The op modules (attention, layer_norm, linear, patch_embed)."""
    from .ops import attention, layer_norm, linear, patch_embed

    return attention, layer_norm, linear, patch_embed


def op_cases(plan: Plan) -> list[tuple[str, str, Callable, Callable, Callable]]:
    """(op, shape, ours, reference, make_inputs) at the plan's shapes; make_inputs() builds seeded CPU tensors."""
    import torch

    att, ln, lin, pe = _op_modules()

    B, N, C, H, D, FF = plan.correct_batch, plan.tokens, plan.hidden, plan.heads, plan.head_dim, plan.inter
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def linear_case(fan_out, act, residual):
        def make():
            return (randn(B, N, C), randn(fan_out, C, scale=C**-0.5), randn(fan_out, scale=0.1),
                    randn(B, N, fan_out) if residual else None)
        return (lambda x, w, b, r: lin.linear(x, w, b, act, r)), (lambda x, w, b, r: lin.linear_ref(x, w, b, act, r)), make

    K = 3 * 2 * 16 * 16
    n_patch = (plan.frames // 2) * (plan.image // 16) ** 2
    cases = [
        ("attention_qkv", f"qkv {B}x{N}x3x{H}x{D}", lambda qkv: att.flash_attention_qkv(qkv),
         lambda qkv: att.attention_ref(*qkv.unbind(2)), lambda: (randn(B, N, 3, H, D),)),
        ("qkv_projection", f"x {B}x{N}x{C}, 3 x W {C}x{C}", lin.qkv_projection, lin.qkv_projection_ref,
         lambda: (randn(B, N, C), *[t for _ in range(3) for t in (randn(C, C, scale=C**-0.5), randn(C, scale=0.1))])),
        ("linear o_proj+residual", f"x {B}x{N}x{C}, W {C}x{C}", *linear_case(C, None, True)),
        ("linear fc1+gelu_fast", f"x {B}x{N}x{C}, W {FF}x{C}", *linear_case(FF, "gelu_fast", False)),
        ("mlp", f"x {B}x{N}x{C}, {C}->{FF}->{C}", lambda *a: lin.mlp(*a[:5], residual=a[5]),
         lambda *a: lin.mlp_ref(*a[:5], residual=a[5]),
         lambda: (randn(B, N, C), randn(FF, C, scale=C**-0.5), randn(FF, scale=0.1), randn(C, FF, scale=FF**-0.5),
                  randn(C, scale=0.1), randn(B, N, C))),
        ("layer_norm", f"x {B}x{N}x{C}", lambda x, w, b: ln.layer_norm(x, w, b, 1e-6),
         lambda x, w, b: ln.layer_norm_ref(x, w, b, 1e-6),
         lambda: (randn(B, N, C) * 2 + 0.5, 1 + randn(C, scale=0.1), randn(C, scale=0.1))),
        ("patch_embed", f"pixels {B}x{plan.frames}x3x{plan.image}x{plan.image}, tubelet 2x16x16", pe.patch_embed,
         pe.patch_embed_ref,
         lambda: (randn(B, plan.frames, 3, plan.image, plan.image), randn(C, 3, 2, 16, 16, scale=K**-0.5),
                  randn(C, scale=0.1), randn(1, 1, C), randn(1, 1 + n_patch, C))),
    ]
    return cases


@contextlib.contextmanager
def _strict_fp32():
    """fp32 references in IEEE fp32: no TF32 in cuBLAS or cuDNN (cuDNN convolutions allow it by default)."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def _record_checks(run: Acceptance, section: str, case: str, shape: str, dtype: str, checks, seconds: float) -> None:
    ok = all(c.ok for c in checks)
    worst = max(checks, key=lambda c: c.error / c.allowed if c.allowed > 0 else math.inf)
    run.data[section].append({
        "case": case, "shape": shape, "dtype": dtype, "ok": ok, "seconds": round(seconds, 3),
        "worst": {"name": worst.name, "error": worst.error, "allowed": worst.allowed},
        "checks": [{"name": c.name, "error": c.error, "allowed": c.allowed, "ok": c.ok} for c in checks],
    })
    for c in checks:
        if not c.ok:
            run.fail(section, case, c.message(), shape=shape, dtype=dtype)


def section_correctness(run: Acceptance) -> None:
    """In the order that tells the most soonest: every op in bf16, the model in bf16, the extension, then fp32
    (ops, model), then fp16."""
    from .testing import compare_to_reference

    def op_checks(dtype: str) -> None:
        for case, shape, ours, ref, make in op_cases(run.plan):
            def check(case=case, shape=shape, ours=ours, ref=ref, make=make):
                inputs = tuple(None if t is None else t.to(run.device).requires_grad_() for t in make())
                start = time.perf_counter()
                with _strict_fp32():
                    checks = compare_to_reference(ours, ref, inputs, _torch_dtype(dtype), name=case)
                run.sync()
                _record_checks(run, "correctness", case, shape, dtype, checks, time.perf_counter() - start)

            run.step("correctness", f"{case} {dtype}", "op", check, shape=shape, dtype=dtype)

    def model_check(dtype: str) -> None:
        run.step("correctness", f"model {dtype}", "model", lambda: _check_model(run, dtype),
                 shape=f"{run.plan.preset} batch {run.plan.model_batch}", dtype=dtype)

    for dtype in run.plan.correct_dtypes:
        op_checks(dtype)
        if dtype in ("bf16", "fp32"):
            model_check(dtype)
        if dtype == run.plan.correct_dtypes[0]:
            run.step("correctness", "extension", "extension", lambda: _check_extension(run))


def _model_pair(preset: str, device):
    import torch

    from .model import VivitConfig, VivitForVideoClassification

    cfg = VivitConfig.from_preset(preset)
    torch.manual_seed(0)
    eager = VivitForVideoClassification(cfg, attn="eager")
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ours = VivitForVideoClassification(cfg, attn="triton")
    ours.load_state_dict(eager.state_dict())
    return cfg, eager.to(device), ours.to(device)


def _check_model(run: Acceptance, dtype: str) -> None:
    """attn="triton" against transformers' eager attention, same weights: logits and every parameter gradient.
    fp32: strict (1e-3 of the reference's magnitude: 12 layers of 3137 tokens in IEEE fp32); bf16: the rule,
    against the fp32 eager model, with the bf16 eager model as PyTorch's own same-dtype error."""
    import torch

    from .model import image_hw
    from .testing import judge

    start = time.perf_counter()
    cfg, eager, ours = _model_pair(run.plan.preset, run.device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(run.plan.model_batch, cfg.num_frames, 3, *image_hw(cfg), generator=g).to(run.device)
    labels = torch.randint(0, cfg.num_labels, (run.plan.model_batch,), generator=g).to(run.device)

    def run_model(model, cast):
        model.zero_grad(set_to_none=True)
        out = model(x.to(cast), labels=labels)
        out.loss.backward()
        grads = {n: p.grad.detach().float() for n, p in model.named_parameters() if p.grad is not None}
        return out.logits.detach().float(), grads

    with _strict_fp32():
        ref_logits, ref_grads = run_model(eager, torch.float32)
        if dtype == "fp32":
            logits, grads = run_model(ours, torch.float32)
            checks = [judge("logits", logits, ref_logits, fp32_atol=1e-3)]
            checks += [judge(n, grads[n], g, fp32_atol=1e-3) if n in grads else judge(n, torch.zeros(0), g)
                       for n, g in ref_grads.items()]
        else:
            low = _torch_dtype(dtype)
            eager.to(low)
            ours.to(low)
            low_logits, low_grads = run_model(eager, low)
            logits, grads = run_model(ours, low)
            checks = [judge("logits", logits, ref_logits, low_logits, 2.0)]
            for n, g in ref_grads.items():
                eps = 1e-4 * max(1.0, g.abs().max().item())
                checks.append(judge(n, grads[n], g, low_grads[n], 3.0, eps=eps) if n in grads else judge(n, torch.zeros(0), g))
    run.sync()
    _record_checks(run, "correctness", f"model (attn='triton' vs eager, logits + {len(ref_grads)} gradients)",
                   f"{run.plan.preset} batch {run.plan.model_batch}", dtype, checks, time.perf_counter() - start)


def _check_extension(run: Acceptance) -> None:
    """The extension's CUDA ops against their CPU twins (same arithmetic); on the CPU (--dry-run), the CPU ops
    against the PyTorch implementations of that arithmetic."""
    import torch

    from .ops import _extension
    from .ops.gelu import bias_gelu_fast_ref
    from .ops.preprocess import preprocess_video_ref
    from .testing import Comparison, judge

    where = run.device.type
    if not (_extension.has_kernel("preprocess_video", where) and _extension.has_kernel("bias_gelu_fast", where)):
        run.skip("correctness", "extension", f"the extension has no {where} kernels here: {_extension.status()}")
        return
    start = time.perf_counter()
    g = torch.Generator().manual_seed(2)
    video = torch.randint(0, 256, (2, 8, 180, 320, 3), generator=g, dtype=torch.uint8)
    checks: list[Comparison] = []
    for dtype in ("fp32", "bf16"):
        dt = _torch_dtype(dtype)
        # VivitImageProcessor's defaults on a 180x320 clip: shortest edge to 256, centre crop 224
        args = ([256, 455], [16, 115, 224, 224], 1 / 127.5, -1.0, [0.5] * 3, [0.5] * 3, dt)
        got = torch.ops.vivit_kernels.preprocess_video(video.to(run.device), *args).float().cpu()
        twin = (torch.ops.vivit_kernels.preprocess_video(video, *args) if where == "cuda"
                else preprocess_video_ref(video, *args)).float()
        checks.append(judge(f"preprocess_video {dtype}", got, twin, fp32_atol=1e-5 if dtype == "fp32" else 1e-2))
        x = torch.randn(64, 3072, generator=g).to(dt)
        b = torch.randn(3072, generator=g).to(dt)
        grad = torch.randn(64, 3072, generator=g).to(dt)
        tol = 1e-5 if dtype == "fp32" else 1e-2
        y = torch.ops.vivit_kernels.bias_gelu_fast(x.to(run.device), b.to(run.device)).float().cpu()
        dy = torch.ops.vivit_kernels.bias_gelu_fast_backward(grad.to(run.device), x.to(run.device),
                                                              b.to(run.device)).float().cpu()
        if where == "cuda":
            ty = torch.ops.vivit_kernels.bias_gelu_fast(x, b).float()
            tdy = torch.ops.vivit_kernels.bias_gelu_fast_backward(grad, x, b).float()
        else:
            xr = x.float().requires_grad_()
            out = bias_gelu_fast_ref(xr, b.float())
            out.backward(grad.float())
            ty, tdy = out.detach(), xr.grad
        checks += [judge(f"bias_gelu_fast {dtype}", y, ty, fp32_atol=tol),
                   judge(f"bias_gelu_fast_backward {dtype}", dy, tdy, fp32_atol=tol)]
    run.sync()
    twin = "its CPU twin" if where == "cuda" else "the PyTorch reference"
    _record_checks(run, "correctness", f"extension ops vs {twin}", "video 2x8x180x320x3, x 64x3072", "fp32, bf16",
                   checks, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------
# 3. Per-op speed
# ------------------------------------------------------------------------------------------------
def op_speed_cases(plan: Plan) -> list[tuple[str, str, Callable, Callable, float, float]]:
    """(op, shape, make_inputs(dtype), reference, forward FLOPs, forward bytes) for every op attn="auto" chooses
    for, at the plan's batch (ViViT-B, batch 8 on a GPU). FLOPs: 2 M N K per GEMM, 4 B H N^2 D for attention;
    bytes: each input read and the output written once."""
    import torch

    att, ln, lin, pe = _op_modules()

    B, N, C, H, D, FF = plan.ops_batch, plan.tokens, plan.hidden, plan.heads, plan.head_dim, plan.inter
    M = B * N
    n_patch = (plan.frames // 2) * (plan.image // 16) ** 2
    K = 3 * 2 * 16 * 16

    def maker(*specs):
        def make(dtype, device):
            g = torch.Generator().manual_seed(0)
            out = []
            for spec in specs:
                if not isinstance(spec, tuple):
                    out.append(spec)
                    continue
                shape, scale = spec
                out.append((torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype))
            return tuple(out)
        return make

    scale = D**-0.5
    elt = 2  # bf16
    return [
        ("layer_norm", f"{B}x{N}x{C}", maker(((B, N, C), 1.0), ((C,), 1.0), ((C,), 0.1), 1e-6),
         lambda x, w, b, eps: ln.layer_norm_ref(x, w, b, eps), 0.0, 2 * M * C * elt),
        ("qkv", f"{B}x{N}x{C} -> 3x{C}", maker(((B, N, C), 1.0), *[((C, C), C**-0.5), ((C,), 0.1)] * 3),
         lin.qkv_projection_ref, 2.0 * M * C * 3 * C, (M * C + 3 * C * C + M * 3 * C) * elt),
        ("linear", f"{B}x{N}x{C} -> {C} + bias + residual",
         maker(((B, N, C), 1.0), ((C, C), C**-0.5), ((C,), 0.1), None, ((B, N, C), 1.0)),
         lambda x, w, b, a, r: lin.linear_ref(x, w, b, a, r), 2.0 * M * C * C, (3 * M * C + C * C) * elt),
        ("mlp", f"{B}x{N}x{C} -> {FF} -> {C}",
         maker(((B, N, C), 1.0), ((FF, C), C**-0.5), ((FF,), 0.1), ((C, FF), FF**-0.5), ((C,), 0.1), "gelu_fast",
               ((B, N, C), 1.0)),
         lambda *a: lin.mlp_ref(*a), 4.0 * M * C * FF, (3 * M * C + 2 * C * FF) * elt),
        ("attention_qkv", f"{B}x{N}x3x{H}x{D}", maker(((B, N, 3, H, D), 1.0), scale),
         lambda qkv, s: att.attention_ref(*qkv.unbind(2), s), 4.0 * B * H * N * N * D, 4 * M * C * elt),
        ("attention", f"3 x {B}x{N}x{H}x{D}", maker(((B, N, H, D), 1.0), ((B, N, H, D), 1.0), ((B, N, H, D), 1.0), scale),
         lambda q, k, v, s: att.attention_ref(q, k, v, s), 4.0 * B * H * N * N * D, 4 * M * C * elt),
        ("patch_embed", f"{B}x{plan.frames}x3x{plan.image}x{plan.image} -> {B}x{n_patch + 1}x{C}",
         maker(((B, plan.frames, 3, plan.image, plan.image), 1.0), ((C, 3, 2, 16, 16), K**-0.5), ((C,), 0.1),
               ((1, 1, C), 1.0), ((1, 1 + n_patch, C), 1.0)),
         pe.patch_embed_ref, 2.0 * B * n_patch * C * K,
         (B * plan.frames * 3 * plan.image**2 + C * K + B * (n_patch + 1) * C) * elt),
    ]


# the backward's FLOPs as a multiple of the forward's (dX and dW GEMMs: 2x; attention: 2.5x, see bench_utils)
_BACKWARD_FLOPS = {"attention_qkv": 2.5, "attention": 2.5}


def section_ops(run: Acceptance) -> None:
    import torch

    from .backends import auto_backend
    from .ops import _triton
    from .ops.registry import OPS
    from .testing import judge, run_with_grads

    dtype_name = ops_dtype(run.device)
    dtype = _torch_dtype(dtype_name)
    auto = auto_backend()
    env = run.data["environment"]
    for op, shape, make, ref, flops, nbytes in op_speed_cases(run.plan):
        for mode in ("infer", "train"):
            training = mode == "train"

            def reference(op=op, make=make, ref=ref, training=training):
                with _strict_fp32():
                    inputs = make(torch.float32, run.device)
                    leaves = tuple(t.requires_grad_(training) if isinstance(t, torch.Tensor) else t for t in inputs)
                    ref32 = _outputs(ref, leaves, torch.float32, training, run_with_grads)
                    low = None if dtype == torch.float32 else _outputs(ref, leaves, dtype, training, run_with_grads)
                return leaves, ref32, low

            prepared = run.step("ops", f"{op} {mode} reference", "speed", reference)
            if prepared is None:
                continue
            leaves, ref32, low = prepared
            impls = OPS[op].implementations
            names = [n for n, impl in impls.items() if impl.available(run.device) is None]
            for name in names + ["auto"]:
                fn = getattr(auto, op) if name == "auto" else impls[name].fn

                def measure(op=op, name=name, fn=fn, mode=mode, training=training, leaves=leaves, ref32=ref32,
                            low=low, flops=flops, nbytes=nbytes, shape=shape):
                    before = sum(_triton.LAUNCHES.values())
                    start = time.perf_counter()
                    try:
                        got = _outputs(fn, leaves, dtype, training, run_with_grads)
                    except Exception as e:  # noqa: BLE001 - a vendor backend that refuses these inputs is no failure
                        run.data["ops"].append({"op": op, "provider": name, "mode": mode, "dtype": dtype_name,
                                                "shape": shape, "ms": None, "unavailable": _first_line(e)})
                        return
                    run.sync()
                    first_s = time.perf_counter() - start
                    interpreted = _triton.INTERPRET and sum(_triton.LAUNCHES.values()) > before
                    checks = [judge(f"{op} out", got[0], ref32[0], None if low is None else low[0], 2.0)]
                    for i, (g, rg) in enumerate(zip(got[1], ref32[1])):
                        if rg is not None:
                            lg = None if low is None else low[1][i]
                            eps = 1e-4 * max(1.0, rg.abs().max().item())
                            checks.append(judge(f"{op} grad[{i}]", g, rg, lg, 3.0, eps=eps))
                    ok = all(c.ok for c in checks)
                    row = {"op": op, "provider": name, "mode": mode, "dtype": dtype_name, "shape": shape,
                           "runs": "attn='auto' dispatch" if name == "auto" else impls[name].runs(run.device),
                           "checked": ok, "interpreted": interpreted, "ms": None}
                    if not ok:
                        for c in checks:
                            if not c.ok:
                                run.fail("ops", f"{op} {name} {mode}", c.message(), shape=shape, dtype=dtype_name)
                        run.data["ops"].append(row)
                        return
                    args = tuple(t.detach().to(dtype) if isinstance(t, torch.Tensor) else t for t in leaves)
                    ms = _median_ms(run, fn, training, args) if not interpreted else first_s * 1e3
                    run.overhead("ops", first_s - ms * 1e-3)
                    work = flops * (1 + _BACKWARD_FLOPS.get(op, 2.0)) if training else flops
                    moved = nbytes * (3 if training else 1)
                    row.update(ms=ms)
                    if not interpreted:
                        if work:
                            row["tflops"] = work / (ms * 1e-3) / 1e12
                            if env.get("peak_matmul_tflops"):
                                row["fraction_of_peak"] = row["tflops"] / env["peak_matmul_tflops"]
                        else:
                            row["gbps"] = moved / (ms * 1e-3) / 1e9
                            if env.get("peak_copy_gbps"):
                                row["fraction_of_peak"] = row["gbps"] / env["peak_copy_gbps"]
                    run.data["ops"].append(row)

                run.step("ops", f"{op} {name} {mode}", "speed", measure, dtype=dtype_name)
            del leaves, ref32, low, prepared


def _outputs(fn, leaves, dtype, training, run_with_grads):
    """(output, input gradients) in ``dtype``; inference: (output, [])."""
    import torch

    if training:
        return run_with_grads(fn, leaves, dtype)
    with torch.no_grad():
        args = tuple(t.detach().to(dtype) if isinstance(t, torch.Tensor) else t for t in leaves)
        return fn(*args).detach(), []


# ------------------------------------------------------------------------------------------------
# 4. The seed's tables
# ------------------------------------------------------------------------------------------------
def build_seed_model(provider: str, config, dtype, device):
    """A model of the seed's tables: ours (provider "triton" / "auto") or transformers' own ("transformers-eager",
    "transformers-sdpa", and torch.compile of the latter), same config and seeded weights."""
    import torch

    from .model import VivitConfig, VivitForVideoClassification

    cfg = VivitConfig.from_preset(config) if isinstance(config, str) else config
    torch.manual_seed(0)
    if provider.startswith("transformers"):
        import transformers

        hf_cfg = transformers.VivitConfig(**cfg.to_dict())
        hf_cfg._attn_implementation = "eager" if provider == "transformers-eager" else "sdpa"
        model = transformers.VivitForVideoClassification(hf_cfg).to(device, dtype)
        return torch.compile(model) if provider.endswith("compiled") else model
    return VivitForVideoClassification(cfg, attn=provider).to(device, dtype)


def seed_step(model, table: str, pixel_values) -> Callable[[], Any]:
    """One timed unit of the seed's tables: an inference forward without autograd ("inference"), or a training
    step, forward + backward + AdamW ("training"; labels all 0). Puts the model in eval / train mode."""
    import torch

    if table == "inference":
        model.eval()

        def infer():
            with torch.no_grad():
                return model(pixel_values=pixel_values).logits

        return infer
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    labels = torch.zeros(pixel_values.shape[0], dtype=torch.long, device=pixel_values.device)

    def train():
        opt.zero_grad(set_to_none=True)
        loss = model(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        opt.step()
        return loss

    return train


def peak_memory_mb(fn: Callable[[], Any], device) -> Optional[float]:
    """torch.cuda.max_memory_allocated over one call of ``fn`` (weights included, as the seed measures), in MB
    (2^20 bytes); None off the GPU."""
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def _call_seconds(run: Acceptance, step: Callable[[], Any], rounds: int) -> list[float]:
    """Seconds of each of ``rounds`` calls of an already warmed-up ``step`` (CUDA events on a GPU)."""
    import torch

    times = []
    for _ in range(rounds):
        if run.device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return times


def _iqr(times: list[float]) -> Optional[float]:
    if len(times) < 2:
        return None
    q = statistics.quantiles(times, n=4, method="inclusive")
    return q[2] - q[0]


def _seed_row(run: Acceptance, table: str, provider: str, batch: int, dtype: str) -> None:
    import torch

    from .model import VivitConfig, image_hw
    from .ops import _triton

    cfg = VivitConfig.from_preset(run.plan.preset)
    dt = _torch_dtype(dtype)
    model = build_seed_model(provider, cfg, dt, run.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.num_frames, 3, *image_hw(cfg), generator=g).to(run.device, dt)
    step = seed_step(model, table, x)
    rounds = run.plan.infer_rounds if table == "inference" else run.plan.train_steps

    before = sum(_triton.LAUNCHES.values())
    start = time.perf_counter()
    step()  # compile / autotune / auto's measurements outside the timing
    run.sync()
    first = time.perf_counter() - start
    interpreted = _triton.INTERPRET and sum(_triton.LAUNCHES.values()) > before
    if interpreted:
        rounds = 1
    peak = peak_memory_mb(step, run.device)
    times = _call_seconds(run, step, rounds)
    median = statistics.median(times)
    run.overhead("seed", first - median)
    count_key = "num_batches" if table == "inference" else "num_training_steps"
    run.data["seed"].append({
        "table": table, "provider": provider, "batch": batch, "dtype": dtype, count_key: rounds, "time_s": median,
        "iqr_s": _iqr(times), "rounds": len(times), "peak_mem_mb": peak, "first_call_s": first,
        "interpreted": interpreted, "device": run.data["environment"].get("device", str(run.device)),
        "config": run.plan.preset,
    })


def _predict_row(run: Acceptance) -> None:
    """``predict`` end to end on generated videos (decoding in workers, preprocessing, the model): videos/s and
    where the time went, so the run shows whether decoding or the model limits us."""
    import shutil
    import tempfile

    import torch

    from .data import default_workers
    from .model import VivitForVideoClassification
    from .predict import load_predictor

    try:
        import av
    except ImportError:
        run.skip("seed", "predict end to end", "PyAV is not installed (pip install av): no videos to decode")
        return
    gpu = run.device.type == "cuda"
    count, frames, height, width = (16, 64, 240, 320) if gpu else (2, 8, 48, 64)
    folder = Path(tempfile.mkdtemp(prefix="vivit_predict_"))
    try:
        paths = []
        rng = torch.Generator().manual_seed(0)
        for i in range(count):
            path = folder / f"{i:03d}.mp4"
            with av.open(str(path), mode="w") as container:
                stream = container.add_stream("mpeg4", rate=25)
                stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                for _ in range(frames):
                    image = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=rng).numpy()
                    for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
            paths.append(str(path))
        torch.manual_seed(0)
        model = VivitForVideoClassification(run.plan.preset)
        dtype = torch.bfloat16 if gpu else torch.float32
        workers = default_workers()
        predictor = load_predictor(model, batch_size=8 if gpu else 2, workers=workers, device=run.device, dtype=dtype,
                                   attn="auto" if gpu else "sdpa")
        list(predictor.run(paths))  # warm-up: workers, kernels, auto's measurements
        predictor.timings = type(predictor.timings)()
        passes = 2 if gpu else 1
        for _ in range(passes):
            list(predictor.run(paths))
        t = predictor.timings
        if t.failed:
            raise RuntimeError(f"{t.failed} generated video(s) failed to decode")
        run.data.setdefault("predict", []).append({
            "table": "predict", "name": "predict end to end", "provider": f"predict {run.plan.preset}",
            "dtype": str(dtype).removeprefix("torch."), "videos": count, "workers": workers,
            "time_s": t.wall_s / passes, "rounds": passes, "waiting_share": t.waiting_s / t.wall_s,
            "preprocess_share": t.preprocess_s / t.wall_s, "model_share": t.model_s / t.wall_s,
            "video": f"{frames} frames of {width}x{height}", "device": run.data["environment"].get("device")})
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def section_seed(run: Acceptance) -> None:
    plan = run.plan
    # (table, provider, batch, dtype, kind), most valuable first: inference in the first dtype (bf16 on a GPU),
    # training, inference in the others (fp32, as the seed), and torch.compile (slow to compile) last
    infer = [[("inference", p, b, d, "seed") for b in plan.infer_batches for p in SEED_PROVIDERS] for d in plan.infer_dtypes]
    rows = infer[0] + [("training", p, b, plan.train_dtype, "train") for b in plan.train_batches for p in SEED_PROVIDERS]
    rows += [row for rows_of_dtype in infer[1:] for row in rows_of_dtype]
    for table, provider, batch, dtype, kind in rows:
        run.step("seed", f"{table} {provider} batch {batch} {dtype}", kind,
                 lambda t=table, p=provider, b=batch, d=dtype: _seed_row(run, t, p, b, d), batch=batch, dtype=dtype)
    run.step("seed", "predict end to end", "train", lambda: _predict_row(run))
    if run.device.type != "cuda":
        run.skip("seed", COMPILED, "torch.compile of transformers' model is timed on a GPU only")
        return
    compiled = [("inference", COMPILED, b, d, "compiled") for d in plan.infer_dtypes[:1] for b in (1, plan.infer_batches[-1])]
    compiled += [("training", COMPILED, 1, plan.train_dtype, "compiled")]
    for table, provider, batch, dtype, kind in compiled:
        run.step("seed", f"{table} {provider} batch {batch} {dtype}", kind,
                 lambda t=table, p=provider, b=batch, d=dtype: _seed_row(run, t, p, b, d), batch=batch, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# 5. What attn="auto" chose
# ------------------------------------------------------------------------------------------------
def section_auto(run: Acceptance) -> None:
    from . import providers

    def collect():
        for e in providers.entry_rows(run.device):
            run.data["auto"].append({k: e[k] for k in ("op", "shapes", "mode", "choice", "medians_ms", "runs",
                                                       "rejected")})
        run.data["auto_cache"] = str(providers.cache_path())

    run.step("auto", "choices", "auto", collect)


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def _fmt(value, spec: str = ".3g", none: str = "-") -> str:
    if value is None:
        return none
    if isinstance(value, float) and not math.isfinite(value):
        return "inf"
    return format(value, spec)


def render_report(data: dict) -> str:
    """report.md from a results.json dict (the same function renders it during the run and afterwards)."""
    from . import bench_report

    env = data.get("environment", {})
    ver = env.get("versions", {})
    device = env.get("device", "?")
    failures, skipped = data.get("failures", []), data.get("skipped", [])
    checks = data.get("correctness", [])
    if not data.get("finished"):
        verdict = "INCOMPLETE (the run was interrupted or is still going)"
    elif failures:
        verdict = f"FAIL: {len(failures)} failure(s), listed under Failures"
    else:
        verdict = f"PASS: {sum(1 for c in checks if c.get('ok'))} correctness checks passed"
    lines = [f"# vivit_kernels acceptance: {device}, {data.get('date', '?')}", ""]
    if data.get("dry_run"):
        lines += ["**Dry run** (`--dry-run`): the CPU at tiny shapes, Triton kernels in the Triton interpreter. It "
                  "checks the command's plumbing; none of its timings is a GPU figure.", ""]
    lines += [f"- verdict: **{verdict}**",
              f"- command: `{data.get('command', '?')}`",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in ver.items()),
              f"- time: {data.get('elapsed_s', 0):.0f} s of a {data.get('budget_s', 0):.0f} s budget; "
              f"{len(skipped)} step(s) skipped (listed at the end)"]
    comp = data.get("compilations", {})
    if comp:
        what = (f"{comp.get('compiled', 0)} Triton kernels compiled in {comp.get('seconds', 0):.1f} s of compiler "
                f"time, {comp.get('cache_hits', 0)} found in Triton's cache") if comp.get("supported") else \
            "not counted (this Triton has no compilation listener)"
        lines.append(f"- Triton compilation: {what}")
    over = data.get("first_call_overhead_s", {})
    if over:
        lines.append("- first-call overhead (compilation, autotuning, attn='auto' measurements; the first call's "
                     "time beyond a steady call): " + ", ".join(f"{k} {v:.1f} s" for k, v in over.items()))
    lines.append("")

    lines += ["## 1. Environment", "", "| | |", "|---|---|"]
    for key, value in env.get("gpu", {}).items():
        lines.append(f"| {key} | {value} |")
    for key in ("device", "host", "torch_cuda", "cudnn", "triton_interpreter"):
        if key in env:
            lines.append(f"| {key} | {env[key]} |")
    if "peak_matmul_tflops" in env:
        lines.append(f"| measured matmul ({env.get('peak_matmul')}) | {env['peak_matmul_tflops']:.4g} TFLOP/s |")
    if "peak_copy_gbps" in env:
        lines.append(f"| measured device copy ({env.get('peak_copy_bytes', 0) / 2**20:.0f} MiB) | "
                     f"{env['peak_copy_gbps']:.4g} GB/s (read + write) |")
    for item in env.get("extension", []):
        lines.append(f"| extension | {item} |")
    lines.append("")

    lines += ["## 2. Correctness", "", "fp32: strict; fp16 / bf16: within 2x PyTorch's own same-dtype error of the fp32 "
              "reference (3x for gradients), the test suite's rule (vivit_kernels.testing).", "",
              "| case | shape | dtype | result | worst tensor | error | allowed | s |", "|---|---|---|---|---|---|---|---|"]
    for c in checks:
        w = c["worst"]
        lines.append(f"| {c['case']} | {c['shape']} | {c['dtype']} | {'ok' if c['ok'] else '**FAIL**'} | {w['name']} "
                     f"| {_fmt(w['error'])} | {_fmt(w['allowed'])} | {c['seconds']:.1f} |")
    lines.append("")

    lines += ["## 3. Per-op speed", "", "Each provider's result is checked against the op's reference before its time "
              "counts. Training rows time forward + backward. TFLOP/s: 2 M N K per GEMM (4 B H N^2 D for attention; "
              "backward 2x, attention 2.5x); GB/s: bytes read and written once; % of peak: of the measured matmul (same "
              "dtype) or copy above.", "",
              "| op | shape | mode | provider | what ran | ms | TFLOP/s | GB/s | % of peak | check |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data.get("ops", []):
        if r.get("unavailable"):
            check, ms = f"unavailable: {r['unavailable'][:80]}", "-"
        else:
            check = "ok" if r.get("checked") else "**FAIL**"
            ms = "interpreter: correctness run" if r.get("interpreted") else _fmt(r.get("ms"), ".3f")
        frac = r.get("fraction_of_peak")
        lines.append(f"| {r['op']} | {r['shape']} | {r['mode']} | {r['provider']} | {r.get('runs', '-')} | {ms} "
                     f"| {_fmt(r.get('tflops'), '.3g')} "
                     f"| {_fmt(r.get('gbps'), '.3g')} | {_fmt(None if frac is None else 100 * frac, '.0f')} | {check} |")
    lines.append("")

    seed = data.get("seed", [])
    lines += ["## 4. The seed's tables", "",
              "Speedup and memory saving against transformers' eager model, as the seed page computes them "
              "(base / value - 1). Peak memory: torch.cuda.max_memory_allocated over one call, weights included.", "",
              "### Inference", "", bench_report.inference_table(seed), "", "### Training", "",
              bench_report.training_table(seed), ""]
    if data.get("predict"):
        video = data["predict"][0].get("video", "")
        lines += ["### End to end: predict over generated videos", "",
                  f"{video} videos, decoded with PyAV in DataLoader workers; the shares say whether decoding "
                  "(waiting for decoded videos) or the model limits the run.", "",
                  bench_report.predict_table(data["predict"]), ""]
    for name in ("inference_latency.png", "inference_memory.png"):
        if data.get("plots") and name in data["plots"]:
            lines.append(f"![{name[:-4]}]({name})")
    lines.append("")

    lines += ["## 5. attn=\"auto\" choices", ""]
    auto = data.get("auto", [])
    if auto:
        from .providers import format_entries

        lines.append(format_entries(auto))
    else:
        lines.append("No choices stored for this device and these versions.")
    lines.append("")

    if failures:
        lines += ["## Failures", "", "| section | step | shape | dtype | error |", "|---|---|---|---|---|"]
        for f in failures:
            lines.append(f"| {f['section']} | {f['name']} | {f.get('shape', '-')} | {f.get('dtype', '-')} | "
                         f"{f['error'].replace('|', '/')} |")
        lines.append("")
    if skipped:
        lines += ["## Skipped", "", "| section | step | why |", "|---|---|---|"]
        for s in skipped:
            lines.append(f"| {s['section']} | {s['name']} | {s['why']} |")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Results in the repository: bench/results/<gpu>-<yyyy-mm-dd>/, and the README section made from the newest
# ------------------------------------------------------------------------------------------------
RESULTS_DIR = Path("bench") / "results"
README_BEGIN = "<!-- acceptance-results:begin (generated by `python bench/update_readme.py`; do not edit) -->"
README_END = "<!-- acceptance-results:end -->"


def gpu_slug(name: str) -> str:
    """"NVIDIA H200" -> "nvidia-h200" (the results directory's GPU part)."""
    out = "".join(c.lower() if c.isalnum() else "-" for c in name)
    return "-".join(filter(None, out.split("-"))) or "gpu"


def default_out_dir(device, dry_run: bool) -> Path:
    import torch

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    if dry_run:
        return Path("acceptance_results") / f"dry-run-{date}"
    name = gpu_slug(torch.cuda.get_device_name(device))
    root = RESULTS_DIR if RESULTS_DIR.parent.is_dir() and (Path("vivit_kernels").is_dir()) else Path("acceptance_results")
    return root / f"{name}-{date}"


def newest_results(root: Path) -> Optional[tuple[Path, dict]]:
    """The newest finished GPU run under ``root`` (bench/results): by its date, then the directory name."""
    found = []
    for path in sorted(root.glob("*/results.json")) if root.is_dir() else []:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if data.get("format") == FORMAT and not data.get("dry_run"):
            found.append((data.get("date", ""), path.parent.name, path.parent, data))
    if not found:
        return None
    *_, directory, data = max(found, key=lambda f: (f[0], f[1]))
    return directory, data


def readme_section(root: Path = RESULTS_DIR) -> str:
    """The README's "Measured on a GPU" section, from the newest run under ``root`` (or a plain statement that
    no run exists yet)."""
    from . import bench_report

    newest = newest_results(root)
    if newest is None:
        return "\n".join([
            "**No GPU run is in the repository yet.** Every figure in this README is a device-independent count, a",
            "static proxy from ahead-of-time compiles, or an estimate, and says so. The first GPU run will appear",
            "here: `vivit-kernels acceptance` writes `bench/results/<gpu>-<yyyy-mm-dd>/` (results.json, report.md,",
            "plots), and `python bench/update_readme.py` regenerates this section from the newest one.",
        ])
    directory, data = newest
    env, ver = data.get("environment", {}), data.get("environment", {}).get("versions", {})
    rel = directory.as_posix()
    failures = data.get("failures", [])
    lines = [
        f"Measured on **{env.get('device', '?')}** on {data.get('date', '?')} with "
        + ", ".join(f"{k} {ver[k]}" for k in ("torch", "triton", "transformers", "vivit_kernels") if k in ver)
        + f" (CUDA {env.get('torch_cuda', '?')}): `{data.get('command', '?')}`, "
        f"{data.get('elapsed_s', 0):.0f} s. Full report: [{rel}/report.md]({rel}/report.md).",
        "",
        f"- correctness: {sum(1 for c in data.get('correctness', []) if c.get('ok'))} of "
        f"{len(data.get('correctness', []))} cases within the tolerance rule"
        + (f"; **{len(failures)} failure(s)** (see the report)" if failures else ""),
        f"- measured peaks: {env.get('peak_matmul', 'matmul')} matmul {_fmt(env.get('peak_matmul_tflops'), '.0f')} "
        f"TFLOP/s, device copy "
        f"{_fmt(env.get('peak_copy_gbps'), '.0f')} GB/s",
        f"- {len(data.get('skipped', []))} step(s) skipped by the time budget or as not applicable (listed in the report)",
        "",
    ]
    best = {}
    for r in data.get("ops", []):
        if r.get("ms") and r.get("checked") and not r.get("interpreted") and r["provider"] != "auto":
            key = (r["op"], r["mode"])
            best.setdefault(key, {})[r["provider"]] = r["ms"]
    if best:
        lines += ["Per op (ms, ours against the fastest other provider, each checked against the reference first):", "",
                  "| op | mode | ours (triton) | fastest other | ours / fastest other |", "|---|---|---|---|---|"]
        for (op, mode), times in best.items():
            others = {n: t for n, t in times.items() if n != "triton"}
            if "triton" not in times or not others:
                continue
            name = min(others, key=others.get)
            lines.append(f"| {op} | {mode} | {times['triton']:.3f} | {name} {others[name]:.3f} "
                         f"| {times['triton'] / others[name]:.2f} |")
        lines.append("")
    seed = data.get("seed", [])
    if seed:
        lines += ["Inference (the seed's table):", "", bench_report.inference_table(seed), "", "Training:", "",
                  bench_report.training_table(seed)]
    return "\n".join(lines)


def update_readme(readme: Path, root: Path = RESULTS_DIR, check: bool = False) -> bool:
    """Rewrite the section between README_BEGIN and README_END; with ``check``, only say whether it is current.
    Returns True when the README is (now) current."""
    text = readme.read_text(encoding="utf-8")
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme}: no {README_BEGIN!r} ... {README_END!r} markers")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    new = f"{head}{README_BEGIN}\n{readme_section(root)}\n{README_END}{tail}"
    if new == text:
        return True
    if check:
        return False
    atomic_write_text(readme, new)
    return True


# ------------------------------------------------------------------------------------------------
# Command
# ------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="output directory (default: bench/results/<gpu>-<yyyy-mm-dd> in a source checkout, "
                                      "else acceptance_results/<gpu>-<yyyy-mm-dd>; dry runs: acceptance_results/dry-run-<date>)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"wall-clock budget in seconds (default: {DEFAULT_BUDGET_S:.0f}); steps that do not fit are "
                             "skipped and listed")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same run on the CPU at tiny shapes (Triton interpreter): checks the plumbing")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="sections to run (default: all, in order)")
    parser.add_argument("--autotune", action="store_true",
                        help="autotune every shipped Triton config per shape (slower to start); default: each case's "
                             "first shipped config, as the test suite does")


def run_cli(args: argparse.Namespace) -> int:
    if args.budget_s <= 0:
        raise ValueError(f"--budget-s must be positive, got {args.budget_s}")
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET", "1").lower() in ("0", "false", "off", "no"):
            raise ValueError("--dry-run runs the Triton kernels in the Triton interpreter, but TRITON_INTERPRET=0 is set")
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined (the CLI imports none before this)
    import torch

    from .ops import _triton

    if args.dry_run and not _triton.INTERPRET and _triton.HAS_TRITON:
        raise RuntimeError("--dry-run needs the Triton interpreter, but the kernels were defined without it")
    if not args.dry_run and not torch.cuda.is_available():
        raise ValueError("acceptance measures a GPU and this machine has none (torch.cuda.is_available() is False); "
                         "--dry-run runs the same plumbing on the CPU")
    os.environ[_triton.AUTOTUNE_ENV] = "1" if args.autotune else "0"
    device = torch.device("cpu" if args.dry_run else "cuda")
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    out = Path(args.out) if args.out else default_out_dir(device, args.dry_run)
    if args.dry_run and not os.environ.get("VIVIT_KERNELS_CACHE_DIR"):
        # interpreter-run choices are no one's speed data: keep them out of the user's provider cache
        os.environ["VIVIT_KERNELS_CACHE_DIR"] = str(out.resolve() / "provider-cache")
    command = " ".join(["vivit-kernels", "acceptance", *getattr(args, "argv", [])])
    run = Acceptance(out, plan, device, args.budget_s, args.dry_run, command, tuple(args.sections))
    return execute(run)


def execute(run: Acceptance) -> int:
    from . import _compat, bench_report

    steps = {"environment": section_environment, "correctness": section_correctness, "ops": section_ops,
             "seed": section_seed, "auto": section_auto}
    if "environment" not in run.sections:
        run.sections = ("environment",) + tuple(run.sections)  # the versions and peaks every figure refers to
    run.save()
    with _compat.recording_compilations() as compiled:
        for name in SECTIONS:
            if name not in run.sections:
                continue
            run.enter(name)
            print(f"[acceptance] {name} (until {run.left():.0f} s from now)", file=sys.stderr, flush=True)
            steps[name](run)
            run.data["compilations"] = dataclasses.asdict(compiled)
            run.save()
    records = [r for r in run.data["seed"] if r.get("time_s")]
    run.data["plots"] = [p.name for p in bench_report.write_plots(records, run.out)] if records else []
    run.data["finished"] = True
    run.save()
    failures = run.data["failures"]
    print(f"[acceptance] {'FAIL' if failures else 'PASS'}: {len(run.data['correctness'])} correctness cases, "
          f"{len(failures)} failure(s), {len(run.data['skipped'])} step(s) skipped, {run.data['elapsed_s']:.0f} s; "
          f"report: {run.out / 'report.md'}", file=sys.stderr)
    for f in failures:
        print(f"  FAIL {f['section']}: {f['name']}: {f['error'][:300]}", file=sys.stderr)
    return 1 if failures else 0
