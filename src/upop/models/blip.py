"""BLIP presets (Hugging Face BlipForImageTextRetrieval / ForConditionalGeneration / ForQuestionAnswering).

The tokenizer is BLIP's: bert-base-uncased's vocabulary (offline, from all-MiniLM-L6-v2) plus
BLIP's two special tokens, [DEC] (bos of the decoder, id 30522) and [ENC] (the ITM / question
encoder's first token, id 30523), so vocab_size is 30524 as in the released BLIP checkpoints.

`BlipForRetrievalWithTemp` is BlipForImageTextRetrieval plus BLIP's learnable ITC temperature
`temp` (the paper's recipe, `retrieval.learn_temperature`): a parameter of the model, so it
reaches the optimizer, is saved with the weights and is rebuilt by `upop.from_pretrained`.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers as tf
from torch import nn
from transformers import initialization as hf_init

from ._common import BuiltModel, add_presets, minilm_path, minilm_tokenizer, register_architecture

TEMP_INIT = 0.07  # BLIP's initial ITC temperature
TEMP_RANGE = (0.001, 0.5)  # BLIP clamps it here before every forward

BLIP_CLASSES = {
    "retrieval": tf.BlipForImageTextRetrieval,
    "caption": tf.BlipForConditionalGeneration,
    "vqa": tf.BlipForQuestionAnswering,
}


def blip_tokenizer() -> Any:
    tok = minilm_tokenizer()
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    tok.enc_token_id = tok.convert_tokens_to_ids("[ENC]")
    return tok


def blip_config(tokenizer: Any, image_size: int, patch: int, vision_width: int, vision_depth: int,
                vision_heads: int, text_width: int, text_depth: int, text_heads: int,
                projection_dim: int = 256, max_positions: int = 64) -> tf.BlipConfig:
    # BlipVisionConfig's default initializer_range is 1e-10 (fine for loading released weights): a
    # tower trained from scratch from it starts blind to the image, so presets use BERT's 0.02
    vision = dict(image_size=image_size, patch_size=patch, hidden_size=vision_width,
                  intermediate_size=4 * vision_width, num_hidden_layers=vision_depth,
                  num_attention_heads=vision_heads, initializer_range=0.02)
    text = dict(vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=4 * text_width,
                num_hidden_layers=text_depth, num_attention_heads=text_heads, encoder_hidden_size=vision_width,
                max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id)
    return tf.BlipConfig(vision_config=vision, text_config=text, projection_dim=projection_dim,
                         image_text_hidden_size=projection_dim)


def _blip(task: str, vision: tuple[int, int, int, int], text: tuple[int, int, int], projection_dim: int):
    """vision: (patch, width, depth, heads); text: (width, depth, heads)."""
    def build(image_size: int, num_labels: int | None) -> BuiltModel:
        tok = blip_tokenizer()
        config = blip_config(tok, image_size, *vision, *text, projection_dim=projection_dim)
        return BuiltModel(BLIP_CLASSES[task](config), tok, image_size)
    return build


@register_architecture
class BlipForRetrievalWithTemp(tf.BlipForImageTextRetrieval):
    """BlipForImageTextRetrieval with a learnable ITC temperature `temp` (a 0-d parameter, init
    0.07). A Hugging Face BLIP retrieval checkpoint, which has no `temp`, loads into it with
    temp = 0.07 (the missing key is initialised by `_init_weights`)."""

    def __init__(self, config: tf.BlipConfig) -> None:
        super().__init__(config)
        self.temp = nn.Parameter(torch.tensor(TEMP_INIT))

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self:
            hf_init.constant_(self.temp, TEMP_INIT)

    @torch.no_grad()
    def clamp_temperature(self) -> None:
        self.temp.clamp_(*TEMP_RANGE)


def with_learned_temperature(model: tf.BlipForImageTextRetrieval) -> BlipForRetrievalWithTemp:
    """`model` itself, turned into a BlipForRetrievalWithTemp with temp = 0.07: in place, so its
    weights are not copied and hooks on its modules (e.g. drop-path) stay."""
    if isinstance(model, BlipForRetrievalWithTemp):
        return model
    if type(model) is not tf.BlipForImageTextRetrieval:
        raise TypeError(f"a learnable temperature is for BlipForImageTextRetrieval, not {type(model).__name__}")
    p = next(model.parameters())
    model.__class__ = BlipForRetrievalWithTemp  # a subclass whose only addition is `temp`
    model.temp = nn.Parameter(torch.tensor(TEMP_INIT, device=p.device, dtype=p.dtype))
    return model


@torch.no_grad()
def init_text_from_bert(text_model: tf.BlipTextModel, bert: tf.BertModel, cls_token_id: int) -> None:
    """Copy a pretrained BERT (same width, depth and heads) into a BLIP text encoder / decoder:
    embeddings and every self-attention and MLP; the cross-attention layers stay new. BLIP has
    no token-type table, so BERT's type-0 row, added to every token, is folded into the
    position table; [DEC] and [ENC] (beyond BERT's vocabulary) start as copies of [CLS]."""
    source = bert.state_dict()
    target = text_model.state_dict()
    for name, tensor in target.items():
        if name in source and source[name].shape == tensor.shape:
            tensor.copy_(source[name])
    words, old = target["embeddings.word_embeddings.weight"], source["embeddings.word_embeddings.weight"]
    words[: old.shape[0]] = old
    words[old.shape[0]:] = old[cls_token_id]
    positions = target["embeddings.position_embeddings.weight"]
    positions.copy_(source["embeddings.position_embeddings.weight"][: positions.shape[0]]
                    + source["embeddings.token_type_embeddings.weight"][0])


def _minilm_blip_retrieval(image_size: int, num_labels: int | None) -> BuiltModel:
    """BLIP retrieval whose text encoder starts from the pretrained all-MiniLM-L6-v2 (384 wide,
    6 layers, 12 heads) and whose ViT (4 layers, 192 wide, patch 8) is trained here."""
    tok = blip_tokenizer()
    bert = tf.BertModel.from_pretrained(str(minilm_path()))
    text = bert.config
    config = blip_config(tok, image_size, 8, 192, 4, 3, text.hidden_size, text.num_hidden_layers,
                         text.num_attention_heads, projection_dim=256)
    model = tf.BlipForImageTextRetrieval(config)
    init_text_from_bert(model.text_encoder, bert, tok.cls_token_id)
    return BuiltModel(model, tok, image_size)


add_presets({
    "tiny-blip-retrieval": ("retrieval", _blip("retrieval", (8, 32, 2, 4), (32, 2, 4), 16),
                            "2-layer random BLIP, ITC + ITM heads (tests)"),
    "demo-blip-retrieval": ("retrieval", _blip("retrieval", (8, 128, 4, 4), (128, 4, 4), 128),
                            "random BLIP: ViT 4x128 (patch 8) + text encoder 4x128, ITC + ITM heads (OpenMoji demo)"),
    "demo-blip-retrieval-minilm": ("retrieval", _minilm_blip_retrieval,
                                   "BLIP: ViT 4x192 (patch 8) + text encoder from pretrained all-MiniLM-L6-v2"),
    "tiny-blip-caption": ("caption", _blip("caption", (8, 32, 2, 4), (32, 2, 4), 16),
                          "2-layer random BLIP with a text decoder (tests)"),
    "demo-blip-caption": ("caption", _blip("caption", (8, 192, 4, 3), (256, 4, 4), 64),
                          "random BLIP captioner: ViT 4x192 (patch 8) + decoder 4x256 (OpenMoji demo)"),
    "tiny-blip-vqa": ("vqa", _blip("vqa", (8, 32, 2, 4), (32, 2, 4), 16),
                      "2-layer random BLIP with question encoder and answer decoder (tests)"),
    "demo-blip-vqa": ("vqa", _blip("vqa", (8, 128, 4, 4), (128, 3, 4), 64),
                      "random BLIP VQA: ViT 4x128 (patch 8), question encoder + answer decoder 3x128 (OpenMoji demo)"),
})
