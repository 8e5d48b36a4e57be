"""read_video (PyAV) on videos the tests encode, the whole decode -> preprocess -> classify path."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from vivit_kernels.processing import VideoProcessor
from vivit_kernels.video import read_video, sample_frame_indices

from helpers import DEVICE
from videos import bar_position, frame_pattern, write_video

av = pytest.importorskip("av")


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("v") / "clip.mp4", n_frames=60, gop=12)


def expected_positions(indices, h=48, w=64):
    return [bar_position(frame_pattern(int(i), h, w)) for i in indices]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_sampled_frames_are_the_right_frames(video, seed):
    """The seed example's sampling (a random window), found by seeking, decoded to the right frames."""
    frames = read_video(video, num_frames=8, frame_sample_rate=3, seed=seed)
    assert frames.shape == (8, 48, 64, 3) and frames.dtype == np.uint8
    indices = sample_frame_indices(8, 3, 60, np.random.default_rng(seed))
    got = [bar_position(f) for f in frames]
    assert all(abs(a - b) <= 2 for a, b in zip(got, expected_positions(indices), strict=True)), (got, indices)


def test_multi_clip_sampling(video):
    from vivit_kernels.video import _uniform_clips

    clips = read_video(video, num_frames=4, frame_sample_rate=2, clips=4)
    assert clips.shape == (4, 4, 48, 64, 3)
    windows = _uniform_clips(4, 2, 60, 4)
    assert [w[0] for w in windows] == sorted({w[0] for w in windows})  # four windows, in order, no overlap
    for clip, indices in zip(clips, windows, strict=True):
        got = [bar_position(f) for f in clip]
        assert all(abs(a - b) <= 2 for a, b in zip(got, expected_positions(indices), strict=True)), (got, indices)


def test_short_video_repeats_frames_and_says_so(tmp_path):
    short = write_video(tmp_path / "short.mp4", n_frames=5)
    with pytest.warns(UserWarning, match=r"short\.mp4: 5 frames decode, fewer than the 8 a clip needs") as record:
        frames = read_video(short, num_frames=8)
    assert frames.shape == (8, 48, 64, 3) and len(record) == 1
    positions = [bar_position(f) for f in frames]
    assert sorted(set(positions)) == sorted({bar_position(f) for f in read_video(short, num_frames=5)})


@pytest.mark.parametrize("make, exc, match", [
    (lambda p: p / "missing.mp4", FileNotFoundError, "no video file"),
    (lambda p: (p / "junk.mp4").write_bytes(b"not a video") and p / "junk.mp4", ValueError, "is not a readable video"),
])
def test_unreadable_files(tmp_path, make, exc, match):
    with pytest.raises(exc, match=match):
        read_video(make(tmp_path))


@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])
@pytest.mark.parametrize("keep", [0.33, 0.7])
def test_truncated_faststart_file_gives_the_frames_that_decode(tmp_path, codec, keep):
    """Index at the front, frames cut off: the clip is sampled from the frames that decode, with a warning naming
    the file (a decoder error inside the cut used to escape as a raw PyAV error)."""
    whole = write_video(tmp_path / "whole.mp4", n_frames=150, codec=codec, gop=12, faststart=True)
    data = open(whole, "rb").read()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.warns(UserWarning, match=r"cut\.mp4: only the first (\d+) of 150 frames decode") as record:
        frames = read_video(cut, num_frames=8, seed=0)
    decodable = int(__import__("re").search(r"first (\d+) of", str(record[0].message)).group(1))
    assert 0 < decodable < 150 and frames.shape == (8, 48, 64, 3)
    indices = sample_frame_indices(8, 1, decodable, np.random.default_rng(0))
    got = [bar_position(f) for f in frames]
    assert all(abs(a - b) <= 2 for a, b in zip(got, expected_positions(indices), strict=True)), (got, indices)


def test_a_file_cut_inside_its_header_is_a_clear_error(tmp_path):
    whole = write_video(tmp_path / "whole.mp4", n_frames=40, faststart=True)
    cut = tmp_path / "head.mp4"
    cut.write_bytes(open(whole, "rb").read()[:300])
    with pytest.raises(ValueError, match=r"head\.mp4"):
        read_video(cut, num_frames=8)


def test_an_image_named_mp4_warns_that_it_is_a_single_frame(tmp_path):
    from PIL import Image

    image = tmp_path / "photo.mp4"
    Image.fromarray(frame_pattern(3, 48, 64)).save(image, format="PNG")
    with pytest.warns(
        UserWarning, match=r"photo\.mp4 holds a single frame \(an image\?\): the clip repeats it 8 times"
    ):
        frames = read_video(image, num_frames=8)
    assert frames.shape == (8, 48, 64, 3) and all((f == frames[0]).all() for f in frames)


def test_decode_preprocess_forward(video):
    import vivit_kernels as vk

    frames = read_video(video, num_frames=8, seed=0)  # decoding (PyAV) is CPU work; the rest runs on the test device
    processor = VideoProcessor.for_image_size(32, 32)
    pixel_values = processor(frames, device=DEVICE)["pixel_values"]
    assert pixel_values.shape == (1, 8, 3, 32, 32)
    model = vk.VivitForVideoClassification(vk.VivitConfig.from_preset("tiny", num_frames=8)).to(DEVICE).eval()
    with torch.no_grad():
        assert model(pixel_values).logits.shape == (1, 10)


def test_classify_cli(video, tmp_path):
    import vivit_kernels as vk

    cfg = vk.VivitConfig.from_preset("tiny", num_frames=8, id2label={i: f"action_{i}" for i in range(10)})
    vk.VivitForVideoClassification(cfg).save_pretrained(tmp_path)
    out = subprocess.run([sys.executable, "-m", "vivit_kernels", "classify", video, "--model", str(tmp_path),
                          "--top-k", "3", "--clips", "2", "--crops", "3"],
                         capture_output=True, text=True, timeout=600, env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert "6 view(s) of 8 frames" in out.stdout
    assert sum("action_" in line for line in out.stdout.splitlines()) == 3
