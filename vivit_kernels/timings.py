"""Where the time of a run over videos went (``Timings``): waiting for decoded videos, preprocessing, the model,
and which of decoding and the model limited the run. ``predict`` fills it; its summary line is the command's."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Timings"]


@dataclass
class Timings:
    """Where the time went: ``waiting_s`` for the DataLoader (decoding is the usual cause), ``preprocess_s``
    (on the device, or summed over the workers on the CPU), ``model_s`` forward; ``decode_s`` summed over the
    workers (they run in parallel, so it can exceed the wall time)."""

    videos: int = 0
    failed: int = 0
    wall_s: float = 0.0
    waiting_s: float = 0.0
    decode_s: float = 0.0
    preprocess_s: float = 0.0
    model_s: float = 0.0
    frames: int = 0  # frames decoded (every clip's, repeats included)
    clips: int = 0  # views through the model
    worker_s: float = 0.0  # the decoding processes' time: decoding and their share of the preprocessing
    workers: int = 0

    def bottleneck(self) -> dict[str, Any]:
        """What limited the run: ``"decoding"`` when the model loop waited for decoded videos longer than it
        worked, else ``"model"``; the rates behind it (frames decoded per second of one decoding process, clips per
        second of the model loop) and, when decoding limited it, ``workers_needed``: how many decoding processes
        would keep the model busy at those rates."""
        busy = self.model_s + self.preprocess_s - (self.worker_s - self.decode_s)  # the loop's own work
        decoded = self.videos - self.failed
        out: dict[str, Any] = {
            "limited_by": "decoding" if self.waiting_s > busy else "model",
            "decode_frames_per_s_per_worker": round(self.frames / self.worker_s, 1) if self.worker_s else None,
            "model_clips_per_s": round(self.clips / busy, 2) if busy > 0 else None,
        }
        if out["limited_by"] == "decoding" and busy > 0 and decoded:
            out["workers_needed"] = max(1, math.ceil(self.worker_s / busy))
        return out

    def summary(self) -> str:
        rate = self.videos / self.wall_s if self.wall_s else 0.0
        text = (f"{self.videos} videos ({self.failed} failed) in {self.wall_s:.2f} s, {rate:.2f} videos/s; waiting "
                f"for decoded videos {self.waiting_s:.2f} s, preprocessing {self.preprocess_s:.2f} s, model "
                f"{self.model_s:.2f} s (decoding took {self.decode_s:.2f} s summed over the decoding processes)")
        b = self.bottleneck()
        if b["decode_frames_per_s_per_worker"] is None:
            return text
        text += (f"\nbottleneck: {b['limited_by']} (one decoding process: {b['decode_frames_per_s_per_worker']} "
                 f"frames/s; the model: {b['model_clips_per_s']} clips/s)")
        if "workers_needed" in b:
            text += (f"; about {b['workers_needed']} decoding processes would keep the model busy (--workers, now "
                     f"{self.workers or 'none: decoding in the main process'})")
        return text
