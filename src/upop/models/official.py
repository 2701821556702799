"""The paper's starting checkpoints as `model.name`: official `.pth` / `.safetensors` files.

- NLVR2: salesforce/BLIP `model_base_nlvr.pth` (a file, or a folder holding it) -> `BlipNLVRTwinModel`
  through `convert.nlvr_from_official_state_dict`, with the tokenizer of `model.tokenizer` (a BERT
  folder such as bert-base-uncased, given BLIP's [DEC] and [ENC] as BLIP's `init_tokenizer` does, or
  a BLIP tokenizer folder that has them);
- Segmenter: rstrudel/segmenter `checkpoint.pth` (mask transformer) -> `SegmenterForSemanticSegmentation`
  through `convert.segmenter_from_official_state_dict`.

The architecture is read off the tensors' shapes (widths, depths, MLP widths, patch, vocabulary,
position grid, merge layer, classes); head counts, which shapes do not show, are width / 64 as in
every BLIP and Segmenter variant, or Segmenter's `variant.yml` next to the checkpoint when present.
Files are read as data only (`load_official_checkpoint`: weights-only torch.load or safetensors).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
import yaml

from ..runconfig import ConfigError
from ._common import CLIP_MEAN, CLIP_STD, BuiltModel

SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
NLVR_FILE = "model_base_nlvr.pth"
SEGMENTER_FILE = "checkpoint.pth"
HEAD_WIDTH = 64  # BLIP (ViT-B, BERT-base) and Segmenter (ViT-Ti/S/B/L) heads are 64 wide
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def official_file(name: str | None, folder_file: str) -> Path | None:
    """`model.name` as an official checkpoint: a file with a checkpoint suffix, or a folder holding
    `folder_file` and no Hugging Face config.json; None for anything else (a Hugging Face model)."""
    if not name:
        return None
    path = Path(name).expanduser()
    if path.suffix in SUFFIXES:
        if not path.is_file():
            raise ConfigError(f"model.name {name!r}: no such checkpoint file")
        return path
    if path.is_dir() and (path / folder_file).is_file() and not (path / "config.json").is_file():
        return path / folder_file
    return None


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    from .convert import ConversionError, load_official_checkpoint

    try:
        return load_official_checkpoint(path)
    except ConversionError as exc:
        raise ConfigError(f"model.name: {exc}") from None


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for key in state if (m := re.fullmatch(pattern, key))}
    return max(found) + 1 if found else 0


def _tensor(state: dict[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    if key not in state:
        raise ConfigError(f"model.name {str(path)!r}: no {key!r}: not the official checkpoint this task reads")
    return state[key]


def _heads(width: int, what: str) -> int:
    if width % HEAD_WIDTH:
        raise ConfigError(f"{what} is {width} wide, not a multiple of {HEAD_WIDTH}: give the head count in a "
                          "variant.yml next to the checkpoint")
    return width // HEAD_WIDTH


def _grid(rows: int, prefix: int, key: str) -> int:
    grid = math.isqrt(rows - prefix)
    if grid * grid != rows - prefix:
        raise ConfigError(f"{key} has {rows - prefix} patch rows, not a square grid")
    return grid


# ---- BLIP NLVR2 ------------------------------------------------------------------------------------
def blip_tokenizer_from(folder: str | None, vocab_size: int) -> Any:
    """A BERT / BLIP tokenizer folder (offline) with BLIP's [DEC] (bos) and [ENC] tokens."""
    import transformers as tf

    if not folder:
        raise ConfigError("model.tokenizer: an official checkpoint holds no tokenizer; give a BERT "
                          "(bert-base-uncased) or BLIP tokenizer folder")
    if not Path(folder).expanduser().is_dir():
        raise ConfigError(f"model.tokenizer {folder!r}: no such folder")
    try:
        tok = tf.AutoTokenizer.from_pretrained(str(Path(folder).expanduser()), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.tokenizer {folder!r} cannot be loaded: {str(exc).splitlines()[0]}") from None
    if tok.convert_tokens_to_ids("[ENC]") in (None, tok.unk_token_id):  # BLIP's init_tokenizer
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tok.enc_token_id = tok.convert_tokens_to_ids("[ENC]")
    if len(tok) > vocab_size:
        raise ConfigError(f"model.tokenizer {folder!r} has {len(tok)} tokens, the checkpoint's vocabulary "
                          f"{vocab_size}")
    return tok


def nlvr_config_from(state: dict[str, torch.Tensor], image_size: int, path: Path) -> Any:
    """official_nlvr_config(image_size) with every size read off the checkpoint (the released
    model_base_nlvr.pth gives exactly the official configuration)."""
    from .convert import official_nlvr_config

    config = official_nlvr_config(image_size)
    v, t = config.vision_config, config.text_config
    v.hidden_size = _tensor(state, "visual_encoder.cls_token", path).shape[-1]
    v.patch_size = _tensor(state, "visual_encoder.patch_embed.proj.weight", path).shape[-1]
    v.num_hidden_layers = _count(state, r"visual_encoder\.blocks\.(\d+)\.norm1\.weight")
    v.intermediate_size = _tensor(state, "visual_encoder.blocks.0.mlp.fc1.weight", path).shape[0]
    v.num_attention_heads = _heads(v.hidden_size, "the vision encoder")
    if image_size % v.patch_size:
        raise ConfigError(f"data.image_size {image_size} is not a multiple of the checkpoint's patch {v.patch_size}")
    words = _tensor(state, "text_encoder.embeddings.word_embeddings.weight", path)
    t.vocab_size, t.hidden_size = words.shape
    t.max_position_embeddings = _tensor(state, "text_encoder.embeddings.position_embeddings.weight", path).shape[0]
    t.num_hidden_layers = _count(state, r"text_encoder\.encoder\.layer\.(\d+)\.output\.dense\.weight")
    t.intermediate_size = _tensor(state, "text_encoder.encoder.layer.0.intermediate.dense.weight", path).shape[0]
    t.num_attention_heads = _heads(t.hidden_size, "the text encoder")
    t.encoder_hidden_size = v.hidden_size
    merged = [n for n in range(t.num_hidden_layers)
              if f"text_encoder.encoder.layer.{n}.crossattention.output.merge_layer.weight" in state]
    config.merge_from_layer = merged[0] if merged else t.num_hidden_layers
    return config


def load_official_nlvr(path: Path, image_size: int, tokenizer: str | None) -> BuiltModel:
    """The paper's NLVR2 model from BLIP's official checkpoint, its position table resized
    bicubically to `image_size` as BLIP's loader does; returned in train mode."""
    from .convert import ConversionError, nlvr_from_official_state_dict

    state = _state_dict(path)
    config = nlvr_config_from(state, image_size, path)
    tok = blip_tokenizer_from(tokenizer, config.text_config.vocab_size)
    config.text_config.pad_token_id = tok.pad_token_id
    try:
        model = nlvr_from_official_state_dict(state, config)
    except ConversionError as exc:
        raise ConfigError(f"model.name {str(path)!r}: {exc}") from None
    return BuiltModel(model.train(), tok, image_size, CLIP_MEAN, CLIP_STD)


# ---- Segmenter -------------------------------------------------------------------------------------
def _variant(path: Path) -> dict[str, Any]:
    """Segmenter's variant.yml next to the checkpoint (net_kwargs, decoder_kwargs, ...), or {}."""
    file = path.with_name("variant.yml")
    if not file.is_file():
        return {}
    try:
        data = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, ValueError, OSError) as exc:
        raise ConfigError(f"{file}: not readable YAML: {str(exc).splitlines()[0]}") from None
    return data if isinstance(data, dict) else {}


