"""Video datasets: a folder of class sub-folders or a manifest, clip sampling, training augmentation, and
decoding that survives bad files.

    from vivit_kernels.data import load_video_splits, VideoClipDataset
    splits = load_video_splits("videos/")                 # videos/<label>/<file>, or videos/train/..., videos/val/...
    train = VideoClipDataset(splits.train, splits.label2id, processor, num_frames=32, frame_sample_rate=2, train=True)

Each item is ``{"pixel_values": (T, 3, H, W), "labels": int}`` (evaluation with several views:
``(views, T, 3, H, W)``). Decoding happens in ``__getitem__``, so it runs in DataLoader workers; the resize + crop
+ rescale + normalise is one op of our extension (``VideoProcessor.take_view``). Where it runs
(``preprocess_on``): all of it in the worker (``"worker"``, for a model on the CPU); the resize and crop in the
worker and the rest on the model's device (``"views"``, what ``predict`` and ``finetune`` do on a GPU: the
workers hand on 3 bytes a pixel of the 224x224 crop, not of the source frame, docs/video.md); or all of it on the
device (``"device"``: the item carries the uint8 frames, for frames that are already there, decoded by NVDEC).
``VideoBatchPreparer`` finishes a batch on the device.

A video that cannot be read is logged once (path and error) and counted: in training its place in the batch
goes to the next readable video, so an epoch never stops for one bad file; in evaluation it is left out.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .processing import VideoProcessor, views_first
from .processing import View as _View
from .video import read_clips

__all__ = [
    "VIDEO_EXTENSIONS",
    "VideoItem",
    "VideoSplits",
    "find_videos",
    "folder_items",
    "manifest_items",
    "load_video_splits",
    "label_maps",
    "default_workers",
    "Augment",
    "VideoClipDataset",
    "collate_clips",
    "VideoBatchPreparer",
]

logger = logging.getLogger("vivit_kernels.data")

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv",
                              ".3gp", ".ts", ".gif"})
PREPROCESS_ON = ("worker", "views", "device")
_SPLIT_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation", "eval"), "test": ("test",)}


@dataclass(frozen=True)
class VideoItem:
    """One video: its path and (for training data) its label name."""

    path: str
    label: str | None = None


@dataclass
class VideoSplits:
    """Training and held-out items with the label maps (sorted label names: a stable order)."""

    train: list[VideoItem]
    val: list[VideoItem]
    id2label: dict[int, str]
    label2id: dict[str, int]
    source: str = ""


def default_workers() -> int:
    """Decoding workers per process when none is asked for: half the cores, at least 1, at most 8."""
    return min(8, max(1, (os.cpu_count() or 2) // 2))


def find_videos(root: str | os.PathLike) -> list[str]:
    """Every file under ``root`` (recursively) with a video extension, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no directory {root}")
    return sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())


def folder_items(root: str | os.PathLike) -> list[VideoItem]:
    """``root/<label>/<video>`` (videos may sit deeper inside a label's folder): the label is the name of the
    first folder under ``root``."""
    root = Path(root)
    items = [VideoItem(path, Path(path).relative_to(root).parts[0]) for path in find_videos(root)]
    loose = [i.path for i in items if len(Path(i.path).relative_to(root).parts) == 1]
    if loose:
        raise ValueError(f"{root}: videos must sit in one folder per label (root/<label>/<video>), but "
                         f"{len(loose)} are directly in it, e.g. {loose[0]}")
    if not items:
        raise ValueError(f"{root}: no videos found (looked for {', '.join(sorted(VIDEO_EXTENSIONS))} in "
                         "root/<label>/ folders)")
    return items


