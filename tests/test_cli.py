"""The command line, run as a user runs it (a subprocess), on the tiny preset."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


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
    rows = {
        line.split()[0]: line
        for line in out.stdout.splitlines()
        if line.split()[:1] in (["eager"], ["sdpa"], ["triton"], ["auto"])
    }
    assert set(rows) == {"eager", "sdpa", "triton", "auto"}, out.stdout  # triton in the interpreter here
    for name in ("sdpa", "triton", "auto"):
        assert float(rows[name].split()[2]) < 1e-4, out.stdout
    assert "not a speed figure" in rows["triton"]


def test_demo_with_token_merging_adds_a_merged_row_per_backend():
    out = run("demo", "--preset", "tiny", "--repeats", "1", "--merge", "2")
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: float(line.split()[2]) for line in out.stdout.splitlines()
            if line.split()[:1] and line.split()[0].endswith("+merge")}
    assert set(rows) == {"eager+merge", "sdpa+merge", "triton+merge", "auto+merge"}, out.stdout
    assert rows["eager+merge"] > 1e-4, out.stdout  # merging changed the logits (its approximation) ...
    assert all(abs(d - rows["eager+merge"]) < 1e-4 for d in rows.values()), out.stdout  # ... the same on each
    assert "token merging 2" in out.stdout


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


# ------------------------------------------------------------------------------------------------
# ordinary mistakes: one line, a non-zero exit, no traceback (--debug shows it)
# ------------------------------------------------------------------------------------------------
def _one_line_error(out, *fragments):
    assert out.returncode != 0, out.stdout
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines and all(f in lines[-1] for f in fragments), out.stderr
    return lines


def test_classify_missing_file_is_one_line_before_any_model(tmp_path):
    out = run("classify", str(tmp_path / "missing.mp4"))
    lines = _one_line_error(out, "vivit-kernels classify: error: no video file", "missing.mp4")
    assert len(lines) == 1 and out.stdout == ""  # nothing built, nothing printed


@pytest.mark.parametrize(
    "content, fragment",
    [(b"", "is not a readable video"), (b"just text", "is not a readable video")],
    ids=["empty", "text"],
)
def test_classify_unreadable_files(tmp_path, content, fragment):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(content)
    lines = _one_line_error(run("classify", str(bad), "--preset", "tiny"), fragment, str(bad))
    assert len(lines) == 1


@pytest.mark.parametrize("args, fragment", [
    (("--clips", "0"), "argument --clips: must be at least 1, got 0"),
    (("--top-k", "0"), "argument --top-k: must be at least 1, got 0"),
    (("--preset", "huge"), "argument --preset: invalid choice: 'huge'"),
])
def test_bad_flag_values(tmp_path, args, fragment):
    out = run("classify", str(tmp_path / "x.mp4"), *args)
    _one_line_error(out, fragment)


def test_cuda_without_a_gpu_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    video = tmp_path / "v.mp4"
    video.write_bytes(b"x")
    lines = _one_line_error(
        run("classify", str(video), "--device", "cuda"), "--device cuda: there is no CUDA device here"
    )
    assert len(lines) == 1


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path, where):
    """--debug before the command or after it (without it, no traceback: test_classify_missing_file_is_one_line...)."""
    args = ["classify", str(tmp_path / "missing.mp4")]
    out = run(*(["--debug", *args] if where == "before" else [*args, "--debug"]))
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_version_and_help():
    from vivit_kernels import __version__

    assert run("--version").stdout.strip() == f"vivit_kernels {__version__}"
    helptext = run("--help").stdout + run("demo", "--help").stdout
    assert "``" not in helptext
    assert "{small,tiny,vivit-b-16x2,vivit-l-16x2}" in helptext


def test_compile_report_lists_the_kernels_for_an_unknown_name():
    out = run("compile-report", "--kernel", "nonexistent")
    assert out.returncode == 2 and "the kernels are: attn_bwd_dkdv" in out.stderr and "gemm" in out.stderr


def test_info_says_what_each_command_does_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = run("info", env={"TRITON_INTERPRET": "0"})
    assert "demo, classify  switch the Triton interpreter on themselves" in out.stdout
    assert "(now: 0)" in out.stdout


def test_warnings_are_one_line_without_our_source_path(tmp_path):
    from PIL import Image

    from videos import frame_pattern

    image = tmp_path / "photo.mp4"
    Image.fromarray(frame_pattern(3, 48, 64)).save(image, format="PNG")
    out = run("classify", str(image), "--preset", "tiny")
    assert out.returncode == 0, out.stderr
    warned = [line for line in out.stderr.splitlines() if "photo.mp4" in line]
    assert warned == [f"vivit-kernels classify: warning: {image} holds a single frame (an image?): the clip repeats "
                      "it 4 times"], out.stderr
    assert "UserWarning" not in out.stderr and "cli.py" not in out.stderr


def test_the_parser_imports_neither_torch_nor_triton():
    """--help and --version stay instant, and the interpreter is decided before anything defines a kernel."""
    code = ("import sys, vivit_kernels.cli as cli; cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'triton', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.cpu_only
def test_demo_switches_the_interpreter_on_itself_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("with a GPU the demo compiles the kernels instead")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user's shell has it
    out = subprocess.run([sys.executable, "-m", "vivit_kernels", "demo", "--preset", "tiny"], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("triton "))
    assert "Triton interpreter on CPU" in row and float(row.split()[2]) < 1e-4, row  # agrees with eager
