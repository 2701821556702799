"""The model classes this project builds and the named presets, in one package.

- presets: small named models built from a config, one module per family (dual.py, vit.py,
  blip.py, nlvr.py, segmenter.py), each registering them in `PRESETS`;
- project-built classes (`BlipForNLVR` in nlvr.py, the paper's twin-branch `BlipNLVRTwinModel` in
  blip_nlvr.py, `SegmenterForSemanticSegmentation` in segmenter.py), registered in `ARCHITECTURES`
  so that `upop.from_pretrained` rebuilds them by class name;
- `build_model`: a preset, or a Hugging Face model by name or local folder (downloaded only when
  the run config allows it). Which class a hub checkpoint loads into is the task's knowledge: the
  task passes its own loader (`Task.load_hub_model`). A checkpoint trained at another image size
  than `data.image_size` gets its position tables resized to the new grid (positions.py), or is
  refused with one line.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import transformers as tf
from torch import nn

from ..runconfig import ConfigError, ModelConfig
from . import blip, blip_nlvr, dual, nlvr, segmenter, text, vit  # noqa: F401  (each registers its presets / classes)
from ._common import (
    ARCHITECTURES,
    CLIP_MEAN,
    CLIP_STD,
    PRESETS,
    BuiltModel,
    Preset,
    minilm_path,
    minilm_tokenizer,
    register_architecture,
    vit_config,
)
from .positions import fit_image_size

# (hub config, source, num_labels, **from_pretrained kwargs) -> (model, tokenizer or None)
HubLoader = Callable[..., tuple[nn.Module, Any]]


def build_model(cfg: ModelConfig, task: str, image_size: int, num_labels: int | None = None,
                load_hub: HubLoader | None = None) -> BuiltModel:
    """Build the run's model; raises ConfigError for an unknown preset, a preset of another task,
    a missing folder, or a hub model for a task without a loader."""
    if cfg.preset is not None:
        preset = PRESETS[cfg.preset]
        if preset.task != task:
            raise ConfigError(f"model.preset {cfg.preset!r} is a {preset.task} model, the task is {task}")
        return preset.build(image_size, num_labels or cfg.num_labels)
    if load_hub is None:
        raise ConfigError(f"task {task} has no loader for hub models; use a model.preset")
    return _from_name(cfg, load_hub, num_labels or cfg.num_labels, image_size)


def hub_tokenizer(source: str, **kwargs: Any) -> Any:
    """The tokenizer saved with a hub model; BLIP's gets its [ENC] id as `enc_token_id`."""
    tok = tf.AutoTokenizer.from_pretrained(source, **kwargs)
    if tok.convert_tokens_to_ids("[ENC]") not in (None, tok.unk_token_id):  # BLIP's tokenizer
        tok.enc_token_id = tok.convert_tokens_to_ids("[ENC]")
    return tok


def require_model_type(task: str, config: Any, source: str, model_type: str, what: str) -> None:
    """One-line ConfigError when a hub checkpoint is not of the family a task loads from."""
    found = getattr(config, "model_type", "")
    if found != model_type:
        raise ConfigError(f"task {task} needs a {what} checkpoint, {source!r} is a {found or 'unknown'} model")


def _from_name(cfg: ModelConfig, load_hub: HubLoader, num_labels: int | None, image_size: int) -> BuiltModel:
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
        model, tokenizer = load_hub(config, source, num_labels, **kwargs)
    except OSError as exc:
        raise ConfigError(f"model.name {name!r} cannot be loaded: {str(exc).splitlines()[0]}") from None
    fit_image_size(model, image_size, name)  # data.image_size honoured (positions resized) or refused
    mean, std = CLIP_MEAN, CLIP_STD
    try:
        processor = tf.AutoImageProcessor.from_pretrained(source, **kwargs)
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
    except (OSError, ValueError, AttributeError, TypeError):
        pass  # no processor saved with the model: CLIP statistics, as the paper uses
    return BuiltModel(model, tokenizer, image_size, mean, std)


__all__ = ["ARCHITECTURES", "CLIP_MEAN", "CLIP_STD", "PRESETS", "BuiltModel", "HubLoader", "Preset", "build_model",
           "hub_tokenizer", "minilm_path", "minilm_tokenizer", "register_architecture", "require_model_type",
           "vit_config"]
