"""Video preprocessing throughput: 32 frames of 360x640 into 224x224 (transformers' defaults), ours (the C++
CPU op, and the CUDA op where a GPU exists) vs transformers' VivitImageProcessor, side by side in one run.

    pytest bench/test_bench_preprocess.py --benchmark-enable
"""

from __future__ import annotations

import pytest
import torch

from vivit_kernels.processing import VideoProcessor

from bench_utils import run

FRAMES, HEIGHT, WIDTH = 32, 360, 640
OUT_BYTES = FRAMES * 3 * 224 * 224 * 4
IN_BYTES = FRAMES * HEIGHT * WIDTH * 3


@pytest.fixture(scope="module")
def video():
    return torch.randint(
        0, 256, (1, FRAMES, HEIGHT, WIDTH, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )


def test_transformers_processor(benchmark, video):
    transformers = pytest.importorskip("transformers")
    processor = transformers.VivitImageProcessor()
    frames = list(video[0].numpy())
    run(benchmark, lambda: processor(frames, return_tensors="pt"), nbytes=IN_BYTES + OUT_BYTES, rounds=5,
        path="transformers VivitImageProcessor", device_kind="cpu")


def test_ours_cpu(benchmark, video):
    processor = VideoProcessor()
    run(benchmark, lambda: processor(video), nbytes=IN_BYTES + OUT_BYTES, rounds=20, path="vivit_kernels (CPU op)",
        device_kind="cpu")


@pytest.mark.cuda
def test_ours_cuda(benchmark, video):
    processor = VideoProcessor()
    on_gpu = video.cuda()
    run(
        benchmark,
        lambda: processor(on_gpu),
        nbytes=IN_BYTES + OUT_BYTES,
        rounds=50,
        path="vivit_kernels (CUDA op)",
        device_kind="cuda",
    )
