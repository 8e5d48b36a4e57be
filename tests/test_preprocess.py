"""The fused preprocessing op on the test device vs transformers' VivitImageProcessor (the external oracle, on
the CPU); the C++ CPU implementation vs the PyTorch reference (bit-exact); bad input; CUDA vs CPU where a GPU
exists."""

from __future__ import annotations

import pytest
import torch

from vivit_kernels.ops import _extension
from vivit_kernels.ops.preprocess import preprocess_video, preprocess_video_ref
from vivit_kernels.processing import VideoProcessor

from helpers import DEVICE

needs_ext = pytest.mark.skipif(not _extension.available(), reason=f"extension not built: {_extension.error()}")

# landscape, portrait, already 224, smaller than 224, odd sizes
SIZES = [(360, 640), (640, 360), (224, 224), (120, 160), (333, 517), (257, 255)]


def random_video(frames: int, h: int, w: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth content plus noise, like real frames (pure noise is the worst case for resampling differences)
    base = torch.rand(batch, frames, h // 8 + 1, w // 8 + 1, 3, generator=g)
    smooth = torch.nn.functional.interpolate(base.flatten(0, 1).permute(0, 3, 1, 2), size=(h, w), mode="bilinear")
    noise = 0.15 * torch.rand(batch * frames, 3, h, w, generator=g)
    video = ((smooth + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    return video.permute(0, 2, 3, 1).reshape(batch, frames, h, w, 3)


def transformers_pixels(video: torch.Tensor, **kwargs) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    processor = transformers.VivitImageProcessor(**kwargs)
    return processor(list(video[0].numpy()), return_tensors="pt")["pixel_values"]


@needs_ext
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_transformers(size):
    video = random_video(4, *size)
    theirs = transformers_pixels(video)
    ours = VideoProcessor()(video, device=DEVICE)["pixel_values"].cpu()
    assert ours.shape == theirs.shape == (1, 4, 3, 224, 224)
    diff = (ours - theirs).abs()
    assert diff.max() <= 2 / 127.5, diff.max()
    assert diff.mean() <= 0.002, diff.mean()
    # in fact Pillow's fixed-point resampling is reproduced: only float rounding remains
    assert diff.max() < 1e-5, diff.max()


@needs_ext
@pytest.mark.parametrize("kwargs", [
    dict(do_normalize=False),
    dict(size={"height": 200, "width": 300}, crop_size={"height": 160, "width": 240}),
    dict(do_center_crop=False, size={"shortest_edge": 128}),
    dict(rescale_factor=1 / 255, offset=False, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
    dict(do_resize=False, crop_size={"height": 100, "width": 100}),
], ids=["no-normalize", "height-width", "no-crop", "imagenet", "no-resize"])
def test_processor_options_match_transformers(kwargs):
    video = random_video(3, 150, 210)
    theirs = transformers_pixels(video, **kwargs)
    ours = VideoProcessor(**kwargs)(video, device=DEVICE)["pixel_values"].cpu()
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 1e-5


@needs_ext
@pytest.mark.cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.uint8], ids=str)
# resized to 256 x 300: (256, 300) is not resized at all, (400, 300) only in height, (256, 500) only in width (the
# CPU op's copy paths for a side that keeps its size)
@pytest.mark.parametrize("size", [(360, 640), (97, 131), (512, 300), (256, 300), (400, 300), (256, 500)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_cpu_op_equals_reference_exactly(size, dtype):
    """The C++ CPU op (on purpose: the CUDA op is checked against it in test_cuda_op_equals_cpu_op) and the
    PyTorch reference compute the same integers and the same float32 ops."""
    video = random_video(3, *size, batch=2, seed=1)
    args = ([256, 300], [10, 20, 200, 240], 1 / 127.5, -1.0, [0.5, 0.4, 0.3], [0.5, 0.6, 0.7], dtype)
    ours = torch.ops.vivit_kernels.preprocess_video(video, *args)
    ref = preprocess_video_ref(video, *args)
    assert ours.dtype == dtype
    assert torch.equal(ours, ref)
    if dtype == torch.uint8:  # the resized values: what the float op rescales and normalises
        identity = (1.0, 0.0, [0.0] * 3, [1.0] * 3, torch.float32)
        plain = torch.ops.vivit_kernels.preprocess_video(video, *args[:2], *identity)
        assert torch.equal(ours, plain.to(torch.uint8)) and torch.equal(ours.float(), plain)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8], ids=str)
def test_strided_input(dtype):
    video = random_video(6, 120, 160, batch=2).to(DEVICE)
    planar = video.permute(0, 1, 4, 2, 3).contiguous().permute(0, 1, 3, 4, 2)  # channel planes, not RGB triples
    strided = planar[:, ::2, 10:]  # every other frame, a row slice
    assert not strided.is_contiguous()
    args = ([100, 150], [5, 5, 90, 140], 1 / 127.5, -1.0, [0.5] * 3, [0.5] * 3, dtype)
    assert torch.equal(torch.ops.vivit_kernels.preprocess_video(strided, *args),
                       torch.ops.vivit_kernels.preprocess_video(strided.contiguous(), *args))


@needs_ext
def test_opcheck():
    video = random_video(2, 40, 60).to(DEVICE)
    torch.library.opcheck(torch.ops.vivit_kernels.preprocess_video.default,
                          (video, [30, 45], [2, 3, 24, 32], 1 / 127.5, -1.0, [0.5] * 3, [0.5] * 3, torch.float32))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: torch.zeros(1, 4, 32, 32, 3), "frames must be uint8"),
        (lambda: torch.zeros(1, 4, 32, 32, 4, dtype=torch.uint8), r"\(batch, frames, height, width, 3\) RGB"),
        (lambda: torch.zeros(1, 0, 32, 32, 3, dtype=torch.uint8), "the video is empty"),
    ],
)
def test_bad_frames(make, match):
    with pytest.raises(ValueError, match=match):
        preprocess_video(make().to(DEVICE), [32, 32], [0, 0, 16, 16])


