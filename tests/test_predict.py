"""Classifying a collection: inputs (files, folders, globs, manifests), one JSON line per video with errors
marked, agreement with `classify`, embeddings equal to the model's pooled features, resuming after a crash
without duplicates or gaps, two processes giving the rows of one. CPU, generated videos, the tiny preset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vivit_kernels as vk
from vivit_kernels import cli, sharding
from vivit_kernels import predict as vp
from vivit_kernels import prediction_files as files
from vivit_kernels.processing import VideoProcessor
from vivit_kernels.video import read_clips

from helpers import assert_close
from videos import prediction_collection, write_video

pytestmark = pytest.mark.cpu_only
OPTIONS = dict(workers=0, device="cpu", batch_size=4, progress=False)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    return prediction_collection(tmp_path_factory.mktemp("collection"))


def rows_of(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_inputs_from_files_folders_globs_and_manifests(collection, tmp_path):
    videos = collection / "videos"
    every = vp.collect_inputs([videos])
    assert len(every) == 16 and every == sorted(every)
    one = str(videos / "up" / "003.mp4")
    (tmp_path / "list.csv").write_text(f"path\n{one}\n../{Path(one).relative_to(collection.parent)}\n")
    (tmp_path / "list.jsonl").write_text(json.dumps({"path": one}) + "\n")
    got = vp.collect_inputs([one, str(videos / "down" / "00*.mp4"), tmp_path / "list.csv", tmp_path / "list.jsonl"])
    assert got[0] == one and len(got) == 1 + 7, got  # given order; each path once
    with pytest.raises(FileNotFoundError, match="no file, folder or manifest at"):
        vp.collect_inputs([tmp_path / "nothing.mp4"])
    with pytest.raises(FileNotFoundError, match="no file matches"):
        vp.collect_inputs([str(tmp_path / "*.webm")])


def test_one_line_per_video_errors_marked_and_classify_agrees(collection, tmp_path, capsys, monkeypatch):
    out, emb = tmp_path / "preds.jsonl", tmp_path / "emb.safetensors"
    summary = vp.predict_to_file([collection / "videos"], collection / "model", out, embeddings=emb, clips=2,
                                 crops=3, top_k=3, **OPTIONS)
    rows = rows_of(out)
    assert [r["path"] for r in rows] == vp.collect_inputs([collection / "videos"])
    failed = {Path(r["path"]).name: r["error"] for r in rows if "error" in r}
    assert set(failed) == {"corrupt.mp4", "empty.mp4"} and all("not a readable video" in e for e in failed.values())
    assert summary["failed"] == 2 and summary["rows"] == 16 and summary["this_run"].videos == 16
    good = [r for r in rows if "error" not in r]
    assert all(r["views"] == "2x3" and r["frames"] == 8 and len(r["labels"]) == 3 for r in good)
    assert all(r["scores"] == sorted(r["scores"], reverse=True) for r in good)

    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))  # classify may set it
    for row in good[:3]:
        assert cli.main(["classify", row["path"], "--model", str(collection / "model"), "--device", "cpu",
                         "--top-k", "1", "--clips", "2", "--crops", "3"]) == 0
        printed = capsys.readouterr().out.splitlines()
        assert printed[1].split()[-1] == row["labels"][0], (printed, row)

    keys, matrix = files.read_embeddings(emb)
    assert keys == [r["path"] for r in good] and matrix.shape == (14, 64)
    model = vk.VivitForVideoClassification.from_pretrained(collection / "model", attn="sdpa").eval()
    processor = VideoProcessor.for_model(model.config, collection / "model")
    processor.spatial_crops = 3
    for j in (0, 13):
        frames = read_clips(keys[j], model.config.num_frames, 1, clips=2).frames
        with torch.no_grad():
            pooled = model.vivit(processor(torch.from_numpy(frames))["pixel_values"]).last_hidden_state[:, 0].mean(0)
        assert_close(torch.from_numpy(matrix[j]), pooled, 1e-5, name=f"embedding of {keys[j]}")


def test_an_interrupted_run_resumes_without_duplicates_or_gaps(collection, tmp_path, monkeypatch):
    whole = tmp_path / "whole.jsonl"
    vp.predict_to_file([collection / "videos"], collection / "model", whole, **OPTIONS)
    out, emb = tmp_path / "preds.jsonl", tmp_path / "emb.npy"
    writes = {"n": 0}
    real_write = files.LineAppender.write

    def crash_on_second_batch(self, rows):
        writes["n"] += 1
        if writes["n"] == 2:
            os.write(self.fd, b'{"path": "half a li')  # the machine dies in the middle of a line
            raise KeyboardInterrupt
        real_write(self, rows)

    monkeypatch.setattr(files.LineAppender, "write", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        vp.predict_to_file([collection / "videos"], collection / "model", out, embeddings=emb, **OPTIONS)
    monkeypatch.setattr(files.LineAppender, "write", real_write)
    first = out.read_text()
    assert first.count("\n") == 4 and not first.endswith("\n")  # one batch whole, a half line after it
    summary = vp.predict_to_file([collection / "videos"], collection / "model", out, embeddings=emb, **OPTIONS)
    assert summary["skipped_already_done"] == 4 and summary["this_run"].videos == 12
    assert rows_of(out) == rows_of(whole), "the resumed file differs from an uninterrupted run's"
    keys, matrix = files.read_embeddings(emb)
    assert keys == [r["path"] for r in rows_of(whole) if "error" not in r] and len(set(keys)) == len(keys)
    again = vp.predict_to_file([collection / "videos"], collection / "model", out, **OPTIONS)
    assert again["this_run"].videos == 0 and rows_of(out) == rows_of(whole)


def test_retry_errors_replaces_the_error_line(collection, tmp_path):
    videos = tmp_path / "v"
    (videos / "a").mkdir(parents=True)
    write_video(videos / "a" / "good.mp4", n_frames=8)
    (videos / "a" / "later.mp4").write_bytes(b"not yet")
    out = tmp_path / "p.jsonl"
    assert vp.predict_to_file([videos], collection / "model", out, **OPTIONS)["failed"] == 1
    write_video(videos / "a" / "later.mp4", n_frames=8)  # the download finished
    assert vp.predict_to_file([videos], collection / "model", out, **OPTIONS)["failed"] == 1  # skipped: has a line
    summary = vp.predict_to_file([videos], collection / "model", out, retry_errors=True, **OPTIONS)
    rows = rows_of(out)
    assert summary["failed"] == 0 and len(rows) == 2 and all("error" not in r for r in rows)


def test_the_command_exit_status_and_last_line_count_failures(collection, tmp_path, capsys):
    args = ["predict", str(collection / "videos"), "--model", str(collection / "model"), "--out",
            str(tmp_path / "p.jsonl"), "--device", "cpu", "--workers", "0", "--no-progress"]
    assert cli.main(args) == vp.FAILED_EXIT_CODE
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.endswith("16 lines for 16 inputs, 2 failed (their lines have 'error'; --retry-errors tries them again)")
    good = str(collection / "videos" / "up" / "000.mp4")
    assert cli.main(["predict", good, "--model", str(collection / "model"), "--out", str(tmp_path / "q.jsonl"),
                     "--device", "cpu", "--workers", "0", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("1 lines for 1 inputs, 0 failed")


def test_token_merging_from_the_flag_and_from_the_checkpoint(collection, tmp_path, capsys, monkeypatch):
    import shutil

    videos = [str(collection / "videos" / "up" / f"00{i}.mp4") for i in range(3)]
    common = ["--device", "cpu", "--workers", "0", "--no-progress"]

    def run(name, model, *flags):
        out, emb = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.npy"
        assert cli.main(["predict", *videos, "--model", str(model), "--out", str(out), "--embeddings", str(emb),
                         *flags, *common]) == 0
        return rows_of(out), files.read_embeddings(emb)[1]

    plain, plain_emb = run("plain", collection / "model")
    merged, merged_emb = run("merged", collection / "model", "--merge", "3")
    assert all("merge" not in r for r in plain) and all(r["merge"] == 3 for r in merged)
    assert not np.allclose(plain_emb, merged_emb, atol=1e-4)  # the flag merged tokens
    model = vk.VivitForVideoClassification.from_pretrained(collection / "model", attn="sdpa").set_token_merging(3)
    processor = VideoProcessor.for_model(model.config, collection / "model")
    frames = read_clips(videos[0], model.config.num_frames, 1).frames
    with torch.no_grad():
        pooled = model.eval().vivit(processor(torch.from_numpy(frames))["pixel_values"]).last_hidden_state[:, 0]
    assert_close(torch.from_numpy(merged_emb[0]), pooled[0], 1e-5, name="merged embedding vs the Python API's")

    saved = tmp_path / "merged-model"  # a checkpoint saved with merging on merges by itself; --merge off undoes it
    model.save_pretrained(saved)
    shutil.copy(collection / "model" / "preprocessor_config.json", saved)
    again, again_emb = run("again", saved)
    off, off_emb = run("off", saved, "--merge", "off")
    assert all(r["merge"] == 3 for r in again) and all("merge" not in r for r in off)
    np.testing.assert_allclose(again_emb, merged_emb, atol=1e-5)
    np.testing.assert_allclose(off_emb, plain_emb, atol=1e-5)

    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    capsys.readouterr()
    assert cli.main(["classify", videos[0], "--model", str(collection / "model"), "--merge", "3", "--top-k", "1",
                     *common[:2]]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].split()[-1] == merged[0]["labels"][0] and "token merging 3" in printed[-1], printed
    with pytest.raises(SystemExit):
        cli.main(["classify", videos[0], "--merge", "8,x"])
    assert "--merge: expected r, a fraction" in capsys.readouterr().err


def test_two_processes_write_the_rows_of_one(collection, tmp_path):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    vp.predict_to_file([collection / "videos"], collection / "model", one, embeddings=tmp_path / "one.npy", **OPTIONS)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "vivit_kernels.cli",
        "predict",
        str(collection / "videos"),
        "--model",
        str(collection / "model"),
        "--out",
        str(two),
        "--embeddings",
        str(tmp_path / "two.npy"),
        "--device",
        "cpu",
        "--workers",
        "0",
        "--batch-size",
        "4",
        "--no-progress",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    said = f"stdout:\n{run.stdout[-2000:]}\nstderr:\n{run.stderr[-3000:]}"
    assert run.returncode != 0 and "16 lines for 16 inputs, 2 failed" in run.stdout, said
    a, b = rows_of(one), rows_of(two)
    assert [r["path"] for r in a] == [r["path"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() and x.get("labels") == y.get("labels") and x.get("error") == y.get("error")
        assert np.allclose(x.get("scores", []), y.get("scores", []), atol=1e-5)
    keys_a, emb_a = files.read_embeddings(tmp_path / "one.npy")
    keys_b, emb_b = files.read_embeddings(tmp_path / "two.npy")
    assert keys_a == keys_b and np.allclose(emb_a, emb_b, atol=1e-5)
    assert not list(tmp_path.glob("two.jsonl.rank*")) and not (tmp_path / "two.npy.parts").exists()


def test_each_torchrun_rank_gets_its_own_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert sharding.rank_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        expected = torch.device("cuda", 1) if torch.cuda.device_count() > 1 else None
        if expected is not None:
            assert sharding.rank_device(None) == expected
        assert sharding.rank_device("cuda:0") == torch.device("cuda", 0)  # a device named by the user is kept


def test_the_summary_names_what_limited_the_run(collection, tmp_path, capsys):
    """A real run's summary names its bottleneck with the rates behind it (which one wins depends on the machine's
    load: the model is tiny, the videos too); made-up timings check the rule itself: the model loop waiting for
    decoded videos longer than it works is a decoding bottleneck, with the decoding processes that would keep
    up, and the other way round the model is."""
    import re

    args = ["predict", str(collection / "videos" / "up"), "--model", str(collection / "model"), "--out",
            str(tmp_path / "p.jsonl"), "--device", "cpu", "--workers", "0", "--no-progress", "--decode", "pyav"]
    cli.main(args)
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("bottleneck: ")]
    assert len(line) == 1, line
    got = re.match(r"bottleneck: (decoding|model) \(one decoding process: [\d.]+ frames/s; the model: [\d.]+ "
                   r"clips/s\)(; about \d+ decoding processes would keep the model busy .*)?$", line[0])
    assert got and (got.group(1) == "decoding") == (got.group(2) is not None), line[0]
    model_bound = vp.Timings(videos=10, wall_s=10.0, waiting_s=1.0, decode_s=5.0, model_s=8.0, frames=320, clips=10,
                             worker_s=5.0, workers=4)
    b = model_bound.bottleneck()
    assert b["limited_by"] == "model" and "workers_needed" not in b and b["decode_frames_per_s_per_worker"] == 64.0
    decode_bound = vp.Timings(videos=10, wall_s=10.0, waiting_s=8.0, decode_s=12.0, model_s=1.5, frames=320,
                              clips=10, worker_s=12.0, workers=2)
    assert decode_bound.bottleneck() == {"limited_by": "decoding", "decode_frames_per_s_per_worker": 26.7,
                                         "model_clips_per_s": 6.67, "workers_needed": 8}
