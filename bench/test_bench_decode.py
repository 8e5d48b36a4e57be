"""Video file to ``pixel_values``: the seed example's path (``read_video_pyav`` + ``VivitImageProcessor``),
transformers' current one (torchcodec + ``VivitVideoProcessor``, where both are installed) and ours
(``VideoProcessor.process_file``), one evaluation clip of a generated H.264 video, side by side in one run; each
checked against the seed's pixels first. The four-size table of docs/video.md comes from
``python -m vivit_kernels.tools.decode_bench`` (interleaved rounds on one core); this suite keeps the three paths
running in the default test command on a small video.

    pytest bench/test_bench_decode.py --benchmark-enable
"""

from __future__ import annotations

import numpy as np
import pytest

from bench_utils import ON_GPU, run

pytest.importorskip("av")
WIDTH, HEIGHT, SECONDS = (1280, 720, 10) if ON_GPU else (320, 240, 3)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    from vivit_kernels.tools.decode_bench import write_bench_video

    return write_bench_video(tmp_path_factory.mktemp("decode") / "clip.mp4", WIDTH, HEIGHT, seconds=SECONDS)


@pytest.fixture(scope="module")
def seed_pixels(video):
    from vivit_kernels.tools.decode_bench import seed_path

    return seed_path(video)


@pytest.mark.parametrize("path", ["seed", "transformers", "ours"])
def test_video_to_pixel_values(benchmark, video, seed_pixels, path):
    from vivit_kernels.tools import decode_bench

    if path == "transformers":
        try:
            import torchcodec.decoders  # noqa: F401
            import torchvision  # noqa: F401
        except Exception as e:  # noqa: BLE001 - not installed, or FFmpeg's libraries missing
            pytest.skip(f"transformers' path needs torchcodec and torchvision ({type(e).__name__}: {e})")
    paths = {"seed": decode_bench.seed_path, "transformers": decode_bench.transformers_path, "ours": decode_bench.ours}
    fn = paths[path]
    pixels = fn(video)
    # ours is exact to the seed's VivitImageProcessor; transformers' torch resize is not (docs/video.md)
    assert pixels.shape == seed_pixels.shape
    assert np.abs(pixels - seed_pixels).max() <= (1e-6 if path != "transformers" else 0.05)
    run(benchmark, lambda: fn(video), rounds=5, warmup=1, table="decode", path=path, device_kind="cpu",
        video=f"{WIDTH}x{HEIGHT} H.264, {SECONDS} s at 30 fps")
