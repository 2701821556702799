"""Text-encoder presets for text-to-text retrieval (task text_retrieval): a plain BertModel whose
last hidden states the task pools into sentence embeddings."""

from __future__ import annotations

import transformers as tf

from ._common import BuiltModel, add_presets, minilm_path, minilm_tokenizer


def _minilm_text(image_size: int, num_labels: int | None) -> BuiltModel:
    """all-MiniLM-L6-v2 (pretrained, offline): 6 layers, 384 wide, 12 heads, MLP 1536."""
    return BuiltModel(tf.BertModel.from_pretrained(str(minilm_path())), minilm_tokenizer(), image_size)


def _tiny_text(image_size: int, num_labels: int | None) -> BuiltModel:
    tok = minilm_tokenizer()
    config = tf.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64)
    return BuiltModel(tf.BertModel(config), tok, image_size)


add_presets({
    "minilm-text": ("text_retrieval", _minilm_text, "pretrained all-MiniLM-L6-v2 sentence encoder (BertModel)"),
    "tiny-text": ("text_retrieval", _tiny_text, "2-layer random BertModel (tests)"),
})
