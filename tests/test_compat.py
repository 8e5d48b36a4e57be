"""vivit_kernels._compat: what differs between the oldest supported versions (torch 2.11 / Triton 3.6 /
transformers 5.17) and the newest. scripts/check_versions.sh runs these under the oldest and the newest versions too."""

from __future__ import annotations

import pytest
import torch

from vivit_kernels import _compat
from vivit_kernels.ops import _triton

from helpers import DEVICE


@pytest.mark.parametrize("text, expected", [("3.6.0", (3, 6, 0)), ("2.11.0+cu130", (2, 11, 0)),
                                            ("5.17.0.dev0", (5, 17, 0)), ("3.8.0rc1", (3, 8, 0)), ("3.10", (3, 10))])
def test_version_tuple(text, expected):
    assert _compat.version_tuple(text) == expected


@pytest.mark.skipif(not _triton.HAS_TRITON, reason="needs Triton")
@pytest.mark.triton
def test_a_loop_over_an_integer_argument_runs():
    """Triton 3.6's interpreter failed on `range(0, K, BLOCK)` over an int argument with numpy 2.4
    (_compat.fix_interpreter_scalars); compiled on a GPU the same kernel checks the loop count."""
    import triton
    import triton.language as tl

    @triton.jit
    def count_blocks(OUT, K, BLOCK: tl.constexpr):
        n = 0
        for _ in range(0, K, BLOCK):
            n += 1
        tl.store(OUT, n)

    out = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    count_blocks[(1,)](out, 100, BLOCK=32)
    assert out.item() == 4


_COMPILE_TWICE = """
import tempfile, os
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
import triton, triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vivit_kernels import _compat

@triton.jit
def scale(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < N) * 2.0, mask=offs < N)

heard = []
knobs.compilation.listener = lambda **kw: heard.append(kw["cache_hit"])  # the user's own listener
src = ASTSource(scale, {"X": "*fp32", "Y": "*fp32", "N": "i32", "BLOCK": "constexpr"}, {"BLOCK": 128})
with _compat.recording_compilations() as record:
    for _ in range(2):  # the second time from Triton's cache
        triton.compile(src, target=GPUTarget("cuda", 90, 32))
print(record.supported, record.compiled, record.cache_hits, record.seconds > 0, heard,
      knobs.compilation.listener.__name__)
"""


def test_real_compilations_are_counted_and_the_previous_listener_kept(tmp_path):
    """Two real Triton compilations of one kernel for sm_90 (no GPU needed), the second a cache hit: counted,
    timed, and the listener that was there still hears both and is put back."""
    pytest.importorskip("triton.knobs")
    import os
    import subprocess
    import sys

    script = tmp_path / "compile_twice.py"  # Triton reads a kernel's source from its file
    script.write_text(_COMPILE_TWICE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["True", "1", "1", "True", "[False,", "True]", "<lambda>"], out.stdout


def test_activation_checkpointing_names_work_on_every_supported_transformers():
    import vivit_kernels as vk

    model = vk.VivitForVideoClassification("tiny").train()
    assert not model.is_activation_checkpointing
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing and all(layer.gradient_checkpointing for layer in model.vivit.layers)
    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing
    assert _compat.training_checkpointing_argument() in ("activation_checkpointing", "gradient_checkpointing")
