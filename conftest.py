"""The one place that decides where the test suite runs (tests/ and bench/ both use it).

- The test device is CUDA when a GPU is present (the Triton kernels are compiled), otherwise the CPU with the
  Triton kernels in the Triton interpreter. ``--device cuda|cpu`` or ``VIVIT_KERNELS_TEST_DEVICE`` overrides it.
- On the CPU the interpreter is switched on here (``TRITON_INTERPRET=1``), before any kernel is defined, unless
  the environment already says otherwise: with ``TRITON_INTERPRET=0`` and no GPU, tests that launch Triton
  kernels (marked ``triton``) are skipped with a reason that says how to run them.
- ``cuda``-marked tests (ViViT-B shapes, CUDA graphs, inductor, the extension's CUDA ops) run only on CUDA.
- Every Triton launch during a test is recorded (``vivit_kernels.ops._triton.LAUNCH_HOOKS``, the
  ``launch_records`` fixture); a test whose kernels received a tensor on another device than the test device
  fails, unless it is marked ``cpu_only`` (it tests a CPU path on purpose and says so).
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE_ENV = "VIVIT_KERNELS_TEST_DEVICE"
pytest_plugins = ("pytester",)  # tests/test_test_device.py runs inner sessions with this conftest


def pytest_addoption(parser):
    parser.addoption(
        "--device", choices=("auto", "cuda", "cpu"), default=None,
        help=f"where tests put their tensors (default: ${DEVICE_ENV} or auto = cuda when available, else cpu with "
             "the Triton interpreter)",
    )


def _decide_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda was requested, but torch.cuda.is_available() is False here")
    if requested not in ("cuda", "cpu"):
        raise pytest.UsageError(f"{DEVICE_ENV} must be auto, cuda or cpu, got {requested!r}")
    return requested


def pytest_configure(config):
    requested = config.getoption("--device") or os.environ.get(DEVICE_ENV, "auto")
    device = _decide_device(requested)
    os.environ[DEVICE_ENV] = device  # read by tests/helpers.py, bench/bench_utils.py and subprocesses
    # attn="auto" choices go to a cache file of the session, not the user's (unless the caller chose one)
    import tempfile

    os.environ.setdefault("VIVIT_KERNELS_CACHE_DIR", tempfile.mkdtemp(prefix="vivit_kernels_implementations_"))
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit runs (test modules import later)
    config.addinivalue_line("markers", "cuda: needs an NVIDIA GPU (runs only when the test device is CUDA)")
    config.addinivalue_line("markers", "triton: launches Triton kernels (on CUDA, or on the CPU in the interpreter)")
    config.addinivalue_line("markers", "cpu_only: tests a CPU-only path on purpose (its tensors stay on the CPU)")
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_skip_reason(device: str) -> str | None:
    """Why Triton kernels cannot run on the test device here, or None when they can."""
    if device == "cuda" or _interpreting():
        return None
    return ("Triton kernels need a CUDA GPU or the Triton interpreter: this machine has no GPU and "
            "TRITON_INTERPRET=0 is set. Run `python -m pytest` without TRITON_INTERPRET=0 (the suite then "
            "interprets the kernels on the CPU), or on a machine with an NVIDIA GPU.")


def pytest_report_header(config):
    device = os.environ[DEVICE_ENV]
    how = "compiled Triton kernels" if device == "cuda" else (
        "Triton kernels in the Triton interpreter" if _interpreting() else "Triton kernel tests skipped")
    name = f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""
    return f"vivit_kernels test device: {device}{name}, {how}"


def pytest_collection_modifyitems(config, items):
    device = os.environ[DEVICE_ENV]
    skip_cuda = pytest.mark.skip(reason=f"needs the CUDA test device (test device here: {device})")
    reason = triton_skip_reason(device)
    skip_triton = pytest.mark.skip(reason=reason) if reason else None
    for item in items:
        if "cuda" in item.keywords and device != "cuda":
            item.add_marker(skip_cuda)
        elif skip_triton is not None and "triton" in item.keywords:
            item.add_marker(skip_triton)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The test device: every op, model, bench and integration test puts its tensors here."""
    return torch.device(os.environ[DEVICE_ENV])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def launch_records():
    """(kernel name, device type) of every tensor handed to a Triton kernel during this test."""
    from vivit_kernels.ops import _triton

    records: list[tuple[str, str]] = []

    def record(kernel: str, args: tuple) -> None:
        records.extend((kernel, t.device.type) for t in args if isinstance(t, torch.Tensor))

    _triton.LAUNCH_HOOKS.append(record)
    try:
        yield records
    finally:
        _triton.LAUNCH_HOOKS.remove(record)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Fail a test whose Triton kernels received a tensor on another device than the test device."""
    result = yield
    records = item.funcargs.get("launch_records") if hasattr(item, "funcargs") else None
    if records and "cpu_only" not in item.keywords:
        device = os.environ[DEVICE_ENV]
        off = sorted({f"{kernel} <- {dev}" for kernel, dev in records if dev != device})
        if off:
            pytest.fail(f"Triton kernels received tensors off the test device {device}: {off}", pytrace=False)
    return result
