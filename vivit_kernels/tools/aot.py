"""Ahead-of-time GPU compile gate: every shipped Triton kernel config, compiled for sm_80 and sm_90 here,
without a GPU.

For each case (kernel x config x dtype x head_dim ...) that an op module lists in its ``aot_cases()``, this
compiles the kernel with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, runs the
ptxas bundled with Triton with ``-v`` on the PTX, and reports registers, spill bytes, shared memory and an
occupancy estimate. A case fails when it does not compile, spills, or needs more shared memory than the
architecture offers a block.

    vivit-kernels compile-report [--arch 80 90] [--kernel attn] [--json out.json] [-j 2]
    python -m vivit_kernels.tools.aot ...

Compilation happens in worker processes started without TRITON_INTERPRET, so the gate also runs from a
test session that interprets kernels.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Per-architecture limits: max dynamic shared memory per block, shared memory per SM, registers per SM,
# max resident warps per SM.
ARCHS: dict[int, dict[str, int]] = {
    80: dict(smem_block=163 * 1024, smem_sm=164 * 1024, regs_sm=65536, warps_sm=64, blocks_sm=32),
    90: dict(smem_block=227 * 1024, smem_sm=228 * 1024, regs_sm=65536, warps_sm=64, blocks_sm=32),
}

# The reference rows (tutorial-like kernels); the shipped kernels' modules come from the op registry
# (``ops.registry.aot_modules()``: each op's entry names the modules whose ``aot_cases()`` list its kernels).
REFERENCE_MODULES = ("vivit_kernels.tools.aot_reference",)

# the case description and its constructor live beside the ops that list their cases (no import back up to here)
from ..ops._aot_cases import AotCase  # noqa: E402


@dataclass
class AotResult:
    case: AotCase
    arch: int
    ok: bool = False
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int | None = None
    occupancy: float | None = None
    seconds: float = 0.0
    error: str = ""
    problems: list[str] = field(default_factory=list)
    # where registers and spills were read: "triton" (the log of the ptxas run Triton made compiling it) or
    # "ptxas" (our own run on its PTX: a kernel from Triton's cache)
    ptxas_log: str = ""
    # read from the SASS (a proxy for speed, not speed): the MMA instruction kind ("wgmma", "mma.sync", "FMA"),
    # whether tiles load through TMA ("TMA") or cp.async ("cp.async"), and the hot loop (the innermost loop
    # holding the MMAs): its instructions per warp, and those per MFLOP (GEMMs) or per score element (attention)
    mma: str | None = None
    loads: str | None = None
    loop_instructions: int | None = None
    work: float | None = None
    work_unit: str = ""

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["case"] = {"kernel": self.case.name, "label": self.case.label, "num_warps": self.case.num_warps,
                     "num_stages": self.case.num_stages}
        return d


def collect_cases(kernel_filter: str | None = None, references: bool = False) -> list[AotCase]:
    from ..ops.registry import aot_modules

    cases: list[AotCase] = []
    for module_name in aot_modules() + (REFERENCE_MODULES if references else ()):
        module = importlib.import_module(module_name)
        if hasattr(module, "aot_cases"):
            cases.extend(module.aot_cases())
    if kernel_filter:
        cases = [c for c in cases if kernel_filter in c.name]
    return cases


# ------------------------------------------------------------------------------------------------
def _ptxas() -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(90).path


def _sm_name(arch: int) -> str:
    return "sm_90a" if arch == 90 else f"sm_{arch}"


_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@contextlib.contextmanager
def _triton_ptxas_log():
    """The log of the ptxas run Triton makes while compiling (``ptxas -v``: registers, spills), which Triton prints
    when its ``dump_ptxas_log`` knob is on: read from there, a cold compilation runs ptxas once, not twice. Empty
    for a cached kernel, or a Triton without the knob (the caller then runs ptxas itself)."""
    buffer = io.StringIO()
    try:
        from triton import knobs
        nvidia = knobs.nvidia
        saved = nvidia.dump_ptxas_log
    except (ImportError, AttributeError):
        yield buffer
        return
    nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(buffer):
            yield buffer
    finally:
        nvidia.dump_ptxas_log = saved


def _run_ptxas(ptx_source: str, arch: int) -> str:
    """``ptxas -v`` on a kernel's PTX, as Triton runs it: the log (registers, spills)."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(ptx_source)
        proc = subprocess.run(
            [_ptxas(), "-v", "--regAllocOptLevel=2", f"--gpu-name={_sm_name(arch)}", ptx, "-o", ptx + ".o"],
            capture_output=True, text=True,
        )
    log = proc.stderr + proc.stdout
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {log.strip()[-500:]}")
    return log


