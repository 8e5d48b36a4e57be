"""The command line, run as a user runs it (a subprocess), on the tiny preset."""

from __future__ import annotations

import os
import subprocess
import sys



def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "vivit_kernels", *args], capture_output=True, text=True, env=full_env, timeout=600
    )


def test_info():
    out = run("info")
    assert out.returncode == 0, out.stderr
    for word in ("torch", "triton", "eager", "sdpa", "triton"):
        assert word in out.stdout


def test_demo_runs_every_available_backend():
    out = run("demo", "--preset", "tiny", "--repeats", "1")
    assert out.returncode == 0, out.stderr
    assert "RANDOM weights" in out.stdout
    rows = {line.split()[0]: line for line in out.stdout.splitlines() if line.split()[:1] in (["eager"], ["sdpa"], ["triton"], ["auto"])}
    assert set(rows) == {"eager", "sdpa", "triton", "auto"}, out.stdout  # triton in the interpreter here
    for name in ("sdpa", "triton", "auto"):
        assert float(rows[name].split()[2]) < 1e-4, out.stdout
    assert "not a speed figure" in rows["triton"]


def test_demo_with_checkpoint(tmp_path):
    import vivit_kernels as vk

    vk.VivitForVideoClassification("tiny").save_pretrained(tmp_path)
    out = run("demo", "--model", str(tmp_path), "--repeats", "1")
    assert out.returncode == 0, out.stderr
    assert f"model: {tmp_path}" in out.stdout


def test_bad_command():
    out = run("frobnicate")
    assert out.returncode == 2
    assert "invalid choice" in out.stderr
