"""bias_gelu_fast (C++/CUDA extension) against gelu_fast(x + bias), forward and backward, on the test device."""

from __future__ import annotations

import pytest
import torch

from vivit_kernels.ops import _extension
from vivit_kernels.ops.gelu import bias_gelu_fast, bias_gelu_fast_ref

from helpers import DEVICE, check_against_reference

needs_ext = pytest.mark.skipif(not _extension.available(), reason=f"extension not built: {_extension.error()}")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 64), (17, 96), (2, 197, 3072)], ids=str)
def test_bias_gelu_fast(shape, dtype):
    x = torch.randn(*shape).to(DEVICE).requires_grad_()
    b = (0.5 * torch.randn(shape[-1])).to(DEVICE).requires_grad_()
    check_against_reference(bias_gelu_fast, bias_gelu_fast_ref, (x, b), dtype, name="bias_gelu_fast")


@needs_ext
def test_runs_the_extension_op():
    x, b = torch.randn(4, 8, device=DEVICE), torch.randn(8, device=DEVICE)
    assert torch.equal(bias_gelu_fast(x, b), torch.ops.vivit_kernels.bias_gelu_fast(x, b))


@needs_ext
def test_opcheck():
    x = torch.randn(5, 16, device=DEVICE, requires_grad=True)
    b = torch.randn(16, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.vivit_kernels.bias_gelu_fast.default, (x, b))


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"bias must be \(8,\)"):
        bias_gelu_fast(torch.randn(4, 8), torch.randn(7))
    with pytest.raises(ValueError, match="share a float dtype"):
        bias_gelu_fast(torch.randn(4, 8), torch.randn(8).half())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_equals_cpu(dtype):
    x = torch.randn(64, 3072).to(dtype)
    b = torch.randn(3072).to(dtype)
    g = torch.randn(64, 3072).to(dtype)
    cpu = torch.ops.vivit_kernels.bias_gelu_fast(x, b)
    gpu = torch.ops.vivit_kernels.bias_gelu_fast(x.to(DEVICE), b.to(DEVICE))
    assert (gpu.cpu().float() - cpu.float()).abs().max() <= (1e-5 if dtype == torch.float32 else 1e-2)
    dcpu = torch.ops.vivit_kernels.bias_gelu_fast_backward(g, x, b)
    dgpu = torch.ops.vivit_kernels.bias_gelu_fast_backward(g.to(DEVICE), x.to(DEVICE), b.to(DEVICE))
    assert (dgpu.cpu().float() - dcpu.float()).abs().max() <= (1e-5 if dtype == torch.float32 else 1e-2)
