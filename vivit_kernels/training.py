"""What a fine-tune starts from and what it trains: the starting model and its processor (a ViViT checkpoint, a
preset with random weights, or an image ViT inflated, the paper's section 3.4), LoRA adapters (PEFT) and frozen
backbones. ``finetune`` (``vivit_kernels.finetune``) builds on these; ``tools/costs.py`` counts what they cost."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import transformers

from . import data as vdata
from .processing import VideoProcessor

__all__ = ["build_model", "processor_for_vit", "add_lora", "freeze_all_but_head"]

logger = logging.getLogger("vivit_kernels.finetune")


def processor_for_vit(vit_path: str | None, image_size: int) -> VideoProcessor:
    """The ViT's own normalisation (its preprocessor_config.json, else ViTImageProcessor's defaults: x / 255,
    mean = std = 0.5) with ViViT's geometry (short side 256/224 of the crop, center crop)."""
    config: dict[str, Any] = {}
    if vit_path and (Path(vit_path) / "preprocessor_config.json").is_file():
        config = json.loads((Path(vit_path) / "preprocessor_config.json").read_text(encoding="utf-8"))
    return VideoProcessor.for_image_size(
        image_size, image_size, rescale_factor=config.get("rescale_factor", 1 / 255), offset=False,
        do_normalize=config.get("do_normalize", True), image_mean=config.get("image_mean", 0.5),
        image_std=config.get("image_std", 0.5))


def build_model(splits: vdata.VideoSplits, model: str | None = None, preset: str | None = None,
                from_vit: Any = None, inflate: str = "central", num_frames: int | None = None,
                tubelet_time: int = 2, attn: str | None = "auto", attention_type: str | None = None):
    """(model, processor) for the dataset's labels, from exactly one of: a ViViT checkpoint (``model``: Model 1 or
    a factorised one), a preset name or config (random weights; the factorised presets and VivitFactorizedConfig
    build Models 2-4) or an image ViT (``from_vit``, inflated; ``attention_type`` for Models 2-4)."""
    from .model import VivitConfig, VivitForVideoClassification
    from .models import VivitFactorizedConfig, VivitFactorizedForVideoClassification
    from .presets import FACTORIZED_PRESETS, image_hw

    given = [name for name, v in (("model", model), ("preset", preset), ("from_vit", from_vit)) if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one starting point: model (a ViViT checkpoint), preset (random weights) or "
                         f"from_vit (an image ViT to inflate); got {', '.join(given) or 'none'}")
    labels = {"id2label": splits.id2label, "label2id": splits.label2id, "num_labels": len(splits.id2label)}
    if from_vit is not None:
        from .inflate import vivit_from_vit

        vivit = vivit_from_vit(from_vit, num_frames=num_frames or 32, tubelet_time=tubelet_time, inflate=inflate,
                               id2label=splits.id2label, attn=attn, attention_type=attention_type)
        processor = processor_for_vit(from_vit if isinstance(from_vit, (str, os.PathLike)) else None,
                                      image_hw(vivit.config)[0])
        return vivit, processor
    if attention_type is not None:
        raise ValueError("attention_type builds a factorised model from an image ViT (from_vit); a preset or "
                         "checkpoint says its own model")
    if preset is not None:  # a preset name, or a VivitConfig / VivitFactorizedConfig of one's own
        overrides = {**labels, **({"num_frames": num_frames} if num_frames else {})}
        factorised = (
            preset in FACTORIZED_PRESETS if isinstance(preset, str) else isinstance(preset, VivitFactorizedConfig)
        )
        kind, cls = ((VivitFactorizedConfig, VivitFactorizedForVideoClassification) if factorised
                     else (VivitConfig, VivitForVideoClassification))
        config = (kind.from_preset(preset, **overrides) if isinstance(preset, str)
                  else kind(**{**preset.to_dict(), **overrides}))
        vivit = cls(config, attn=attn)
        return vivit, VideoProcessor.for_model(vivit.config)
    config = transformers.AutoConfig.from_pretrained(model)
    cls = (
        VivitFactorizedForVideoClassification
        if isinstance(config, VivitFactorizedConfig)
        else VivitForVideoClassification
    )
    if num_frames and num_frames != config.num_frames:
        raise ValueError(f"num_frames: the checkpoint {model} was trained on {config.num_frames} frames, "
                         f"--num-frames asks for {num_frames}")
    same = {int(k): v for k, v in config.id2label.items()} == splits.id2label
    vivit = cls.from_pretrained(model, attn=attn, **({} if same else
                                                        {**labels, "ignore_mismatched_sizes": True}))
    if not same:
        logger.warning("vivit_kernels finetune: the checkpoint's %d labels differ from the data's %d: the "
                       "classifier starts anew", len(config.id2label), len(splits.id2label))
    return vivit, VideoProcessor.for_model(vivit.config, model)


def freeze_all_but_head(model, train_last_layers: int = 0) -> int:
    """Freeze every weight but the classifier's and, with ``train_last_layers`` > 0, the last that many encoder
    layers' and the final LayerNorm's (a linear probe, or a partial fine-tune); returns the trainable count."""
    base = model.vivit
    layers = list(base.layers)
    if not 0 <= train_last_layers <= len(layers):
        raise ValueError(f"train_last_layers must be between 0 and the model's {len(layers)} layers, got "
                         f"{train_last_layers}")
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)
    if train_last_layers:
        for layer in layers[len(layers) - train_last_layers:]:
            layer.requires_grad_(True)
        base.layernorm.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def add_lora(model, rank: int, alpha: int | None = None):
    """PEFT LoRA adapters of ``rank`` (alpha default 2 x rank) on q and v; the classifier trains too."""
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA needs PEFT: pip install peft") from None
    config = peft.LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=["q_proj", "v_proj"],
                             modules_to_save=["classifier"])
    return peft.get_peft_model(model, config)


# ------------------------------------------------------------------------------------------------
# Evaluation over views
# ------------------------------------------------------------------------------------------------
