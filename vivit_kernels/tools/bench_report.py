"""``vivit-kernels bench``: device-independent measurements, the pytest-benchmark suite, and the report.

Writes, into the output directory:

- ``measurements.json`` / ``measurements.md``: the counts of vivit_kernels.tools.measure (any machine);
- ``benchmark.json``: pytest-benchmark's raw results of bench/ (timed on this machine's device);
- ``report.md``: the seed's two tables (inference and training, per backend, speedup and memory saving
  against transformers' eager model), the per-op table, and the measurements, each saying which machine
  measured it;
- ``inference_latency.png`` / ``inference_memory.png``: latency and peak memory vs batch size per backend.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..names import DTYPES

__all__ = ["load_benchmarks", "inference_table", "training_table", "ops_table", "write_report", "main"]


def load_benchmarks(path: str | os.PathLike) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(records, machine info) from a pytest-benchmark JSON file; a record is extra_info + the median seconds
    (``time_s``) and the inter-quartile range (``iqr_s``)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    records = []
    for b in data.get("benchmarks", []):
        rec = dict(b.get("extra_info", {}))
        rec["name"] = b.get("name")
        stats = b.get("stats", {})
        rec["time_s"] = stats.get("median")
        rec["iqr_s"] = stats.get("iqr")
        rec["rounds"] = stats.get("rounds")
        records.append(rec)
    return records, data.get("machine_info", {})


def _timing(r: dict) -> str:
    """median ms +- IQR, or why there is no figure."""
    if r.get("interpreted"):
        return "interpreter: correctness run"
    iqr = f" ± {1e3 * r['iqr_s']:.2f}" if r.get("iqr_s") is not None and (r.get("rounds") or 0) > 1 else ""
    return f"{1e3 * r['time_s']:.2f}{iqr}"


def _baseline(group: list[dict], key: str) -> dict | None:
    for name in ("transformers-eager", "eager"):
        for r in group:
            if r.get(key) == name:
                return r
    return None


def _pct(base: float | None, value: float | None) -> str:
    """The seed's convention: base / value - 1, in percent (speedup from times, saving from memory)."""
    if not base or not value:
        return "-"
    return f"{100 * (base / value - 1):.1f}"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _seed_table(records: list[dict], table: str, count_key: str, count_label: str, time_label: str) -> str:
    """The seed's layout: per dtype and batch, each backend's time and peak memory, and the speedup and memory
    saving against transformers' eager model."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("table") == table and r.get("time_s"):
            groups[(r["dtype"], r["batch"])].append(r)
    lines = [f"| {count_label} | batch_size | dtype | path | {time_label} (ms, median ± IQR) | speedup (%) "
             "| peak memory (MB) | memory saving (%) |", "|---|---|---|---|---|---|---|---|"]
    for (dtype, batch), group in sorted(groups.items()):
        base = _baseline(group, "path")
        for r in sorted(group, key=lambda r: r["path"]):
            speedup = "-" if r.get("interpreted") else _pct(base and base["time_s"], r["time_s"])
            path = r["path"] + (f" ({r['merge']})" if r.get("merge") else "")  # token merging's schedule
            lines.append(
                f"| {r.get(count_key, '-')} | {batch} | {dtype} | {path} | {_timing(r)} "
                f"| {speedup} | {_mb(r.get('peak_mem_mb'))} "
                f"| {_pct(base and base.get('peak_mem_mb'), r.get('peak_mem_mb'))} |"
            )
    return "\n".join(lines)


def inference_table(records: list[dict]) -> str:
    return _seed_table(records, "inference", "num_batches", "num_batches", "latency per batch")


def training_table(records: list[dict]) -> str:
    return _seed_table(records, "training", "num_training_steps", "num_training_steps", "time per step")


def predict_table(records: list[dict]) -> str:
    """End to end rows (bench/test_bench_predict.py): videos/s from the median, and where the time went."""
    rows = [r for r in records if r.get("table") == "predict" and r.get("time_s")]
    lines = ["| benchmark | dtype | videos | decode workers | s per pass (median ± IQR) | videos/s | waiting for "
             "decoded videos | preprocess | model |", "|---|---|---|---|---|---|---|---|---|"]
    pct = lambda v: f"{100 * v:.0f}%" if v is not None else "-"  # noqa: E731
    for r in rows:
        iqr = f" ± {r['iqr_s']:.2f}" if r.get("iqr_s") is not None and (r.get("rounds") or 0) > 1 else ""
        lines.append(
            f"| {r.get('path', r['name'])} | {r.get('dtype', '-')} | {r.get('videos', '-')} | "
            f"{r.get('workers', '-')} | {r['time_s']:.2f}{iqr} | {r.get('videos', 0) / r['time_s']:.2f} | "
            f"{pct(r.get('waiting_share'))} | {pct(r.get('preprocess_share'))} | {pct(r.get('model_share'))} |"
        )
    return "\n".join(lines)


def _case(r: dict) -> str:
    """An op row's op and variant, or another row's benchmark name."""
    if r.get("op"):
        return r["op"] + (f" {r['variant']}" if r.get("variant") else "")
    return r["name"].split("[")[0].removeprefix("test_")


def ops_table(records: list[dict]) -> str:
    rows = [r for r in records if r.get("time_s") and r.get("table") not in ("inference", "training", "predict")]
    lines = ["| op / benchmark | implementation / path | what ran | dtype | batch | mode | ms (median ± IQR) | TFLOP/s "
             "| GB/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r.get("op") or r["name"].split("[")[0], r.get("variant") or "",
                                         r.get("dtype", ""), r.get("batch") or 0, r.get("mode", ""))):
        tflops = f"{r['tflops']:.1f}" if r.get("tflops") else "-"
        gbps = f"{r['gbps']:.1f}" if r.get("gbps") else "-"
        lines.append(
            f"| {_case(r)} | {r.get('implementation') or r.get('path', '-')} | {r.get('runs', '-')} "
            f"| {r.get('dtype', '-')} | {r.get('batch', '-')} | {r.get('mode', '-')} | {_timing(r)} | {tflops} "
            f"| {gbps} |"
        )
    return "\n".join(lines)


def write_plots(records: list[dict], out_dir: Path) -> list[Path]:
    """Latency and peak memory vs batch size per backend (inference), one line per backend and dtype."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    # interpreted Triton rows are correctness runs, not speed: they stay out of the plots
    rows = [r for r in records if r.get("table") == "inference" and r.get("time_s") and not r.get("interpreted")]
    written = []
    for key, label, scale in (("time_s", "latency per batch (ms)", 1e3), ("peak_mem_mb", "peak memory (MB)", 1.0)):
        series: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for r in rows:
            if r.get(key) is not None:
                series[f"{r['path']} {r['dtype']}"].append((r["batch"], r[key] * scale))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        values = []
        for name, points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
            values += [p[1] for p in points]
        ax.set_xticks(sorted({r["batch"] for r in rows}))
        if min(values) > 0 and max(values) / min(values) > 50:
            ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.set_title(f"ViViT inference: {label}\n{rows[0].get('device', '?')}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        path = out_dir / ("inference_latency.png" if key == "time_s" else "inference_memory.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def write_report(out_dir: Path, benchmark_json: Path | None, measurements_md: str | None) -> Path:
    parts = ["# vivit_kernels benchmark report", ""]
    if benchmark_json and benchmark_json.exists():
        records, machine = load_benchmarks(benchmark_json)
        devices = sorted({r.get("device", "?") for r in records})
        parts += [f"Timed on: {', '.join(devices)} ({machine.get('cpu', {}).get('brand_raw', '')}, "
                  f"python {machine.get('python_version', '?')}). Speedup and memory saving are against "
                  "transformers' eager model, as the seed defines them (base / value - 1).", ""]
        parts += ["## Inference", "", inference_table(records), "", "## Training", "", training_table(records), "",
                  "## Per op", "", ops_table(records), ""]
        if any(r.get("table") == "predict" for r in records):
            parts += ["## End to end: predict over a set of videos", "", predict_table(records), "",
                      "A large share waiting for decoded videos means decoding limits the run (more --workers, or "
                      "a faster decoder); a large model share means the GPU does.", ""]
        plots = write_plots(records, out_dir)
        for path in plots:
            parts.append(f"![{path.stem}]({path.name})")
        if not any(p.stem == "inference_memory" for p in plots):
            parts += ["", "No memory plot: peak memory is torch.cuda.max_memory_allocated, which only a GPU reports."]
        if any(r.get("interpreted") for r in records):
            parts += ["", "Rows marked \"interpreter: correctness run\" ran our Triton kernels in the Triton "
                      "interpreter (no GPU here): they show the kernels run, not how fast; they are left out of the "
                      "plots and speedups."]
        parts.append("")
        parts += implementations_section()
    if measurements_md:
        parts += ["## Device-independent measurements (FakeTensorMode counts; exact on any machine)", "",
                  measurements_md, ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(parts), encoding="utf-8")
    return report


def implementations_section() -> list[str]:
    """What attn="auto" chose on this device (the implementation cache), with each candidate's median time."""
    import torch

    from ..auto import cache

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = cache.entry_rows(device)
    if not rows:
        return ["## Implementations chosen by attn=\"auto\"", "", f"No choices stored for {device} in "
                f"{cache.cache_path()} (run `vivit-kernels tune`).", ""]
    return ["## Implementations chosen by attn=\"auto\"", "",
            f"From {cache.cache_path()} (median ms of each candidate as measured when the choice was made):", "",
            cache.format_entries(rows), ""]


def _bench_dir() -> Path:
    root = Path(__file__).resolve().parents[2]
    bench = root / "bench"
    if not (bench / "bench_utils.py").exists():
        raise SystemExit(f"no bench/ suite next to the package ({bench}): run from a source checkout")
    return bench


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="bench_results", help="output directory (default: bench_results)")
    parser.add_argument("--skip-timing", action="store_true", help="only the device-independent measurements")
    parser.add_argument("--skip-measure", action="store_true", help="only the timed pytest-benchmark suite")
    parser.add_argument("-k", dest="select", help="pytest -k expression to select benchmarks")
    parser.add_argument("--measure-batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--measure-config", default="vivit-b-16x2", help="preset for the measurements")
    parser.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES.values()),
                        help="dtype of the measurements")


