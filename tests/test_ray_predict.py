"""predict on Ray (vivit_kernels.ray_predict) on a local Ray instance, CPU actors: the same lines and embeddings as
plain predict on the test collection (damaged files included), nothing lost or duplicated when the model actor is
killed midway or the driver is killed and run again. One Ray instance for the module (started once)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from vivit_kernels import cli
from vivit_kernels import predict as vp
from vivit_kernels import prediction_files as files

from videos import prediction_collection

pytestmark = pytest.mark.cpu_only
OPTIONS = dict(device="cpu", batch_size=4, progress=False)


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray", reason="Ray Data is not installed (pip install 'vivit_kernels[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    return prediction_collection(tmp_path_factory.mktemp("collection"))


@pytest.fixture(scope="module")
def plain(collection, tmp_path_factory):
    """plain predict's lines and embeddings (the reference every Ray run must give)."""
    out = tmp_path_factory.mktemp("plain")
    vp.predict_to_file([collection / "videos"], collection / "model", out / "p.jsonl", embeddings=out / "e.npy",
                       workers=0, **OPTIONS)
    return rows_of(out / "p.jsonl"), files.read_embeddings(out / "e.npy")


def rows_of(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def assert_same_predictions(rows, emb, plain):
    """Same videos in the same order, same error lines, same labels, scores and embeddings within float32 rounding
    (the batches hold other videos than plain predict's)."""
    want_rows, (want_keys, want_matrix) = plain
    assert [r["path"] for r in rows] == [r["path"] for r in want_rows]
    for got, want in zip(rows, want_rows, strict=True):
        if "error" in want:
            assert got == want
            continue
        assert {k: v for k, v in got.items() if k != "scores"} == {k: v for k, v in want.items() if k != "scores"}
        np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-5)
    keys, matrix = emb
    assert keys == want_keys
    np.testing.assert_allclose(matrix, want_matrix, rtol=1e-5, atol=1e-5)


def test_ray_writes_predicts_lines_and_embeddings(ray_instance, collection, plain, tmp_path):
    from vivit_kernels.ray_predict import predict_on_ray

    out, emb = tmp_path / "preds.jsonl", tmp_path / "emb.npy"
    summary = predict_on_ray([collection / "videos"], collection / "model", out, embeddings=emb, decode_workers=2,
                             **OPTIONS)
    assert_same_predictions(rows_of(out), files.read_embeddings(emb), plain)
    assert summary["rows"] == 16 and summary["failed"] == 2 and summary["this_run"].videos == 16
    b = summary["this_run"].bottleneck()
    assert b["limited_by"] in ("decoding", "model") and b["advice"]
    again = predict_on_ray([collection / "videos"], collection / "model", out, **OPTIONS)
    assert again["this_run"].videos == 0 and again["skipped_already_done"] == 16


def test_a_killed_model_actor_loses_and_duplicates_nothing(ray_instance, collection, plain, tmp_path):
    """The model actor's process is killed (SIGKILL) once the first lines are written: Ray restarts it and runs its
    batch again; every video gets exactly one line, equal to plain predict's."""
    from ray._private import state

    from vivit_kernels.ray_predict import predict_on_ray

    out, emb = tmp_path / "preds.jsonl", tmp_path / "emb.npy"
    killed = []

    def kill_the_model_actor():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (out.is_file() and out.read_text().count("\n") >= 1):
            time.sleep(0.02)
        for actor in state.actors().values():
            if "_ModelStage" in actor.get("ActorClassName", "") and actor.get("State") == "ALIVE":
                os.kill(actor["Pid"], signal.SIGKILL)
                killed.append(actor["Pid"])

    killer = threading.Thread(target=kill_the_model_actor)
    killer.start()
    predict_on_ray([collection / "videos"], collection / "model", out, embeddings=emb, decode_workers=1,
                   **dict(OPTIONS, batch_size=1))
    killer.join()
    assert killed, "the model actor was not found alive to kill"
    assert_same_predictions(rows_of(out), files.read_embeddings(emb), plain)


def test_a_killed_driver_resumes_without_gaps_or_duplicates(ray_instance, collection, plain, tmp_path):
    """`vivit-kernels predict --ray ADDRESS` in a process of its own, killed (SIGKILL) once some lines are written,
    then run again: it skips the written videos and the file ends equal to plain predict's."""
    out, emb = tmp_path / "preds.jsonl", tmp_path / "emb.npy"
    address = ray_instance.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "vivit_kernels", "predict", str(collection / "videos"), "--model",
               str(collection / "model"), "--out", str(out), "--embeddings", str(emb), "--device", "cpu",
               "--batch-size", "1", "--no-progress", "--ray", address]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None and not (
            out.is_file() and out.read_text().count("\n") >= 2):
        time.sleep(0.02)
    assert first.poll() is None, f"the first run ended before it could be killed:\n{first.stdout.read().decode()}"
    first.send_signal(signal.SIGKILL)
    first.wait()
    written = rows_of(out) if out.is_file() else []
    assert 2 <= len(written) < 16
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == vp.FAILED_EXIT_CODE, second.stdout + second.stderr  # the two damaged files
    assert f"{len(written)} video(s) already had a line" in second.stdout
    assert_same_predictions(rows_of(out), files.read_embeddings(emb), plain)


def test_the_command_checks_its_ray_options(collection, tmp_path, capsys):
    base = ["predict", str(collection / "videos"), "--model", str(collection / "model"), "--out",
            str(tmp_path / "p.jsonl")]
    assert cli.main([*base, "--decode-workers", "2"]) == 1
    assert "--decode-workers and --model-actors are for --ray" in capsys.readouterr().err
    assert cli.main([*base, "--ray", "--workers", "2"]) == 1
    assert "on Ray use --decode-workers" in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists()


def test_the_writer_writes_a_video_delivered_twice_once(tmp_path):
    """Ray Data delivers a batch at least once: a result that arrives again (a batch rerun after its actor died once
    its first result was out) is not written, nor counted, a second time; its embedding neither. No Ray needed:
    the writer takes any iterable of the model stage's output batches."""
    from vivit_kernels.ray_predict import RayStages, _write

    def batch(paths, value):
        rows = [json.dumps({"path": p, "labels": ["a"], "scores": [value]}) for p in paths]
        feats = [np.full(3, value, np.float32).tobytes() for _ in paths]
        return {"path": np.array(paths, dtype=object), "row": np.array(rows, dtype=object),
                "feature": np.array(feats, dtype=object), "decode_s": np.full(len(paths), 0.5),
                "model_s": np.full(len(paths), 0.25)}

    out, parts = tmp_path / "p.jsonl", tmp_path / "parts"
    stages = RayStages(decode_workers=1, model_actors=1)
    _write([batch(["a", "b"], 1.0), batch(["b", "c"], 2.0), batch(["a"], 3.0)], out, parts, stages, 3, False)
    assert [(r["path"], r["scores"]) for r in rows_of(out)] == [("a", [1.0]), ("b", [1.0]), ("c", [2.0])]
    assert (stages.videos, stages.decode_s, stages.model_s) == (3, 1.5, 0.75)
    files.gather_embeddings(tmp_path / "e.npy", parts, ["a", "b", "c"])  # what predict_on_ray does at the end
    keys, matrix = files.read_embeddings(tmp_path / "e.npy")
    assert list(keys) == ["a", "b", "c"] and matrix.tolist() == [[1.0] * 3, [1.0] * 3, [2.0] * 3]
