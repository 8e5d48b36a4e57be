"""Throughput of `predict --ray` (1 and 2 decode workers, a local Ray instance) against plain `predict` (0, 1 and 2
decoding workers) on one generated collection, on the CPU: docs/predict.md's table. A timing of this machine.

    python bench/ray_throughput.py [--videos 48]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import vivit_kernels as vk  # noqa: E402
from vivit_kernels import predict as vp  # noqa: E402
from vivit_kernels.ray_predict import predict_on_ray  # noqa: E402

from videos import write_video  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=48)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    (root / "v").mkdir()
    for i in range(args.videos):
        write_video(root / "v" / f"{i:03d}.mp4", n_frames=96, height=480, width=640, codec="libx264")
    torch.manual_seed(0)
    vk.VivitForVideoClassification(vk.VivitConfig.from_preset("tiny", num_labels=6)).save_pretrained(root / "model")
    options = dict(device="cpu", batch_size=8, progress=False, clips=4, crops=3)
    runs = {}
    for workers in (0, 1, 2):
        start = time.perf_counter()
        summary = vp.predict_to_file([root / "v"], root / "model", root / f"plain{workers}.jsonl", workers=workers,
                                     **options)
        runs[f"predict --workers {workers}"] = (time.perf_counter() - start, summary["this_run"].summary())
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    for workers in (1, 2):
        start = time.perf_counter()
        summary = predict_on_ray([root / "v"], root / "model", root / f"ray{workers}.jsonl", decode_workers=workers,
                                 **options)
        runs[f"predict --ray --decode-workers {workers}"] = (time.perf_counter() - start,
                                                              summary["this_run"].summary())
    for name, (seconds, text) in runs.items():
        print(f"{name}: {args.videos / seconds:.2f} videos/s ({seconds:.1f} s)\n    {text}")


if __name__ == "__main__":
    main()
