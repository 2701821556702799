"""Dual-encoder presets for retrieval (VisionTextDualEncoderModel, CLIPModel)."""

from __future__ import annotations

import transformers as tf
from torch import nn

from ._common import BuiltModel, add_presets, minilm_path, minilm_tokenizer, vit_config


def _dual(vision: tf.ViTConfig, text_model: nn.Module, projection_dim: int) -> nn.Module:
    config = tf.VisionTextDualEncoderConfig.from_vision_text_configs(vision, text_model.config,
                                                                     projection_dim=projection_dim)
    return tf.VisionTextDualEncoderModel(config=config, vision_model=tf.ViTModel(vision), text_model=text_model)


def _demo_dual(image_size: int, num_labels: int | None) -> BuiltModel:
    text = tf.BertModel.from_pretrained(str(minilm_path()))
    vision = vit_config(image_size, 8, 192, 6, 3)
    return BuiltModel(_dual(vision, text, 256), minilm_tokenizer(), image_size)


def _tiny_dual(image_size: int, num_labels: int | None) -> BuiltModel:
    text = tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=64))
    vision = vit_config(image_size, 8, 32, 2, 4)
    return BuiltModel(_dual(vision, text, 16), minilm_tokenizer(), image_size)


def _tiny_clip(image_size: int, num_labels: int | None) -> BuiltModel:
    tok = minilm_tokenizer()
    text = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)  # pooled at [SEP]
    vision = dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4)
    return BuiltModel(tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)),
                      tok, image_size)


add_presets({
    "demo-dual": ("retrieval", _demo_dual, "pretrained all-MiniLM-L6-v2 text tower + 6-layer ViT (192 wide)"),
    "tiny-dual": ("retrieval", _tiny_dual, "2-layer random BERT + 2-layer ViT (tests)"),
    "tiny-clip": ("retrieval", _tiny_clip, "2-layer random CLIPModel (tests)"),
})
