"""Fine-tuning on one's own videos: datasets (folders, manifests, clip sampling, augmentation, bad files), the
finetune API and command (learning a label that needs time, resume, LoRA, two processes), and the paper's
ViT -> ViViT initialisation. CPU, seconds each: small generated videos, the tiny preset."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import vivit_kernels as vk
from vivit_kernels import data as vdata
from vivit_kernels.finetune import evaluate_clips, finetune, parse_views
from vivit_kernels.inflate import inflate_patch_filter, repeat_position_table, vivit_from_vit
from vivit_kernels.processing import VideoProcessor
from vivit_kernels.video import read_clips

from helpers import DEVICE, assert_close
from videos import motion_dataset, motion_frames, write_frames, write_video

pytestmark = pytest.mark.cpu_only

# tiny's sizes with 8x8 patches (4 x 4 x 2 tubelets): small enough to learn the motion task in seconds
MOTION = dict(tubelet_size=[2, 8, 8])
RUN = dict(workers=0, progress=False, attn="sdpa", weight_decay=0.0, logging_steps=50)


@pytest.fixture(scope="module")
def motion(tmp_path_factory):
    return motion_dataset(tmp_path_factory.mktemp("motion"), per_class=48)


def tiny_config(**overrides):
    return vk.VivitConfig.from_preset("tiny", **{**MOTION, **overrides})


# ------------------------------------------------------------------------------------------------
# datasets
# ------------------------------------------------------------------------------------------------
def test_folder_splits_labels_and_manifests(tmp_path):
    for split, label, n in [("train", "walk", 3), ("train", "run", 2), ("val", "run", 1), ("val", "walk", 1)]:
        (tmp_path / "a" / split / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (tmp_path / "a" / split / label / f"{i}.mp4").write_bytes(b"x")
    s = vdata.load_video_splits(tmp_path / "a")
    assert s.id2label == {0: "run", 1: "walk"} and s.label2id == {"run": 0, "walk": 1}
    assert len(s.train) == 5 and len(s.val) == 2 and all("/val/" in i.path for i in s.val)

    flat = tmp_path / "a" / "train"  # class folders only: every 10th video of each class held out
    s = vdata.load_video_splits(flat, val_fraction=0.5)
    assert sorted(Path(i.path).name for i in s.val) == ["1.mp4", "1.mp4"] and len(s.train) == 3

    rows = [{"path": "v/1.mp4", "label": "b"}, {"path": "v/2.mp4", "label": "a", "split": "val"},
            {"path": "v/3.mp4", "label": "a"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "m.csv").write_text("path,label,split\nv/1.mp4,b,\nv/2.mp4,a,val\nv/3.mp4,a,train\n")
    for name in ("m.jsonl", "m.csv"):
        s = vdata.load_video_splits(tmp_path / name)
        assert [Path(i.path) for i in s.train] == [tmp_path / "v/1.mp4", tmp_path / "v/3.mp4"], name
        assert [i.label for i in s.val] == ["a"] and s.id2label == {0: "a", 1: "b"}


def test_dataset_errors_name_the_problem(tmp_path):
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "x.mp4").write_bytes(b"x")
    with pytest.raises(ValueError, match="one folder per label"):
        vdata.load_video_splits(tmp_path / "loose")
    (tmp_path / "one" / "cat").mkdir(parents=True)
    (tmp_path / "one" / "cat" / "x.mp4").write_bytes(b"x")
    with pytest.raises(ValueError, match="at least 2 labels"):
        vdata.load_video_splits(tmp_path / "one", val_fraction=0)
    (tmp_path / "bad.csv").write_text("file,label\nx.mp4,a\n")
    with pytest.raises(ValueError, match="no 'path'"):
        vdata.load_video_splits(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError, match="no video folder or manifest"):
        vdata.load_video_splits(tmp_path / "missing")
    (tmp_path / "m.csv").write_text("path,label\na.mp4,a\nb.mp4,b\n")
    (tmp_path / "v.csv").write_text("path,label\nc.mp4,c\n")
    with pytest.raises(ValueError, match="labels the training videos lack: c"):
        vdata.load_video_splits(tmp_path / "m.csv", val=tmp_path / "v.csv")


def test_training_clips_are_random_windows_and_evaluation_views_match_the_processor(tmp_path):
    path = write_video(tmp_path / "v.mp4", n_frames=40, height=48, width=64)
    items = [vdata.VideoItem(path, "a")]
    processor = VideoProcessor.for_image_size(32, 32)
    train = vdata.VideoClipDataset(items, {"a": 0}, processor, num_frames=4, frame_sample_rate=2, train=True,
                                   augment=vdata.Augment(flip=0.0))
    torch.manual_seed(0)
    clips = [train[0]["pixel_values"] for _ in range(6)]
    assert clips[0].shape == (4, 3, 32, 32) and clips[0].dtype == torch.float32
    assert len({c.sum().item() for c in clips}) > 1, "training windows / crops never change"

    evaluation = vdata.VideoClipDataset(items, {"a": 0}, processor, num_frames=4, frame_sample_rate=2, views=(2, 3))
    item = evaluation[0]
    assert item["pixel_values"].shape == (6, 4, 3, 32, 32) and item["labels"] == 0
    frames = read_clips(path, 4, 2, clips=2).frames
    expected = VideoProcessor.for_image_size(32, 32, spatial_crops=3)(torch.from_numpy(frames))["pixel_values"]
    assert torch.equal(item["pixel_values"], expected), "evaluation preprocessing differs from VideoProcessor's"

    on_device = vdata.VideoClipDataset(items, {"a": 0}, processor, 4, 2, views=(2, 3), preprocess_on="device")
    batch = vdata.collate_clips([on_device[0]])
    assert "frames" in batch and batch["frames"][0].dtype == torch.uint8
    prepared = vdata.VideoBatchPreparer(processor, DEVICE)(batch)  # on a GPU: the extension's CUDA kernel
    assert prepared["pixel_values"].device.type == DEVICE.type
    assert_close(prepared["pixel_values"][0], expected.to(DEVICE), 1e-5, name="device preprocessing vs the worker's")


def test_flip_and_scale_jitter(tmp_path):
    frames = np.zeros((8, 40, 40, 3), np.uint8)
    frames[:, :, :10] = 255  # bright left edge
    path = write_frames(tmp_path / "edge.mp4", frames)
    processor = VideoProcessor.for_image_size(32, 32)
    items = [vdata.VideoItem(path, "a")]
    always = vdata.VideoClipDataset(items, {"a": 0}, processor, 4, 1, train=True, augment=vdata.Augment(flip=1.0))
    never = vdata.VideoClipDataset(items, {"a": 0}, processor, 4, 1, train=True, augment=vdata.Augment(flip=0.0))
    left = lambda x: x[..., :4].mean().item()  # noqa: E731
    right = lambda x: x[..., -4:].mean().item()  # noqa: E731
    assert left(never[0]["pixel_values"]) > right(never[0]["pixel_values"])
    assert right(always[0]["pixel_values"]) > left(always[0]["pixel_values"])
    with pytest.raises(ValueError, match="Augment.scale"):
        vdata.Augment(scale=(0.5, 1.0))


def test_unreadable_videos_are_logged_once_skipped_and_counted(tmp_path, caplog):
    root = tmp_path / "d"
    motion_dataset(root, per_class=3)
    (root / "up" / "broken.mp4").write_bytes(os.urandom(2048))
    (root / "down" / "empty.mp4").write_bytes(b"")
    splits = vdata.load_video_splits(root, val_fraction=0)
    processor = VideoProcessor.for_image_size(32, 32)
    train = vdata.VideoClipDataset(splits.train, splits.label2id, processor, 4, 2, train=True)
    with caplog.at_level(logging.WARNING, logger="vivit_kernels.data"):
        batch = vdata.collate_clips([train[i] for i in range(len(train))] * 2)
    assert batch["pixel_values"].shape[0] == 2 * len(train), "training must keep its batch size"
    bad = {str(root / "up" / "broken.mp4"), str(root / "down" / "empty.mp4")}
    assert {p for p, _ in batch["skipped"]} == bad
    logged = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(logged) == 2 and all(any(b in m for b in bad) for m in logged), logged  # once per file

    unknown = vdata.VideoClipDataset([vdata.VideoItem(str(root / "up" / "000.mp4"), "sideways")], splits.label2id,
                                     processor, 4, 2)
    with pytest.raises(KeyError, match="'sideways'"):  # an error of the data, never a skipped file
        unknown[0]
    evaluation = vdata.VideoClipDataset(splits.train, splits.label2id, processor, 4, 2)
    model = vk.VivitForVideoClassification(tiny_config(num_labels=2), attn="sdpa")
    result = evaluate_clips(model, evaluation, batch_size=4)
    assert result["videos"] == len(splits.train) - 2 and set(result["skipped"]) == bad


# ------------------------------------------------------------------------------------------------
# finetune
# ------------------------------------------------------------------------------------------------
def test_finetune_learns_a_label_that_needs_time_and_saves_a_checkpoint_both_read(motion, tmp_path):
    out = tmp_path / "run"
    result = finetune(motion, out, preset=tiny_config(), epochs=12, batch_size=8, lr=1e-3, frame_sample_rate=2,
                      val_fraction=0.25, eval_views=(2, 3), **{**RUN, "attn": "auto"})
    metrics = result["metrics"]
    assert metrics["multiview_videos"] == 24 and metrics["multiview_views"] == "2x3"
    # 24 held-out videos: 18 right by chance has probability 1.1%; the trained model gets (nearly) all
    assert metrics["multiview_top1"] >= 0.75, metrics
    assert metrics["train_clips_per_s"] > 0 and metrics["peak_memory_gib"] > 0
    saved = json.loads((out / "finetune_results.json").read_text())
    assert saved["metrics"]["multiview_top1"] == metrics["multiview_top1"] and saved["labels"] == {
        "0": "down",
        "1": "up",
    }

    ours = vk.VivitForVideoClassification.from_pretrained(out, attn="sdpa").eval()
    theirs = transformers.AutoModelForVideoClassification.from_pretrained(out).eval()
    assert type(theirs) is transformers.VivitForVideoClassification and ours.config.id2label == {0: "down", 1: "up"}
    processor = VideoProcessor.from_pretrained(out)
    rng = np.random.default_rng(7)
    clips = [motion_frames(label, 8, 40, 48, rng)[::2] for label in ("down", "up") for _ in range(4)]
    x = processor(torch.from_numpy(np.stack(clips)))["pixel_values"]
    with torch.no_grad():
        logits = ours(x).logits
        assert_close(theirs(x).logits, logits, 1e-4, name="transformers reads the checkpoint")
        reversed_logits = ours(x.flip(1)).logits  # the same frames in reverse order: the other direction
    labels = torch.tensor([0] * 4 + [1] * 4)
    assert (logits.argmax(-1) == labels).float().mean() >= 0.75
    assert (reversed_logits.argmax(-1) == labels).float().mean() <= 0.25, "the model does not use time"

    # token merging keeps the held-out accuracy (what we measured: docs/merging.md; asserted: the robust part)
    splits = vdata.load_video_splits(motion, val_fraction=0.25)
    held_out = vdata.VideoClipDataset(splits.val, splits.label2id, processor, ours.config.num_frames, 2, views=(2, 3))
    unmerged = evaluate_clips(ours, held_out, batch_size=8)
    kept: list[int] = []  # the tokens the last layer hands on (merged lengths: returned states are full length)
    hook = ours.vivit.layers[-1].register_forward_hook(lambda m, a, out: kept.append(out.shape[1]))
    for schedule in ("fraction-20", 12):
        ours.set_token_merging(schedule)
        kept.clear()
        with torch.no_grad():
            ours(x)
        assert kept[0] < x.shape[1] // 2 * 16 + 1, "nothing merged"  # 2 slices x 16 patches + [CLS] unmerged
        merged = evaluate_clips(ours, held_out, batch_size=8)
        assert merged["videos"] == unmerged["videos"] == 24
        assert merged["top1"] >= 0.75 and merged["top1"] >= unmerged["top1"] - 2 / 24, (schedule, merged, unmerged)
    hook.remove()


def test_resume_continues_from_the_saved_step(motion, tmp_path):
    common = dict(preset=tiny_config(), batch_size=4, lr=1e-3, save_steps=2, val_fraction=0.25, eval_views=(1, 1),
                  seed=3, **{**RUN, "logging_steps": 1})
    finetune(motion, tmp_path / "whole", max_steps=4, **common)
    with pytest.raises(FileNotFoundError, match="no checkpoint-N"):
        finetune(motion, tmp_path / "part", max_steps=4, resume=True, **common)

    class Crash(transformers.TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise RuntimeError("the machine went down")

    with pytest.raises(RuntimeError, match="went down"):
        finetune(motion, tmp_path / "part", max_steps=4, callbacks=[Crash()], **common)
    assert sorted(p.name for p in (tmp_path / "part").glob("checkpoint-*")) == ["checkpoint-2"]
    with pytest.raises(FileExistsError, match="--resume"):
        finetune(motion, tmp_path / "part", max_steps=4, **common)
    resumed = finetune(motion, tmp_path / "part", max_steps=4, resume=True, **common)
    assert resumed["metrics"]["steps"] == 4

    def history(run):
        state = json.loads((tmp_path / run / "checkpoint-4" / "trainer_state.json").read_text())
        return {e["step"]: e for e in state["log_history"] if "loss" in e}

    whole, part = history("whole"), history("part")
    assert sorted(part) == [1, 2, 3, 4]
    first = json.loads((tmp_path / "part" / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    assert [e["loss"] for e in first if "loss" in e] == [part[1]["loss"], part[2]["loss"]], "steps 1-2 were rerun"
    # the schedule went on from step 2 (a restart would warm up again from 0)
    assert [part[s]["learning_rate"] for s in (3, 4)] == [whole[s]["learning_rate"] for s in (3, 4)]
    at_2 = vk.VivitForVideoClassification.from_pretrained(tmp_path / "part" / "checkpoint-2")
    final = vk.VivitForVideoClassification.from_pretrained(tmp_path / "part")
    pairs = zip(at_2.parameters(), final.parameters(), strict=True)
    assert any(not torch.equal(x, y) for x, y in pairs), "resuming trained nothing"


def test_finetune_with_lora_writes_a_plain_vivit_checkpoint(motion, tmp_path):
    """The final checkpoint is a plain ViViT (no adapter modules) whose q and v weights carry the trained adapters
    merged in: the same seeded run with a learning rate of 0 gives the untrained weights, and the difference is
    exactly scaling x B A of the adapters the run's last checkpoint saved; k, which has no adapter, is unchanged."""
    from safetensors.torch import load_file

    runs = {}
    for name, lr in (("lora", 1e-3), ("frozen", 0.0)):
        result = finetune(motion, tmp_path / name, preset=tiny_config(), max_steps=2, save_steps=2, batch_size=4,
                          lr=lr, warmup=0.0, lora_rank=4, val_fraction=0.25, eval_views=(1, 1), **RUN)
        assert result["lora_rank"] == 4
        with open(tmp_path / name / "config.json") as f:
            assert json.load(f)["model_type"] == "vivit"
        model = transformers.AutoModelForVideoClassification.from_pretrained(tmp_path / name)
        assert not any("lora" in n for n, _ in model.named_parameters())
        runs[name] = model.state_dict()
    adapters = load_file(str(tmp_path / "lora" / "checkpoint-2" / "adapter_model.safetensors"))
    scaling = 2 * 4 / 4  # add_lora's alpha (2 x rank) over the rank
    layers = {k.split(".lora_A.")[0] for k in adapters if ".lora_A." in k}
    assert layers and {k.rsplit(".", 1)[1] for k in layers} == {"q_proj", "v_proj"}, sorted(layers)
    for layer in layers:
        a, b = adapters[f"{layer}.lora_A.weight"], adapters[f"{layer}.lora_B.weight"]
        key = layer.split("base_model.model.", 1)[1] + ".weight"
        delta = runs["lora"][key] - runs["frozen"][key]
        assert delta.abs().max() > 0, f"{key}: the adapters were not merged into the checkpoint"
        assert_close(delta, scaling * b.float() @ a.float(), 1e-6, rtol=1e-4, name=key)
        k_key = key.replace("q_proj", "k_proj").replace("v_proj", "k_proj")
        assert torch.equal(runs["lora"][k_key], runs["frozen"][k_key])


