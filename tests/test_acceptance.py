"""`vivit-kernels acceptance`: the dry run end to end (every section written), and the run's rules: a wrong
kernel fails it with op, shape and dtype; a spent budget skips and lists; an interrupted run keeps its results."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from vivit_kernels.ops.layer_norm import layer_norm
from vivit_kernels.ops.registry import OPS, Implementation, backend_ops
from vivit_kernels.tools import acceptance
from vivit_kernels.tools.acceptance import checks
from vivit_kernels.tools.model_paths import COMPILED, TIMED


def test_dry_run_writes_every_section(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vivit_kernels", "acceptance", "--dry-run", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[acceptance] PASS" in out.stderr
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["format"] == acceptance.FORMAT and data["finished"] and data["dry_run"]
    assert data["command"] == f"vivit-kernels acceptance --dry-run --out {tmp_path}"
    env = data["environment"]
    assert {"torch", "triton", "transformers", "vivit_kernels"} <= set(env["versions"])
    assert env["peak_matmul_tflops"] > 0 and env["peak_copy_gbps"] > 0 and env["peak_matmul"].startswith("fp32")
    cases = {(c["case"].split(" (")[0], c["dtype"]) for c in data["correctness"]}
    for op in backend_ops():  # every op a layer runs, each variant of its sample inputs, from the registry
        for variant in OPS[op].variants:
            name = op if variant is None else f"{op} {variant}"
            assert {(name, "bf16"), (name, "fp32")} <= cases, name
    assert {("model", "bf16"), ("model", "fp32")} <= cases
    assert {("bias_gelu_fast", "fp32"), ("bias_gelu_fast", "bf16"), ("preprocess_video", "fp32")} <= cases  # extension
    assert all(c["ok"] for c in data["correctness"]) and not data["failures"]
    ours = {(r["op"], r["mode"]) for r in data["ops"] if r["implementation"] == "triton" and r["checked"]}
    assert ours == {(op, mode) for op in backend_ops() for mode in ("infer", "train")}
    assert all(r["interpreted"] for r in data["ops"] if r["implementation"] == "triton")  # never a speed figure
    assert any(r["implementation"] == "auto" and r["ms"] for r in data["ops"])
    seed = {(r["table"], r["path"]) for r in data["seed"]}
    # a LoRA step beside the full one, and PEFT on transformers' sdpa model
    lora = {("training", "triton+lora"), ("training", "auto+lora"), ("training", "transformers-sdpa+lora")}
    merge = {("inference", "triton+merge"), ("inference", "auto+merge")}  # token merging beside the full model
    assert seed == {(t, p) for t in ("inference", "training") for p in TIMED} | lora | merge
    merged = [r for r in data["seed"] if r["path"].endswith("+merge")]
    assert all(r["merge"] == "fraction-10" for r in merged)  # the schedule is recorded, and shown in the report
    # every op a layer runs (the per-op section asks auto for each), and the whole model
    assert {a["op"] for a in data["auto"]} == set(backend_ops()) | {"model"}
    assert any(s["name"] == COMPILED for s in data["skipped"])  # said, not silently left out
    # decoding beside the model: PyAV always, each other decoder measured or its absence said; frames compared
    decoders = {r["decoder"]: r for r in data["decode"]}
    assert decoders["pyav"]["clips_per_s"] > 0 and decoders["pyav"]["max_diff_to_pyav"] == 0
    skipped = {s["name"] for s in data["skipped"]}
    assert all(d in decoders or f"decode {d}" in skipped for d in ("torchcodec", "cuda"))
    assert "torchcodec" not in decoders or decoders["torchcodec"]["max_diff_to_pyav"] == 0
    # where to cut between the decoding workers and the device: both cuts measured per source size
    (cut,) = data["cut"]
    assert cut["views"]["worker_ms"] > 0 and cut["device"]["worker_ms"] == 0 and cut["device"]["device_ms"] > 0
    width, height = map(int, cut["source"].split("x"))
    assert cut["views"]["pcie_bytes"] == cut["frames"] * 3 * 224 * 224  # the crop, uint8
    assert cut["device"]["pcie_bytes"] == cut["frames"] * height * width * 3  # the decoded frames, uint8
    (row,) = data["predict"]  # predict end to end: videos/s, where the time went, and what limited it
    assert row["videos"] == 2 and row["time_s"] > 0 and 0 < row["waiting_share"] + row["model_share"] <= 1.0
    assert row["limited_by"] in ("decoding", "model")
    report = (tmp_path / "report.md").read_text()
    assert "### Decoding one clip, per decoder" in report and "Bottleneck: " in report and "### Where to cut" in report
    for heading in ("## 1. Environment", "## 2. Correctness", "## 3. Per-op speed", "## 4. The seed's tables",
                    "### End to end: predict over generated videos", "## 5. attn=\"auto\" choices", "## Skipped"):
        assert heading in report, heading
    assert "**Dry run**" in report and "verdict: **PASS" in report and "triton+merge (fraction-10)" in report
    assert (tmp_path / "inference_latency.png").exists()

    # the README section is made from the newest GPU run under bench/results (a dry run is never one)
    root = tmp_path / "results"
    (root / "dry").mkdir(parents=True)
    (root / "dry" / "results.json").write_text(json.dumps(data))
    assert acceptance.newest_results(root) is None and "No GPU run" in acceptance.readme_section(root)
    for name, date in (("nvidia-old-2026-01-01", "2026-01-01"), ("nvidia-new-2026-12-01", "2026-12-01")):
        gpu = dict(data, dry_run=False, date=date, environment=dict(env, device=name.rsplit("-", 3)[0].upper()))
        (root / name).mkdir()
        (root / name / "results.json").write_text(json.dumps(gpu))
    section = acceptance.readme_section(root)
    assert "Measured on **NVIDIA-NEW** on 2026-12-01" in section and "nvidia-new-2026-12-01/report.md" in section
    assert "| num_batches | batch_size | dtype | path |" in section


def test_the_readme_section_is_generated_from_bench_results():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert acceptance.update_readme(root / "README.md", root / "bench" / "results", check=True), \
        "README.md's 'Measured on a GPU' section is out of date: run `python bench/update_readme.py`"


def _run(tmp_path, device, budget_s=600.0, sections=("correctness",)):
    return acceptance.Acceptance(tmp_path, acceptance.DRY_PLAN, device, budget_s, True, "test", sections)


def test_a_wrong_kernel_fails_the_run_naming_op_shape_and_dtype(tmp_path, device, monkeypatch):
    ours = OPS["layer_norm"].implementations["triton"]
    wrong = Implementation("triton", lambda x, w, b, eps: layer_norm(x, w, b, eps) * 1.01, ours.available, ours.runs)
    monkeypatch.setitem(OPS["layer_norm"].implementations, "triton", wrong)  # our kernel, 1% off
    monkeypatch.setattr(checks, "_checked_ops", lambda: ["layer_norm"])
    run = _run(tmp_path, device)
    assert acceptance.execute(run) == 1
    failed = [f for f in run.data["failures"] if f["name"] == "layer_norm"]
    assert {f["dtype"] for f in failed} == {"bf16", "fp32"} and {f["shape"] for f in failed} == {"1x67x64, 64, 64"}
    assert "max abs error" in failed[0]["error"]
    report = (tmp_path / "report.md").read_text()
    assert "verdict: **FAIL" in report and "| layer_norm | 1x67x64, 64, 64 | fp32 | **FAIL** |" in report
    # the model runs the registry's implementation too: its checks catch the same wrong kernel
    assert [c["ok"] for c in run.data["correctness"] if c["case"].startswith("model")] == [False, False]


def test_a_spent_budget_skips_and_lists_what_it_skipped(tmp_path, device):
    run = _run(tmp_path, device, budget_s=1e-3, sections=acceptance.SECTIONS)
    assert acceptance.execute(run) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert not data["correctness"] and not data["seed"]
    skipped = {s["section"] for s in data["skipped"]}
    assert {"environment", "correctness", "ops", "seed"} <= skipped
    assert all(
        "time budget" in s["why"] for s in data["skipped"] if s["section"] != "seed" or "compile" not in s["name"]
    )
    assert "## Skipped" in (tmp_path / "report.md").read_text()


def test_an_interrupted_run_keeps_what_it_measured(tmp_path, device, monkeypatch):
    def interrupted(run):
        raise KeyboardInterrupt

    monkeypatch.setattr(checks, "section_ops", interrupted)
    monkeypatch.setattr(checks, "_checked_ops", lambda: [])  # correctness: the model
    run = _run(tmp_path, device, sections=("correctness", "ops"))
    with pytest.raises(KeyboardInterrupt):
        acceptance.execute(run)
    data = json.loads((tmp_path / "results.json").read_text())
    assert not data["finished"] and data["correctness"]  # the model's checks ran and were kept
    assert "INCOMPLETE" in (tmp_path / "report.md").read_text()


@pytest.mark.cpu_only
def test_without_a_gpu_the_command_says_to_use_dry_run(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = subprocess.run([sys.executable, "-m", "vivit_kernels", "acceptance", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert "has none" in out.stderr and "--dry-run" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = subprocess.run([sys.executable, "-m", "vivit_kernels", "acceptance", "--dry-run", "--budget-s", "0"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "--budget-s must be positive" in out.stderr


def test_a_step_out_of_gpu_memory_is_listed_as_skipped_not_failed(tmp_path, device):
    run = _run(tmp_path, device)

    def too_big():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    assert run.step("ops", "attention train reference", "speed", too_big) is None
    assert not run.data["failures"]
    assert run.data["skipped"] == [{"section": "ops", "name": "attention train reference",
                                    "why": "out of GPU memory on this device: OutOfMemoryError: CUDA out of memory. "
                                           "Tried to allocate 80.00 GiB"}]
