"""Official checkpoints -> this project's models, by name and shape, with nothing guessed.

- BLIP NLVR2 (salesforce/BLIP `model_base_nlvr.pth`, the model UPop compresses for NLVR2)
  -> `BlipNLVRTwinModel`: `nlvr_from_official_state_dict(state_dict, config)`.
- Segmenter (rstrudel/segmenter checkpoints, e.g. seg_small_mask `checkpoint.pth`)
  -> `SegmenterForSemanticSegmentation`: `segmenter_from_official_state_dict(state_dict, config)`.

Getting the tensors: the official files are pickles of `{"model": state_dict, ...}`. Read them with
`load_official_checkpoint(path)`: `.pth` / `.pt` / `.bin` through `torch.load(path, weights_only=True)`
(tensors and plain containers only: no code from the file runs), anything else as safetensors. Or load
the dict yourself and pass it. Every official tensor must be used exactly once and every parameter of
ours must come from one: a missing or unexpected key, or a shape that does not fit, raises one
ConversionError line naming the key before any weight is copied.

Key mapping (official -> ours):

    BLIP NLVR                                           BlipNLVRTwinModel
    visual_encoder.cls_token                            vision_model.embeddings.class_embedding
    visual_encoder.pos_embed                            vision_model.embeddings.position_embedding
    visual_encoder.patch_embed.proj.*                   vision_model.embeddings.patch_embedding.*
    visual_encoder.blocks.N.norm1.*                     vision_model.encoder.layers.N.layer_norm1.*
    visual_encoder.blocks.N.attn.qkv.*  (fused q|k|v)   vision_model.encoder.layers.N.self_attn.qkv.*  (same layout)
    visual_encoder.blocks.N.attn.proj.*                 vision_model.encoder.layers.N.self_attn.projection.*
    visual_encoder.blocks.N.norm2.*                     vision_model.encoder.layers.N.layer_norm2.*
    visual_encoder.blocks.N.mlp.fc1/fc2.*               vision_model.encoder.layers.N.mlp.fc1/fc2.*
    visual_encoder.norm.*                               vision_model.post_layernorm.*
    text_encoder.*  (embeddings, attention.self, crossattention.self0/self1,
                     crossattention.output.dense0/dense1/LayerNorm/merge_layer,
                     intermediate, output)              text_encoder.*  (the same names)
    text_encoder.embeddings.position_ids                (checked to be 0..L-1, then dropped: ours is computed)
    cls_head.0/2.*                                      cls_head.0/2.*

    Segmenter                                           SegmenterForSemanticSegmentation
    encoder.cls_token / pos_embed                       encoder.embeddings.cls_token / position_embeddings
    encoder.patch_embed.proj.*                          encoder.embeddings.patch_embeddings.projection.*
    {encoder.blocks, decoder.blocks}.N.norm1 / norm2    {encoder.layers, decoder.blocks}.N.layernorm_before / _after
    {...}.N.attn.qkv.*  (fused q|k|v)                   {...}.N.attention.q_proj / k_proj / v_proj.*  (rows split in 3)
    {...}.N.attn.proj.*                                 {...}.N.attention.o_proj.*
    {...}.N.mlp.fc1/fc2.*                               {...}.N.mlp.fc1/fc2.*
    encoder.norm.*                                      encoder.layernorm.*
    encoder.head.*  (ImageNet head, unused by Segmenter) (checked for shape, then dropped)
    decoder.proj_dec / cls_emb / proj_patch / proj_classes / decoder_norm / mask_norm   the same names
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .blip_nlvr import BlipNLVRTwinConfig, BlipNLVRTwinModel
from .segmenter import SegmenterConfig, SegmenterForSemanticSegmentation

# official LayerNorm epsilons: BLIP's ViT partial(nn.LayerNorm, eps=1e-6), BLIP's BERT 1e-12,
# Segmenter nn.LayerNorm(d) everywhere (1e-5)
BLIP_VISION_EPS, BLIP_TEXT_EPS, SEGMENTER_EPS = 1e-6, 1e-12, 1e-5


class ConversionError(ValueError):
    """An official checkpoint that does not fit the model it is converted into."""


# ---- reading the file --------------------------------------------------------------------------------
def load_official_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of an official checkpoint file, unwrapped from its `{"model": ...}` envelope.

    `.pth` / `.pt` / `.bin`: `torch.load(..., weights_only=True)` (refuses anything but tensors and
    plain containers); any other suffix is read as safetensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint file not found: {path}")
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a refused pickle or a corrupted file: several exception types
            raise ConversionError(f"{path}: not a weights-only torch checkpoint: "
                                  f"{str(exc).splitlines()[0][:200]}") from None
    else:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            data = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConversionError(f"{path}: not a readable safetensors file: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]  # BLIP and Segmenter save {"model": state_dict, "optimizer": ..., ...}
    if not isinstance(data, dict) or not data:
        raise ConversionError(f"{path}: expected a state dict (or {{'model': state dict}}), got {type(data).__name__}")
    for key, value in data.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return data


# ---- the shared matcher ------------------------------------------------------------------------------
# ours -> (official key, part): part None copies the tensor; (t, n) takes rows chunk t of n (fused qkv)
Source = tuple[str, tuple[int, int] | None]


def _sources(model: nn.Module, rules: list[tuple[str, str]], what: str) -> dict[str, Source]:
    """Map every tensor of `model`'s state dict to its official source through `rules`
    (regex over our key -> official template; a template ending in `#t/n` takes rows chunk t of n)."""
    compiled = [(re.compile(pattern), template) for pattern, template in rules]
    sources: dict[str, Source] = {}
    for ours in model.state_dict():
        for pattern, template in compiled:
            match = pattern.fullmatch(ours)
            if match:
                official = match.expand(template)
                part = None
                if "#" in official:
                    official, chunk = official.split("#")
                    t, n = chunk.split("/")
                    part = (int(t), int(n))
                sources[ours] = (official, part)
                break
        else:  # a rule table that does not cover the model is a bug here, not a user error
            raise RuntimeError(f"{what}: no official name for our tensor {ours!r}")
    return sources


def _convert(state_dict: dict[str, torch.Tensor], model: nn.Module, sources: dict[str, Source],
             extra: dict[str, Callable[[torch.Tensor], None]], adapt: dict[str, Callable[[torch.Tensor],
             torch.Tensor]], what: str) -> dict[str, torch.Tensor]:
    """Check names and shapes, then build our state dict. `extra`: official keys we consume without a
    tensor of ours (each a check that raises ConversionError); `adapt`: official key -> transform
    applied before the shape check (e.g. the official position-table interpolation)."""
    expected = model.state_dict()
    wanted: dict[str, tuple[int, ...]] = {}
    for ours, (official, part) in sources.items():
        shape = tuple(expected[ours].shape)
        if part is not None:
            shape = (shape[0] * part[1], *shape[1:])
        wanted[official] = shape
    for official in wanted:
        if official not in state_dict:
            raise ConversionError(f"{what}: the official checkpoint has no {official!r}")
    for key in state_dict:
        if key not in wanted and key not in extra:
            raise ConversionError(f"{what}: unexpected key {key!r} in the official checkpoint")
    tensors = {key: adapt[key](value) if key in adapt else value for key, value in state_dict.items()}
    for official, shape in wanted.items():
        got = tuple(tensors[official].shape)
        if got != shape:
            raise ConversionError(f"{what}: {official!r} has shape {got}, the model expects {shape}")
    for key, check in extra.items():
        if key in tensors:
            check(tensors[key])
    converted = {}
    for ours, (official, part) in sources.items():
        value = tensors[official]
        if part is not None:
            value = value.chunk(part[1], dim=0)[part[0]]
        converted[ours] = value
    return converted


def _load(model: nn.Module, converted: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        model.load_state_dict(converted, strict=True)


def _check_eps(what: str, name: str, got: float, official: float) -> None:
    if not math.isclose(got, official, rel_tol=1e-9):
        raise ConversionError(f"{what}: {name} is {got:g}; the official model's LayerNorms use {official:g} "
                              "(set it in the config, or the converted model computes something else)")


# ---- BLIP NLVR2 ----------------------------------------------------------------------------------------
_NLVR_RULES = [
    (r"vision_model\.embeddings\.class_embedding", "visual_encoder.cls_token"),
    (r"vision_model\.embeddings\.position_embedding", "visual_encoder.pos_embed"),
    (r"vision_model\.embeddings\.patch_embedding\.(\w+)", r"visual_encoder.patch_embed.proj.\1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.(\w+)", r"visual_encoder.blocks.\1.norm1.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.(\w+)", r"visual_encoder.blocks.\1.norm2.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.(\w+)", r"visual_encoder.blocks.\1.attn.qkv.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.(\w+)", r"visual_encoder.blocks.\1.attn.proj.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(\w+)", r"visual_encoder.blocks.\1.mlp.\2.\3"),
    (r"vision_model\.post_layernorm\.(\w+)", r"visual_encoder.norm.\1"),
    (r"(text_encoder\..+)", r"\1"),
    (r"(cls_head\.[02]\.\w+)", r"\1"),
]


def official_nlvr_config(image_size: int = 384) -> BlipNLVRTwinConfig:
    """The configuration of the official BLIP-base NLVR2 model (`model_base_nlvr.pth`, image size 384):
    ViT-B/16 (eps 1e-6) and BERT-base with BLIP's 30524-token vocabulary, merging from text layer 6."""
    vision = dict(image_size=image_size, patch_size=16, hidden_size=768, intermediate_size=3072,
                  num_hidden_layers=12, num_attention_heads=12, layer_norm_eps=BLIP_VISION_EPS,
                  initializer_range=0.02)
    text = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=512, layer_norm_eps=BLIP_TEXT_EPS,
                hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, pad_token_id=0)
    return BlipNLVRTwinConfig(vision_config=vision, text_config=text, merge_from_layer=6)