def run_cli(args: argparse.Namespace) -> int:
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    measurements_md = None
    if not args.skip_measure:
        from .measure import format_markdown, measure_all

        dtype = getattr(torch, args.dtype)
        rows = measure_all(args.measure_config, tuple(args.measure_batches), dtype,
                           progress=lambda msg: print(f"[measure] {msg}", file=sys.stderr, flush=True))
        (out / "measurements.json").write_text(json.dumps([r.to_json() for r in rows], indent=1), encoding="utf-8")
        measurements_md = (f"`vivit-kernels bench --skip-timing --measure-config {args.measure_config} --dtype "
                           f"{args.dtype}`, {args.measure_config}, {args.dtype}:\n\n" + format_markdown(rows))
        if args.measure_config == "vivit-b-16x2":  # the paper's four models exist at ViViT-B/16x2
            from .measure import format_models_markdown, measure_models

            models = measure_models(1, dtype, progress=lambda m: print(f"[measure] {m}", file=sys.stderr, flush=True))
            measurements_md += ("\n\n### The paper's four models\n\n`vivit_kernels.tools.measure.measure_models()`:\n\n"
                                + format_models_markdown(models))
            from .costs import TRAINING_MODES, format_training_markdown, measure_training

            training = [measure_training(mode, path, batch=8, dtype=dtype, autocast=autocast)
                        for path in ("triton", "transformers-eager") for autocast in (False, True)
                        for mode in TRAINING_MODES]
            measurements_md += ("\n\n### What a training step costs by what trains\n\n"
                                "`vivit_kernels.tools.costs.measure_training()`:\n\n"
                                + format_training_markdown(training))
        (out / "measurements.md").write_text(measurements_md + "\n", encoding="utf-8")
        print(measurements_md)
    benchmark_json = None
    if not args.skip_timing:
        benchmark_json = out / "benchmark.json"
        cmd = [sys.executable, "-m", "pytest", str(_bench_dir()), "-p", "no:cacheprovider", "--benchmark-enable",
               f"--benchmark-json={benchmark_json}", "-v", "--benchmark-columns=mean,stddev,rounds"]
        if args.select:
            cmd += ["-k", args.select]
        print("[bench] " + " ".join(cmd), file=sys.stderr, flush=True)
        from ..auto.cache import CACHE_ENV, cache_path

        # the suite's attn="auto" rows use (and fill) the user's implementation cache, which the report then shows
        code = subprocess.call(cmd, env={**os.environ, CACHE_ENV: str(cache_path().parent)})
        if code not in (0, 5):
            print(f"[bench] pytest exited with {code}", file=sys.stderr)
            return code
    report = write_report(out, benchmark_json, measurements_md)
    print(f"[bench] report: {report}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vivit-kernels bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