def test_frames_smaller_than_crop_is_an_error():
    processor = VideoProcessor(do_resize=False)
    with pytest.raises(ValueError, match=r"frames of 100x120 \(after resizing\) are smaller than the 224x224 crop"):
        processor(torch.zeros(4, 100, 120, 3, dtype=torch.uint8))


def test_processor_bad_inputs():
    with pytest.raises(ValueError, match="uint8 frames"):
        VideoProcessor()(torch.zeros(4, 64, 64, 3))
    with pytest.raises(ValueError, match=r"\(frames, height, width, 3\)"):
        VideoProcessor()(torch.zeros(64, 64, 3, dtype=torch.uint8).unsqueeze(0).unsqueeze(0).unsqueeze(0))
    with pytest.raises(ValueError, match="bilinear resampling only"):
        VideoProcessor(resample="bicubic")
    with pytest.raises(ValueError, match="dtype must be float32, float16, bfloat16 or uint8, got torch.int32"):
        VideoProcessor()(torch.zeros(4, 64, 64, 3, dtype=torch.uint8), dtype=torch.int32)
    with pytest.raises(ValueError, match="no video given"):
        VideoProcessor()([])


def test_fallback_without_extension_warns_once_and_matches(monkeypatch):
    """With the extension absent, the PyTorch fallback gives the same numbers, after one warning."""
    monkeypatch.setattr(_extension, "_loaded", False)
    monkeypatch.setattr(_extension, "_error", "ImportError: (simulated)")
    monkeypatch.setattr(_extension, "_warned", set())
    video = random_video(2, 90, 120).to(DEVICE)
    with pytest.warns(
        UserWarning, match=r"preprocess_video: the C\+\+/CUDA extension .* not available .* PyTorch fallback"
    ):
        a = preprocess_video(video, [96, 128], [0, 0, 64, 64])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = preprocess_video(video, [96, 128], [0, 0, 64, 64])  # no second warning
    assert torch.equal(a, b)
    assert torch.equal(a, preprocess_video_ref(video, [96, 128], [0, 0, 64, 64], 1 / 127.5, -1.0, [0.5] * 3, [0.5] * 3))