def test_finetune_merged_trains_and_keeps_the_setting(motion, tmp_path):
    """finetune --merge trains on merged tokens (the schedule applies in every training forward: fewer tokens after
    each layer), and the checkpoint keeps it; with gradient checkpointing, or for Model 3, a clear error."""
    counts: list[int] = []

    class Count(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            model.vivit.layers[-1].register_forward_hook(lambda m, a, out: counts.append(out.shape[1]))

    result = finetune(motion, tmp_path / "merged", preset=tiny_config(), max_steps=2, batch_size=4, merge=2,
                      val_fraction=0.25, eval_views=(1, 1), callbacks=[Count()], **RUN)
    config = tiny_config()
    tokens = 1 + (config.num_frames // config.tubelet_size[0]) * (config.image_size // config.tubelet_size[1]) ** 2
    assert counts and set(counts) == {tokens - 2 * config.num_hidden_layers}  # r = 2 in every layer
    assert result["token_merging"] == 2
    assert vk.VivitForVideoClassification.from_pretrained(tmp_path / "merged").token_merging == 2
    with pytest.raises(ValueError, match="gradient checkpointing"):
        finetune(motion, tmp_path / "x", preset=tiny_config(), merge=2, gradient_checkpointing=True, **RUN)
    with pytest.raises(ValueError, match="Models 1 and 2"):
        finetune(motion, tmp_path / "y", preset="tiny-fsa", merge=2, max_steps=1, **RUN)


def _losses_and_weights(out: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    model = vk.VivitForVideoClassification.from_pretrained(out)
    return [e["loss"] for e in state["log_history"] if "loss" in e], model.state_dict()


def test_one_seed_repeats_a_run_and_another_does_not(motion, tmp_path):
    """The same command with the same seed twice: the same losses and the same final weights, bit for bit (a
    random-weight preset, the data order, clip sampling and augmentation all under the seed); another seed
    differs."""
    common = dict(preset=tiny_config(), batch_size=4, lr=1e-3, max_steps=3, save_steps=3, val_fraction=0.25,
                  eval_views=(1, 1), **{**RUN, "logging_steps": 1})
    runs = {name: finetune(motion, tmp_path / name, seed=seed, **common) for name, seed in
            (("a", 5), ("b", 5), ("c", 6))}
    assert all(r["seed"] in (5, 6) for r in runs.values())
    (losses_a, weights_a), (losses_b, weights_b), (losses_c, _) = (_losses_and_weights(tmp_path / n) for n in "abc")
    assert len(losses_a) == 3 and losses_a == losses_b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert losses_c != losses_a


def test_a_linear_probe_trains_the_classifier_alone_from_the_command_line(motion, tmp_path):
    from vivit_kernels import cli

    start = tmp_path / "start"
    transformers.set_seed(0)
    vk.VivitForVideoClassification(tiny_config(num_labels=2, id2label={0: "down", 1: "up"})).save_pretrained(start)
    assert cli.main(["finetune", str(motion), "--out", str(tmp_path / "probe"), "--model", str(start),
                     "--freeze-backbone", "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2", "--attn", "sdpa",
                     "--workers", "0", "--eval-views", "1x1", "--val-fraction", "0.25", "--device", "cpu",
                     "--no-progress"]) == 0
    before = vk.VivitForVideoClassification.from_pretrained(start).state_dict()
    after = vk.VivitForVideoClassification.from_pretrained(tmp_path / "probe").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"classifier.weight", "classifier.bias"}, changed
    results = json.loads((tmp_path / "probe" / "finetune_results.json").read_text())
    assert results["freeze_backbone"] and results["train_last_layers"] == 0
    with pytest.raises(ValueError, match="choose one"):
        finetune(motion, tmp_path / "x", model=str(start), freeze_backbone=True, lora_rank=4, **RUN)
    with pytest.raises(ValueError, match="between 0 and the model's 2 layers"):
        finetune(motion, tmp_path / "y", model=str(start), freeze_backbone=True, train_last_layers=3, max_steps=1,
                 **RUN)


@pytest.mark.parametrize("preset", ["tiny-fsa", "tiny-fdp"])
def test_a_factorised_model_finetunes_saves_and_predicts(motion, tmp_path, preset):
    """Models 3 and 4 through the same job as Model 1: a preset, Trainer, the multi-view evaluation, a checkpoint
    transformers' Auto classes read, and predict on it (features: the mean of the tokens, not a [CLS])."""
    from vivit_kernels.models import VivitFactorizedConfig, VivitFactorizedForVideoClassification
    from vivit_kernels.predict import predict_to_file
    from vivit_kernels.presets import FACTORIZED_PRESETS

    config = VivitFactorizedConfig(**{**FACTORIZED_PRESETS[preset], **MOTION})
    result = finetune(motion, tmp_path / "m", preset=config, max_steps=2, batch_size=4, lr=1e-3, val_fraction=0.25,
                      eval_views=(1, 1), **RUN)
    assert result["start"]["attention_type"] == config.attention_type and result["metrics"]["steps"] == 2
    model = transformers.AutoModelForVideoClassification.from_pretrained(tmp_path / "m")
    assert type(model) is VivitFactorizedForVideoClassification and model.config.num_labels == 2
    videos = sorted(str(p) for p in Path(motion).rglob("*") if p.is_file())[:3]
    summary = predict_to_file(videos, str(tmp_path / "m"), tmp_path / "p.jsonl", embeddings=tmp_path / "e.npy",
                              progress=False, device="cpu", workers=0)
    assert summary["rows"] == 3 and summary["failed"] == 0, summary
    features = np.load(tmp_path / "e.npy")
    assert features.shape == (3, config.hidden_size) and np.isfinite(features).all()


def test_finetune_rejects_bad_combinations(motion, tmp_path):
    with pytest.raises(ValueError, match="exactly one starting point"):
        finetune(motion, tmp_path / "x", **RUN)
    with pytest.raises(ValueError, match="GPUs only"):
        finetune(motion, tmp_path / "x", preset="tiny", fsdp=True, device="cpu", **RUN)
    with pytest.raises(ValueError, match="CLIPSxCROPS"):
        parse_views("four")
    assert parse_views("4x3") == (4, 3)


def test_two_processes_with_torchrun_train_and_write_one_checkpoint(motion, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "vivit_kernels.cli", "finetune", motion, "--out", str(out), "--preset", "tiny", "--epochs", "1",
           "--batch-size", "4", "--attn", "sdpa", "--workers", "0", "--eval-views", "1x1", "--val-fraction", "0.25",
           "--device", "cpu", "--no-progress"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    said = f"stdout:\n{run.stdout[-2000:]}\nstderr:\n{run.stderr[-3000:]}"
    assert run.returncode == 0, said
    results = json.loads((out / "finetune_results.json").read_text())
    assert results["world_size"] == 2 and results["parallel"] == "ddp", (results, said)
    # 72 training videos, 4 per process and step, 2 processes: 9 steps in the epoch, one checkpoint
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert results["metrics"]["steps"] == 9 and checkpoints == ["checkpoint-9"], (results["metrics"], checkpoints, said)
    assert results["metrics"]["multiview_videos"] == 24, (results["metrics"], said)  # each held-out video once
    assert run.stdout.count("trained 9 steps") == 1, said  # rank 0 reports
    vk.VivitForVideoClassification.from_pretrained(out)


# ------------------------------------------------------------------------------------------------
# ViT -> ViViT (the paper's section 3.4)
# ------------------------------------------------------------------------------------------------
def small_vit(**overrides):
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=16, **overrides)
    return transformers.ViTForImageClassification(config).eval()


def test_inflated_filters_and_position_table_follow_the_paper():
    w = torch.randn(8, 3, 4, 4)
    central = inflate_patch_filter(w, 3, "central")
    assert central.shape == (8, 3, 3, 4, 4) and torch.equal(central[:, :, 1], w)
    assert not central[:, :, 0].any() and not central[:, :, 2].any()
    average = inflate_patch_filter(w, 2, "average")
    assert torch.equal(average.sum(2), w) and torch.equal(average[:, :, 0], average[:, :, 1])
    table = torch.randn(1, 5, 8)
    grown = repeat_position_table(table, 3)
    assert grown.shape == (1, 13, 8) and torch.equal(grown[:, 0], table[:, 0])
    for k in range(3):
        assert torch.equal(grown[:, 1 + 4 * k : 5 + 4 * k], table[:, 1:])
    with pytest.raises(ValueError, match="inflate must be"):
        inflate_patch_filter(w, 2, "middle")


@pytest.mark.parametrize("inflate", ["central", "average"])
def test_inflated_vivit_embeds_a_video_as_the_vit_embeds_its_frames(inflate):
    vit = small_vit()
    vivit = vivit_from_vit(vit, num_frames=4, tubelet_time=2, inflate=inflate, attn="eager").eval()
    assert vivit.config.hidden_act == vit.config.hidden_act and vivit.config.layer_norm_eps == vit.config.layer_norm_eps
    g = torch.Generator().manual_seed(1)
    video = torch.randn(2, 4, 3, 32, 32, generator=g)
    with torch.no_grad():
        tokens = vivit.vivit.embeddings(video)[:, 1:].view(2, 2, 4, 32)  # (batch, time step, patch, hidden)
        for step in range(2):
            if inflate == "central":  # the step's middle frame (index 1 of 2), the other frame ignored
                frame = video[:, 2 * step + 1]
            else:  # the average of the step's frames
                frame = video[:, 2 * step : 2 * step + 2].mean(1)
            expected = vit.vit.embeddings(frame)[:, 1:]
            assert_close(tokens[:, step], expected, 1e-5, name=f"{inflate} step {step}")
        short = vivit_from_vit(vit, num_frames=2, tubelet_time=2, inflate=inflate, attn="sdpa").eval()
        still = video[:, :1].expand(-1, 2, -1, -1, -1)  # a static clip of one tubelet step
        assert_close(short.vivit(still).last_hidden_state, vit.vit(still[:, 0]).last_hidden_state, 1e-5,
                     name="one step: the ViT's features")


def test_inflation_errors_name_both_sides():
    vit = small_vit()
    with pytest.raises(ValueError, match=r"the ViT's patches are 16x16, the tubelets' are 8x8"):
        vivit_from_vit(vit, num_frames=4, tubelet_size=[2, 8, 8])
    with pytest.raises(ValueError, match="hidden_size: the ViT has 32"):
        vivit_from_vit(vit, num_frames=4, hidden_size=64)
    with pytest.raises(ValueError, match="position embeddings"):
        vivit_from_vit(vit, num_frames=4, image_size=64)
    with pytest.raises(ValueError, match="multiple of the tubelet"):
        vivit_from_vit(vit, num_frames=5)
    with pytest.raises(TypeError, match="ViTModel or ViTForImageClassification"):
        vivit_from_vit(torch.nn.Linear(2, 2))


def test_finetune_from_a_vit_checkpoint_on_disk(motion, tmp_path):
    vit = small_vit(num_labels=5)
    vit.save_pretrained(tmp_path / "vit")
    transformers.ViTImageProcessor(image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4]).save_pretrained(
        tmp_path / "vit"
    )
    result = finetune(motion, tmp_path / "out", from_vit=str(tmp_path / "vit"), inflate="average", num_frames=4,
                      max_steps=2, batch_size=4, lr=1e-3, val_fraction=0.25, eval_views=(1, 1), **RUN)
    assert result["start"]["from_vit"] == str(tmp_path / "vit") and result["start"]["inflate"] == "average"
    model = vk.VivitForVideoClassification.from_pretrained(tmp_path / "out")
    assert model.config.num_labels == 2 and list(model.config.tubelet_size) == [2, 16, 16]
    processor = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.4, 0.5, 0.6] and processor["rescale_factor"] == pytest.approx(1 / 255)
    assert processor["offset"] is False