def compile_case(case: AotCase, arch: int, sass: bool = True) -> AotResult:
    """Compile one case for one architecture (in a process where Triton is not interpreting); ``sass=False``
    skips reading the SASS back (the MMA / load / hot-loop fields stay empty; registers, spills and shared memory
    still come from ptxas and Triton)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..ops import _triton

    result = AotResult(case, arch)
    start = time.perf_counter()
    try:
        fn = getattr(importlib.import_module(case.module), case.kernel)
        names = [n for n, _ in case.signature]
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in case.divisible}
        src = ASTSource(fn=fn, signature=dict(case.signature), constexprs=dict(case.constexprs), attrs=attrs)
        with _triton_ptxas_log() as triton_log:
            compiled = triton.compile(
                src, target=GPUTarget("cuda", arch, 32),
                options=dict(num_warps=case.num_warps, num_stages=case.num_stages, enable_fp_fusion=_triton.FP_FUSION)
            )
        result.shared = int(compiled.metadata.shared)
        log, result.ptxas_log = triton_log.getvalue(), "triton"
        if not _REGS.search(log):  # a cached kernel (Triton ran no ptxas), or a Triton that keeps its log
            log, result.ptxas_log = _run_ptxas(compiled.asm["ptx"], arch), "ptxas"
        regs, spills = _REGS.search(log), _SPILLS.search(log)
        result.registers = int(regs.group(1)) if regs else 0
        result.spill_stores, result.spill_loads = (int(spills.group(1)), int(spills.group(2))) if spills else (0, 0)
        result.occupancy = occupancy(arch, result.registers, result.shared, case.num_warps)
        if sass:
            analyse_sass(result, disassemble(compiled.asm["cubin"]))
    except Exception as e:  # noqa: BLE001 - a failure to compile is a result, reported in the table
        result.error = f"{type(e).__name__}: {str(e).strip()[:400]}"
    result.seconds = time.perf_counter() - start
    result.problems = problems(result)
    result.ok = not result.problems
    return result


def disassemble(cubin: bytes) -> str:
    """SASS of a cubin, by the nvdisasm bundled with Triton."""
    from triton.backends.nvidia import compiler as nvidia

    nvdisasm = os.path.join(os.path.dirname(nvidia.__file__), "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        # -ndf: no dataflow annotations (the same instructions and labels, a third faster)
        out = subprocess.run([nvdisasm, "-c", "-ndf", f.name], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"nvdisasm failed: {out.stderr.strip()[-300:]}")
    return out.stdout


_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


def hot_loop(sass: str) -> tuple[str, list[str]]:
    """(MMA kind, the instructions of the innermost loop holding the kernel's matrix multiplies). A loop is a
    backward branch to a label; the MMA kind is wgmma (HGMMA) over mma.sync (HMMA) over FMA (FFMA)."""
    instructions: list[str] = []
    labels: dict[str, int] = {}
    loops: list[tuple[int, int]] = []
    for line in sass.splitlines():
        label = _LABEL.match(line.strip())
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        branch = _BRANCH.search(m.group(1))
        if branch and branch.group(1) in labels and labels[branch.group(1)] <= len(instructions):
            loops.append((labels[branch.group(1)], len(instructions)))
        instructions.append(m.group(1))
    kinds = [k for k in ("HGMMA", "HMMA") if any(k in i for i in instructions)] or ["FFMA"]
    kind = kinds[0]

    def holds(loop):
        return any(re.search(rf"\b{kind}\b", i) for i in instructions[loop[0]: loop[1] + 1])

    candidates = [loop for loop in loops if holds(loop)]
    if not candidates:
        return {"HGMMA": "wgmma", "HMMA": "mma.sync", "FFMA": "FMA"}[kind], []
    start, end = min(candidates, key=lambda loop: loop[1] - loop[0])
    return {"HGMMA": "wgmma", "HMMA": "mma.sync", "FFMA": "FMA"}[kind], instructions[start: end + 1]


def analyse_sass(result: AotResult, sass: str) -> None:
    """Fill the SASS fields of ``result``: MMA kind, load path, hot-loop size and work per instruction."""
    case = result.case
    result.mma, body = hot_loop(sass)
    result.loads = "TMA" if "UTMALDG" in sass else ("cp.async" if "LDGSTS" in sass else "ld.global")
    result.loop_instructions = len(body) or None
    meta = dict(case.constexprs)
    bm, bn, bk = meta.get("BLOCK_M"), meta.get("BLOCK_N"), meta.get("BLOCK_K")
    if not body or bm is None or bn is None:
        return
    from ..ops.formulas import gemm_flops

    if "attn" in case.name or "attention" in case.name:
        # score elements per thread per iteration: BLOCK_M x BLOCK_N scores over warps x 32 threads
        result.work, result.work_unit = len(body) / (bm * bn / (case.num_warps * 32)), "instr/score"
    elif bk is not None:
        # per MFLOP of the tile's MMA: warp instructions issued per SM sub-partition (4 per SM)
        mflop = gemm_flops(bm, bn, bk) / 1e6
        result.work, result.work_unit = len(body) * (case.num_warps / 4) / mflop, "instr/MFLOP"


def occupancy(arch: int, registers: int, shared: int, num_warps: int) -> float:
    """Resident warps per SM / max warps, limited by registers, shared memory, and the block limit."""
    lim = ARCHS[arch]
    regs_per_warp = ((max(registers, 1) * 32 + 255) // 256) * 256  # allocation granularity: 256 per warp
    by_regs = lim["regs_sm"] // (regs_per_warp * num_warps)
    by_smem = lim["smem_sm"] // shared if shared else lim["blocks_sm"]
    by_warps = lim["warps_sm"] // num_warps
    blocks = min(by_regs, by_smem, by_warps, lim["blocks_sm"])
    return blocks * num_warps / lim["warps_sm"]


def problems(r: AotResult) -> list[str]:
    if r.error:
        return [f"compile failed: {r.error}"]
    out = []
    if r.spill_stores or r.spill_loads:
        out.append(f"spills {r.spill_stores} B stores / {r.spill_loads} B loads")
    limit = ARCHS[r.arch]["smem_block"]
    if r.shared is not None and r.shared > limit:
        out.append(f"shared memory {r.shared} B > {limit} B")
    return out


# ------------------------------------------------------------------------------------------------
def _init_worker() -> None:
    os.environ.pop("TRITON_INTERPRET", None)


def _compile_star(args: tuple[AotCase, int, bool]) -> AotResult:
    return compile_case(*args)


def run(cases: list[AotCase], archs: tuple[int, ...] = (80, 90), jobs: int = 2, progress: bool = True,
        sass_archs: tuple[int, ...] | None = None,
        sass: Callable[[AotCase, int], bool] | None = None) -> list[AotResult]:
    """Compile every case for every arch in ``jobs`` worker processes (spawned without TRITON_INTERPRET); the
    SASS is read back for ``sass_archs`` (default: every arch), and of those for the (case, arch) pairs where
    ``sass`` says so (default: all). nvdisasm is most of a cached compile's time."""
    sass_archs = archs if sass_archs is None else sass_archs
    work = [(c, a, a in sass_archs and (sass is None or sass(c, a))) for c in cases for a in archs if a in c.archs]
    saved = os.environ.pop("TRITON_INTERPRET", None)  # spawned workers inherit the environment
    try:
        ctx = multiprocessing.get_context("spawn")
        results: list[AotResult] = []
        with cf.ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=ctx, initializer=_init_worker) as pool:
            for i, result in enumerate(pool.map(_compile_star, work), 1):
                results.append(result)
                if progress:
                    status = "ok" if result.ok else "FAIL"
                    print(f"\r[{i}/{len(work)}] {result.case.name} {result.case.label} sm_{result.arch}: {status}  ",
                          end="" if i < len(work) else "\n", file=sys.stderr, flush=True)
        return results
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def format_table(results: list[AotResult]) -> str:
    header = (f"{'kernel':<18} {'config':<52} {'arch':<6} {'regs':>4} {'spill B':>8} {'smem KB':>8} {'occ':>5} "
              f"{'mma':<8} {'loads':<9} {'loop':>5} {'per work':>9} {'unit':<11}  status")
    lines = [header, "-" * len(header)]
    for r in results:
        spill = "-" if r.spill_stores is None else str(r.spill_stores + r.spill_loads)
        smem = "-" if r.shared is None else f"{r.shared / 1024:.1f}"
        occ = "-" if r.occupancy is None else f"{r.occupancy:.0%}"
        regs = "-" if r.registers is None else str(r.registers)
        loop = "-" if r.loop_instructions is None else str(r.loop_instructions)
        work = "-" if r.work is None else f"{r.work:.1f}"
        config = r.case.label
        status = "ok" if r.ok else "FAIL: " + "; ".join(r.problems)
        lines.append(f"{r.case.name:<18} {config:<52} sm_{r.arch:<3} {regs:>4} {spill:>8} {smem:>8} {occ:>5} "
                     f"{r.mma or '-':<8} {r.loads or '-':<9} {loop:>5} {work:>9} {r.work_unit or '-':<11}  {status}")
    n_bad = sum(not r.ok for r in results)
    lines.append(f"{len(results)} compilations, {n_bad} failing")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vivit-kernels compile-report", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(ARCHS))
    parser.add_argument("--kernel", help="only kernels whose name contains this")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quiet", action="store_true", help="no progress line (it is shown only on a terminal anyway)")
    parser.add_argument("--no-reference", action="store_true",
                        help="leave out the reference rows (tutorial-like kernels compiled the same way)")


def run_cli(args: argparse.Namespace) -> int:
    cases = collect_cases(args.kernel, references=not args.no_reference)
    if not cases:
        names = sorted({c.name for c in collect_cases(references=not args.no_reference)})
        print(f"no kernel name contains {args.kernel!r}; the kernels are: {', '.join(names)}", file=sys.stderr)
        return 2
    results = run(cases, tuple(args.arch), args.jobs, progress=not args.quiet and sys.stderr.isatty())
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_json() for r in results], f, indent=1)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
