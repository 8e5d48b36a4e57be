"""vivit_kernels._compat: what differs between the oldest supported versions (torch 2.11 / Triton 3.6 /
transformers 5.17) and the newest. scripts/check_oldest.sh runs these under the oldest versions too."""

from __future__ import annotations

import types

import pytest
import torch

from helpers import DEVICE
from vivit_kernels import _compat
from vivit_kernels.ops import _triton


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
        for k in range(0, K, BLOCK):
            n += 1
        tl.store(OUT, n)

    out = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    count_blocks[(1,)](out, 100, BLOCK=32)
    assert out.item() == 4


def test_compilations_are_counted_and_the_previous_listener_kept():
    pytest.importorskip("triton.knobs")
    from triton import knobs

    seen = []
    previous = knobs.compilation.listener
    knobs.compilation.listener = lambda **kw: seen.append(kw["cache_hit"])
    try:
        times = types.SimpleNamespace(ir_initialization=250_000, lowering_stages=[("ttir", 500_000), ("ptx", 250_000)],
                                      store_results=0)
        with _compat.recording_compilations() as record:
            for hit in (False, True):
                knobs.compilation.listener(src=None, metadata={}, metadata_group={}, times=times, cache_hit=hit)
        assert record.supported and (record.compiled, record.cache_hits) == (1, 1)
        assert record.seconds == pytest.approx(1.0)  # microseconds, summed
        assert seen == [False, True]  # the listener that was there still hears every compilation
        assert knobs.compilation.listener is not None and knobs.compilation.listener.__name__ == "<lambda>"
    finally:
        knobs.compilation.listener = previous


def test_activation_checkpointing_names_work_on_every_supported_transformers():
    import vivit_kernels as vk

    model = vk.VivitForVideoClassification("tiny").train()
    assert not model.is_activation_checkpointing
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing and all(layer.gradient_checkpointing for layer in model.vivit.layers)
    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing
    assert _compat.training_checkpointing_argument() in ("activation_checkpointing", "gradient_checkpointing")
