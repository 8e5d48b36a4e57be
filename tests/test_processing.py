"""read_video (PyAV) on videos the tests encode, the whole decode -> preprocess -> classify path."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from vivit_kernels.processing import VideoProcessor, views_first
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


def test_skipping_unwanted_non_reference_frames_gives_the_same_frames(tmp_path, monkeypatch):
    """H.264 with B frames: read_clips leaves the non-reference frames no clip wants undecoded; every clip's frames
    are still exactly those of decoding every frame in order, found in one pass (no fallback decode from the
    start)."""
    from vivit_kernels import video
    from vivit_kernels.video import _frames, _uniform_clips, read_clips

    path = str(write_video(tmp_path / "b.mp4", n_frames=90, height=64, width=96, codec="libx264", gop=48))
    with av.open(path) as container:
        stream = container.streams.video[0]
        every = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        container.seek(0)
        kept = sum(1 for _ in _frames(container, stream, [], lambda pts: False))
    assert len(every) == 90 and kept < len(every) - 20, "the encoder made no non-reference frames to skip"
    passes = []
    monkeypatch.setattr(video, "_frames", lambda *a, **k: passes.append(len(a) + len(k)) or _frames(*a, **k))
    for clips, rng in [(1, None), (3, None), (1, np.random.default_rng(5)), (1, np.random.default_rng(9))]:
        state = None if rng is None else rng.bit_generator.state
        got = read_clips(path, 8, 3, clips, rng).frames
        if rng is None:
            windows = _uniform_clips(8, 3, 90, clips)
        else:
            rng.bit_generator.state = state
            windows = [sample_frame_indices(8, 3, 90, rng)]
        want = np.stack([np.stack([every[i] for i in w]) for w in windows])
        assert got.shape == want.shape and np.array_equal(got, want), (clips, windows)
        assert passes == [4], passes  # one pass over the stream, skipping
        passes.clear()


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


def _torchcodec_or_skip():
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or RuntimeError without FFmpeg's shared libraries
        pytest.skip(f"torchcodec is not usable here ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                    "pip install torchcodec and apt-get install ffmpeg to run this test")


@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])
def test_torchcodec_decodes_the_frames_pyav_decodes(tmp_path, codec):
    """--decode torchcodec: the same clips, bit for bit, as PyAV's, for every sampling (middle window, spread
    windows, random window)."""
    _torchcodec_or_skip()
    from vivit_kernels.video import read_clips

    path = str(write_video(tmp_path / "v.mp4", n_frames=75, height=64, width=96, codec=codec, gop=30))
    for clips, seed in [(1, None), (4, None), (1, 3)]:
        ours = read_clips(path, 8, 2, clips, None if seed is None else np.random.default_rng(seed), decode="pyav")
        theirs = read_clips(path, 8, 2, clips, None if seed is None else np.random.default_rng(seed),
                            decode="torchcodec")
        assert isinstance(theirs.frames, np.ndarray) and theirs.frames.shape == ours.frames.shape
        assert np.array_equal(theirs.frames, ours.frames), (clips, seed)
        assert theirs.video_frames == ours.video_frames == 75
        assert theirs.duration_s == pytest.approx(ours.duration_s)
    # with the data path's transform (each frame to its three crops as it is decoded): the same views as PyAV's
    transform = VideoProcessor.for_image_size(32, 32, spatial_crops=3).views_per_frame()
    ours = read_clips(path, 8, 2, 2, decode="pyav", transform=transform).frames
    theirs = read_clips(path, 8, 2, 2, decode="torchcodec", transform=transform).frames
    assert theirs.shape == ours.shape == (2, 8, 3, 3, 32, 32) and torch.equal(theirs, ours)


def test_decoder_names_and_errors():
    from vivit_kernels.video import read_clips, resolve_decoder

    assert resolve_decoder("auto") == "pyav"
    with pytest.raises(ValueError, match="decode must be one of auto, pyav, torchcodec, cuda, got 'nvdec'"):
        resolve_decoder("nvdec")
    with pytest.raises(ValueError, match="decode must be one of"):
        read_clips("whatever.mp4", 8, decode="gpu")
    if not torch.cuda.is_available():
        with pytest.raises((ValueError, ImportError), match="--decode cuda"):
            resolve_decoder("cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="NVDEC decoding needs an NVIDIA GPU")
def test_nvdec_frames_are_pyavs_up_to_colour_conversion(tmp_path):
    """--decode cuda: the clip comes back on the GPU, the frames PyAV decodes up to NVDEC's colour conversion
    (measured here: mean and worst difference in uint8 levels; docs/video.md quotes the acceptance run's)."""
    _torchcodec_or_skip()
    from vivit_kernels.video import read_clips

    path = str(write_video(tmp_path / "v.mp4", n_frames=75, height=128, width=192, codec="libx264", gop=30))
    ours = read_clips(path, 8, 2, 2, decode="pyav").frames
    gpu = read_clips(path, 8, 2, 2, decode="cuda").frames
    assert isinstance(gpu, torch.Tensor) and gpu.device.type == "cuda" and gpu.dtype == torch.uint8
    diff = (gpu.cpu().int() - torch.from_numpy(ours).int()).abs()
    assert gpu.shape == ours.shape and diff.float().mean() < 2.0 and diff.max() <= 16, (diff.float().mean(), diff.max())


def test_uint8_views_then_normalize_is_the_fused_op(video):
    """The data path's cut (workers resize and crop to uint8, the device normalises): bit for bit what the fused
    op gives, for the default processor and for one with its own mean / std."""
    clip = torch.from_numpy(read_video(video, num_frames=4, frame_sample_rate=2))[None]
    for processor in (VideoProcessor.for_image_size(32, 32),
                      VideoProcessor.for_image_size(32, 32, image_mean=[0.4, 0.45, 0.5], image_std=[0.2, 0.25, 0.3])):
        hw = processor.resized_size(48, 64)
        box = processor.crop_boxes(*hw)[0]
        views = processor.take_view_uint8(clip, hw, box)
        assert views.dtype == torch.uint8 and views.shape == (1, 4, 3, 32, 32)
        fused = processor.take_view(clip, hw, box)
        assert torch.equal(processor.normalize(views.to(DEVICE)).cpu(), fused)


def test_checkpoints_carry_a_video_processor_config(tmp_path):
    """save_pretrained writes VivitImageProcessor's and VivitVideoProcessor's configs; either one alone reads back
    as the same processor; transformers' AutoVideoProcessor loads the video one (where torchvision is installed,
    which transformers' video processors need)."""
    import json

    from vivit_kernels.processing import IMAGE_CONFIG, VIDEO_CONFIG

    processor = VideoProcessor.for_image_size(160, 160, frame_sample_rate=3, image_mean=[0.4, 0.45, 0.5])
    written = processor.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in written) == sorted([IMAGE_CONFIG, VIDEO_CONFIG])
    video = json.loads((tmp_path / "ckpt" / VIDEO_CONFIG).read_text())
    assert video["video_processor_type"] == "VivitVideoProcessor" and "offset" not in video
    (tmp_path / "ckpt" / IMAGE_CONFIG).unlink()
    assert VideoProcessor.from_pretrained(tmp_path / "ckpt").to_dict() == processor.to_dict()
    no_offset = VideoProcessor(offset=False, do_rescale=True)
    assert [p.name for p in no_offset.save_pretrained(tmp_path / "plain")] == [IMAGE_CONFIG]  # not expressible
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pytest.skip("transformers' video processors need torchvision (not installed): the config files are checked")
    import warnings

    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        theirs = transformers.AutoVideoProcessor.from_pretrained(str(tmp_path / "ckpt"))
    assert type(theirs).__name__ == "VivitVideoProcessor"
    assert dict(theirs.size) == processor.size and dict(theirs.crop_size) == processor.crop_size
    assert list(theirs.image_mean) == processor.image_mean and theirs.rescale_factor == processor.rescale_factor


