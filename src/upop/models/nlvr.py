"""The BLIP-based NLVR2 model: two images, one statement, true/false.

Built from stock Hugging Face BLIP parts so that upop's adapters find every prunable structure
by themselves and a BLIP checkpoint (e.g. BlipForImageTextRetrieval's `vision_model` and
`text_encoder`) loads into it by parameter name:

    pixel_values_left, pixel_values_right (B, 3, S, S)
      -> vision_model on the 2B images as ONE batch (as the paper does)  -> (2B, N, Dv)
      -> split into left / right, add a learned image-type embedding (2, Dv) to each
      -> concatenate along the tokens                                      -> (B, 2N, Dv)
    input_ids (B, L) -> text_encoder, cross-attending to the 2N tokens    -> (B, L, Dt)
      -> cls_head on the first ([ENC]) state: Linear(Dt, Dt), ReLU, Linear(Dt, 2) -> logits (B, 2)

Why one cross-attention over both images instead of the paper's two branches: the paper's
text layer has two cross-attentions (one per image) whose outputs are averaged or merged by an
extra Linear; transformers' BlipTextModel has one cross-attention per layer. Concatenating the
two token sequences keeps the stock module (exact discovery and compression through the bert
adapter, BLIP weights load unchanged) while still letting every text token attend to both images;
the image-type embedding tells the text which tokens are left and which are right. The attention
cost is that of two branches of N keys; what differs is that one softmax spans both images and
the key/value projections are shared between them (3 attention + 2 MLP groups instead of the
paper's 4 + 2).


This single-branch model is an option for starting from a Hugging Face BLIP checkpoint (no NLVR2
weights exist there). The paper's model is `BlipNLVRTwinModel` (blip_nlvr.py), loaded from the
official `model_base_nlvr.pth` (models/official.py) or built by the `*-blip-nlvr-twin` presets.

The presets (`tiny-blip-nlvr`, `demo-blip-nlvr`, `tiny-blip-nlvr-twin`, `demo-blip-nlvr-twin`) and
`from_blip_checkpoint` follow the class.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BlipConfig
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.blip.modeling_blip import BlipPreTrainedModel, BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextModel

from ._common import BuiltModel, add_presets, register_architecture
from .blip import blip_config, blip_tokenizer
from .blip_nlvr import BlipNLVRTwinConfig, BlipNLVRTwinModel


@register_architecture
class BlipForNLVR(BlipPreTrainedModel):
    """BLIP ViT + BLIP text encoder (cross-attending to both images) + a 2-way classification head."""

    config_class = BlipConfig
    main_input_name = "input_ids"

    def __init__(self, config: BlipConfig) -> None:
        super().__init__(config)
        vision_width = config.vision_config.hidden_size
        text_width = config.text_config.hidden_size
        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_encoder = BlipTextModel(config.text_config, add_pooling_layer=False)
        # which image a visual token comes from: 0 left, 1 right (an Embedding, so that
        # _init_weights initialises it when the rest is loaded from a BLIP checkpoint)
        self.image_type_embeddings = nn.Embedding(2, vision_width)
        self.cls_head = nn.Sequential(nn.Linear(text_width, text_width), nn.ReLU(), nn.Linear(text_width, 2))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_encoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_encoder.set_input_embeddings(value)

    def encode_images(self, pixel_values_left: torch.Tensor, pixel_values_right: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) x 2 -> the text's cross-attention memory (B, 2N, Dv)."""
        batch = pixel_values_left.shape[0]
        tokens = self.vision_model(pixel_values=torch.cat([pixel_values_left, pixel_values_right])).last_hidden_state
        left, right = tokens[:batch], tokens[batch:]  # (B, N, Dv) each
        kinds = self.image_type_embeddings.weight  # (2, Dv)
        return torch.cat([left + kinds[0], right + kinds[1]], dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values_left: torch.Tensor | None = None, pixel_values_right: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> SequenceClassifierOutput:
        if pixel_values_left is None or pixel_values_right is None:
            raise ValueError("BlipForNLVR needs pixel_values_left and pixel_values_right")
        if pixel_values_left.shape != pixel_values_right.shape:
            raise ValueError(f"left and right images differ in shape: {tuple(pixel_values_left.shape)} vs "
                             f"{tuple(pixel_values_right.shape)}")
        memory = self.encode_images(pixel_values_left, pixel_values_right)
        memory_mask = torch.ones(memory.shape[:2], dtype=torch.long, device=memory.device)
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                 encoder_hidden_states=memory, encoder_attention_mask=memory_mask)
        logits = self.cls_head(text.last_hidden_state[:, 0])  # the [ENC] token's state
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def _nlvr(vision: tuple[int, int, int, int], text: tuple[int, int, int], max_positions: int = 64):
    """vision: (patch, width, depth, heads); text: (width, depth, heads)."""
    def build(image_size: int, num_labels: int | None) -> BuiltModel:
        tok = blip_tokenizer()
        config = blip_config(tok, image_size, *vision, *text, projection_dim=16, max_positions=max_positions)
        return BuiltModel(BlipForNLVR(config), tok, image_size)
    return build


def _twin(vision: tuple[int, int, int, int], text: tuple[int, int, int], merge_from_layer: int,
          max_positions: int = 64):
    """The paper's twin-branch model: vision (patch, width, depth, heads); text (width, depth, heads);
    text layers from `merge_from_layer` on merge the two branches with a Linear (the official: 6 of 12)."""
    def build(image_size: int, num_labels: int | None) -> BuiltModel:
        tok = blip_tokenizer()
        base = blip_config(tok, image_size, *vision, *text, projection_dim=16, max_positions=max_positions)
        config = BlipNLVRTwinConfig(vision_config=base.vision_config.to_dict(),
                                    text_config=base.text_config.to_dict(), merge_from_layer=merge_from_layer)
        return BuiltModel(BlipNLVRTwinModel(config), tok, image_size)
    return build


def from_blip_checkpoint(source: str, **kwargs: Any) -> BlipForNLVR:
    """A BlipForNLVR whose `vision_model` and `text_encoder` come from a BLIP checkpoint folder or
    hub name (BlipForImageTextRetrieval / BlipForQuestionAnswering weights use these names); the
    image-type embeddings and the classification head start fresh."""
    return BlipForNLVR.from_pretrained(source, **kwargs)


add_presets({
    "tiny-blip-nlvr": ("nlvr", _nlvr((8, 32, 2, 4), (32, 2, 4)),
                       "2-layer random BLIP NLVR model, 32 wide (tests)"),
    # small enough to train from scratch on one CPU core in minutes (docs/tasks/nlvr.md)
    "demo-blip-nlvr": ("nlvr", _nlvr((8, 48, 3, 4), (48, 2, 4)),
                       "random BLIP NLVR model: 3-layer ViT and 2-layer text encoder, 48 wide, patch 8 (demo)"),
    "tiny-blip-nlvr-twin": ("nlvr", _twin((8, 32, 2, 4), (32, 2, 4), merge_from_layer=1),
                            "2-layer random twin-branch BLIP NLVR model (the paper's), 32 wide (tests)"),
    "demo-blip-nlvr-twin": ("nlvr", _twin((8, 48, 3, 4), (48, 2, 4), merge_from_layer=1),
                            "random twin-branch BLIP NLVR model: 3-layer ViT, 2-layer text encoder, 48 wide (demo)"),
})
