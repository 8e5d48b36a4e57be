"""tests/: the test device, the Triton interpreter switch, markers and the launch-device check live in the
repository's root conftest.py (shared with bench/).

On a GPU the suite launches each case's first shipped kernel config instead of autotuning every call
(VIVIT_KERNELS_AUTOTUNE=0): every shipped config is tested on its own (tests/test_cuda.py, the *_config tests),
and the autotuned launch by tests/test_autotune.py and tests/test_cuda.py. That keeps a cold run on one GPU to a
few minutes of kernel compilation instead of compiling and timing every config of every test shape. Set
VIVIT_KERNELS_AUTOTUNE=1 to autotune everywhere.
"""

import os

os.environ.setdefault("VIVIT_KERNELS_AUTOTUNE", "0")


import pytest  # noqa: E402


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