def _interpolate_positions(target: tuple[int, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    """BLIP's `interpolate_pos_embed`: a square grid of another size is resized bicubically (the [CLS]
    row kept), as the official loader does for a checkpoint trained at another image size."""
    def adapt(table: torch.Tensor) -> torch.Tensor:
        if table.dim() != 3 or tuple(table.shape) == target or table.shape[-1] != target[-1]:
            return table  # equal, or a shape error reported by the shape check
        old, new = math.isqrt(table.shape[1] - 1), math.isqrt(target[1] - 1)
        if old * old != table.shape[1] - 1 or new * new != target[1] - 1:
            return table
        grid = table[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(new, new), mode="bicubic", align_corners=False).to(table.dtype)
        return torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
    return adapt


def nlvr_from_official_state_dict(state_dict: dict[str, torch.Tensor],
                                  config: BlipNLVRTwinConfig) -> BlipNLVRTwinModel:
    """A BlipNLVRTwinModel holding the official BLIP NLVR2 weights (see the module docstring's table).

    `config` must describe the checkpoint (e.g. `official_nlvr_config()`), with the official
    LayerNorm epsilons (vision 1e-6, text 1e-12). A `visual_encoder.pos_embed` of another square
    grid is interpolated as BLIP's own loader does. Returns the model in eval mode.
    """
    what = "BLIP NLVR checkpoint"
    _check_eps(what, "vision_config.layer_norm_eps", config.vision_config.layer_norm_eps, BLIP_VISION_EPS)
    _check_eps(what, "text_config.layer_norm_eps", config.text_config.layer_norm_eps, BLIP_TEXT_EPS)
    model = BlipNLVRTwinModel(config)
    sources = _sources(model, _NLVR_RULES, what)
    positions = config.text_config.max_position_embeddings

    def position_ids(value: torch.Tensor) -> None:
        if not torch.equal(value.reshape(-1).long(), torch.arange(value.numel())) or value.numel() != positions:
            raise ConversionError(f"{what}: 'text_encoder.embeddings.position_ids' is not 0..{positions - 1}")

    pos_shape = tuple(model.vision_model.embeddings.position_embedding.shape)
    converted = _convert(state_dict, model, sources, {"text_encoder.embeddings.position_ids": position_ids},
                         {"visual_encoder.pos_embed": _interpolate_positions(pos_shape)}, what)
    _load(model, converted)
    return model.eval()


# ---- Segmenter -----------------------------------------------------------------------------------------
def _block_rules(ours: str, official: str) -> list[tuple[str, str]]:
    o, f = re.escape(ours), official
    return [
        (rf"{o}\.(\d+)\.layernorm_before\.(\w+)", rf"{f}.\1.norm1.\2"),
        (rf"{o}\.(\d+)\.layernorm_after\.(\w+)", rf"{f}.\1.norm2.\2"),
        *[(rf"{o}\.(\d+)\.attention\.{p}_proj\.(\w+)", rf"{f}.\1.attn.qkv.\2#{t}/3") for t, p in enumerate("qkv")],
        (rf"{o}\.(\d+)\.attention\.o_proj\.(\w+)", rf"{f}.\1.attn.proj.\2"),
        (rf"{o}\.(\d+)\.mlp\.(fc[12])\.(\w+)", rf"{f}.\1.mlp.\2.\3"),
    ]


_SEGMENTER_RULES = [
    (r"encoder\.embeddings\.cls_token", "encoder.cls_token"),
    (r"encoder\.embeddings\.position_embeddings", "encoder.pos_embed"),
    (r"encoder\.embeddings\.patch_embeddings\.projection\.(\w+)", r"encoder.patch_embed.proj.\1"),
    *_block_rules("encoder.layers", "encoder.blocks"),
    (r"encoder\.layernorm\.(\w+)", r"encoder.norm.\1"),
    *_block_rules("decoder.blocks", "decoder.blocks"),
    (r"(decoder\.(?:cls_emb|proj_patch|proj_classes))", r"\1"),
    (r"(decoder\.(?:proj_dec|decoder_norm|mask_norm)\.\w+)", r"\1"),
]


def segmenter_from_official_state_dict(state_dict: dict[str, torch.Tensor],
                                       config: SegmenterConfig) -> SegmenterForSemanticSegmentation:
    """A SegmenterForSemanticSegmentation holding an official Segmenter checkpoint with the
    mask-transformer decoder (see the module docstring's table).

    `config` must describe the checkpoint: widths, depths, heads, patch, `num_labels`, `image_size`
    (the position table's grid; it is not resized), and `layer_norm_eps=1e-5` (Segmenter's
    nn.LayerNorm default). The encoder's ImageNet `head` is unused by segmentation and dropped. A
    distilled encoder (`dist_token`) or a linear decoder cannot be represented and is refused.
    Returns the model in eval mode.
    """
    what = "Segmenter checkpoint"
    if "encoder.dist_token" in state_dict:
        raise ConversionError(f"{what}: a distilled encoder (encoder.dist_token) is not supported: "
                              "this Segmenter has one [CLS] token")
    if "decoder.head.weight" in state_dict:
        raise ConversionError(f"{what}: a linear decoder (decoder.head) is not supported: "
                              "this Segmenter has the mask-transformer decoder")
    _check_eps(what, "layer_norm_eps", config.layer_norm_eps, SEGMENTER_EPS)
    model = SegmenterForSemanticSegmentation(config)
    sources = _sources(model, _SEGMENTER_RULES, what)
    width = config.hidden_size

    def head(name: str) -> Callable[[torch.Tensor], None]:
        def check(value: torch.Tensor) -> None:  # Linear(width, classes): only its input side is known
            bad = (value.dim() != 2 or value.shape[1] != width) if name == "weight" else value.dim() != 1
            if bad:
                raise ConversionError(f"{what}: 'encoder.head.{name}' has shape {tuple(value.shape)}, "
                                      f"not that of a Linear({width}, n)")
        return check

    extra = {"encoder.head.weight": head("weight"), "encoder.head.bias": head("bias")}
    converted = _convert(state_dict, model, sources, extra, {}, what)
    _load(model, converted)
    return model.eval()
