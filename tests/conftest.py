"""tests/: the test device, the Triton interpreter switch, markers and the launch-device check live in the
repository's root conftest.py (shared with bench/). Here: the compile gate's compilations, started in the background
when a test that reads them (the ``gate_results`` fixture) is collected, and those tests ordered last
(tests/compile_gate.py says why).

On a GPU the suite launches each case's first shipped kernel config instead of autotuning every call
(VIVIT_KERNELS_AUTOTUNE=0): every shipped config is tested on its own (tests/test_cuda.py, the *_config tests),
and the autotuned launch by tests/test_autotune.py and tests/test_cuda.py. That keeps a cold run on one GPU to a
few minutes of kernel compilation instead of compiling and timing every config of every test shape. Set
VIVIT_KERNELS_AUTOTUNE=1 to autotune everywhere.
"""

import os

os.environ.setdefault("VIVIT_KERNELS_AUTOTUNE", "0")


import pytest  # noqa: E402
from compile_gate import BackgroundGate  # noqa: E402

GATE_FIXTURE = "gate_results"
_GATE = pytest.StashKey[BackgroundGate]()


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: only a run that keeps a gate test compiles the gate
def pytest_collection_modifyitems(config, items):
    gate = [item for item in items if GATE_FIXTURE in getattr(item, "fixturenames", ())]
    if not gate or config.option.collectonly:
        return
    items[:] = [item for item in items if GATE_FIXTURE not in getattr(item, "fixturenames", ())] + gate
    config.stash[_GATE] = BackgroundGate(jobs=max(1, min(16, os.cpu_count() or 1)))


def pytest_unconfigure(config):
    gate = config.stash.get(_GATE, None)
    if gate is not None:
        gate.stop()


@pytest.fixture(scope="session")
def gate_results(request):
    """Every shipped config's AotResult for sm_80 and sm_90 (compiled since the session started)."""
    gate = request.config.stash.get(_GATE, None)
    if gate is None:  # collected without the hook above (a plugin reordering or re-collecting)
        gate = request.config.stash[_GATE] = BackgroundGate(jobs=max(1, min(16, os.cpu_count() or 1)))
    return gate.results()


@pytest.fixture
def private_implementation_cache(tmp_path, monkeypatch):
    """attn="auto" with its own cache file, no pins from the environment, empty memory and fresh log lines."""
    from vivit_kernels._log import forget_said
    from vivit_kernels.auto import cache, choose

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(choose.PINS_ENV, raising=False)
    choose.forget()
    forget_said()
    yield
    choose.forget()
