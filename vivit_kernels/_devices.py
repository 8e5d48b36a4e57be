"""Device helpers every job shares: wait for a device's queued work, name a device in words, the defaults of a run.
Imports torch only when called (the command line's parser imports this module's users without torch)."""

from __future__ import annotations

import os
import platform

__all__ = ["synchronize", "device_name", "run_defaults"]


def synchronize(device) -> None:
    """Wait until ``device``'s queued kernels have run (a GPU; nothing to wait for on the CPU)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device) -> str:
    """"NVIDIA H200" for a GPU, "CPU (x86_64, 2 cores)" for the CPU."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_defaults(device=None, dtype=None, attn: str | None = None):
    """(device, dtype, attn) of every command and job unless told otherwise: the GPU when there is one, bf16 and
    our kernels (attn="auto") there; float32 and transformers' sdpa attention on the CPU (where our Triton kernels
    only run in the interpreter, a correctness check). A CUDA device where there is none is a clear error."""
    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: there is no CUDA device here (torch.cuda.is_available() is False); "
                         "use the CPU")
    gpu = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if gpu and torch.cuda.is_bf16_supported() else torch.float32)
    return device, dtype, attn or ("auto" if gpu else "sdpa")
