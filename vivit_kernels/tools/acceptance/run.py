"""``vivit-kernels acceptance --out DIR``: the first thing to run on a GPU, in one command, bounded in time.

Ordered by value; each section is cut short when the time budget (``--budget-s``, default 480) runs out, and
what was skipped is listed with the reason:

1. environment: GPU name, SM count, clocks, driver, CUDA, the versions, and the peaks the speed figures are
   compared with, measured here (a large bf16 matmul's TFLOP/s, a device-to-device copy's GB/s);
2. correctness at ViViT-B shapes: every op's forward and every input gradient against its eager reference (the
   test suite's tolerance rule, vivit_kernels.testing), the whole model in bf16 and fp32 against transformers'
   eager attention; the extension's ops too, where it is built for the device. Any failure makes the command exit 1,
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

This module: the plan, the budget and its steps. The package: ``command`` (arguments, the run of the sections),
``checks`` (sections 1-3, every op read from the op registry), ``seed`` (sections 4-5) and ``report`` (report.md,
bench/results/ and the README section).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..._devices import synchronize
from ..._files import atomic_write_text
from .report import FORMAT, render_report

__all__ = ["SECTIONS", "SECTION_ENDS", "DEFAULT_BUDGET_S",
           "Plan", "GPU_PLAN", "DRY_PLAN", "Acceptance", "ops_dtype", "torch_dtype", "first_line", "median_ms"]

SECTIONS = ("environment", "correctness", "ops", "seed", "auto")
# Where each section must end, as a fraction of the budget from the start (cumulative): a section may use what
# earlier ones left, but never starves the later ones; the last one may use everything that is left.
SECTION_ENDS = {"environment": 0.05, "correctness": 0.50, "ops": 0.72, "seed": 0.97, "auto": 1.0}
DEFAULT_BUDGET_S = 480.0


@dataclasses.dataclass(frozen=True)
class Plan:
    """Shapes and counts of a run: ViViT-B/16x2 on a GPU, tiny ones under --dry-run. ``estimate_s`` is how long
    a step of each kind may take (cold caches included): a step starts only if the budget has that much left."""

    preset: str
    correct_batch: int
    ops_batch: int
    sizes: str  # the op registry's sample-input sizes: a Shape constructor ("vivit_b", "tiny")
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

    def shape(self, batch: int):
        """The op registry's sample-input sizes of this plan at ``batch``."""
        from ...ops.sample_inputs import Shape

        return getattr(Shape, self.sizes)(batch)


GPU_PLAN = Plan(
    preset="vivit-b-16x2", correct_batch=2, ops_batch=8, sizes="vivit_b", correct_dtypes=("bf16", "fp32", "fp16"),
    model_batch=1, infer_batches=(1, 2, 4, 8), infer_dtypes=("bf16", "fp32"), infer_rounds=20, train_batches=(1, 8),
    train_dtype="bf16", train_steps=20, matmul_n=8192, copy_mib=1024, warmup=3, repeats=15,
    estimate_s={"environment": 20, "op": 10, "model": 40, "speed": 6, "seed": 10, "train": 30,
                "compiled": 120, "auto": 1},
)
DRY_PLAN = Plan(
    preset="tiny", correct_batch=1, ops_batch=2, sizes="tiny", correct_dtypes=("bf16", "fp32"), model_batch=1,
    infer_batches=(1, 2), infer_dtypes=("fp32",), infer_rounds=2, train_batches=(1,), train_dtype="fp32",
    train_steps=2, matmul_n=256, copy_mib=16, warmup=0, repeats=1,
    estimate_s={"environment": 2, "op": 2, "model": 5, "speed": 1, "seed": 2, "train": 5,
                "compiled": 60, "auto": 0},
)


def ops_dtype(device) -> str:
    """The dtype of the per-op timings and of the matmul peak they are compared with: bf16 on a GPU (what users
    should run), fp32 on the CPU (--dry-run; the CPU's bf16 matmul is no reference for anything)."""
    return "bf16" if device.type == "cuda" else "fp32"


def torch_dtype(name: str):
    import torch

    from ...names import DTYPES

    return getattr(torch, DTYPES[name])


def first_line(e: BaseException) -> str:
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
                self.skip(section, name, f"out of GPU memory on this device: {first_line(e)[:200]}")
            else:
                self.fail(section, name, first_line(e), traceback=traceback.format_exc(limit=6)[-2000:], **fields)
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
        synchronize(self.device)




def median_ms(run: Acceptance, fn: Callable[[], Any], training: bool = False, args: tuple = ()) -> float:
    """Median milliseconds of ``fn(*args)`` (CUDA events on a GPU, wall clock on the CPU), with the inputs
    rotated through copies larger than the L2 cache (the timer attn='auto' uses)."""
    from ...auto.choose import cuda_event_timer

    return cuda_event_timer(fn, args, training, run.device, warmup=run.plan.warmup, repeats=run.plan.repeats)
