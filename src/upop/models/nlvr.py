"""NLVR2 presets (upop.architectures.nlvr.BlipForNLVR) and loading one from a BLIP checkpoint folder."""

from __future__ import annotations

from typing import Any

from ..architectures.nlvr import BlipForNLVR
from ._common import BuiltModel, Preset
from .blip import blip_config, blip_tokenizer


def _nlvr(vision: tuple[int, int, int, int], text: tuple[int, int, int], max_positions: int = 64):
    """vision: (patch, width, depth, heads); text: (width, depth, heads)."""
    def build(image_size: int, num_labels: int | None) -> BuiltModel:
        tok = blip_tokenizer()
        config = blip_config(tok, image_size, *vision, *text, projection_dim=16, max_positions=max_positions)
        return BuiltModel(BlipForNLVR(config), tok, image_size)
    return build


def from_blip_checkpoint(source: str, **kwargs: Any) -> BlipForNLVR:
    """A BlipForNLVR whose `vision_model` and `text_encoder` come from a BLIP checkpoint folder or
    hub name (BlipForImageTextRetrieval / BlipForQuestionAnswering weights use these names); the
    image-type embeddings and the classification head start fresh."""
    return BlipForNLVR.from_pretrained(source, **kwargs)


PRESETS: dict[str, Preset] = {
    "tiny-blip-nlvr": ("nlvr", _nlvr((8, 32, 2, 4), (32, 2, 4)),
                       "2-layer random BLIP NLVR model, 32 wide (tests)"),
    # small enough to train from scratch on one CPU core in minutes (docs/tasks/nlvr.md)
    "demo-blip-nlvr": ("nlvr", _nlvr((8, 48, 3, 4), (48, 2, 4)),
                       "random BLIP NLVR model: 3-layer ViT and 2-layer text encoder, 48 wide, patch 8 (demo)"),
}
