"""Sections 4 and 5 of the acceptance run: the seed's tables on this GPU (inference and training steps of our
backends and transformers' own models, speedup and memory saving as the seed page computes them), ``predict`` end
to end, and what ``attn="auto"`` chose."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..model_paths import COMPILED, LORA, MERGE, MERGE_SCHEDULE, TIMED, build_model
from .run import Acceptance, first_line, torch_dtype

__all__ = ["seed_step", "peak_memory_mb", "section_seed", "section_auto"]


def seed_step(model, table: str, pixel_values) -> Callable[[], Any]:
    """One timed unit of the seed's tables: an inference forward without autograd ("inference"), or a training
    step, forward + backward + AdamW ("training"; labels all 0). Puts the model in eval / train mode."""
    import torch

    if table == "inference":
        model.eval()

        def infer():
            with torch.no_grad():
                return model(pixel_values=pixel_values).logits

        return infer
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    labels = torch.zeros(pixel_values.shape[0], dtype=torch.long, device=pixel_values.device)

    def train():
        opt.zero_grad(set_to_none=True)
        loss = model(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        opt.step()
        return loss

    return train


def peak_memory_mb(fn: Callable[[], Any], device) -> float | None:
    """torch.cuda.max_memory_allocated over one call of ``fn`` (weights included, as the seed measures), in MB
    (2^20 bytes); None off the GPU."""
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def _call_seconds(run: Acceptance, step: Callable[[], Any], rounds: int) -> list[float]:
    """Seconds of each of ``rounds`` calls of an already warmed-up ``step`` (CUDA events on a GPU)."""
    import torch

    times = []
    for _ in range(rounds):
        if run.device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return times


def _iqr(times: list[float]) -> float | None:
    if len(times) < 2:
        return None
    q = statistics.quantiles(times, n=4, method="inclusive")
    return q[2] - q[0]


def _seed_row(run: Acceptance, table: str, path: str, batch: int, dtype: str) -> None:
    import torch

    from ...model import VivitConfig
    from ...ops import _triton
    from ...presets import image_hw

    cfg = VivitConfig.from_preset(run.plan.preset)
    dt = torch_dtype(dtype)
    model = build_model(path, cfg, dt, run.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.num_frames, 3, *image_hw(cfg), generator=g).to(run.device, dt)
    step = seed_step(model, table, x)
    rounds = run.plan.infer_rounds if table == "inference" else run.plan.train_steps

    before = sum(_triton.LAUNCHES.values())
    start = time.perf_counter()
    step()  # compile / autotune / auto's measurements outside the timing
    run.sync()
    first = time.perf_counter() - start
    interpreted = _triton.INTERPRET and sum(_triton.LAUNCHES.values()) > before
    if interpreted:
        rounds = 1
    peak = peak_memory_mb(step, run.device)
    times = _call_seconds(run, step, rounds)
    median = statistics.median(times)
    run.overhead("seed", first - median)
    count_key = "num_batches" if table == "inference" else "num_training_steps"
    run.data["seed"].append({
        "table": table, "path": path, "batch": batch, "dtype": dtype, count_key: rounds, "time_s": median,
        "iqr_s": _iqr(times), "rounds": len(times), "peak_mem_mb": peak, "first_call_s": first,
        "interpreted": interpreted, "device": run.data["environment"].get("device", str(run.device)),
        "config": run.plan.preset, "merge": MERGE_SCHEDULE if path.endswith(MERGE) else None,
    })


def _predict_row(run: Acceptance) -> None:
    """``predict`` end to end on generated videos (decoding in workers, preprocessing, the model): videos/s and
    where the time went, so the run shows whether decoding or the model limits us."""
    import shutil
    import tempfile

    import torch

    from ...data import default_workers
    from ...model import VivitForVideoClassification
    from ...predict import load_predictor

    try:
        import av
    except ImportError:
        run.skip("seed", "predict end to end", "PyAV is not installed (pip install av): no videos to decode")
        return
    gpu = run.device.type == "cuda"
    count, frames, height, width = (16, 64, 240, 320) if gpu else (2, 8, 48, 64)
    folder = Path(tempfile.mkdtemp(prefix="vivit_predict_"))
    try:
        paths = []
        rng = torch.Generator().manual_seed(0)
        for i in range(count):
            path = folder / f"{i:03d}.mp4"
            with av.open(str(path), mode="w") as container:
                stream = container.add_stream("mpeg4", rate=25)
                stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                for _ in range(frames):
                    image = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=rng).numpy()
                    for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
            paths.append(str(path))
        torch.manual_seed(0)
        model = VivitForVideoClassification(run.plan.preset)
        dtype = torch.bfloat16 if gpu else torch.float32
        workers = default_workers()
        predictor = load_predictor(model, batch_size=8 if gpu else 2, workers=workers, device=run.device, dtype=dtype,
                                   attn="auto" if gpu else "sdpa")
        list(predictor.run(paths))  # warm-up: workers, kernels, auto's measurements
        predictor.timings = type(predictor.timings)()
        passes = 2 if gpu else 1
        for _ in range(passes):
            list(predictor.run(paths))
        t = predictor.timings
        if t.failed:
            raise RuntimeError(f"{t.failed} generated video(s) failed to decode")
        run.data.setdefault("predict", []).append({
            "table": "predict", "name": "predict end to end", "path": f"predict {run.plan.preset}",
            "dtype": str(dtype).removeprefix("torch."), "videos": count, "workers": workers,
            "time_s": t.wall_s / passes, "rounds": passes, "waiting_share": t.waiting_s / t.wall_s,
            "preprocess_share": t.preprocess_s / t.wall_s, "model_share": t.model_s / t.wall_s,
            "video": f"{frames} frames of {width}x{height}", "device": run.data["environment"].get("device"),
            **t.bottleneck()})
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _decode_rows(run: Acceptance) -> None:
    """Decoding one evaluation clip of a generated H.264 video with each decoder there is (PyAV and torchcodec on
    the CPU, torchcodec on NVDEC): clips/s and frames/s of one process, and how far each decoder's frames are from
    PyAV's (NVDEC converts colour its own way), beside the model's clips/s of the seed rows."""
    import shutil
    import tempfile

    import numpy as np
    import torch

    from ...video import read_clips, resolve_decoder
    from ..decode_bench import write_bench_video

    try:
        import av  # noqa: F401
    except ImportError:
        run.skip("seed", "decode throughput", "PyAV is not installed (pip install av): no videos to decode")
        return
    gpu = run.device.type == "cuda"
    (width, height, seconds), frames, rounds = ((1280, 720, 4), 32, 5) if gpu else ((160, 96, 1), 8, 1)
    folder = Path(tempfile.mkdtemp(prefix="vivit_decode_"))
    try:
        path = write_bench_video(folder / "clip.mp4", width, height, seconds=seconds)
        reference = read_clips(path, frames, 2, decode="pyav").frames
        for decoder in ("pyav", "torchcodec", "cuda"):
            try:
                resolve_decoder(decoder)
            except (ImportError, ValueError) as e:
                run.skip("seed", f"decode {decoder}", first_line(e))
                continue
            got = read_clips(path, frames, 2, decode=decoder).frames  # warm-up
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                got = read_clips(path, frames, 2, decode=decoder).frames
                run.sync()
                times.append(time.perf_counter() - start)
            diff = np.abs(np.asarray(torch.as_tensor(got).cpu(), dtype=np.int16) - reference.astype(np.int16))
            clip_s = statistics.median(times)
            run.data.setdefault("decode", []).append({
                "decoder": decoder, "source": f"{width}x{height} H.264, {seconds} s at 30 fps", "frames": frames,
                "clip_ms": 1e3 * clip_s, "clips_per_s": 1 / clip_s, "rounds": rounds,
                "max_diff_to_pyav": int(diff.max()), "mean_diff_to_pyav": float(diff.mean())})
    finally:
        shutil.rmtree(folder, ignore_errors=True)


CUT_SOURCES = ((340, 256), (640, 360), (1280, 720), (1920, 1080))  # decode_bench's sizes


def _cut_rows(run: Acceptance) -> None:
    """Where the data path should cut between the decoding workers and the device, per source size (the data path
    runs "views" on a GPU: the exact CPU op in the workers, 224x224 uint8 over PCIe, normalised on the device;
    "device" hands the full-resolution uint8 frames over and runs the op there). For one decoded 32-frame clip:
    a worker's CPU milliseconds (one thread, as a worker runs), the bytes and milliseconds over PCIe (pinned), and
    the device's milliseconds, each cut; the data path's choice is right while "views" costs the GPU less and
    the CPU cost is what the decoding workers can afford (the predict row's bottleneck line)."""
    import shutil
    import tempfile

    import torch

    from ...processing import VideoProcessor
    from ...video import read_clips
    from ..decode_bench import write_bench_video

    try:
        import av  # noqa: F401
    except ImportError:
        run.skip("seed", "workers or device", "PyAV is not installed (pip install av): no videos to decode")
        return
    gpu = run.device.type == "cuda"
    sources, frames, rounds = (CUT_SOURCES, 32, 5) if gpu else (((160, 96),), 8, 1)
    processor = VideoProcessor()
    folder = Path(tempfile.mkdtemp(prefix="vivit_cut_"))
    threads = torch.get_num_threads()

    def timed(fn, *args) -> tuple[float, Any]:
        fn(*args)  # warm-up
        times, out = [], None
        for _ in range(rounds):
            run.sync()
            start = time.perf_counter()
            out = fn(*args)
            run.sync()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times), out

    def to_device(t):
        return t.to(run.device, non_blocking=True)

    dtype = torch_dtype(run.plan.infer_dtypes[0])
    try:
        for width, height in sources:
            path = write_bench_video(folder / f"{width}x{height}.mp4", width, height, seconds=2)
            clip = torch.from_numpy(read_clips(path, frames, 2).frames)  # (1, T, H, W, 3) uint8
            view = processor.eval_views(height, width)[0]
            torch.set_num_threads(1)
            try:
                worker_ms, views = timed(processor.take_view_uint8, clip, view.resize_hw, view.box)
            finally:
                torch.set_num_threads(threads)
            views_h2d_ms, views_dev = timed(to_device, views.pin_memory() if gpu else views)
            clip_h2d_ms, clip_dev = timed(to_device, clip.pin_memory() if gpu else clip)
            normalize_ms, _ = timed(processor.normalize, views_dev, dtype)
            device_op_ms, _ = timed(processor.take_view, clip_dev, view.resize_hw, view.box, dtype)
            run.data.setdefault("cut", []).append({
                "source": f"{width}x{height}", "frames": frames, "rounds": rounds,
                "views": {"worker_ms": worker_ms, "pcie_bytes": views.numel() * views.element_size(),
                          "pcie_ms": views_h2d_ms, "device_ms": normalize_ms},
                "device": {"worker_ms": 0.0, "pcie_bytes": clip.numel() * clip.element_size(),
                           "pcie_ms": clip_h2d_ms, "device_ms": device_op_ms}})
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def section_seed(run: Acceptance) -> None:
    plan = run.plan
    # (table, path, batch, dtype, kind), most valuable first: inference in the first dtype (bf16 on a GPU),
    # training, inference in the others (fp32, as the seed), and torch.compile (slow to compile) last
    infer = [
        [("inference", p, b, d, "seed") for b in plan.infer_batches for p in TIMED] for d in plan.infer_dtypes
    ]
    rows = infer[0] + [
        ("training", p, b, plan.train_dtype, "train") for b in plan.train_batches for p in TIMED
    ]
    # a LoRA step beside the full one (what frozen weights and the adapters inside our GEMMs save), and PEFT on
    # transformers' sdpa model (what a LoRA user runs without us): the largest training batch
    rows += [("training", p + LORA, plan.train_batches[-1], plan.train_dtype, "train")
             for p in ("triton", "auto", "transformers-sdpa")]
    # token merging beside the full model (what merging saves, and whether it pays at batch 1): our two paths, the
    # smallest and the largest inference batch
    rows += [("inference", p + MERGE, b, plan.infer_dtypes[0], "seed") for b in dict.fromkeys(
        (plan.infer_batches[0], plan.infer_batches[-1])) for p in ("triton", "auto")]
    rows += [row for rows_of_dtype in infer[1:] for row in rows_of_dtype]
    for table, path, batch, dtype, kind in rows:
        run.step("seed", f"{table} {path} batch {batch} {dtype}", kind,
                 lambda t=table, p=path, b=batch, d=dtype: _seed_row(run, t, p, b, d), batch=batch, dtype=dtype)
    run.step("seed", "predict end to end", "train", lambda: _predict_row(run))
    run.step("seed", "decode throughput", "train", lambda: _decode_rows(run))
    run.step("seed", "workers or device", "train", lambda: _cut_rows(run))
    if run.device.type != "cuda":
        run.skip("seed", COMPILED, "torch.compile of transformers' model is timed on a GPU only")
        return
    compiled = [
        ("inference", COMPILED, b, d, "compiled") for d in plan.infer_dtypes[:1] for b in (1, plan.infer_batches[-1])
    ]
    compiled += [("training", COMPILED, 1, plan.train_dtype, "compiled")]
    for table, path, batch, dtype, kind in compiled:
        run.step("seed", f"{table} {path} batch {batch} {dtype}", kind,
                 lambda t=table, p=path, b=batch, d=dtype: _seed_row(run, t, p, b, d), batch=batch, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# 5. What attn="auto" chose
# ------------------------------------------------------------------------------------------------
def section_auto(run: Acceptance) -> None:
    from ...auto import cache

    def collect():
        for e in cache.entry_rows(run.device):
            run.data["auto"].append({k: e[k] for k in ("op", "shapes", "mode", "choice", "medians_ms", "runs",
                                                       "rejected")})
        run.data["auto_cache"] = str(cache.cache_path())

    run.step("auto", "choices", "auto", collect)