def test_process_file_gives_the_pixels_of_decoding_then_processing(video):
    """Frames resized and cropped as they are decoded (the data path) give exactly the pixels of the whole clip
    decoded first and processed then: one clip with the center crop, and 3 clips x 3 crops."""
    from vivit_kernels.video import read_clips

    for clips, crops in [(1, 1), (3, 3)]:
        processor = VideoProcessor.for_image_size(32, 32, spatial_crops=crops)
        got = processor.process_file(video, num_frames=4, frame_sample_rate=3, clips=clips)
        frames = read_clips(video, 4, 3, clips).frames
        want = processor(torch.from_numpy(frames))["pixel_values"]
        assert got["pixel_values"].shape == want.shape == (clips * crops, 4, 3, 32, 32)
        assert torch.equal(got["pixel_values"], want) and got["video_frames"] == 60
        # the views are stored views-major as they are decoded: the views-first batch is that memory, not a copy
        stored = read_clips(video, 4, 3, clips, transform=processor.views_per_frame()).frames
        assert views_first(stored).data_ptr() == stored.data_ptr() and views_first(stored).is_contiguous()


def test_ffmpeg_threads_change_nothing_but_speed(video):
    """threads=1 (the data path's: a core per decoding process) and 0 (FFmpeg's choice) decode the same frames."""
    from vivit_kernels.video import read_clips

    one = read_clips(video, 8, 3, 3, threads=1).frames
    assert np.array_equal(one, read_clips(video, 8, 3, 3, threads=0).frames)
    assert np.array_equal(one, read_video(video, num_frames=8, frame_sample_rate=3, clips=3))