def test_the_three_places_preprocessing_can_run_give_the_same_pixels(tmp_path):
    """The dataset's preprocess_on: all of it in the worker, uint8 views in the worker and the rest on the device,
    or all of it on the device: the same pixels for evaluation views (2 clips x 3 crops); the uint8 cut hands on a
    quarter of the float pixels' bytes."""
    path = write_video(tmp_path / "v.mp4", n_frames=30, height=48, width=64)
    processor = VideoProcessor.for_image_size(32, 32)
    items = [vdata.VideoItem(path, "a")]
    preparer = vdata.VideoBatchPreparer(processor, DEVICE)
    got = {}
    for where in vdata.PREPROCESS_ON:
        dataset = vdata.VideoClipDataset(items, {"a": 0}, processor, 4, 2, views=(2, 3), preprocess_on=where)
        batch = vdata.collate_clips([dataset[0]])
        if where == "views":
            assert batch["pixels_uint8"].dtype == torch.uint8 and batch["pixels_uint8"].shape == (1, 6, 4, 3, 32, 32)
        got[where] = preparer(batch)["pixel_values"].cpu()
    assert got["worker"].shape == (1, 6, 4, 3, 32, 32)
    assert torch.equal(got["views"], got["worker"])
    assert_close(got["device"], got["worker"], 1e-5, name="device preprocessing vs the worker's")


