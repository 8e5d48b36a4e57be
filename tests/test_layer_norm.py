"""Triton LayerNorm against F.layer_norm, forward and every gradient, on the test device."""

from __future__ import annotations

import pytest
import torch

from vivit_kernels.ops import layer_norm as ln_mod
from vivit_kernels.ops.layer_norm import layer_norm, layer_norm_ref

from helpers import DEVICE, check_against_reference

pytestmark = pytest.mark.triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def inputs(rows, features, batch=2):
    x = (torch.randn(batch, rows, features) * 2 + 0.5).to(DEVICE).requires_grad_()
    w = (1 + 0.1 * torch.randn(features)).to(DEVICE).requires_grad_()
    b = (0.1 * torch.randn(features)).to(DEVICE).requires_grad_()
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, features", [(1, 32), (17, 96), (197, 768), (3137, 64), (5, 1)], ids=lambda v: str(v))
def test_layer_norm(rows, features, dtype):
    x, w, b = inputs(rows, features)
    check_against_reference(lambda x, w, b: layer_norm(x, w, b, 1e-6), lambda x, w, b: layer_norm_ref(x, w, b, 1e-6),
                            (x, w, b), dtype, name="layer_norm")


@pytest.mark.parametrize("block_c", sorted(ln_mod.LN_CONFIGS))
def test_every_shipped_config(block_c, monkeypatch):
    """Each shipped (BLOCK_C, warps, rows per program), forced, with a width just above the next smaller
    block and a row count that leaves partial row tiles in the forward and the backward."""
    features = block_c // 2 + 3 if block_c > 64 else 33
    assert ln_mod.block_c_for(features) == block_c
    warps, rows = ln_mod.LN_CONFIGS[block_c]
    monkeypatch.setattr(ln_mod, "INTERPRET", False)  # config_for() then returns the GPU config unchanged
    assert ln_mod.config_for(features).kwargs == dict(BLOCK_C=block_c, BLOCK_R=rows)
    x, w, b = inputs(70, features, batch=1)
    check_against_reference(lambda x, w, b: layer_norm(x, w, b, 1e-5), lambda x, w, b: layer_norm_ref(x, w, b, 1e-5),
                            (x, w, b), torch.float32, name=f"BLOCK_C={block_c}")


def test_eps_is_used():
    x = 0.01 * torch.randn(1, 4, 8, device=DEVICE)  # variance ~1e-4: eps 1e-2 changes the result, 1e-6 barely
    w, b = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)
    small, large = layer_norm(x, w, b, 1e-6), layer_norm(x, w, b, 1e-2)
    assert (small - large).abs().max() > 0.5
    assert torch.allclose(small, layer_norm_ref(x, w, b, 1e-6), atol=1e-4)
    assert torch.allclose(large, layer_norm_ref(x, w, b, 1e-2), atol=1e-5)


def test_opcheck():
    x, w, b = inputs(9, 48)
    torch.library.opcheck(torch.ops.vivit_kernels.layer_norm_fwd.default, (x, w, b, 1e-6))


def test_bad_inputs():
    with torch.device(DEVICE):
        _bad_inputs()


def _bad_inputs():
    with pytest.raises(ValueError, match=r"weight must be \(8,\), got \(7,\)"):
        layer_norm(torch.randn(2, 8), torch.ones(7), torch.zeros(8), 1e-6)
    with pytest.raises(ValueError, match="at most 8192 features"):
        layer_norm(torch.randn(2, 9000), torch.ones(9000), torch.zeros(9000), 1e-6)
    with pytest.raises(ValueError, match="bias is torch.float16"):
        layer_norm(torch.randn(2, 8), torch.ones(8), torch.zeros(8).half(), 1e-6)
