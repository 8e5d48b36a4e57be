"""What ``predict_to_file`` writes, and how a run resumes from it: the predictions file and the embeddings file.

- predictions: JSON lines, one per video (``read_rows``, ``LineAppender``, ``write_rows``). A line is appended by
  one write of a whole line to an O_APPEND file and flushed to disk, so after a crash a line is either whole or
  cut short; a last line cut short is dropped (and with ``repair`` cut off the file, so appends start on a fresh
  line). Under torchrun each rank appends to its own part file (``part_file``), which rank 0 merges.
- embeddings: the pooled features, one row per video in the predictions' order, in ``.safetensors`` (the paths in
  its metadata) or ``.npy`` (with ``FILE.paths.json``): ``write_embeddings`` / ``read_embeddings``. While a run goes
  on, each batch's features are an atomic part file of their own (``write_embedding_part``), written before the
  batch's lines (a line implies its features exist); ``gather_embeddings`` merges them at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ._files import atomic_write_text

__all__ = ["read_rows", "write_rows", "LineAppender", "part_file", "write_embedding_part", "embedding_parts",
           "gather_embeddings", "write_embeddings", "read_embeddings"]


def read_rows(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """The whole JSON lines of ``path``; a last line without its newline (a write cut short) is dropped, and with
    ``repair`` cut off the file, so appends start on a fresh line."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if repair and end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(end)
    rows = []
    for n, line in enumerate(raw[:end].splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not a JSON line ({e}); is this a predictions file?") from None
    return rows


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` as the whole file ``path``, written atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


class LineAppender:
    """Appends whole lines: each line is one write of a complete line on an O_APPEND file, flushed to disk."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            os.write(self.fd, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
            os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def part_file(out: Path, rank: int) -> Path:
    """Rank ``rank``'s own predictions file beside ``out`` (merged into ``out`` at the end)."""
    return out.with_name(f"{out.name}.rank{rank}.part")




def write_embedding_part(parts_dir: Path, rank: int, seq: int, feats: list[tuple[str, np.ndarray]]) -> None:
    """One batch's features (path, vector) as part file ``seq`` of ``rank``, written atomically."""
    from safetensors.numpy import save_file

    tmp = parts_dir / f".rank{rank}-{seq:07d}.tmp"
    save_file({"embeddings": np.stack([f for _, f in feats]).astype(np.float32)}, str(tmp),
              metadata={"paths": json.dumps([p for p, _ in feats])})
    os.replace(tmp, parts_dir / f"rank{rank}-{seq:07d}.safetensors")


def embedding_parts(parts_dir: Path, rank: int | None = None) -> list[Path]:
    """The part files in ``parts_dir`` (of ``rank``, or of every rank), in the order they were written."""
    return sorted(parts_dir.glob(f"rank{'*' if rank is None else rank}-*.safetensors"))


def gather_embeddings(path: Path, parts_dir: Path, order: list[str]) -> tuple[list[str], set[str]]:
    """The embeddings file ``path``: its earlier rows and every part file's, for the videos of ``order`` that have
    features, in that order; the part files (and their folder) removed. Returns (the paths written, every path with
    features)."""
    from safetensors import safe_open

    feats: dict[str, np.ndarray] = {}
    if path.is_file():  # an earlier run's file: its rows stay, new parts add to it
        feats.update(zip(*read_embeddings(path), strict=True))
    files = embedding_parts(parts_dir)
    for file in files:
        with safe_open(str(file), "np") as f:
            names = json.loads(f.metadata()["paths"])
            values = f.get_tensor("embeddings")
        feats.update(zip(names, values, strict=True))
    keep = [p for p in order if p in feats]
    matrix = np.stack([feats[p] for p in keep]) if keep else np.zeros((0, 0), np.float32)
    write_embeddings(path, keep, matrix)
    for file in files:  # now in the file: the parts go
        file.unlink()
    with contextlib.suppress(OSError):
        parts_dir.rmdir()
    return keep, set(feats)


def write_embeddings(path: Path, keys: list[str], matrix: np.ndarray) -> None:
    """``keys`` and their rows of ``matrix`` as the embeddings file ``path`` (its suffix picks the format),
    written atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({"embeddings": matrix}, str(tmp), metadata={"paths": json.dumps(keys)})
    else:
        with open(tmp, "wb") as f:
            np.save(f, matrix)
        atomic_write_text(path.with_name(path.name + ".paths.json"), json.dumps(keys) + "\n")
    os.replace(tmp, path)


def read_embeddings(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """(paths, matrix) from an embeddings file ``predict_to_file`` wrote."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            return json.loads(f.metadata()["paths"]), f.get_tensor("embeddings")
    keys = json.loads(path.with_name(path.name + ".paths.json").read_text(encoding="utf-8"))
    return keys, np.load(path)
