"""``vivit-kernels acceptance``'s command: its arguments, and the run of the sections in budget order."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from .run import DEFAULT_BUDGET_S, DRY_PLAN, GPU_PLAN, SECTIONS, Acceptance

__all__ = ["add_arguments", "run_cli", "execute"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        help="output directory (default: bench/results/<gpu>-<yyyy-mm-dd> in a source checkout, "
        "else acceptance_results/<gpu>-<yyyy-mm-dd>; dry runs: acceptance_results/dry-run-<date>)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"wall-clock budget in seconds (default: {DEFAULT_BUDGET_S:.0f}); steps that do not fit are "
        "skipped and listed",
    )
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
            raise ValueError(
                "--dry-run runs the Triton kernels in the Triton interpreter, but TRITON_INTERPRET=0 is set"
            )
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined (the CLI imports none before this)
    import torch

    from ...ops import _triton
    from .report import default_out_dir

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
        # interpreter-run choices are no one's speed data: keep them out of the user's implementation cache
        os.environ["VIVIT_KERNELS_CACHE_DIR"] = str(out.resolve() / "implementation-cache")
    command = " ".join(["vivit-kernels", "acceptance", *getattr(args, "argv", [])])
    run = Acceptance(out, plan, device, args.budget_s, args.dry_run, command, tuple(args.sections))
    return execute(run)


def execute(run: Acceptance) -> int:
    from ... import _compat
    from .. import bench_report
    from .checks import section_correctness, section_environment, section_ops
    from .seed import section_auto, section_seed

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
