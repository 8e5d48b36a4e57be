"""The mechanism that makes this suite a GPU user's correctness check: one test device for every test, Triton
launches checked against it, and kernel tests that skip (with a reason saying how to run them) where Triton
kernels cannot run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import DEVICE

ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


def test_helpers_and_fixture_agree(device):
    """tests/helpers.py and the ``device`` fixture read the one decision of the root conftest.py."""
    assert DEVICE == device and os.environ["VIVIT_KERNELS_TEST_DEVICE"] == device.type


@pytest.mark.triton
def test_every_launch_is_recorded_with_its_device(launch_records):
    from vivit_kernels.ops.layer_norm import layer_norm

    records = launch_records
    x = torch.randn(3, 8, device=DEVICE)
    layer_norm(x, torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE), 1e-6)
    assert ("_layer_norm_fwd_kernel", DEVICE.type) in records


def _inner(pytester, test_code: str, *args: str, env: dict | None = None):
    pytester.makeconftest(ROOT_CONFTEST.read_text())
    pytester.makepyfile(test_inner=test_code)
    for k, v in (env or {}).items():
        pytester._monkeypatch.setenv(k, v)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs", *args)


def test_a_launch_off_the_test_device_fails_the_test(pytester):
    """A kernel that received a tensor on another device fails its test, naming the kernel and the device."""
    result = _inner(pytester, """
import pytest, torch
from vivit_kernels.ops.layer_norm import layer_norm

def test_launches_off_device(launch_records):
    launch_records.append(("_some_kernel", "meta"))  # what the launch hook records for a meta tensor

@pytest.mark.triton
def test_launches_on_device(device):
    x = torch.randn(3, 8, device=device)
    layer_norm(x, torch.ones(8, device=device), torch.zeros(8, device=device), 1e-6)

@pytest.mark.cpu_only
def test_cpu_only_is_exempt(launch_records):
    launch_records.append(("_some_kernel", "meta"))
""")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*Triton kernels received tensors off the test device*_some_kernel <- meta*"])


def test_kernel_tests_skip_without_gpu_and_interpreter(pytester):
    """--device cpu with TRITON_INTERPRET=0: kernel tests skip, saying how to run them; other tests run."""
    result = _inner(pytester, """
import pytest

@pytest.mark.triton
def test_kernel():
    raise AssertionError("must not run")

def test_plain(device):
    assert device.type == "cpu"
""", "--device", "cpu", env={"TRITON_INTERPRET": "0"})
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(
        ["*Triton kernels need a CUDA GPU or the Triton interpreter*without TRITON_INTERPRET=0*"]
    )


def test_cuda_tests_skip_off_cuda_and_device_option(pytester):
    result = _inner(pytester, """
import pytest

@pytest.mark.cuda
def test_gpu():
    raise AssertionError("must not run")

def test_device(device):
    assert device.type == "cpu"
""", "--device", "cpu")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*needs the CUDA test device (test device here: cpu)*"])
    if not torch.cuda.is_available():
        bad = _inner(pytester, "def test_x():\n    pass\n", "--device", "cuda")
        assert bad.ret != 0
        bad.stderr.fnmatch_lines(["*--device cuda was requested, but torch.cuda.is_available() is False*"])
