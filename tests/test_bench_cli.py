"""`vivit-kernels bench` end to end on this machine's CPU (tiny shapes): measurements, timed suite, report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vivit_kernels.tools import bench_report


def test_bench_command_writes_the_report(tmp_path):
    pytest.importorskip("matplotlib")
    out = subprocess.run(
        [sys.executable, "-m", "vivit_kernels", "bench", "--out", str(tmp_path), "--measure-config", "tiny",
         "--measure-batches", "1", "2", "-k", "test_inference and (eager or triton or sdpa or auto)"],
        capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[measure] measuring triton batch 2" in out.stderr  # progress
    for name in ("measurements.json", "measurements.md", "benchmark.json", "report.md", "inference_latency.png"):
        assert (tmp_path / name).exists(), name
    report = (tmp_path / "report.md").read_text()
    assert "## Inference" in report
    rows = [line for line in report.splitlines() if line.startswith("| 2 | 2 | fp32 |")]  # num_batches, batch, dtype
    assert {line.split("|")[4].strip() for line in rows} >= {
        "triton",
        "auto",
        "transformers-eager",
        "transformers-sdpa",
    }
    chosen = report.split('## Implementations chosen by attn="auto"')[1].split("\n## ")[0]
    assert "| op | shapes | mode |" in chosen and "| mlp |" in chosen  # what auto chose
    assert "CPU" in report  # says which machine timed it
    assert "interpreter: correctness run" in report and "No memory plot" in report
    measured = json.loads((tmp_path / "measurements.json").read_text())
    assert {m["path"] for m in measured} >= {"triton", "transformers-sdpa"}


def test_tables_follow_the_seed_convention():
    """Speedup and memory saving are base / value - 1, against transformers' eager model; times are medians with
    their inter-quartile range; interpreted rows are correctness runs without a speed figure."""
    records = [
        dict(table="inference", path="transformers-eager", dtype="fp16", batch=1, time_s=0.02, iqr_s=0.001,
             rounds=5, peak_mem_mb=700.0, num_batches=20),
        dict(table="inference", path="triton", dtype="fp16", batch=1, time_s=0.01, iqr_s=0.0005, rounds=5,
             peak_mem_mb=350.0, num_batches=20),
        dict(table="inference", path="auto", dtype="fp16", batch=1, time_s=3.0, rounds=1, interpreted=True,
             num_batches=20),
    ]
    table = bench_report.inference_table(records)
    assert "| 20 | 1 | fp16 | triton | 10.00 ± 0.50 | 100.0 | 350.0 | 100.0 |" in table
    assert "| 20 | 1 | fp16 | transformers-eager | 20.00 ± 1.00 | 0.0 | 700.0 | 0.0 |" in table
    assert "| 20 | 1 | fp16 | auto | interpreter: correctness run | - | - | - |" in table


def test_the_predict_row_shows_videos_per_second_and_where_the_time_went():
    records = [dict(table="predict", path="predict vivit-b-16x2", name="test_predict_end_to_end", dtype="bfloat16",
                    videos=16, workers=8, time_s=2.0, iqr_s=0.1, rounds=3, waiting_share=0.6, preprocess_share=0.05,
                    model_share=0.3)]
    table = bench_report.predict_table(records)
    assert "| predict vivit-b-16x2 | bfloat16 | 16 | 8 | 2.00 ± 0.10 | 8.00 | 60% | 5% | 30% |" in table
    assert "predict" not in bench_report.ops_table(records)