def load_official_segmenter(path: Path, image_size: int) -> BuiltModel:
    """A Segmenter (mask transformer) from an official checkpoint; its position table stays at the
    training grid and the model interpolates it for inputs of another size (such as `image_size`
    crops); returned in train mode."""
    from .convert import ConversionError, segmenter_from_official_state_dict
    from .segmenter import SegmenterConfig

    state = _state_dict(path)
    variant = _variant(path)
    net, dec = variant.get("net_kwargs") or {}, variant.get("decoder_kwargs") or {}
    width = _tensor(state, "encoder.cls_token", path).shape[-1]
    patch = _tensor(state, "encoder.patch_embed.proj.weight", path).shape[-1]
    grid = _grid(_tensor(state, "encoder.pos_embed", path).shape[1], 1, "encoder.pos_embed")
    classes = _tensor(state, "decoder.cls_emb", path)
    dec_width = classes.shape[-1]
    config = SegmenterConfig(
        image_size=grid * patch, patch_size=patch, hidden_size=width,
        num_hidden_layers=_count(state, r"encoder\.blocks\.(\d+)\.norm1\.weight"),
        num_attention_heads=int(net.get("n_heads") or _heads(width, "the encoder")),
        intermediate_size=_tensor(state, "encoder.blocks.0.mlp.fc1.weight", path).shape[0],
        decoder_hidden_size=dec_width, decoder_num_layers=_count(state, r"decoder\.blocks\.(\d+)\.norm1\.weight"),
        decoder_num_heads=int(dec.get("n_heads") or _heads(dec_width, "the decoder")),
        decoder_intermediate_size=_tensor(state, "decoder.blocks.0.mlp.fc1.weight", path).shape[0],
        layer_norm_eps=1e-5, num_labels=classes.shape[1])
    try:
        model = segmenter_from_official_state_dict(state, config)
    except ConversionError as exc:
        raise ConfigError(f"model.name {str(path)!r}: {exc}") from None
    normalization = net.get("normalization", "vit")
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if normalization == "deit" else ((0.5,) * 3, (0.5,) * 3)
    return BuiltModel(model.train(), None, image_size, mean, std)


__all__ = ["NLVR_FILE", "SEGMENTER_FILE", "blip_tokenizer_from", "load_official_nlvr", "load_official_segmenter",
           "nlvr_config_from", "official_file"]
