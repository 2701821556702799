"""BLIP's NLVR2 model as the paper prunes it: one text layer holds a self-attention and TWO
cross-attentions, one per image (salesforce/BLIP `models/nlvr_encoder.py`, `models/blip_nlvr.py`).

    pixel_values_left, pixel_values_right (B, 3, S, S)  (or pixel_values (2B, 3, S, S): left half first)
      -> vision_model (transformers' BlipVisionModel) on the 2B images as one batch -> (2B, N, Dv)
      -> image0 = the first B (left), image1 = the last B (right)
    input_ids (B, L), attention_mask (B, L) -> word + position embeddings, LayerNorm
      -> per text layer n:
           a = LN(x + dense(SelfAttn(x)))                                   `attention`
           c0 = CrossAttn0(a -> image0), c1 = CrossAttn1(a -> image1)      `crossattention.self0/self1`
           m = (dense0(c0) + dense1(c1)) / 2                 for n <  merge_from_layer (official: 6)
           m = merge_layer(cat(dense0(c0), dense1(c1)))      for n >= merge_from_layer  (no activation)
           b = LN(a + m)                                     one LayerNorm after the merge: `crossattention.output`
           x = LN(b + dense(act(intermediate(b))))                          `intermediate`, `output`
      -> cls_head on the first ([ENC]) state: Linear(D, D), ReLU, Linear(D, 2) -> logits (B, 2)

The module and parameter names under `text_encoder` are the official ones, so an official
checkpoint's text weights load by name (see `convert.nlvr_from_official_state_dict`). Prunable
structures, found by the `bert` and `blip_vision` adapters: per vision layer the attention and the
MLP; per text layer the self-attention, each cross-attention branch (self0 with dense0, self1 with
dense1) and the MLP: 4 attention + 2 MLP groups, as the paper. `merge_layer` and `cls_head` stay
whole: they read the full residual width, which is never pruned.

Temperature: the attention modules divide by sqrt(current head width) as the official ones do; upop's
compression rescales the kept query rows so the compressed model keeps the original temperature
(the official compression does not, spec 4.4).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BlipConfig
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.blip.modeling_blip import BlipPreTrainedModel, BlipVisionModel
from transformers.models.blip.modeling_blip_text import (
    BlipTextAttention,
    BlipTextConfig,
    BlipTextEmbeddings,
    BlipTextIntermediate,
    BlipTextOutput,
    BlipTextSelfAttention,
)

from ._common import register_architecture

MASKED = -10000.0  # the official additive score for a padded text token (nlvr_encoder.py)


class BlipNLVRTwinConfig(BlipConfig):
    """BlipConfig (vision_config, text_config) plus where the twin cross-attention starts merging:
    text layers n >= merge_from_layer merge the two branches with a Linear(2D, D), earlier ones
    average them. The official model hard-codes 6 (12-layer BERT)."""

    model_type = "upop_blip_nlvr_twin"

    merge_from_layer: int = 6


class BlipNLVRTwinOutput(nn.Module):
    """The cross-attention's output: one dense per branch, averaged or merged, then one residual
    LayerNorm (official `BertSelfOutput(twin=True, merge=layer >= 6)`)."""

    def __init__(self, config: BlipTextConfig, merge: bool) -> None:
        super().__init__()
        width = config.hidden_size
        self.dense0 = nn.Linear(width, width)
        self.dense1 = nn.Linear(width, width)
        self.merge_layer = nn.Linear(2 * width, width) if merge else None
        self.LayerNorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, context0: torch.Tensor, context1: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out0, out1 = self.dense0(context0), self.dense1(context1)
        if self.merge_layer is not None:
            merged = self.merge_layer(torch.cat([out0, out1], dim=-1))
        else:
            merged = (out0 + out1) / 2
        return self.LayerNorm(self.dropout(merged) + residual)


class BlipNLVRTwinCrossAttention(nn.Module):
    """Two cross-attention branches (`self0` reads image0, `self1` image1), each with its own
    query/key/value, and their shared output (`output.dense0`, `output.dense1`)."""

    def __init__(self, config: BlipTextConfig, merge: bool) -> None:
        super().__init__()
        self.self0 = BlipTextSelfAttention(config, is_cross_attention=True)
        self.self1 = BlipTextSelfAttention(config, is_cross_attention=True)
        self.output = BlipNLVRTwinOutput(config, merge)

    def forward(self, hidden_states: torch.Tensor, image0: torch.Tensor, image1: torch.Tensor) -> torch.Tensor:
        # every image token is attended to (the official mask is all ones: an additive 0)
        context0, _ = self.self0(hidden_states, encoder_hidden_states=image0)
        context1, _ = self.self1(hidden_states, encoder_hidden_states=image1)
        return self.output(context0, context1, hidden_states)


class BlipNLVRTwinLayer(nn.Module):
    """Self-attention -> twin cross-attention -> MLP, each with its residual LayerNorm."""

    def __init__(self, config: BlipTextConfig, merge: bool) -> None:
        super().__init__()
        self.attention = BlipTextAttention(config)
        self.crossattention = BlipNLVRTwinCrossAttention(config, merge)
        self.intermediate = BlipTextIntermediate(config)
        self.output = BlipTextOutput(config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, image0: torch.Tensor,
                image1: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attention(hidden_states, attention_mask=attention_mask)
        crossed = self.crossattention(attended, image0, image1)
        return self.output(self.intermediate(crossed), crossed)


class BlipNLVRTwinEncoder(nn.Module):
    def __init__(self, config: BlipTextConfig, merge_from_layer: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList([BlipNLVRTwinLayer(config, merge=n >= merge_from_layer)
                                    for n in range(config.num_hidden_layers)])


class BlipNLVRTwinTextEncoder(nn.Module):
    """The official NLVR text encoder (`BertModel` of nlvr_encoder.py without pooler), by the same names."""

    def __init__(self, config: BlipTextConfig, merge_from_layer: int) -> None:
        super().__init__()
        self.embeddings = BlipTextEmbeddings(config)
        self.encoder = BlipNLVRTwinEncoder(config, merge_from_layer)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image0: torch.Tensor,
                image1: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(input_ids=input_ids)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, device=input_ids.device)
        additive = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * MASKED  # (B, 1, 1, L)
        for layer in self.encoder.layer:
            hidden = layer(hidden, additive, image0, image1)
        return hidden


@register_architecture
class BlipNLVRTwinModel(BlipPreTrainedModel):
    """BLIP NLVR2 with the official twin cross-attention (see the module docstring).

    forward(input_ids (B, L), attention_mask (B, L), pixel_values_left, pixel_values_right (B, 3, S, S)
    | pixel_values (2B, 3, S, S), labels (B,) | None) -> SequenceClassifierOutput(logits (B, 2), loss).
    """

    config_class = BlipNLVRTwinConfig
    main_input_name = "input_ids"
    _no_split_modules = ["BlipEncoderLayer", "BlipNLVRTwinLayer"]

    def __init__(self, config: BlipNLVRTwinConfig) -> None:
        super().__init__(config)
        width = config.text_config.hidden_size
        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_encoder = BlipNLVRTwinTextEncoder(config.text_config, config.merge_from_layer)
        self.cls_head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_encoder.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_encoder.embeddings.word_embeddings = value

    def encode_images(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(2B, 3, S, S), left images first -> (image0, image1), each (B, N, Dv)."""
        tokens = self.vision_model(pixel_values=pixel_values).last_hidden_state
        return tokens.chunk(2, dim=0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values_left: torch.Tensor | None = None, pixel_values_right: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                **kwargs: Any) -> SequenceClassifierOutput:
        pixel_values = _image_batch(input_ids.shape[0], pixel_values, pixel_values_left, pixel_values_right)
        image0, image1 = self.encode_images(pixel_values)
        text = self.text_encoder(input_ids, attention_mask, image0, image1)
        logits = self.cls_head(text[:, 0])  # the [ENC] token's state
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def _image_batch(batch: int, both: torch.Tensor | None, left: torch.Tensor | None,
                 right: torch.Tensor | None) -> torch.Tensor:
    """The 2B images as one batch, left first (the official order), from either calling form."""
    if both is not None:
        if left is not None or right is not None:
            raise ValueError("give either pixel_values (2B images) or pixel_values_left/right, not both")
        if both.shape[0] != 2 * batch:
            raise ValueError(f"pixel_values holds {both.shape[0]} images; {batch} statements need {2 * batch}")
        return both
    if left is None or right is None:
        raise ValueError("BlipNLVRTwinModel needs pixel_values_left and pixel_values_right (or pixel_values)")
    if left.shape != right.shape or left.shape[0] != batch:
        raise ValueError(f"left images {tuple(left.shape)} and right images {tuple(right.shape)} must have the "
                         f"same shape and {batch} images each")
    return torch.cat([left, right])