def manifest_items(file: str | os.PathLike, need_label: bool = True) -> list[VideoItem]:
    """A CSV (a header row with ``path`` and ``label`` columns) or JSONL (``{"path": ..., "label": ...}`` per
    line) manifest; relative paths are relative to the manifest's folder."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"no manifest file {file}")
    rows: list[dict] = []
    if file.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        with open(file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{file}:{n}: not a JSON object ({e})") from None
    else:
        with open(file, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    items = []
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not row.get("path"):
            raise ValueError(f"{file}: row {n} has no 'path' (expected columns path,label), got {row!r}")
        label = row.get("label")
        if need_label and (label is None or str(label) == ""):
            raise ValueError(f"{file}: row {n} ({row['path']}) has no 'label'")
        path = Path(row["path"]).expanduser()
        items.append(VideoItem(os.path.normpath(path if path.is_absolute() else file.parent / path),
                               None if label is None else str(label)))
    if not items:
        raise ValueError(f"{file}: the manifest lists no videos")
    return items


def collect_inputs(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Video paths from files, folders (recursive, by video extension, sorted), globs, and manifests (``.csv``
    with a ``path`` column, ``.jsonl`` with a ``path`` key; relative paths are relative to the manifest), in the
    order given, each path once."""
    out: list[str] = []
    for raw in inputs:
        text = str(raw)
        path = Path(text)
        if path.is_dir():
            out.extend(find_videos(path))
        elif path.is_file() and path.suffix.lower() in (".csv", ".jsonl", ".ndjson", ".json"):
            out.extend(item.path for item in manifest_items(path, need_label=False))
        elif path.is_file():
            out.append(text)
        elif glob.has_magic(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no file matches {text}")
            for match in matches:
                out.extend(find_videos(match) if Path(match).is_dir() else [match])
        else:
            raise FileNotFoundError(f"no file, folder or manifest at {text}")
    seen: set[str] = set()
    unique = [p for p in out if not (p in seen or seen.add(p))]
    if not unique:
        raise ValueError(f"no videos found in {', '.join(map(str, inputs))}")
    return unique


def label_maps(items: Iterable[VideoItem]) -> tuple[dict[int, str], dict[str, int]]:
    """``id2label`` and ``label2id`` over the items' labels, sorted by name."""
    names = sorted({i.label for i in items if i.label is not None})
    return dict(enumerate(names)), {name: i for i, name in enumerate(names)}


def load_video_splits(data: str | os.PathLike, val: str | os.PathLike | None = None,
                      val_fraction: float = 0.1) -> VideoSplits:
    """Training and held-out videos from ``data``:

    - a folder with ``train/`` (and ``val/`` / ``validation/``) sub-folders, each of class folders;
    - a folder of class folders: every ``round(1 / val_fraction)``-th video of each class (in sorted order) is
      held out, so the split is stable and every class is in both parts;
    - a CSV / JSONL manifest (``path``, ``label``; an optional ``split`` column with train / val).

    ``val`` (a folder or manifest) overrides where the held-out videos come from. Labels seen only in the
    held-out part are an error (the model could never predict them).
    """
    data = Path(data)
    train: list[VideoItem]
    held: list[VideoItem] = []
    if data.is_file():
        rows = manifest_items(data)
        splits = _manifest_splits(data)
        train = [r for r, s in zip(rows, splits, strict=True) if s != "val"]
        held = [r for r, s in zip(rows, splits, strict=True) if s == "val"]
        explicit = any(s == "val" for s in splits)
    elif data.is_dir():
        sub = {name: _split_dir(data, name) for name in _SPLIT_NAMES}
        if sub["train"] is not None:
            train = folder_items(sub["train"])
            held = folder_items(sub["val"]) if sub["val"] is not None else []
            explicit = sub["val"] is not None
        else:
            train, explicit = folder_items(data), False
    else:
        raise FileNotFoundError(f"no video folder or manifest at {data}")
    if val is not None:
        val = Path(val)
        held = manifest_items(val) if val.is_file() else folder_items(val)
        explicit = True
    if not explicit and val_fraction > 0:
        train, held = _hold_out(train, val_fraction)
    id2label, label2id = label_maps(train)
    unknown = sorted({i.label for i in held} - set(label2id))
    if unknown:
        raise ValueError(f"{data}: the held-out videos have labels the training videos lack: {', '.join(unknown[:5])}")
    if len(label2id) < 2:
        raise ValueError(f"{data}: a classifier needs at least 2 labels, the training videos have {len(label2id)}")
    return VideoSplits(train, held, id2label, label2id, str(data))


def _split_dir(root: Path, split: str) -> Path | None:
    for name in _SPLIT_NAMES[split]:
        if (root / name).is_dir():
            return root / name
    return None


def _manifest_splits(file: Path) -> list[str]:
    """The manifest's ``split`` column (train / val names as for folders), "train" where it has none."""
    rows: list[Any]
    if file.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        with open(file, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        with open(file, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        split = str(row.get("split") or "train").lower()
        out.append("val" if split in _SPLIT_NAMES["val"] + _SPLIT_NAMES["test"] else "train")
    return out


def _hold_out(items: list[VideoItem], fraction: float) -> tuple[list[VideoItem], list[VideoItem]]:
    every = max(2, round(1 / fraction))
    train, held = [], []
    by_label: dict[str, list[VideoItem]] = {}
    for item in items:
        by_label.setdefault(item.label or "", []).append(item)
    for group in by_label.values():
        for n, item in enumerate(group):
            (held if n % every == every - 1 else train).append(item)
    return train, held


# ------------------------------------------------------------------------------------------------
# Clips
# ------------------------------------------------------------------------------------------------
@dataclass
class Augment:
    """Training augmentation, the usual video recipe: resize the short side to a random multiple of the crop's
    (``scale``: 256/224 to 320/224 of the crop), take a random crop, flip horizontally with probability
    ``flip`` (0 for labels that depend on left and right)."""

    scale: tuple[float, float] = (256 / 224, 320 / 224)
    flip: float = 0.5

    def __post_init__(self):
        low, high = self.scale
        if not 1.0 <= low <= high:
            raise ValueError(f"Augment.scale must be (low, high) with 1 <= low <= high (multiples of the crop), "
                             f"got {self.scale}")
        if not 0.0 <= self.flip <= 1.0:
            raise ValueError(f"Augment.flip is a probability, got {self.flip}")


class VideoClipDataset(torch.utils.data.Dataset):
    """Clips of ``items`` for ViViT: ``num_frames`` frames ``frame_sample_rate`` apart.

    - ``train=True``: a random window per call (videos shorter than the window: the clip spreads its frames over
      the whole video, so frames repeat; counted in ``stats()``), with ``augment`` (default ``Augment()``);
      an unreadable video is replaced by the next readable one.
    - ``train=False``: ``views=(clips, crops)`` views per video: ``clips`` windows spread evenly (1: the middle
      window), each with ``crops`` crops along the long side (1: the center one), preprocessed exactly as
      ``processor`` (transformers' VivitImageProcessor) does; an unreadable video gives an item without
      pixels (``collate_clips`` leaves it out and reports it).

    ``preprocess_on="views"`` returns the resized and cropped uint8 views (``pixels_uint8``) instead of pixels, and
    ``"device"`` the uint8 frames and the views to take: ``VideoBatchPreparer`` finishes them on the model's
    device. ``decode``: the frames' decoder (``video.DECODERS``; ``"cuda"`` decodes on the GPU, so it needs the
    dataset read in the main process: a DataLoader with ``num_workers=0``).
    """

    def __init__(self, items: Sequence[VideoItem], label2id: dict[str, int] | None, processor: VideoProcessor,
                 num_frames: int, frame_sample_rate: int = 1, train: bool = False, augment: Augment | None = None,
                 views: tuple[int, int] = (1, 1), preprocess_on: str = "worker", dtype: torch.dtype = torch.float32,
                 decode: str = "pyav"):
        if preprocess_on not in PREPROCESS_ON:
            raise ValueError(f"preprocess_on must be one of {', '.join(PREPROCESS_ON)}, got {preprocess_on!r}")
        if not items:
            raise ValueError("VideoClipDataset: no videos")
        clips, crops = views
        if clips < 1 or crops not in (1, 3):
            raise ValueError(f"views must be (clips >= 1, crops 1 or 3), got {views}")
        if train and views != (1, 1):
            raise ValueError("training takes one random view per video; views are for evaluation")
        self.items = list(items)
        self.label2id = label2id
        self.processor = processor
        self.num_frames, self.frame_sample_rate = int(num_frames), int(frame_sample_rate)
        self.train = train
        self.augment = (augment or Augment()) if train else None
        self.views = (int(clips), int(crops))
        self.preprocess_on = preprocess_on
        self.dtype = dtype
        self.decode = decode
        self._logged: set[str] = set()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        skipped: list[tuple[str, str]] = []
        for attempt in range(min(len(self.items), 64 if self.train else 1)):
            item = self.items[(index + attempt) % len(self.items)]
            label = self._label(item)  # a label the model lacks is an error of the data, not of the file
            try:
                sample = self._load(item, label)
            except Exception as e:  # noqa: BLE001 - any decoder failure: log, count, go on
                error = " ".join(f"{type(e).__name__}: {e}".split())
                if item.path not in self._logged:
                    self._logged.add(item.path)
                    logger.warning("vivit_kernels.data: skipping %s (%s)", item.path, error)
                skipped.append((item.path, error))
                continue
            sample["index"] = index
            sample["skipped"] = skipped
            return sample
        if self.train:
            raise RuntimeError(f"64 videos in a row from {self.items[index].path} on could not be read; the last "
                               f"error: {skipped[-1][1]}")
        return {"index": index, "path": self.items[index].path, "skipped": skipped}

    def _label(self, item: VideoItem) -> int:
        if self.label2id is None or item.label is None:
            return -100
        if item.label not in self.label2id:
            raise KeyError(f"label {item.label!r} of {item.path} is not one of the model's labels")
        return self.label2id[item.label]

    def _load(self, item: VideoItem, label: int) -> dict[str, Any]:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item())) if self.train else None
        clips = 1 if self.train else self.views[0]
        processing_s = [0.0]
        transform = None  # "device": the frames themselves; else each frame becomes its views as it is decoded
        if self.preprocess_on != "device":
            transform = self.processor.views_per_frame(self._views, uint8=self.preprocess_on == "views",
                                                       dtype=self.dtype, spent=processing_s)
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:  # counted, not printed once per call
            warnings.simplefilter("always")
            frames, seg_len, duration = read_clips(item.path, self.num_frames, self.frame_sample_rate, clips, rng,
                                                   decode=self.decode, transform=transform)
        decode_s = time.perf_counter() - start - processing_s[0]
        for w in caught:
            if "frames repeat" not in str(w.message) and item.path not in self._logged:
                self._logged.add(item.path)
                logger.warning("vivit_kernels.data: %s", w.message)
        frames = torch.as_tensor(frames)  # on the GPU when NVDEC decoded it
        sample = {"labels": label, "path": item.path,
                  "short": seg_len < self.num_frames * self.frame_sample_rate,
                  "meta": {"video_frames": seg_len, "duration_s": duration, "decode_s": decode_s,
                           "frames_decoded": frames.shape[0] * frames.shape[1]}}
        if self.preprocess_on == "device":  # (clips, T, H, W, 3) uint8, the views to take
            sample.update(frames=frames, views=self._views(frames.shape[2], frames.shape[3]))
            return sample
        # (clips, T, views, 3, h, w) -> (T, 3, h, w) for one view of one clip, else (clips * views, T, 3, h, w)
        pixels = views_first(frames)
        sample["pixels_uint8" if self.preprocess_on == "views" else "pixel_values"] = (
            pixels[0] if pixels.shape[0] == 1 else pixels)
        sample["meta"]["preprocess_s"] = processing_s[0]
        return sample

    def _views(self, height: int, width: int) -> list[_View]:
        if not self.train:
            hw = self.processor.resized_size(height, width)
            crops = VideoProcessor(**{**_geometry(self.processor), "spatial_crops": self.views[1]}).crop_boxes(*hw)
            return [_View(hw, box) for box in crops]
        ch, cw = self.processor.crop_size["height"], self.processor.crop_size["width"]
        scale = float(torch.empty(()).uniform_(*self.augment.scale))
        short = max(round(min(ch, cw) * scale), min(ch, cw))
        jittered = VideoProcessor(**{**_geometry(self.processor), "size": {"shortest_edge": short}})
        rh, rw = jittered.resized_size(height, width)
        rh, rw = max(rh, ch), max(rw, cw)  # a crop larger than a very thin frame: stretch it to fit
        top = int(torch.randint(0, rh - ch + 1, ()))
        left = int(torch.randint(0, rw - cw + 1, ()))
        flip = bool(torch.rand(()) < self.augment.flip)
        return [_View((rh, rw), (top, left, ch, cw), flip)]


def _geometry(processor: VideoProcessor) -> dict[str, Any]:
    return {"size": processor.size, "do_resize": processor.do_resize, "crop_size": processor.crop_size,
            "do_center_crop": processor.do_center_crop}


def _take_views(processor: VideoProcessor, clip: torch.Tensor, views: list[_View],
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 clips (clips, T, H, W, 3) -> (T, 3, h, w) for one view of one clip, else (clips * crops, T, 3, h, w)
    (clip-major), on the clip's device (the whole clip at once: frames NVDEC left on the GPU)."""
    stacked = processor.take_views(clip, views, dtype=dtype, stacked=True)
    return stacked[0] if stacked.shape[0] == 1 else stacked


def collate_clips(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch of ``VideoClipDataset`` items: ``pixel_values`` stacked (or, for device preprocessing, ``frames``
    and ``views`` lists), ``labels``, ``index``, and the bookkeeping ``skipped`` (path, error) pairs and
    ``short`` count; items that could not be read are left out (``pixel_values`` is None if none could)."""
    good = [s for s in samples if "labels" in s]
    batch: dict[str, Any] = {
        "labels": torch.tensor([s["labels"] for s in good], dtype=torch.long),
        "index": torch.tensor([s["index"] for s in good], dtype=torch.long),
        "skipped": [pair for s in samples for pair in s["skipped"]],
        "short": sum(1 for s in good if s["short"]),
    }
    batch["paths"] = [s["path"] for s in good]
    batch["meta"] = [s["meta"] for s in good]  # per video: frames, duration, decode (and worker preprocess) time
    if "counted" in samples[0]:  # evaluation shards: whether each item counts (padding items do not)
        batch["counted"] = torch.tensor([s["counted"] for s in good], dtype=torch.bool)
    if good and "frames" in good[0]:
        batch["frames"] = [s["frames"] for s in good]
        batch["views"] = [s["views"] for s in good]
    elif good and "pixels_uint8" in good[0]:  # resized and cropped uint8 views: the device normalises them
        batch["pixels_uint8"] = _stack_for_transfer([s["pixels_uint8"] for s in good])
    else:
        batch["pixel_values"] = _stack_for_transfer([s["pixel_values"] for s in good]) if good else None
    return batch


def _stack_for_transfer(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The samples' tensors stacked; in a DataLoader worker, straight into shared memory (torch's
    ``default_collate`` does that), where the batch goes to reach the main process anyway: without it, the worker
    writes every byte twice (a stacked copy, then that copy moved into shared memory). 4 clips x 3 crops of a
    340x256 video in float32 are 231 MB: through one worker 554 -> 434 ms a video, measured here (docs/video.md)."""
    return torch.utils.data.default_collate(tensors)


@dataclass
class VideoBatchPreparer:
    """Turns a ``collate_clips`` batch into model inputs on ``device``: runs the preprocessing there when the
    batch carries frames, and keeps the bookkeeping (``skipped`` files, ``short`` clips) in its counters."""

    processor: VideoProcessor
    device: Any
    dtype: torch.dtype = torch.float32
    skipped: dict[str, str] = field(default_factory=dict)
    short: int = 0

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        self.skipped.update(dict(batch.pop("skipped", [])))
        self.short += int(batch.pop("short", 0))
        for key in ("index", "paths", "meta"):
            batch.pop(key, None)
        frames, views, uint8 = batch.pop("frames", None), batch.pop("views", None), batch.pop("pixels_uint8", None)
        if uint8 is not None:
            batch["pixel_values"] = self.processor.normalize(uint8.to(self.device, non_blocking=True), self.dtype)
        elif frames is not None:
            batch["pixel_values"] = torch.stack([
                _take_views(self.processor, f.to(self.device, non_blocking=True), v, self.dtype)
                for f, v in zip(frames, views, strict=True)])
        return batch
