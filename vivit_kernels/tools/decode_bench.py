"""Video to ``pixel_values``, three ways, on generated H.264 videos: the seed example's ``read_video_pyav`` +
``VivitImageProcessor``, transformers' current path (torchcodec + ``VivitVideoProcessor``, where torchcodec and
torchvision are installed) and ours (``read_clips`` + ``VideoProcessor``). One evaluation clip each: 32 frames,
every 2nd, the middle window of a 10 s, 30 fps video. Interleaved rounds, medians; our time split into decoding,
RGB conversion and copying, and preprocessing (docs/video.md).

    taskset -c 0 python -m vivit_kernels.tools.decode_bench [--sizes 340x256,1920x1080] [--rounds 5] [--dir DIR]

``taskset -c 0`` pins it to one core (the figure that says how many cores keep a GPU fed); it also sets torch's
and FFmpeg's threads to one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

SIZES = ((340, 256), (640, 360), (1280, 720), (1920, 1080))  # (width, height)
NUM_FRAMES, SAMPLE_RATE, SECONDS, FPS = 32, 2, 10, 30


def write_bench_video(path: str | os.PathLike, width: int, height: int, seconds: int = SECONDS, fps: int = FPS) -> str:
    """A 30 fps H.264 (libx264 defaults: B frames, one key frame every 250) video of a textured scene that pans,
    with grain: a bitrate like a camera's (about 1.3 Mbit/s at 720p), not a flat test pattern's."""
    import av

    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, size=(height // 8 + 40, width // 8 + 40, 3), dtype=np.uint8)
    scene = np.repeat(np.repeat(texture, 8, 0), 8, 1)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(seconds * fps):
            dy, dx = i % 160, (2 * i) % 240
            frame = scene[dy : dy + height, dx : dx + width].astype(np.int16)
            grain = rng.integers(-5, 6, size=(height // 2, width // 2, 1), dtype=np.int16)
            frame += grain.repeat(2, 0).repeat(2, 1)[:height, :width]
            image = av.VideoFrame.from_ndarray(frame.clip(0, 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(image):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def middle_window(seg_len: int) -> list[int]:
    from vivit_kernels.video import _uniform_clips

    return [int(i) for i in _uniform_clips(NUM_FRAMES, SAMPLE_RATE, seg_len, 1)[0]]


def seed_path(path: str) -> np.ndarray:
    """The seed example: decode from the start to the last index, keep the wanted frames, stack, then
    ``VivitImageProcessor``."""
    import av
    import transformers

    with av.open(path) as container:
        indices = middle_window(container.streams.video[0].frames)
        frames = []
        container.seek(0)
        for i, frame in enumerate(container.decode(video=0)):
            if i > indices[-1]:
                break
            if i >= indices[0] and i in indices:
                frames.append(frame)
        video = np.stack([x.to_ndarray(format="rgb24") for x in frames])
    processor = transformers.VivitImageProcessor()
    return processor(list(video), return_tensors="pt")["pixel_values"].numpy()


def transformers_path(path: str) -> np.ndarray:
    """transformers' current path: torchcodec's decoder (one FFmpeg thread) and ``VivitVideoProcessor``."""
    import transformers
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(path, num_ffmpeg_threads=1)
    frames = decoder.get_frames_at(middle_window(decoder.metadata.num_frames)).data  # (T, 3, H, W)
    processor = transformers.VivitVideoProcessor()
    return processor(videos=[frames], return_tensors="pt")["pixel_values"].numpy()


def ours(path: str) -> np.ndarray:
    """Ours, as ``predict``'s and ``finetune``'s workers run it: ``VideoProcessor.process_file`` (seek, skip the
    non-reference frames nobody wants, each wanted frame converted to RGB and resized and cropped as it is
    decoded)."""
    from vivit_kernels.processing import VideoProcessor

    return VideoProcessor().process_file(path, NUM_FRAMES, SAMPLE_RATE)["pixel_values"].numpy()


def ours_in_two_steps(path: str, split: dict[str, float]) -> np.ndarray:
    """``read_clips`` (the whole clip's uint8 frames in one array) then ``VideoProcessor`` on it: the same pixels,
    and the split of the time between the two."""
    import torch

    from vivit_kernels.processing import VideoProcessor
    from vivit_kernels.video import read_clips

    start = time.perf_counter()
    clips = read_clips(path, NUM_FRAMES, SAMPLE_RATE, 1)
    decoded = time.perf_counter()
    pixels = VideoProcessor()(torch.from_numpy(clips.frames))["pixel_values"]
    split["read_clips"] = decoded - start
    split["preprocess"] = time.perf_counter() - decoded
    return pixels.numpy()


def decode_split(path: str) -> dict[str, Any]:
    """Where ``read_clips``'s time goes: decoding (every frame from the key frame to the last wanted one, minus
    the skipped ones) and the RGB conversion of the wanted frames, measured apart; frames decoded and skipped."""
    import av

    from vivit_kernels.video import _frame_numbering, _frames

    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1  # as read_clips decodes
        fps = float(stream.average_rate)
        wanted = set(middle_window(stream.frames))
        last = max(wanted)
        target = int(min(wanted) / fps / stream.time_base) + (stream.start_time or 0)
        container.seek(target, stream=stream, backward=True, any_frame=False)
        decoded = converted = 0
        first = None
        convert_s = 0.0
        start = time.perf_counter()
        number = _frame_numbering(stream, fps)
        for frame in _frames(container, stream, [], lambda pts: number(pts) in wanted):
            index = number(frame.pts)
            first = index if first is None else first
            decoded += 1
            if index in wanted:
                t = time.perf_counter()
                frame.to_ndarray(format="rgb24")
                convert_s += time.perf_counter() - t
                converted += 1
            if index >= last:
                break
        total = time.perf_counter() - start
    return {"from_frame": first, "to_frame": last, "frames_decoded": decoded, "frames_in_range": last - first + 1,
            "converted": converted, "decode_s": total - convert_s, "convert_s": convert_s}


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def measure(sizes=SIZES, rounds: int = 5, directory: str | os.PathLike | None = None,
            progress: bool = True) -> list[dict[str, Any]]:
    """One row per size: the three paths' median seconds (interleaved rounds), their max difference to the
    seed's ``pixel_values``, our split and the bytes of one clip's uint8 frames."""
    import tempfile

    _one_thread()
    directory = Path(directory or tempfile.mkdtemp(prefix="vivit_decode_bench_"))
    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Any] = {"seed": seed_path, "ours": ours, "ours_two_steps": ours_in_two_steps}
    try:
        import torchcodec.decoders  # noqa: F401
        import torchvision  # noqa: F401

        paths["transformers"] = transformers_path
    except Exception as e:  # noqa: BLE001 - missing, or FFmpeg's libraries missing
        print(f"transformers' torchcodec path left out: {type(e).__name__}: {e}")
    rows = []
    for width, height in sizes:
        video = directory / f"bench_{width}x{height}.mp4"
        if not video.is_file():
            write_bench_video(video, width, height)
        reference = seed_path(str(video))
        row: dict[str, Any] = {"size": f"{width}x{height}", "file_mb": round(video.stat().st_size / 2**20, 2)}
        times: dict[str, list[float]] = {name: [] for name in paths}
        splits: list[dict[str, float]] = []
        for name, fn in paths.items():  # warm-up, and the agreement with the seed's pixels
            got = fn(str(video), {}) if name == "ours_two_steps" else fn(str(video))
            row[f"{name}_max_diff"] = float(np.abs(got - reference).max())
        for _ in range(rounds):
            for name, fn in paths.items():
                split: dict[str, float] = {}
                start = time.perf_counter()
                fn(str(video), split) if name == "ours_two_steps" else fn(str(video))
                times[name].append(time.perf_counter() - start)
                if split:
                    splits.append(split)
        for name, ts in times.items():
            row[f"{name}_ms"] = round(1e3 * statistics.median(ts), 1)
        row["ours_read_clips_ms"] = round(1e3 * statistics.median(s["read_clips"] for s in splits), 1)
        row["ours_preprocess_ms"] = round(1e3 * statistics.median(s["preprocess"] for s in splits), 1)
        split = [decode_split(str(video)) for _ in range(rounds)]
        row.update({k: split[0][k] for k in ("from_frame", "to_frame", "frames_decoded", "frames_in_range")})
        row["ours_decode_ms"] = round(1e3 * statistics.median(s["decode_s"] for s in split), 1)
        row["ours_convert_ms"] = round(1e3 * statistics.median(s["convert_s"] for s in split), 1)
        row["clip_uint8_mb"] = round(NUM_FRAMES * width * height * 3 / 2**20, 1)
        row["views_uint8_mb"] = round(NUM_FRAMES * 224 * 224 * 3 / 2**20, 1)
        row["seed_over_ours"] = round(row["seed_ms"] / row["ours_ms"], 2)
        if "transformers_ms" in row:
            row["transformers_over_ours"] = round(row["transformers_ms"] / row["ours_ms"], 2)
        rows.append(row)
        if progress:
            print(row, flush=True)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| source | seed: `read_video_pyav` + `VivitImageProcessor` | transformers: torchcodec + "
             "`VivitVideoProcessor` | ours: `process_file` | ours in two steps: `read_clips`, then `VideoProcessor` "
             "| seed / ours | transformers / ours |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['seed_ms']} ms | {r.get('transformers_ms', 'n/a')} ms | {r['ours_ms']} ms "
                     f"| {r['ours_two_steps_ms']} ms | {r['seed_over_ours']}x "
                     f"| {r.get('transformers_over_ours', 'n/a')}x |")
    lines += ["", "| source | frames decoded (of the range) | decoding | RGB conversion (32 frames) "
              "| rest of `read_clips` (the clip array) | preprocessing | max diff to the seed: ours / transformers' |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        rest = round(r["ours_read_clips_ms"] - r["ours_decode_ms"] - r["ours_convert_ms"], 1)
        lines.append(f"| {r['size']} | {r['frames_decoded']} of {r['frames_in_range']} (frames {r['from_frame']}-"
                     f"{r['to_frame']}) | {r['ours_decode_ms']} ms | {r['ours_convert_ms']} ms | {rest} ms | "
                     f"{r['ours_preprocess_ms']} ms | {r['ours_max_diff']:.1e} / "
                     f"{r.get('transformers_max_diff', float('nan')):.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vivit_kernels.tools.decode_bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(f"{w}x{h}" for w, h in SIZES), help="WxH,WxH,...")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", help="where the generated videos are kept (default: a temporary directory)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    rows = measure(sizes, args.rounds, args.dir)
    print(markdown(rows))
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
