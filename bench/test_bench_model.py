"""The seed's two tables, for every backend: whole-model inference and training, with peak memory.

GPU: google/vivit-b-16x2-kinetics400's architecture (random weights), inference over 20 batches at batch
sizes 1, 2, 4, 8 in fp32 / fp16 / bf16, training 100 steps at batch 1 (forward, backward, AdamW step); ours
(triton: our kernels behind transformers' modules; auto: per op the fastest of ours / cuBLAS / cuDNN / SDPA
measured on this GPU) and transformers' (eager, sdpa, and torch.compile of sdpa;
what our attn="eager" / "sdpa" run) side by side. CPU: the tiny
preset, a couple of batches / steps, so the suite runs everywhere (CPU timings, not GPU claims).

    vivit-kernels bench          # runs this with pytest-benchmark and writes the report
"""

from __future__ import annotations

import pytest
import torch

from vivit_kernels import VivitConfig
from vivit_kernels.presets import image_hw
from vivit_kernels.tools.acceptance import peak_memory_mb, seed_step
from vivit_kernels.tools.model_paths import PATHS, build_model

from bench_utils import DEVICE, ON_GPU, params, run, torch_dtype

CONFIG = "vivit-b-16x2" if ON_GPU else "tiny"
BATCHES = [1, 2, 4, 8] if ON_GPU else [1, 2]
INFER_ROUNDS = 20 if ON_GPU else 2
TRAIN_STEPS = 100 if ON_GPU else 2


def _model(path: str, dtype: torch.dtype) -> torch.nn.Module:
    return build_model(path, CONFIG, dtype, DEVICE)  # the acceptance run builds its rows the same way


def _pixels(batch: int, dtype: torch.dtype) -> torch.Tensor:
    cfg = VivitConfig.from_preset(CONFIG)
    h, w = image_hw(cfg)
    return torch.randn(batch, cfg.num_frames, 3, h, w, device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"] if ON_GPU else ["fp32"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("path", params(PATHS, ours={"triton"}))
def test_inference(benchmark, path, batch, dtype):
    if path.endswith("compiled") and not ON_GPU:
        pytest.skip("torch.compile of transformers on the CPU is not a comparison anyone runs")
    step = seed_step(_model(path, torch_dtype(dtype)), "inference", _pixels(batch, torch_dtype(dtype)))
    step()  # compile / autotune outside the timing
    peak = peak_memory_mb(step, DEVICE)
    run(benchmark, step, rounds=INFER_ROUNDS, warmup=2 if ON_GPU else 0, table="inference", path=path,
        batch=batch, dtype=dtype, num_batches=INFER_ROUNDS, peak_mem_mb=peak, config=CONFIG)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"] if ON_GPU else ["fp32"])
@pytest.mark.parametrize("path", params(PATHS, ours={"triton"}))
def test_training(benchmark, path, dtype):
    if path.endswith("compiled") and not ON_GPU:
        pytest.skip("torch.compile of transformers on the CPU is not a comparison anyone runs")
    step = seed_step(_model(path, torch_dtype(dtype)), "training", _pixels(1, torch_dtype(dtype)))
    step()
    peak = peak_memory_mb(step, DEVICE)
    run(benchmark, step, rounds=TRAIN_STEPS, warmup=2 if ON_GPU else 0, table="training", path=path, batch=1,
        dtype=dtype, num_training_steps=TRAIN_STEPS, peak_mem_mb=peak, config=CONFIG)
