"""Fine-tune ViViT on a folder of videos, on transformers' Trainer with our kernels behind the model.

    from vivit_kernels.finetune import finetune
    result = finetune("videos/", "runs/mine", model="google-vivit-b-16x2-kinetics400", epochs=3)
    result["metrics"]["multiview_top1"]

The same as a command: ``vivit-kernels finetune videos/ --out runs/mine --model CKPT`` (``--preset NAME``, or
``--from-vit VIT --inflate central|average`` for the paper's initialisation from an image ViT). Under
``torchrun --nproc_per_node=N`` Trainer runs DDP (``fsdp=True``: FSDP2, one shard group per ViViT layer).
What we add to Trainer is the video part: datasets (``vivit_kernels.data``), preprocessing on the model's
device, an evaluation of top-1 / top-5 over several views per video (the paper's clips x crops at the end),
clips/s and peak memory in the logs, bad files skipped and reported, and a final checkpoint that transformers
and ``VivitForVideoClassification.from_pretrained`` both read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from . import data as vdata
from ._compat import training_checkpointing_argument
from ._devices import run_defaults
from ._files import atomic_write_text
from .monkey_patch import set_token_merging
from .processing import VideoProcessor
from .training import add_lora, build_model, freeze_all_but_head
from .video import resolve_decoder

__all__ = ["finetune", "evaluate_clips", "VideoTrainer", "parse_views"]

logger = logging.getLogger("vivit_kernels.finetune")
RESULTS_FILE = "finetune_results.json"


def parse_views(text: str | tuple[int, int]) -> tuple[int, int]:
    """"4x3" -> (4 temporal clips, 3 spatial crops)."""
    if isinstance(text, tuple):
        return text
    try:
        clips, crops = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"views must look like CLIPSxCROPS, e.g. 4x3 or 1x1, got {text!r}") from None
    if clips < 1 or crops not in (1, 3):
        raise ValueError(f"views {text!r}: clips must be >= 1 and crops 1 or 3")
    return clips, crops


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate_clips(model, dataset: vdata.VideoClipDataset, batch_size: int = 8, device: Any = None,
                   workers: int = 0, dtype: torch.dtype | None = None, progress: bool = False,
                   autocast: torch.dtype | None = None) -> dict[str, Any]:
    """Top-1 / top-5 accuracy and the loss of the view-averaged probabilities over ``dataset``'s videos (each
    video's views, clips x crops, averaged after the softmax). Under torch.distributed each rank takes every
    world-th video and the counts are summed; every rank runs the same number of forwards (FSDP needs it).
    Videos that cannot be read are left out and listed in ``skipped``. ``autocast``: run the forwards under
    autocast to that dtype (what bf16 training does)."""
    rank, world = _dist()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = dtype or next(model.parameters()).dtype
    per_rank = math.ceil(len(dataset) / world)
    loader = torch.utils.data.DataLoader(
        _Shard(dataset, list(range(rank, per_rank * world, world))), batch_size=batch_size, num_workers=workers,
        collate_fn=vdata.collate_clips, pin_memory=device.type == "cuda" and dataset.decode != "cuda")
    preparer = vdata.VideoBatchPreparer(dataset.processor, device, dtype)
    was_training = model.training
    model.eval()
    clips, crops = dataset.views
    views = clips * crops
    crop = dataset.processor.crop_size
    shape = (model.config.num_frames, 3, crop["height"], crop["width"])
    sums = torch.zeros(4, dtype=torch.float64)  # videos, top-1, top-5, loss
    start = time.perf_counter()
    iterator = loader
    if progress and rank == 0:
        from tqdm.auto import tqdm

        iterator = tqdm(loader, desc=f"evaluate ({clips}x{crops} views)", unit="batch")
    for batch in iterator:
        counted = batch.pop("counted")
        batch = preparer(batch)
        pixels, labels = batch.get("pixel_values"), batch["labels"]
        if pixels is None:  # nothing in this batch decoded: one forward all the same, as the other ranks run one
            pixels = torch.zeros(1, *shape, device=device, dtype=dtype)
            counted, labels = torch.zeros(1, dtype=torch.bool), torch.zeros(1, dtype=torch.long)
        flat = pixels.to(device, dtype).reshape(-1, *shape)
        step = batch_size * views
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            logits = torch.cat([model(flat[i : i + step]).logits.float() for i in range(0, flat.shape[0], step)])
        probs = logits.softmax(-1).view(labels.shape[0], -1, logits.shape[-1]).mean(1).cpu()
        top = probs.topk(min(5, probs.shape[-1]), dim=-1).indices
        sums[0] += counted.sum()
        sums[1] += ((top[:, 0] == labels) & counted).sum()
        sums[2] += ((top == labels[:, None]).any(-1) & counted).sum()
        sums[3] += (-probs.gather(1, labels[:, None]).clamp_min(1e-12).log().squeeze(1) * counted).sum()
    skipped = preparer.skipped
    if world > 1:
        total = sums.to(device)
        torch.distributed.all_reduce(total)
        sums = total.cpu()
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, skipped)
        skipped = {k: v for part in gathered for k, v in part.items()}
    model.train(was_training)
    n = max(float(sums[0]), 1.0)
    return {"videos": int(sums[0]), "top1": float(sums[1]) / n, "top5": float(sums[2]) / n,
            "loss": float(sums[3]) / n, "views": f"{clips}x{crops}", "skipped": skipped,
            "seconds": time.perf_counter() - start}


class _Shard(torch.utils.data.Dataset):
    """The videos at ``positions`` (positions past the dataset's end repeat earlier videos and are not counted:
    every rank gets the same number of items)."""

    def __init__(self, dataset: vdata.VideoClipDataset, positions: list[int]):
        self.dataset, self.positions = dataset, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, j: int) -> dict[str, Any]:
        position = self.positions[j]
        sample = self.dataset[position % len(self.dataset)]
        sample["counted"] = position < len(self.dataset)
        return sample


# ------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------
class VideoTrainer(transformers.Trainer):
    """transformers' Trainer with video batches: preprocessing on the model's device when the batch carries
    frames, bad-file bookkeeping, clips/s and peak memory in every log, and ``evaluate`` over views
    (``evaluate_clips``) instead of Trainer's per-batch loop."""

    def __init__(self, *args, processor: VideoProcessor, eval_workers: int = 0, **kwargs):
        kwargs.setdefault("data_collator", vdata.collate_clips)
        super().__init__(*args, **kwargs)
        self.preparer = vdata.VideoBatchPreparer(processor, self.args.device)
        self.eval_workers = eval_workers
        self._last_log = (time.perf_counter(), 0)

    def _prepare_inputs(self, inputs):
        inputs = self.preparer(dict(inputs))
        inputs.pop("counted", None)
        return super()._prepare_inputs(inputs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        now, step = time.perf_counter(), self.state.global_step
        last_time, last_step = self._last_log
        if "loss" in logs and step > last_step:
            rank_batch = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
            logs["clips_per_s"] = round((step - last_step) * rank_batch * self.args.world_size / (now - last_time), 2)
            logs["peak_memory_gib"] = round(peak_memory_gib(self.args.device), 3)
            self._last_log = (now, step)
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        result = evaluate_clips(
            self.model,
            dataset,
            batch_size=self.args.per_device_eval_batch_size,
            device=self.args.device,
            workers=self.eval_workers,
            progress=not self.args.disable_tqdm,
            autocast=torch.bfloat16 if self.args.bf16 else None,
        )
        self.preparer.skipped.update(result["skipped"])
        metrics = {f"{metric_key_prefix}_{k}": result[k] for k in ("top1", "top5", "loss", "videos")}
        metrics[f"{metric_key_prefix}_seconds"] = round(result["seconds"], 2)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def peak_memory_gib(device) -> float:
    """Peak memory of this process: allocated GPU memory on CUDA, else the resident set (CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def _checkpoints(out: Path) -> list[Path]:
    return sorted((p for p in out.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                  key=lambda p: int(p.name.split("-")[-1]))


def finetune(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str | None = None,
    preset: str | None = None,
    from_vit: Any = None,
    inflate: str = "central",
    attention_type: str | None = None,
    val: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    num_frames: int | None = None,
    tubelet_time: int = 2,
    frame_sample_rate: int | None = None,
    epochs: float = 3.0,
    max_steps: int = -1,
    batch_size: int = 8,
    grad_accum: int = 1,
    lr: float = 5e-5,
    weight_decay: float = 0.05,
    warmup: float = 0.1,
    scheduler: str = "cosine",
    label_smoothing: float = 0.0,
    bf16: bool | None = None,
    gradient_checkpointing: bool = False,
    lora_rank: int = 0,
    lora_alpha: int | None = None,
    merge: Any = None,
    freeze_backbone: bool = False,
    train_last_layers: int = 0,
    attn: str | None = None,
    workers: int | None = None,
    eval_views: str | tuple[int, int] = (4, 3),
    flip: float = 0.5,
    scale: tuple[float, float] = (256 / 224, 320 / 224),
    resume: bool = False,
    fsdp: bool = False,
    seed: int = 0,
    logging_steps: int = 10,
    save_steps: int | None = None,
    save_total_limit: int = 2,
    preprocess_on: str | None = None,
    device: str | None = None,
    decode: str = "auto",
    progress: bool = True,
    callbacks: list | None = None,
) -> dict[str, Any]:
    """Fine-tune (or train) ViViT on ``data`` (see ``vivit_kernels.data.load_video_splits``) into ``out``.

    Starting point: exactly one of ``model`` (a ViViT checkpoint directory), ``preset`` (random weights; the
    ``*-fe`` / ``*-fsa`` / ``*-fdp`` presets are the paper's Models 2, 3, 4) or ``from_vit`` (an image ViT, inflated
    with ``inflate``; ``attention_type`` makes it Model 2, 3 or 4). Evaluation during training takes one view per video
    (the middle clip, center crop), each epoch; the final evaluation takes ``eval_views`` (clips x crops). The
    final model, its ``preprocessor_config.json`` (with the clip sampling, ``frame_sample_rate``: by default the
    starting checkpoint's, else every 2nd frame) and ``finetune_results.json`` are written to ``out``
    (Trainer's ``checkpoint-N`` folders beside them; ``resume=True`` continues from the latest: run it with the
    same arguments, since the learning-rate schedule is the checkpoint's). ``callbacks``: Trainer callbacks.
    Returns the results dict that file holds.

    What trains: everything (default); LoRA adapters of ``lora_rank`` on q and v plus the classifier; or, with
    ``freeze_backbone``, the classifier alone on frozen features (a linear probe), plus the last
    ``train_last_layers`` encoder layers and the final LayerNorm when that is > 0. Frozen weights cost no gradient
    in our kernels. ``merge``: token merging while training (r per layer, a fraction, a per-layer list or a
    schedule's name, as ``set_token_merging`` takes; "off" turns a checkpoint's own off, None keeps it): the model
    learns on the tokens it will see merged, and the checkpoint keeps the setting, so ``predict`` and ``classify``
    merge alike (Models 1 and 2; not with ``gradient_checkpointing``). ``seed`` seeds everything: the random weights
    (a preset, a new classifier), the data order, clip sampling and augmentation: the same command twice gives the
    same losses and weights on the CPU.
    ``decode``: the video decoder (``video.DECODERS``); on a GPU the decoding workers hand on resized and cropped
    uint8 views and the GPU normalises them (``preprocess_on="views"``, docs/video.md).
    """
    out = Path(out)
    views = parse_views(eval_views)
    run_device, _, attn = run_defaults(device, None, attn)  # our kernels (auto) on a GPU, sdpa on the CPU
    use_cpu = run_device.type == "cpu"
    earlier = _checkpoints(out) if out.is_dir() else []
    if resume and not earlier:
        raise FileNotFoundError(f"resume: {out} holds no checkpoint-N folder to continue from")
    if earlier and not resume:
        raise FileExistsError(f"{out} holds checkpoints of an earlier run ({earlier[-1].name}); pass resume=True "
                              "(--resume) to continue it, or choose another output directory")
    if fsdp and use_cpu:
        raise ValueError("fsdp: transformers' Trainer (through accelerate) shards with FSDP on GPUs only; on the CPU "
                         "it would run DDP instead, so leave fsdp off there")
    if fsdp and lora_rank:
        raise ValueError("fsdp with LoRA is not supported here: LoRA trains few weights, so DDP (the default) is the "
                         "right choice for it")
    if freeze_backbone and lora_rank:
        raise ValueError("freeze_backbone trains the classifier (and train_last_layers layers) on frozen features; "
                         "lora_rank trains adapters in every layer: choose one")
    if train_last_layers and not freeze_backbone:
        raise ValueError("train_last_layers goes with freeze_backbone (without it, every layer trains)")
    if merge not in (None, 0, "off", "none") and gradient_checkpointing:
        raise ValueError("token merging (merge) with gradient checkpointing is not supported: the recomputed layers "
                         "would not see the merged tokens; turn one of them off")
    splits = vdata.load_video_splits(data, val, val_fraction)
    transformers.set_seed(seed)  # before any random weight: a preset's, a new classifier's
    vivit, processor = build_model(splits, model, preset, from_vit, inflate, num_frames, tubelet_time, attn,
                                   attention_type)
    config = vivit.config
    # the checkpoint's own clip sampling unless told (video.DEFAULT_FRAME_SAMPLE_RATE without one); saved with the
    # model, so predict and classify read the model back with the sampling it was trained on
    frame_sample_rate = processor.frame_sample_rate = processor.sample_rate(frame_sample_rate)
    if merge is not None:  # refused, with the reason, for Models 3 and 4 and for a schedule that does not fit
        set_token_merging(vivit, merge)
    if lora_rank:
        vivit = add_lora(vivit, lora_rank, lora_alpha)
    if freeze_backbone:
        trainable = freeze_all_but_head(vivit, train_last_layers)
        logger.info("vivit_kernels finetune: training %d of %d parameters (the classifier%s)", trainable,
                    sum(p.numel() for p in vivit.parameters()),
                    f" and the last {train_last_layers} layers" if train_last_layers else "")
    bf16 = (not use_cpu and torch.cuda.is_bf16_supported()) if bf16 is None else bf16
    decode = resolve_decoder(decode)
    workers = 0 if decode == "cuda" else vdata.default_workers() if workers is None else workers
    # on a GPU the workers hand on resized and cropped uint8 views and the GPU normalises them (docs/video.md);
    # NVDEC's frames are on the GPU already
    preprocess_on = preprocess_on or ("worker" if use_cpu else "device" if decode == "cuda" else "views")
    augment = vdata.Augment(scale=tuple(scale), flip=flip)
    train_set = vdata.VideoClipDataset(splits.train, splits.label2id, processor, config.num_frames,
                                       frame_sample_rate, train=True, augment=augment, preprocess_on=preprocess_on,
                                       decode=decode)
    eval_set = (vdata.VideoClipDataset(splits.val, splits.label2id, processor, config.num_frames, frame_sample_rate,
                                       preprocess_on=preprocess_on, decode=decode) if splits.val else None)
    fsdp_args: dict[str, Any] = {}
    if fsdp:
        fsdp_args = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["VivitLayer"],
                                                   "reshard_after_forward": True}}
    args = transformers.TrainingArguments(
        output_dir=str(out),
        num_train_epochs=epochs,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup,
        lr_scheduler_type=scheduler,
        label_smoothing_factor=label_smoothing,
        bf16=bf16,
        seed=seed,
        use_cpu=use_cpu,
        **{training_checkpointing_argument(): gradient_checkpointing},
        dataloader_num_workers=workers,
        dataloader_persistent_workers=workers > 0,
        dataloader_pin_memory=not use_cpu and decode != "cuda",  # NVDEC's frames are on the GPU: nothing to pin
        remove_unused_columns=False,
        report_to=[],
        logging_steps=logging_steps,
        save_strategy="steps" if save_steps else "epoch",
        save_steps=save_steps or 500,
        save_total_limit=save_total_limit,
        eval_strategy="epoch" if eval_set is not None else "no",
        ddp_find_unused_parameters=False,
        disable_tqdm=not progress,
        ddp_backend="gloo" if use_cpu and _launched_world() > 1 else None,
        **fsdp_args,
    )
    trainer = VideoTrainer(model=vivit, args=args, train_dataset=train_set, eval_dataset=eval_set,
                           processor=processor, eval_workers=workers, callbacks=callbacks)
    if fsdp and not trainer.is_fsdp_enabled:
        raise RuntimeError("fsdp was asked for but Trainer did not enable it (is this run under torchrun on GPUs?)")
    start = time.perf_counter()
    trained = trainer.train(resume_from_checkpoint=str(earlier[-1]) if resume else None)
    train_seconds = time.perf_counter() - start
    final: dict[str, Any] = {}
    if eval_set is not None:
        final_set = vdata.VideoClipDataset(splits.val, splits.label2id, processor, config.num_frames,
                                           frame_sample_rate, views=views, preprocess_on=preprocess_on, decode=decode)
        final = evaluate_clips(trainer.model, final_set, batch_size=max(1, batch_size // (views[0] * views[1])),
                               device=args.device, workers=workers, progress=progress,
                               autocast=torch.bfloat16 if bf16 else None)
    rank, world = _dist()
    skipped = dict(trainer.preparer.skipped)
    short = trainer.preparer.short
    if world > 1:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, (skipped, short))
        skipped = {k: v for part, _ in gathered for k, v in part.items()}
        short = sum(n for _, n in gathered)
    skipped.update(final.get("skipped", {}))
    metrics = {"train_loss": trained.training_loss, "steps": trained.global_step,
               "train_clips_per_s": round(trained.global_step * batch_size * grad_accum * world / train_seconds, 3),
               "peak_memory_gib": round(peak_memory_gib(args.device), 3)}
    if final:
        metrics.update({f"multiview_{k}": final[k] for k in ("top1", "top5", "loss", "videos", "views")})
    results = {
        "metrics": metrics,
        "out": str(out),
        "labels": splits.id2label,
        "train_videos": len(splits.train),
        "val_videos": len(splits.val),
        "skipped": skipped,
        "short_clips": short,
        "start": {
            "model": model,
            "preset": preset,
            "from_vit": None if from_vit is None else str(from_vit),
            "inflate": inflate if from_vit is not None else None,
            "attention_type": getattr(vivit.config, "attention_type", "spatio_temporal"),
        },
        "attn": attn,
        "world_size": world,
        "parallel": _parallel(trainer, world),
        "bf16": bf16,
        "lora_rank": lora_rank,
        "token_merging": getattr(config, "token_merging", None),
        "freeze_backbone": freeze_backbone,
        "train_last_layers": train_last_layers,
        "seed": seed,
    }
    to_save = trainer.model
    if lora_rank:
        to_save = to_save.merge_and_unload()  # the final checkpoint is a plain ViViT transformers reads
    if fsdp:
        trainer.save_model(str(out))  # every rank: the full state dict is gathered from the shards
    elif trainer.is_world_process_zero():
        to_save.save_pretrained(out)
    if trainer.is_world_process_zero():
        processor.save_pretrained(out)  # preprocessor_config.json and video_preprocessor_config.json
        atomic_write_text(out / RESULTS_FILE, json.dumps(results, indent=2, default=str) + "\n")
        if skipped:
            logger.warning("vivit_kernels finetune: %d video(s) could not be read and were skipped (listed in %s)",
                           len(skipped), out / RESULTS_FILE)
        if short:
            logger.warning("vivit_kernels finetune: %d training clip(s) came from videos shorter than the %d-frame "
                           "window (%d frames x rate %d): their frames repeat", short,
                           config.num_frames * frame_sample_rate, config.num_frames, frame_sample_rate)
    return results


def _launched_world() -> int:
    """The world size torchrun (or another launcher) set in the environment; 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _parallel(trainer, world: int) -> str:
    """How the run was spread: "fsdp2" (parameters were sharded), "ddp" or "one process"."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in trainer.model.parameters()):
        return "fsdp2"
    return "ddp" if world > 1 else "one process"