def test_presets_and_from_pretrained(tmp_path):
    video = random_video(2, 120, 160)
    original = VideoProcessor.from_preset("vivit-original")(video)["pixel_values"]
    assert -1.0 <= original.min() and original.max() <= 1.0  # [-1, 1], no second normalisation
    default = VideoProcessor()(video)["pixel_values"]
    assert torch.allclose(default, (original - 0.5) / 0.5, atol=1e-6)  # transformers' default: [-3, 1]
    import json

    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(VideoProcessor(crop_size={"height": 96, "width": 96}).to_dict())
    )
    loaded = VideoProcessor.from_pretrained(tmp_path)
    assert loaded(video)["pixel_values"].shape[-2:] == (96, 96)
    transformers = pytest.importorskip("transformers")
    theirs = transformers.VivitImageProcessor.from_pretrained(tmp_path)
    assert theirs.crop_size == {"height": 96, "width": 96}


def test_batching_and_spatial_crops():
    a, b = random_video(4, 120, 160, seed=1), random_video(4, 90, 200, seed=2)
    processor = VideoProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56})
    both = processor([a[0].numpy(), b[0]], device=DEVICE)["pixel_values"]  # numpy and torch, different sizes
    assert both.shape == (2, 4, 3, 56, 56) and both.device.type == DEVICE.type
    assert torch.equal(both[1], processor(b, device=DEVICE)["pixel_values"][0])
    three = VideoProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}, spatial_crops=3)(
        b, device=DEVICE)["pixel_values"]
    assert three.shape == (3, 4, 3, 56, 56)
    assert torch.equal(three[1], processor(b, device=DEVICE)["pixel_values"][0])  # the middle crop is the center crop
    assert not torch.equal(three[0], three[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "uint8"], ids=str)
@pytest.mark.parametrize("size", [(256, 340), (360, 640), (640, 360), (257, 255)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_views_resized_once_over_their_union_are_each_view_alone(size, dtype):
    """take_views resizes the views that share a resize once, over the box bounding them, and slices: bit for
    bit each view computed on its own (flipped ones too), in the views' order, on the test device."""
    from vivit_kernels.processing import View, _shared_resizes

    video = random_video(3, *size, batch=2).to(DEVICE)
    processor = VideoProcessor(spatial_crops=3)
    hw = processor.resized_size(*size)
    views = processor.eval_views(*size) + [View(hw, processor.crop_boxes(*hw)[0], flip=True)]
    uint8 = dtype == "uint8"
    got = processor.take_views(video, views, uint8=uint8, dtype=torch.float32 if uint8 else dtype)
    for view, g in zip(views, got, strict=True):
        alone = (processor.take_view_uint8(video, view.resize_hw, view.box) if uint8
                 else processor.take_view(video, view.resize_hw, view.box, dtype))
        assert torch.equal(g, alone.flip(-1) if view.flip else alone)
    work = _shared_resizes(views)
    if size != (257, 255):  # three crops of a non-square frame overlap: one resize over their union
        assert len(work) == 1 and sorted(work[0][2]) == [0, 1, 2, 3]
        assert work[0][1][2] * work[0][1][3] < 3 * 224 * 224
    else:  # 257x255 -> 256x257: the union is barely larger than one crop
        assert len(work) == 1


def test_views_that_share_no_pixels_are_resized_each_alone():
    from vivit_kernels.processing import View, _shared_resizes

    far = [View((512, 512), (0, 0, 64, 64)), View((512, 512), (448, 448, 64, 64))]
    assert [entry[1] for entry in _shared_resizes(far)] == [(0, 0, 64, 64), (448, 448, 64, 64)]
    other_sizes = [View((256, 340), (16, 58, 224, 224)), View((224, 298), (0, 37, 224, 224))]
    assert [len(entry[2]) for entry in _shared_resizes(other_sizes)] == [1, 1]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.uint8], ids=str)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_cuda_op_equals_cpu_op(size, dtype):
    video = random_video(4, *size, batch=2)
    processor = VideoProcessor()
    cpu = processor(video, device="cpu", dtype=dtype)["pixel_values"]
    gpu = processor(video, device=DEVICE, dtype=dtype)["pixel_values"]
    assert gpu.is_cuda
    assert (gpu.cpu().float() - cpu.float()).abs().max() <= 1e-5
