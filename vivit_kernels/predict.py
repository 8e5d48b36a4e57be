"""Classify a whole collection of videos: batch prediction and embeddings, resumable, on one process or many.

    from vivit_kernels.predict import predict
    for row in predict(["videos/"], model="runs/mine"):
        print(row["path"], row["labels"][0], row["scores"][0])

``predict_to_file`` (and ``vivit-kernels predict INPUT... --model CKPT --out preds.jsonl``) writes one JSON line
per video and can be stopped and run again: videos with a line are skipped, and a line is either whole or not
there (the files' formats: ``prediction_files.py``). Under torchrun each rank takes every world-th input
(``sharding.py``), writes its own part file, and rank 0 merges the parts in input order at the end. Decoding runs
in DataLoader workers; clips of several videos go through the model in one batch; preprocessing runs on the GPU
(``VideoProcessor``'s fused op) when the model is there.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, sharding
from . import data as vdata
from . import prediction_files as files
from ._devices import run_defaults, synchronize
from .data import collect_inputs
from .models import pool_tokens
from .processing import VideoProcessor, views_first
from .timings import Timings
from .video import resolve_decoder

__all__ = ["classify", "predict", "predict_to_file", "Predictor", "FAILED_EXIT_CODE"]

logger = logging.getLogger("vivit_kernels.predict")
FAILED_EXIT_CODE = 3  # the command's exit status when some videos could not be read


# ------------------------------------------------------------------------------------------------
# The model loop
# ------------------------------------------------------------------------------------------------
@dataclass
class Predictor:
    """A model and its processor, run over video paths: ``run(paths)`` yields (row, pooled features) per video
    in input order; rows of videos that could not be read have ``error`` and no features."""

    model: Any
    processor: VideoProcessor
    clips: int = 1
    crops: int = 1
    top_k: int = 5
    batch_size: int = 8
    frame_sample_rate: int | None = None  # None: the checkpoint's (its processor's), else the default
    workers: int = 0
    name: str = ""
    timings: Timings = field(default_factory=Timings)
    decode: str = "auto"  # video.DECODERS

    def run(self, paths: Sequence[str], progress: bool = False) -> Iterator[tuple[dict[str, Any], np.ndarray | None]]:
        if not paths:
            return
        param = next(self.model.parameters())
        device, dtype = param.device, param.dtype
        decoder = resolve_decoder(self.decode)
        workers = 0 if decoder == "cuda" else self.workers  # NVDEC decodes in this process, on the GPU
        # on a GPU the workers hand on resized and cropped uint8 views, the GPU normalises (docs/video.md)
        preprocess_on = "device" if decoder == "cuda" else "views" if device.type == "cuda" else "worker"
        items = [vdata.VideoItem(p) for p in paths]
        dataset = vdata.VideoClipDataset(
            items,
            None,
            self.processor,
            self.model.config.num_frames,
            self.processor.sample_rate(self.frame_sample_rate),
            views=(self.clips, self.crops),
            preprocess_on=preprocess_on,
            dtype=dtype,
            decode=decoder,
        )
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, num_workers=workers,
                                             collate_fn=vdata.collate_clips,
                                             pin_memory=device.type == "cuda" and decoder != "cuda")
        preparer = vdata.VideoBatchPreparer(self.processor, device, dtype)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(paths), unit="video", desc="predict", dynamic_ncols=True)
        t = self.timings
        t.workers = workers
        self.model.eval()
        start = last = time.perf_counter()
        position = 0  # the loader keeps the input order: batch n holds paths[n * batch_size:][:batch_size]
        try:
            for batch in loader:
                got = time.perf_counter()
                t.waiting_s += got - last
                errors = {p: e for p, e in batch["skipped"]}
                paths_ok, meta = batch["paths"], batch["meta"]
                t.decode_s += sum(m["decode_s"] for m in meta)
                t.worker_s += sum(m["decode_s"] + m.get("preprocess_s", 0.0) for m in meta)
                t.frames += sum(m["frames_decoded"] for m in meta)
                t.clips += len(meta) * self.clips * self.crops
                pixels = preparer(batch).get("pixel_values")
                synchronize(device)
                prepared = time.perf_counter()
                t.preprocess_s += prepared - got + sum(m.get("preprocess_s", 0.0) for m in meta)
                results = self.score(pixels, paths_ok, meta) if pixels is not None else {}
                synchronize(device)
                last = time.perf_counter()
                t.model_s += last - prepared
                in_batch = paths[position : position + self.batch_size]
                position += len(in_batch)
                for path in in_batch:
                    t.videos += 1
                    if path in results:
                        yield results[path]
                    else:
                        t.failed += 1
                        yield ({"path": path, "error": errors.get(path, "not decoded"), "model": self.name,
                                "vivit_kernels": __version__}, None)
                if bar is not None:
                    bar.update(len(in_batch))
                    bar.set_postfix(failed=t.failed)
                last = time.perf_counter()
        finally:
            t.wall_s += time.perf_counter() - start
            if bar is not None:
                bar.close()


    def score(self, pixels: torch.Tensor, paths: Sequence[str], meta: Sequence[dict]
              ) -> dict[str, tuple[dict[str, Any], np.ndarray]]:
        """(row, pooled features) by path for one batch: ``pixels`` (videos, [views,] T, 3, h, w) preprocessed,
        ``meta`` per video its ``video_frames`` and ``duration_s``; the softmax and the features averaged over each
        video's views."""
        param = next(self.model.parameters())
        names, views = self.model.config.id2label, self.clips * self.crops
        with torch.no_grad():
            flat = pixels.to(param.device, param.dtype).reshape(-1, *pixels.shape[-4:])
            features = pool_tokens(self.model.config, self.model.vivit(flat).last_hidden_state)
            probs = self.model.classifier(features).float().softmax(-1)
            probs = probs.view(len(paths), views, -1).mean(1)
            pooled = features.float().view(len(paths), views, -1).mean(1)
            top = probs.topk(min(self.top_k, probs.shape[-1]), dim=-1)
        scores, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
        pooled = pooled.cpu().numpy()
        merging = getattr(self.model.config, "token_merging", None)
        results = {}
        for j, path in enumerate(paths):
            row = {"path": path, "labels": [names.get(i, str(i)) for i in indices[j]],
                   "scores": [round(s, 6) for s in scores[j]], "views": f"{self.clips}x{self.crops}",
                   "frames": meta[j]["video_frames"], "duration_s": _round(meta[j]["duration_s"]),
                   "model": self.name, "vivit_kernels": __version__}
            if merging is not None:
                row["merge"] = merging
            results[path] = (row, pooled[j])
        return results

    def classify(self, path: str | os.PathLike) -> dict[str, Any]:
        """One video in this process (no workers): its ``clips`` evenly spread windows (1: the middle one, as the
        evaluation takes it) x ``crops`` crops through the model, the softmax averaged over the views. The row has
        the top-k ``labels`` and ``scores``, the ``views``, and the milliseconds of decoding, preprocessing (on the
        model's device: on the CPU each frame as it is decoded, so no full-resolution clip is stored) and the
        forward."""
        import copy

        from .monkey_patch import attn_of
        from .video import read_clips

        param = next(self.model.parameters())
        device, dtype = param.device, param.dtype
        processor = copy.copy(self.processor)
        processor.spatial_crops = self.crops
        config = self.model.config
        start = time.perf_counter()
        spent = [0.0]
        on_cpu = device.type == "cpu" and resolve_decoder(self.decode) != "cuda"
        clips = read_clips(path, config.num_frames, processor.sample_rate(self.frame_sample_rate), self.clips,
                           decode=self.decode, transform=processor.views_per_frame(dtype=dtype, spent=spent) if on_cpu
                           else None, threads=0)  # one video: FFmpeg's threads for its latency
        decoded = time.perf_counter() - spent[0]
        if on_cpu:
            pixel_values = views_first(clips.frames)
        else:
            pixel_values = processor(torch.as_tensor(clips.frames), device=device, dtype=dtype)["pixel_values"]
        synchronize(device)
        processed = time.perf_counter()
        self.model.eval()
        with torch.no_grad():
            logits = self.model(pixel_values).logits.float()
        synchronize(device)
        done = time.perf_counter()
        probs = logits.softmax(-1).mean(0)
        top = probs.topk(min(self.top_k, probs.numel()))
        return {"path": str(path), "views": pixel_values.shape[0], "frames": config.num_frames,
                "pixels": tuple(pixel_values.shape[-2:]),
                "labels": [config.id2label.get(i, str(i)) for i in top.indices.tolist()],
                "scores": top.values.tolist(), "decode_ms": 1e3 * (decoded - start),
                "preprocess_ms": 1e3 * (processed - decoded), "forward_ms": 1e3 * (done - processed),
                "device": device.type, "attn": attn_of(self.model), "decode": resolve_decoder(self.decode),
                "merge": getattr(config, "token_merging", None)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def load_predictor(model: Any, clips: int = 1, crops: int = 1, top_k: int = 5, batch_size: int = 8,
                   frame_sample_rate: int | None = None, workers: int | None = None, device: Any = None,
                   dtype: torch.dtype | None = None, attn: str | None = None, merge: Any = None,
                   decode: str = "auto") -> Predictor:
    """A ``Predictor`` for a checkpoint directory (or a model instance). Defaults (``_devices.run_defaults``): the
    GPU when there is one, bf16 and attn="auto" there; fp32 and attn="sdpa" on the CPU. ``frame_sample_rate``:
    the checkpoint's own (saved by ``finetune``), else ``video.DEFAULT_FRAME_SAMPLE_RATE``. ``merge``: token
    merging (``monkey_patch.set_token_merging``: r per layer, a fraction, a list or a schedule's name; "off" turns a
    checkpoint's own off); None keeps the checkpoint's setting. ``decode``: the video decoder (``video.DECODERS``;
    ``cuda``, NVDEC, decodes in the main process)."""
    import transformers

    from .checkpoint import check_local, local_dir
    from .model import VivitForVideoClassification
    from .models import VivitFactorizedConfig, VivitFactorizedForVideoClassification

    device, dtype, attn = run_defaults(device, dtype, attn)
    directory = None
    if isinstance(model, (str, os.PathLike)):
        directory = model
        if local_dir(model) is not None:
            check_local(local_dir(model))  # a clear error naming the file that is missing or wrong
        factorised = isinstance(transformers.AutoConfig.from_pretrained(model), VivitFactorizedConfig)
        cls = VivitFactorizedForVideoClassification if factorised else VivitForVideoClassification
        model = cls.from_pretrained(model, attn=attn, dtype=dtype)
    else:  # ours or transformers' own model (apply_vivit_kernels takes both)
        from .monkey_patch import apply_vivit_kernels

        apply_vivit_kernels(model, attn)
    if merge is not None:
        from .monkey_patch import set_token_merging

        set_token_merging(model, merge)
    model = model.to(device=device, dtype=dtype).eval()
    processor = VideoProcessor.for_model(model.config, directory)
    workers = vdata.default_workers() if workers is None else workers
    return Predictor(model, processor, clips, crops, top_k, batch_size, frame_sample_rate, workers,
                     name=str(directory) if directory is not None else type(model).__name__,
                     decode=resolve_decoder(decode))


def classify(video: str | os.PathLike, model: Any, **options: Any) -> dict[str, Any]:
    """Classify one video file (``Predictor.classify``); ``options`` as ``load_predictor``'s. A missing file is an
    error before any model is built."""
    if not os.path.isfile(video):
        raise FileNotFoundError(f"no video file {video}" + (" (it is a directory)" if os.path.isdir(video) else ""))
    return load_predictor(model, workers=0, **options).classify(video)


def predict(inputs: Sequence[str | os.PathLike], model: Any, progress: bool = False,
            **options: Any) -> Iterator[dict[str, Any]]:
    """One result dict per input video (see the module docstring); ``options`` as ``load_predictor``'s."""
    predictor = load_predictor(model, **options)
    for row, _ in predictor.run(collect_inputs(inputs), progress=progress):
        yield row


# ------------------------------------------------------------------------------------------------
# A collection into files: resumable, sharded under torchrun
# ------------------------------------------------------------------------------------------------
def predict_to_file(inputs: Sequence[str | os.PathLike], model: Any, out: str | os.PathLike,
                    embeddings: str | os.PathLike | None = None, progress: bool = True, retry_errors: bool = False,
                    **options: Any) -> dict[str, Any]:
    """Predict every input video into the JSONL file ``out`` (resumable; see the module docstring) and, with
    ``embeddings`` (``.safetensors`` or ``.npy``), the pooled features, one row per video in the JSONL's order
    (``prediction_files.py`` holds both formats). ``retry_errors``: videos whose earlier line is an error are tried
    again. Returns a summary dict."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    emb_path = Path(embeddings) if embeddings is not None else None
    if emb_path is not None and emb_path.suffix not in (".safetensors", ".npy"):
        raise ValueError(f"embeddings: {emb_path} must end in .safetensors or .npy")
    options["device"] = sharding.rank_device(options.get("device"))
    ours = torch.distributed.is_available() and not torch.distributed.is_initialized()
    rank, world = sharding.start(options["device"])
    try:
        return _predict_to_file(inputs, model, out, emb_path, progress, retry_errors, rank, world, options)
    finally:
        if ours and world > 1 and torch.distributed.is_initialized():  # the process group we made goes with us
            torch.distributed.destroy_process_group()


def _predict_to_file(inputs, model, out: Path, emb_path: Path | None, progress: bool, retry_errors: bool,
                     rank: int, world: int, options: dict) -> dict[str, Any]:
    paths = collect_inputs(inputs)
    parts_dir = emb_path.with_name(emb_path.name + ".parts") if emb_path is not None else None
    if rank == 0 and retry_errors and out.is_file():
        files.write_rows(out, [r for r in files.read_rows(out, repair=True) if "error" not in r])
    sharding.barrier(world)
    mine_file = out if world == 1 else files.part_file(out, rank)
    done = {r["path"] for r in files.read_rows(out, repair=world == 1)}
    for part in out.parent.glob(f"{out.name}.rank*.part"):
        done |= {r["path"] for r in files.read_rows(part, repair=part == mine_file)}
    if retry_errors:
        done -= {r["path"] for r in files.read_rows(mine_file) if "error" in r}
    mine = [p for p in sharding.share(paths, rank, world) if p not in done]
    predictor = load_predictor(model, **options)
    if parts_dir is not None:
        parts_dir.mkdir(parents=True, exist_ok=True)
    appender = files.LineAppender(mine_file)
    seq = len(files.embedding_parts(parts_dir, rank)) if parts_dir is not None else 0
    rows: list[dict] = []
    feats: list[tuple[str, np.ndarray]] = []
    try:
        for row, feature in predictor.run(mine, progress=progress and rank == 0):
            rows.append(row)
            if feature is not None:
                feats.append((row["path"], feature))
            if len(rows) >= predictor.batch_size:
                seq = _flush(appender, rows, feats, parts_dir, rank, seq)
                rows, feats = [], []
        _flush(appender, rows, feats, parts_dir, rank, seq)
    finally:
        appender.close()
    sharding.barrier(world)
    summary: dict[str, Any] = _merge(out, paths, emb_path, parts_dir) if rank == 0 else {}
    summary["this_run"] = sharding.gather_timings(predictor.timings, world)
    summary["skipped_already_done"] = len(done & set(paths))
    return summary


def _flush(appender: files.LineAppender, rows, feats, parts_dir: Path | None, rank: int, seq: int) -> int:
    """The batch's features first (an atomic part file), then its lines: a line implies its features exist."""
    if parts_dir is not None and feats:
        files.write_embedding_part(parts_dir, rank, seq, feats)
        seq += 1
    appender.write(rows)
    return seq


def _merge(out: Path, paths: list[str], emb_path: Path | None, parts_dir: Path | None) -> dict:
    """Rank 0: every line (the file and the ranks' parts) once, in input order, written atomically; the part
    files removed; the embeddings gathered in the same order."""
    rows: dict[str, dict] = {}
    for r in files.read_rows(out):
        rows[r["path"]] = r
    parts = sorted(out.parent.glob(f"{out.name}.rank*.part"))
    for part in parts:
        for r in files.read_rows(part):
            rows[r["path"]] = r
    order = {p: i for i, p in enumerate(paths)}
    ordered = sorted(rows.values(), key=lambda r: (order.get(r["path"], len(order)), r["path"]))
    files.write_rows(out, ordered)
    for part in parts:
        part.unlink()
    failed = [r for r in ordered if "error" in r]
    summary = {"out": str(out), "rows": len(ordered), "failed": len(failed), "inputs": len(paths),
               "missing": len(set(paths) - set(rows))}
    if emb_path is not None and parts_dir is not None:
        keep, with_features = files.gather_embeddings(emb_path, parts_dir, [r["path"] for r in ordered])
        without = sum(1 for r in ordered if "error" not in r and r["path"] not in with_features)
        if without:
            logger.warning("vivit_kernels predict: %d video(s) have a line but no embeddings row (an earlier run "
                           "without --embeddings wrote them); delete their lines to compute them again", without)
        summary["embeddings"] = {"file": str(emb_path), "rows": len(keep), "without": without}
    return summary
