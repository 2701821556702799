"""Tiny randomly initialised models of every supported family, with inputs and an output probe."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers as tf
from torch import nn

VOCAB = 99
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=32)
VISION = dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=4)


@dataclass
class Family:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], dict]
    probe: Callable[[object], torch.Tensor]  # model output -> one tensor to compare


def _text(g: torch.Generator, batch: int = 2, length: int = 7) -> dict:
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -2:] = 0  # padding is part of the test
    return {"input_ids": ids, "attention_mask": mask}


def _pixels(g: torch.Generator, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=g)


def _cat(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _clip() -> nn.Module:
    return tf.CLIPModel(tf.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16))


def _vit() -> nn.Module:
    return tf.ViTForImageClassification(tf.ViTConfig(**VISION, num_labels=5))


def _vit_model() -> nn.Module:
    return tf.ViTModel(tf.ViTConfig(**VISION))


def _deit() -> nn.Module:
    return tf.DeiTForImageClassificationWithTeacher(tf.DeiTConfig(**VISION, num_labels=5))


def _bert() -> nn.Module:
    return tf.BertModel(tf.BertConfig(**TEXT))


def _bert_cross() -> nn.Module:
    return tf.BertModel(tf.BertConfig(**TEXT, is_decoder=True, add_cross_attention=True))


def _blip_text() -> nn.Module:
    return tf.BlipTextModel(tf.BlipTextConfig(**TEXT, encoder_hidden_size=24))


def _blip_config() -> tf.BlipConfig:
    text = dict(TEXT, encoder_hidden_size=VISION["hidden_size"])
    return tf.BlipConfig(text_config=text, vision_config=VISION, image_text_hidden_size=16)


def _dual() -> nn.Module:
    config = tf.VisionTextDualEncoderConfig.from_vision_text_configs(
        tf.ViTConfig(**VISION), tf.BertConfig(**TEXT), projection_dim=16)
    return tf.VisionTextDualEncoderModel(config)


def _cross_inputs(width: int):
    def make(g: torch.Generator) -> dict:
        return {**_text(g), "encoder_hidden_states": torch.randn(2, 5, width, generator=g)}
    return make


TIMM_VIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=5)
OPEN_CLIP = dict(
    embed_dim=16,
    vision_cfg=dict(layers=2, width=32, head_width=8, image_size=16, patch_size=4),
    text_cfg=dict(context_length=8, vocab_size=VOCAB, width=32, heads=4, layers=2),
)


def _timm(name: str, **extra):
    def build() -> nn.Module:
        import upop

        return upop.create_model("timm", name, **TIMM_VIT, **extra)
    return build


def _timm_eager(name: str):
    def build() -> nn.Module:
        from timm.layers import set_fused_attn

        set_fused_attn(False)
        try:
            return _timm(name)()
        finally:
            set_fused_attn(True)
    return build


def _open_clip() -> nn.Module:
    import upop

    return upop.create_model("open_clip", "CLIP", **OPEN_CLIP)


def _open_clip_inputs(g: torch.Generator) -> dict:
    return {"image": _pixels(g), "text": torch.randint(1, VOCAB, (2, 8), generator=g)}


def _open_clip_probe(out) -> torch.Tensor:
    image_features, text_features, logit_scale = out[:3]
    return _cat(image_features, text_features)


FAMILIES = [
    Family("clip", _clip, lambda g: {**_text(g), "pixel_values": _pixels(g)},
           lambda o: _cat(o.logits_per_image, o.text_embeds, o.image_embeds)),
    Family("vit", _vit, lambda g: {"pixel_values": _pixels(g)}, lambda o: o.logits),
    Family("vit_model", _vit_model, lambda g: {"pixel_values": _pixels(g)},
           lambda o: _cat(o.last_hidden_state, o.pooler_output)),
    Family("deit", _deit, lambda g: {"pixel_values": _pixels(g)}, lambda o: o.logits),
    Family("bert", _bert, _text, lambda o: _cat(o.last_hidden_state, o.pooler_output)),
    Family("bert_cross", _bert_cross, _cross_inputs(32), lambda o: o.last_hidden_state),
    Family("blip_text", _blip_text, _cross_inputs(24), lambda o: o.last_hidden_state),
    Family("blip_retrieval", lambda: tf.BlipForImageTextRetrieval(_blip_config()),
           lambda g: {**_text(g), "pixel_values": _pixels(g)}, lambda o: o.itm_score),
    Family("blip_vqa", lambda: tf.BlipForQuestionAnswering(_blip_config()),
           lambda g: {**_text(g), "pixel_values": _pixels(g), "labels": torch.randint(1, VOCAB, (2, 5), generator=g)},
           lambda o: o.loss.reshape(1)),
    Family("blip_caption", lambda: tf.BlipForConditionalGeneration(_blip_config()),
           lambda g: {**_text(g), "pixel_values": _pixels(g)}, lambda o: o.logits),
    Family("dual_encoder", _dual, lambda g: {**_text(g), "pixel_values": _pixels(g)},
           lambda o: _cat(o.logits_per_image, o.text_embeds, o.image_embeds)),
]

# Families of issue 5 (timm, open_clip): same guarantees, same tests.
FAMILIES += [
    Family("timm_vit", _timm("vit_tiny_patch16_224"), lambda g: {"x": _pixels(g)}, lambda o: o),
    Family("timm_vit_eager", _timm_eager("vit_tiny_patch16_224"), lambda g: {"x": _pixels(g)}, lambda o: o),
    Family("timm_deit_distilled", _timm("deit_tiny_distilled_patch16_224"), lambda g: {"x": _pixels(g)},
           lambda o: o),
    Family("timm_layerscale", _timm("vit_tiny_patch16_224", init_values=0.1), lambda g: {"x": _pixels(g)},
           lambda o: o),
    Family("open_clip", _open_clip, _open_clip_inputs, _open_clip_probe),
    Family("siglip", lambda: tf.SiglipModel(tf.SiglipConfig(text_config=TEXT, vision_config=VISION)),
           lambda g: {"input_ids": _text(g)["input_ids"], "pixel_values": _pixels(g)},
           lambda o: _cat(o.logits_per_image, o.text_embeds, o.image_embeds)),
]
HEAD_ONLY = [Family("timm_qk_norm", _timm("vit_tiny_patch16_224", qk_norm=True), lambda g: {"x": _pixels(g)},
                    lambda o: o)]
FAMILY_BY_NAME = {f.name: f for f in FAMILIES + HEAD_ONLY}
