"""Image-classification presets (ViT, DeiT)."""

from __future__ import annotations

import transformers as tf

from ..runconfig import ConfigError
from ._common import BuiltModel, add_presets, vit_config


def _classifier(width: int, depth: int, heads: int, patch: int, deit: bool = False):
    def build(image_size: int, num_labels: int | None) -> BuiltModel:
        if not num_labels:
            raise ConfigError("a classification preset needs the number of classes")
        config = vit_config(image_size, patch, width, depth, heads, num_labels=num_labels)
        if deit:
            model = tf.DeiTForImageClassification(tf.DeiTConfig(**config.to_dict()))
        else:
            model = tf.ViTForImageClassification(config)
        return BuiltModel(model, None, image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return build


add_presets({
    "demo-vit": ("classification", _classifier(192, 6, 3, 4), "6-layer ViT, 192 wide, patch 4"),
    "tiny-vit": ("classification", _classifier(32, 2, 4, 8), "2-layer ViT (tests)"),
    "tiny-deit": ("classification", _classifier(32, 2, 4, 8, deit=True), "2-layer DeiT (tests)"),
})
