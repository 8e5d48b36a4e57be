"""The acceptance run's report: ``report.md`` from results.json (during the run and afterwards), the results
directory in the repository (``bench/results/<gpu>-<yyyy-mm-dd>/``), and the README section made from the newest.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

from ..._files import atomic_write_text

FORMAT = "vivit_kernels-acceptance"  # results.json's format

__all__ = ["FORMAT", "render_report", "RESULTS_DIR", "README_BEGIN", "README_END", "gpu_slug", "default_out_dir",
           "newest_results", "readme_section", "update_readme"]


def _fmt(value, spec: str = ".3g", none: str = "-") -> str:
    if value is None:
        return none
    if isinstance(value, float) and not math.isfinite(value):
        return "inf"
    return format(value, spec)


def render_report(data: dict) -> str:
    """report.md from a results.json dict (the same function renders it during the run and afterwards)."""
    from .. import bench_report

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

    lines += [
        "## 2. Correctness",
        "",
        "fp32: strict; fp16 / bf16: within 2x PyTorch's own same-dtype error of the fp32 "
        "reference (3x for gradients), the test suite's rule (vivit_kernels.testing).",
        "",
        "| case | shape | dtype | result | worst tensor | error | allowed | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        w = c["worst"]
        lines.append(f"| {c['case']} | {c['shape']} | {c['dtype']} | {'ok' if c['ok'] else '**FAIL**'} | {w['name']} "
                     f"| {_fmt(w['error'])} | {_fmt(w['allowed'])} | {c['seconds']:.1f} |")
    lines.append("")

    lines += [
        "## 3. Per-op speed",
        "",
        "Each implementation's result is checked against the op's reference before its time "
        "counts. Training rows time forward + backward. TFLOP/s: 2 M N K per GEMM (4 B H N^2 D for attention; "
        "backward 2x, attention 2.5x); GB/s: bytes read and written once; % of peak: of the measured matmul (same "
        "dtype) or copy above.",
        "",
        "| op | shape | mode | implementation | what ran | ms | TFLOP/s | GB/s | % of peak | check |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data.get("ops", []):
        if r.get("unavailable"):
            check, ms = f"unavailable: {r['unavailable'][:80]}", "-"
        else:
            check = "ok" if r.get("checked") else "**FAIL**"
            ms = "interpreter: correctness run" if r.get("interpreted") else _fmt(r.get("ms"), ".3f")
        frac = r.get("fraction_of_peak")
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['mode']} | {r['implementation']} | {r.get('runs', '-')} | {ms} "
            f"| {_fmt(r.get('tflops'), '.3g')} "
            f"| {_fmt(r.get('gbps'), '.3g')} | {_fmt(None if frac is None else 100 * frac, '.0f')} | {check} |"
        )
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
        bottleneck = data["predict"][0].get("limited_by")
        if bottleneck:
            p = data["predict"][0]
            lines += [f"Bottleneck: {bottleneck} (one decoding process: {p.get('decode_frames_per_s_per_worker')} "
                      f"frames/s; the model: {p.get('model_clips_per_s')} clips/s"
                      + (f"; about {p['workers_needed']} decoding processes would keep it busy)" if p.get(
                          "workers_needed") else ")"), ""]
    if data.get("decode"):
        lines += ["### Decoding one clip, per decoder", "",
                  "One process, one evaluation clip of a generated H.264 video; the difference to PyAV's frames is in "
                  "uint8 levels (NVDEC converts colour its own way).", "",
                  "| decoder | source | frames | ms per clip | clips/s | frames/s | max / mean difference to PyAV |",
                  "|---|---|---|---|---|---|---|"]
        for r in data["decode"]:
            lines.append(f"| {r['decoder']} | {r['source']} | {r['frames']} | {r['clip_ms']:.1f} | "
                         f"{r['clips_per_s']:.2f} | {r['frames'] * r['clips_per_s']:.0f} | "
                         f"{r['max_diff_to_pyav']} / {r['mean_diff_to_pyav']:.3f} |")
        lines.append("")
    if data.get("cut"):
        lines += ["### Where to cut: the CPU op in the decoding workers, or the frames to the device", "",
                  "One decoded clip per source size: \"views\" (what the data path runs on a GPU) resizes and crops "
                  "in a worker (one thread) and hands 224x224 uint8 over PCIe, normalised on the device; "
                  "\"device\" hands the full-resolution uint8 frames over and runs the op on the device.", "",
                  "| source | frames | views: worker ms | views: MB / ms over PCIe | views: device ms "
                  "| device: MB / ms over PCIe | device: device ms |", "|---|---|---|---|---|---|---|"]
        for r in data["cut"]:
            v, d = r["views"], r["device"]
            lines.append(f"| {r['source']} | {r['frames']} | {v['worker_ms']:.1f} | {v['pcie_bytes'] / 1e6:.1f} / "
                         f"{v['pcie_ms']:.2f} | {v['device_ms']:.2f} | {d['pcie_bytes'] / 1e6:.1f} / "
                         f"{d['pcie_ms']:.2f} | {d['device_ms']:.2f} |")
        lines.append("")
    for name in ("inference_latency.png", "inference_memory.png"):
        if data.get("plots") and name in data["plots"]:
            lines.append(f"![{name[:-4]}]({name})")
    lines.append("")

    lines += ["## 5. attn=\"auto\" choices", ""]
    auto = data.get("auto", [])
    if auto:
        from ...auto.cache import format_entries

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
    root = (
        RESULTS_DIR if RESULTS_DIR.parent.is_dir() and (Path("vivit_kernels").is_dir()) else Path("acceptance_results")
    )
    return root / f"{name}-{date}"


def newest_results(root: Path) -> tuple[Path, dict] | None:
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
    from .. import bench_report

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
        f"- {len(data.get('skipped', []))} step(s) skipped by the time budget or as not applicable (listed in the "
        "report)",
        "",
    ]
    best = {}
    for r in data.get("ops", []):
        if r.get("ms") and r.get("checked") and not r.get("interpreted") and r["implementation"] != "auto":
            key = (r["op"], r["mode"])
            best.setdefault(key, {})[r["implementation"]] = r["ms"]
    if best:
        lines += ["Per op (ms, ours against the fastest other implementation, each checked against the reference "
                  "first):", "",
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


