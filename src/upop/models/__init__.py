"""Models for the pipeline: small named presets built from a config, or Hugging Face models
by name or local folder (downloaded only when the run config allows it).

Presets live with their family (dual.py, vit.py, blip.py, ...); `PRESETS` gathers them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import transformers as tf
from torch import nn

from ..runconfig import ConfigError, ModelConfig
from . import blip, dual, vit
from . import nlvr as nlvr_presets
from . import segmenter as segmenter_presets
from ._common import CLIP_MEAN, CLIP_STD, BuiltModel, Preset, minilm_path, minilm_tokenizer, vit_config

PRESETS: dict[str, Preset] = {**dual.PRESETS, **vit.PRESETS, **blip.PRESETS, **nlvr_presets.PRESETS,
                             **segmenter_presets.PRESETS}


def build_model(cfg: ModelConfig, task: str, image_size: int, num_labels: int | None = None) -> BuiltModel:
    """Build the run's model; raises ConfigError for an unknown preset or a missing folder."""
    if cfg.preset is not None:
        if cfg.preset not in PRESETS:
            raise ConfigError(f"model.preset {cfg.preset!r} is unknown; presets: {', '.join(PRESETS)}")
        preset_task, build, _ = PRESETS[cfg.preset]
        if preset_task != task:
            raise ConfigError(f"model.preset {cfg.preset!r} is a {preset_task} model, the task is {task}")
        return build(image_size, num_labels or cfg.num_labels)
    return _from_name(cfg, task, num_labels or cfg.num_labels)


def _hub_model(task: str, config: Any, source: str, num_labels: int | None, **kwargs: Any) -> tuple[nn.Module, Any]:
    """The model class each task loads from a hub name or folder, and its tokenizer."""
    model_type = getattr(config, "model_type", "")
    if task == "retrieval" and model_type == "blip":  # BLIP retrieval: ITC + ITM heads
        return tf.BlipForImageTextRetrieval.from_pretrained(source, **kwargs), _tokenizer(source, **kwargs)
    if task == "nlvr":  # project-built model: BLIP's vision_model + text_encoder, fresh head
        if model_type != "blip":
            raise ConfigError(f"task nlvr needs a BLIP checkpoint, {source!r} is a {model_type or 'unknown'} model")
        return nlvr_presets.from_blip_checkpoint(source, **kwargs), _tokenizer(source, **kwargs)
    if task in blip.BLIP_CLASSES and task != "retrieval":
        if model_type != "blip":
            raise ConfigError(f"task {task} needs a BLIP checkpoint, {source!r} is a {model_type or 'unknown'} model")
        return blip.BLIP_CLASSES[task].from_pretrained(source, **kwargs), _tokenizer(source, **kwargs)
    if task == "retrieval":
        return tf.AutoModel.from_pretrained(source, **kwargs), _tokenizer(source, **kwargs)
    if task == "segmentation":  # project-built Segmenter: a ViT checkpoint as encoder, new decoder
        if model_type != "vit":
            raise ConfigError(f"task segmentation needs a ViT checkpoint, {source!r} is a "
                              f"{model_type or 'unknown'} model")
        if not num_labels:
            raise ConfigError("task segmentation from a ViT checkpoint needs the number of classes")
        return segmenter_presets.from_vit(source, num_labels, **kwargs), None
    if task == "classification":
        extra = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if num_labels else {}
        return tf.AutoModelForImageClassification.from_pretrained(source, **kwargs, **extra), None
    raise ConfigError(f"task {task} has no loader for hub models; use a model.preset")


def _tokenizer(source: str, **kwargs: Any) -> Any:
    tok = tf.AutoTokenizer.from_pretrained(source, **kwargs)
    if tok.convert_tokens_to_ids("[ENC]") not in (None, tok.unk_token_id):  # BLIP's tokenizer
        tok.enc_token_id = tok.convert_tokens_to_ids("[ENC]")
    return tok


def _from_name(cfg: ModelConfig, task: str, num_labels: int | None) -> BuiltModel:
    name = cfg.name
    local = Path(name).expanduser()
    if not local.exists() and (name.startswith((".", "/", "~")) or not cfg.allow_download):
        is_path = name.startswith((".", "/", "~"))
        hint = "" if is_path else " (or set model.allow_download: true to fetch it from the hub)"
        raise ConfigError(f"model.name {name!r}: no such local folder{hint}")
    kwargs = {"local_files_only": not cfg.allow_download}
    source = str(local) if local.exists() else name
    try:
        config = tf.AutoConfig.from_pretrained(source, **kwargs)
        model, tokenizer = _hub_model(task, config, source, num_labels, **kwargs)
    except OSError as exc:
        raise ConfigError(f"model.name {name!r} cannot be loaded: {str(exc).splitlines()[0]}") from None
    vision = getattr(config, "vision_config", config)
    image_size = int(getattr(vision, "image_size", 224))
    mean, std = CLIP_MEAN, CLIP_STD
    try:
        processor = tf.AutoImageProcessor.from_pretrained(source, **kwargs)
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
    except (OSError, ValueError, AttributeError, TypeError):
        pass  # no processor saved with the model: CLIP statistics, as the paper uses
    return BuiltModel(model, tokenizer, image_size, mean, std)


__all__ = ["CLIP_MEAN", "CLIP_STD", "PRESETS", "BuiltModel", "build_model", "minilm_path", "minilm_tokenizer",
           "vit_config"]