def _collate_reporting_shared_memory(samples):
    batch = vdata.collate_clips(samples)
    key = "pixels_uint8" if "pixels_uint8" in batch else "pixel_values"
    batch["stacked_in_shared_memory"] = batch[key].is_shared()  # as the worker built it, before it is sent
    return batch


def test_a_worker_stacks_the_batch_straight_into_shared_memory(tmp_path):
    """In a DataLoader worker collate_clips stacks the pixels into shared memory, where the batch must go to reach
    the main process (no second copy of every byte in the worker); the pixels arrive unchanged."""
    path = write_video(tmp_path / "v.mp4", n_frames=30, height=48, width=64)
    processor = VideoProcessor.for_image_size(32, 32)
    items = [vdata.VideoItem(path, "a"), vdata.VideoItem(path, "a")]
    for where in ("worker", "views"):
        dataset = vdata.VideoClipDataset(items, {"a": 0}, processor, 4, 2, views=(2, 3), preprocess_on=where)
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1,
                                             collate_fn=_collate_reporting_shared_memory)
        batch = next(iter(loader))
        key = "pixels_uint8" if where == "views" else "pixel_values"
        assert batch["stacked_in_shared_memory"], where
        assert torch.equal(batch[key], vdata.collate_clips([dataset[0], dataset[1]])[key])
