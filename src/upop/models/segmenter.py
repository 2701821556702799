"""Semantic-segmentation presets: Segmenter (ViT encoder + mask-transformer decoder)."""

from __future__ import annotations

from typing import Any

from ..architectures.segmenter import SegmenterConfig, SegmenterForSemanticSegmentation
from ..runconfig import ConfigError
from ._common import BuiltModel, Preset

SEGMENTER_MEAN = SEGMENTER_STD = (0.5, 0.5, 0.5)  # the statistics of timm's ViT weights Segmenter starts from


def _segmenter(width: int, depth: int, heads: int, patch: int, dec_width: int, dec_depth: int, dec_heads: int):
    def build(image_size: int, num_labels: int | None) -> BuiltModel:
        if not num_labels:
            raise ConfigError("a segmentation preset needs the number of classes")
        config = SegmenterConfig(image_size=image_size, patch_size=patch, hidden_size=width, num_hidden_layers=depth,
                                 num_attention_heads=heads, intermediate_size=4 * width,
                                 decoder_hidden_size=dec_width, decoder_num_layers=dec_depth,
                                 decoder_num_heads=dec_heads, decoder_intermediate_size=4 * dec_width,
                                 num_labels=num_labels)
        return BuiltModel(SegmenterForSemanticSegmentation(config), None, image_size, SEGMENTER_MEAN, SEGMENTER_STD)
    return build


def from_vit(source: str, num_labels: int, decoder: dict[str, int] | None = None,
             **kwargs: Any) -> SegmenterForSemanticSegmentation:
    """A Segmenter whose encoder is a Hugging Face ViT checkpoint (folder or hub name) and whose
    decoder is new: `decoder` sets decoder_hidden_size / decoder_num_layers / decoder_num_heads
    (default: the encoder's width and heads, 2 layers, as Segmenter-S/16's mask transformer)."""
    from transformers import ViTModel

    vit = ViTModel.from_pretrained(source, add_pooling_layer=False, **kwargs)
    enc = vit.config
    dec = {"decoder_hidden_size": enc.hidden_size, "decoder_num_layers": 2,
           "decoder_num_heads": enc.num_attention_heads, **(decoder or {})}
    dec.setdefault("decoder_intermediate_size", 4 * dec["decoder_hidden_size"])
    config = SegmenterConfig(image_size=enc.image_size, patch_size=enc.patch_size, num_channels=enc.num_channels,
                             hidden_size=enc.hidden_size, num_hidden_layers=enc.num_hidden_layers,
                             num_attention_heads=enc.num_attention_heads, intermediate_size=enc.intermediate_size,
                             layer_norm_eps=enc.layer_norm_eps, num_labels=num_labels, **dec)
    model = SegmenterForSemanticSegmentation(config)
    model.encoder.load_state_dict(vit.state_dict())
    return model


PRESETS: dict[str, Preset] = {
    "demo-segmenter": ("segmentation", _segmenter(96, 4, 3, 8, 96, 2, 3),
                       "Segmenter: 4-layer ViT encoder 96 wide, patch 8; 2-layer mask transformer"),
    "tiny-segmenter": ("segmentation", _segmenter(32, 2, 4, 8, 32, 1, 4),
                       "Segmenter: 2-layer ViT encoder, 1-layer mask transformer (tests)"),
}
