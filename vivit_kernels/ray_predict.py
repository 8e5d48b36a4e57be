"""``predict`` on a Ray cluster: decoding on CPU workers, the model on GPU actors, each stage scaled on its own.

    from vivit_kernels.ray_predict import predict_on_ray
    summary = predict_on_ray(["s3-mounted/videos/"], "runs/mine", "preds.jsonl", address="auto")

(``vivit-kernels predict ... --ray [ADDRESS]``.) A Ray Data pipeline over the inputs ``predict`` takes:

- **decode** (Ray tasks, ``decode_cpus`` CPUs each, ``decode_workers`` at a time or as many as the cluster has):
  each video decoded and cut into the views ``predict`` takes (``clips`` x ``crops``), resized and cropped, as uint8
  (the normaliser runs where the model is: a quarter of float32's bytes cross the network); a file that cannot be
  read becomes an error record, never a failed job.
- **model** (a pool of actors, one per GPU, or one CPU actor where the cluster has no GPU): each holds the model
  once (``load_predictor``: attn="auto" and bf16 on a GPU, token merging if asked) and scores batches of clips
  from several videos (``Predictor.score``, the same code as ``predict``'s loop).
- **write** (this process): each result is appended to the JSONL as it arrives (a whole line or none,
  ``prediction_files``), each batch's embeddings to an atomic part file first; at the end the lines are put in input
  order and the embeddings gathered, exactly the files ``predict_to_file`` writes.

Fault tolerance: a rerun skips the videos that already have a line (as ``predict``'s resume); a dead model actor is
replaced and its batch run again, a decode task whose worker died runs again (Ray Data's defaults: actors
``max_restarts=-1``, ``max_task_retries=-1``, tasks ``max_retries=-1`` for system failures); only results of
finished tasks reach the writer, and it writes each video once.
At the end the summary names the stage that limited the run from the stages' own times (decode seconds per video
over the decode workers against model seconds per video over the actors) and what to add.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import prediction_files as files

__all__ = ["predict_on_ray", "RayStages"]

logger = logging.getLogger("vivit_kernels.ray_predict")


class RayStages:
    """Where the time of a Ray run went, per stage: decode seconds (decoding and preprocessing, summed over the
    tasks), model seconds (summed over the actors), the workers of each, and which stage limited the run."""

    def __init__(self, decode_workers: int, model_actors: int):
        self.decode_workers, self.model_actors = decode_workers, model_actors
        self.videos = self.failed = 0
        self.decode_s = self.model_s = self.wall_s = 0.0

    def bottleneck(self) -> dict[str, Any]:
        """Videos per second each stage sustains with its workers, the smaller one the bottleneck, and the advice."""
        decoded = max(self.videos, 1)
        scored = max(self.videos - self.failed, 1)
        decode_rate = self.decode_workers * decoded / self.decode_s if self.decode_s else None
        model_rate = self.model_actors * scored / self.model_s if self.model_s else None
        if decode_rate is None or model_rate is None:
            return {"limited_by": None, "decode_videos_per_s": decode_rate, "model_videos_per_s": model_rate}
        decoding = decode_rate < model_rate
        advice = (f"decoding limits the run: about {int(np.ceil(self.decode_workers * model_rate / decode_rate))} "
                  "decode workers would keep the model busy (more CPU nodes, or --decode-workers)" if decoding else
                  "the model limits the run: more GPU actors (GPUs) would go faster; the decode workers keep up")
        return {"limited_by": "decoding" if decoding else "model", "decode_videos_per_s": round(decode_rate, 2),
                "model_videos_per_s": round(model_rate, 2), "advice": advice}

    def summary(self) -> str:
        rate = self.videos / self.wall_s if self.wall_s else 0.0
        b = self.bottleneck()
        text = (f"{self.videos} videos ({self.failed} failed) in {self.wall_s:.2f} s, {rate:.2f} videos/s on Ray; "
                f"decode {self.decode_s:.2f} s over {self.decode_workers} worker(s), model {self.model_s:.2f} s over "
                f"{self.model_actors} actor(s)")
        if b["limited_by"] is not None:
            text += (f"\nbottleneck: {b['limited_by']} (decode {b['decode_videos_per_s']} videos/s, model "
                     f"{b['model_videos_per_s']} videos/s); {b['advice']}")
        return text


def _decode(row: dict[str, Any], processor, num_frames: int, frame_sample_rate: int, views: tuple[int, int],
            decode: str) -> dict[str, Any]:
    """One video into its uint8 views (views, T, 3, h, w), or an error record (``error`` set, no views)."""
    from . import data as vdata

    start = time.perf_counter()
    dataset = vdata.VideoClipDataset([vdata.VideoItem(row["path"])], None, processor, num_frames, frame_sample_rate,
                                     views=views, preprocess_on="views", decode=decode)
    sample = dataset[0]
    out = {"path": row["path"], "index": row["index"], "decode_s": time.perf_counter() - start}
    if "pixels_uint8" not in sample:
        error = sample["skipped"][-1][1] if sample["skipped"] else "not decoded"
        return dict(out, views=b"", meta="", error=error)
    pixels = sample["pixels_uint8"].numpy()
    pixels = pixels[None] if pixels.ndim == 4 else pixels  # (views, T, 3, h, w)
    meta = {k: sample["meta"][k] for k in ("video_frames", "duration_s")}
    # the views as bytes and their shape in the metadata: one column type for every record, failed ones included
    return dict(out, views=np.ascontiguousarray(pixels).tobytes(), meta=json.dumps(dict(meta, shape=pixels.shape)),
                error="")


class _ModelStage:
    """A Ray actor holding the model once: scores a batch of decoded videos (error records pass through)."""

    def __init__(self, model: Any, options: dict[str, Any]):
        from .predict import load_predictor

        self.predictor = load_predictor(model, workers=0, **options)
        param = next(self.predictor.model.parameters())
        self.device, self.dtype = param.device, param.dtype

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from . import __version__
        from ._devices import synchronize

        start = time.perf_counter()
        paths = [str(p) for p in batch["path"]]
        ok = [i for i, e in enumerate(batch["error"]) if not e]
        results: dict[str, tuple[dict, np.ndarray]] = {}
        if ok:
            meta = [json.loads(batch["meta"][i]) for i in ok]
            pixels = torch.from_numpy(np.stack([np.frombuffer(batch["views"][i], np.uint8).reshape(m["shape"])
                                                for i, m in zip(ok, meta, strict=True)]))
            pixels = self.predictor.processor.normalize(pixels.to(self.device), self.dtype)
            results = self.predictor.score(pixels, [paths[i] for i in ok], meta)
            synchronize(self.device)
        rows, features = [], []
        for i, path in enumerate(paths):
            if path in results:
                row, feature = results[path]
                rows.append(json.dumps(row, ensure_ascii=False))
                features.append(np.asarray(feature, np.float32).tobytes())
            else:
                rows.append(json.dumps({"path": path, "error": str(batch["error"][i]), "model": self.predictor.name,
                                        "vivit_kernels": __version__}, ensure_ascii=False))
                features.append(b"")
        share = (time.perf_counter() - start) / len(paths)
        return {"path": np.array(paths, dtype=object), "row": np.array(rows, dtype=object),
                "feature": np.array(features, dtype=object), "decode_s": batch["decode_s"],
                "model_s": np.full(len(paths), share)}


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError('predict on Ray needs Ray Data: pip install "vivit_kernels[ray]"') from None
    return ray


def _start(ray, address: str | None) -> None:
    """Connect to ``address`` ("auto": the cluster this machine belongs to), or start a local instance; an
    instance this process already has is used as it is."""
    if ray.is_initialized():
        return
    ray.init(address=address or None, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)


def predict_on_ray(inputs: Sequence[str | os.PathLike], model: Any, out: str | os.PathLike,
                   embeddings: str | os.PathLike | None = None, address: str | None = None,
                   decode_workers: int | None = None, model_actors: int | None = None, decode_cpus: float = 1.0,
                   progress: bool = True, retry_errors: bool = False, **options: Any) -> dict[str, Any]:
    """``predict_to_file`` on Ray (see the module docstring): the same JSONL (and embeddings) for the same inputs.
    ``address``: a running cluster's (``ray start --head`` prints it; "auto" on one of its machines), None for a
    local instance. ``decode_workers``: decode tasks at a time (None: as many as the cluster's CPUs allow);
    ``model_actors``: actors of the model stage (None: one per GPU of the cluster, one on the CPU without GPUs).
    ``options`` as ``load_predictor``'s (``batch_size``: videos per model batch). ``model`` must be readable by
    every node (a shared or a copied directory). Returns ``predict_to_file``'s summary with ``this_run`` the
    stages' ``RayStages``."""
    from . import predict as p
    from .data import collect_inputs
    from .processing import VideoProcessor
    from .video import resolve_decoder

    ray = _ray()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    emb_path = Path(embeddings) if embeddings is not None else None
    if emb_path is not None and emb_path.suffix not in (".safetensors", ".npy"):
        raise ValueError(f"embeddings: {emb_path} must end in .safetensors or .npy")
    if options.get("decode") == "cuda":
        raise ValueError("predict on Ray decodes on CPU workers: --decode cuda does not apply")
    paths = collect_inputs(inputs)
    parts_dir = emb_path.with_name(emb_path.name + ".parts") if emb_path is not None else None
    if retry_errors and out.is_file():
        files.write_rows(out, [r for r in files.read_rows(out, repair=True) if "error" not in r])
    done = {r["path"] for r in files.read_rows(out, repair=True)}
    todo = [(i, path) for i, path in enumerate(paths) if path not in done]
    config, directory = _config_of(model)
    processor = VideoProcessor.for_model(config, directory)
    clips, crops = int(options.get("clips", 1)), int(options.get("crops", 1))
    batch_size = int(options.get("batch_size", 8))
    rate = processor.sample_rate(options.get("frame_sample_rate"))
    _start(ray, address)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = model_actors or max(gpus, 1)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    workers = decode_workers or max(1, cpus - (0 if gpus else actors))
    stages = RayStages(workers, actors)
    start = time.perf_counter()
    ray_stats = ""
    if todo:
        ds = _pipeline(ray, todo, model, options, processor, config.num_frames, rate, (clips, crops),
                       resolve_decoder(options.get("decode", "auto")), batch_size, gpus, actors, decode_workers,
                       decode_cpus)
        _write(ds.iter_batches(batch_size=None, batch_format="numpy"), out, parts_dir, stages, len(todo), progress)
        ray_stats = ds.stats()
    stages.wall_s = time.perf_counter() - start
    summary = p._merge(out, paths, emb_path, parts_dir)
    summary["this_run"] = stages
    summary["ray_stats"] = ray_stats  # Ray Data's own per-stage table (wall and CPU time, rows, memory)
    summary["skipped_already_done"] = len(done & set(paths))
    return summary


def _config_of(model: Any) -> tuple[Any, str | None]:
    """The model's config without building the model (the driver only needs the clip geometry), and its
    directory."""
    if isinstance(model, (str, os.PathLike)):
        import transformers

        from .checkpoint import check_local, local_dir

        if local_dir(model) is not None:
            check_local(local_dir(model))
        return transformers.AutoConfig.from_pretrained(model), str(model)
    return model.config, None


def _pipeline(ray, todo, model, options, processor, num_frames, rate, views, decoder, batch_size, gpus, actors,
              decode_workers, decode_cpus):
    """The Ray Data pipeline (lazy): decode tasks, then the model actors. Ray's own progress bars off (this
    process shows one bar over the videos)."""
    ray.data.DataContext.get_current().enable_progress_bars = False
    items = [{"path": path, "index": i} for i, path in todo]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * (decode_workers or 8))))
    ds = ds.map(_decode, fn_kwargs=dict(processor=processor, num_frames=num_frames, frame_sample_rate=rate,
                                        views=views, decode=decoder),
                num_cpus=decode_cpus, compute=ray.data.TaskPoolStrategy(size=decode_workers))
    model_options = {k: v for k, v in options.items() if k not in ("workers", "decode", "batch_size")}
    model_options["batch_size"] = batch_size
    ds = ds.map_batches(_ModelStage, fn_constructor_kwargs=dict(model=model, options=model_options),
                        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                        num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)
    return ds


