"""vivit-kernels timeline: every window of a video scored as the model scores that window's clip, streamed
(about one window of frames held at a time), with its JSON and plot; windows in frames or seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import vivit_kernels as vk
from vivit_kernels.processing import VideoProcessor
from vivit_kernels.timeline import parse_span, plot_timeline, timeline
from vivit_kernels.video import _uniform_clips, window_frames

from helpers import DEVICE
from videos import write_video

pytest.importorskip("av")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    config = vk.VivitConfig.from_preset("tiny", num_frames=8, id2label={i: f"action_{i}" for i in range(10)})
    vk.VivitForVideoClassification(config).save_pretrained(directory)
    return str(directory)


def _all_frames(path: str) -> np.ndarray:
    import av

    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_every_window_is_scored_as_its_clip(tmp_path, checkpoint):
    """100 frames, windows of 16 every 8: 11 windows, each the model's softmax on the 8 frames spread over it."""
    path = write_video(tmp_path / "v.mp4", n_frames=100)
    result = timeline(path, checkpoint, window=16, stride="8", top_k=10, batch_size=3, device=DEVICE, attn="eager")
    assert (result["frames"], result["window_frames"], result["stride_frames"]) == (100, 16, 8)
    assert [(w["start_frame"], w["end_frame"]) for w in result["windows"]] == [(8 * k, 8 * k + 16) for k in range(11)]
    assert result["windows"][1]["start_s"] == pytest.approx(8 / 25)
    # a window samples as read_clips samples a video of the window's length (its middle clip), the same indices
    assert window_frames(0, 16, 8).tolist() == [0, 2, 4, 6, 9, 11, 13, 15] == _uniform_clips(8, 2, 16, 1)[0].tolist()
    frames = _all_frames(path)
    model = vk.VivitForVideoClassification.from_pretrained(checkpoint, attn="eager").to(DEVICE).eval()
    processor = VideoProcessor.for_model(model.config, checkpoint)
    for k, window in enumerate(result["windows"]):
        clip = torch.as_tensor(frames[window_frames(8 * k, 8 * k + 16, 8)])[None]
        with torch.no_grad():
            probs = model(processor(clip)["pixel_values"].to(DEVICE)).logits.softmax(-1)[0]
        expected = {model.config.id2label[i]: p for i, p in enumerate(probs.tolist())}
        for label, score in zip(window["labels"], window["scores"], strict=True):
            assert score == pytest.approx(expected[label], abs=1e-5), (k, label)
    assert len(result["series"]) == 5 and all(len(s) == 11 for s in result["series"].values())
    assert result["frames_held_max"] <= 16 + 1  # streamed: about one window of frames, not the video


def test_a_video_shorter_than_a_window_is_one_window_over_all_its_frames(tmp_path, checkpoint):
    path = write_video(tmp_path / "short.mp4", n_frames=12)
    result = timeline(path, checkpoint, window=40, device=DEVICE, attn="eager")
    assert [(w["start_frame"], w["end_frame"]) for w in result["windows"]] == [(0, 12)]


@pytest.mark.cpu_only
def test_window_and_stride_in_seconds_and_bad_values():
    assert parse_span("0.64s", 25.0, "window") == 16
    assert parse_span(64, None, "window") == 64
    with pytest.raises(ValueError, match="window must be frames \\(64\\) or seconds \\(2.5s\\), got 'abc'"):
        parse_span("abc", 25.0, "window")
    with pytest.raises(ValueError, match="in seconds, but the video has no frame rate"):
        parse_span("2s", None, "stride")
    with pytest.raises(ValueError, match="at least one frame"):
        parse_span("0.001s", 25.0, "stride")


def test_command_writes_the_json_and_the_plot(tmp_path, checkpoint):
    path = write_video(tmp_path / "walk.mp4", n_frames=60)
    out, png = tmp_path / "t.json", tmp_path / "t.png"
    run = subprocess.run([sys.executable, "-m", "vivit_kernels", "timeline", path, "--model", checkpoint,
                          "--window", "0.8s", "--stride", "0.4s", "--out", str(out), "--plot", str(png),
                          "--device", DEVICE.type, "--no-progress", "--merge", "1"],
                         capture_output=True, text=True, timeout=600, env={**os.environ})
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert (result["window_frames"], result["stride_frames"], len(result["windows"])) == (20, 10, 5)
    assert result["merge"] == 1  # token merging applies (one token per layer merged)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "5 windows of 20 frames every 10" in run.stdout


@pytest.mark.cpu_only
def test_plot_without_a_frame_rate(tmp_path):
    result = {"path": "x.mp4", "fps": None, "window_frames": 4, "stride_frames": 4,
              "windows": [{"start_frame": 4 * k, "end_frame": 4 * k + 4} for k in range(3)],
              "series": {"a": [0.1, 0.5, 0.9], "b": [0.9, 0.5, 0.1]}}
    plot_timeline(result, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 5_000
