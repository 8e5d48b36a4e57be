"""End to end: `predict` over a generated set of videos (decoding in DataLoader workers, preprocessing, the model),
in videos/s, with the shares of time spent waiting for decoded videos, preprocessing and in the model, so a GPU
run shows whether decoding or the model limits us. ViViT-B/16x2 in bf16 with attn="auto" on a GPU (random
weights: the speed is the weights'-independent part); the small preset in fp32 on the CPU.

    pytest bench/test_bench_predict.py --benchmark-enable
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from bench_utils import DEVICE, ON_GPU, run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from videos import write_video  # noqa: E402

VIDEOS = 16 if ON_GPU else 4
FRAMES, HEIGHT, WIDTH = (64, 240, 320) if ON_GPU else (16, 72, 96)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_videos")
    return [write_video(root / f"{i:03d}.mp4", n_frames=FRAMES, height=HEIGHT, width=WIDTH) for i in range(VIDEOS)]


def test_predict_end_to_end(benchmark, videos):
    import vivit_kernels as vk
    from vivit_kernels.data import default_workers
    from vivit_kernels.predict import load_predictor

    torch.manual_seed(0)
    preset, dtype = ("vivit-b-16x2", torch.bfloat16) if ON_GPU else ("small", torch.float32)
    model = vk.VivitForVideoClassification(preset)
    workers = default_workers()
    predictor = load_predictor(model, batch_size=8 if ON_GPU else 2, workers=workers, device=DEVICE, dtype=dtype,
                               attn="auto" if ON_GPU else "sdpa")
    run(
        benchmark,
        lambda: list(predictor.run(videos)),
        rounds=3,
        warmup=1,
        table="predict",
        path=f"predict {preset}",
        dtype=str(dtype).removeprefix("torch."),
        videos=len(videos),
        workers=workers,
    )
    t = predictor.timings
    assert t.failed == 0 and t.videos % len(videos) == 0
    benchmark.extra_info.update(waiting_share=t.waiting_s / t.wall_s, preprocess_share=t.preprocess_s / t.wall_s,
                                model_share=t.model_s / t.wall_s, decode_s_per_video=t.decode_s / t.videos)