def _write(batches, out: Path, parts_dir: Path | None, stages: RayStages, total: int, progress: bool) -> None:
    """Each result line appended as it arrives (once per video), each batch's embeddings first."""
    from .predict import _flush
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="video", desc="predict (ray)", dynamic_ncols=True)
    if parts_dir is not None:
        parts_dir.mkdir(parents=True, exist_ok=True)
    seq = len(files.embedding_parts(parts_dir, 0)) if parts_dir is not None else 0
    appender = files.LineAppender(out)
    written: set[str] = set()
    try:
        for batch in batches:
            rows, feats = [], []
            for path, line, feature, decode_s, model_s in zip(batch["path"], batch["row"], batch["feature"],
                                                             batch["decode_s"], batch["model_s"], strict=True):
                path = str(path)
                if path in written:  # a retried batch's result: written once
                    continue
                written.add(path)
                row = json.loads(line)
                rows.append(row)
                stages.videos += 1
                stages.decode_s += float(decode_s)
                stages.model_s += float(model_s)
                if "error" in row:
                    stages.failed += 1
                elif feature:
                    feats.append((path, np.frombuffer(feature, np.float32)))
            seq = _flush(appender, rows, feats, parts_dir, 0, seq)  # predict's: the features, then the lines
            if bar is not None:
                bar.update(len(rows))
                bar.set_postfix(failed=stages.failed)
    finally:
        appender.close()
        if bar is not None:
            bar.close()
