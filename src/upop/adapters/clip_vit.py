"""CLIP, SigLIP, ViT and DeiT (Hugging Face transformers).

Attention: separate `q_proj`, `k_proj`, `v_proj` and `out_proj` (CLIP) or `o_proj` (ViT,
DeiT) Linears, viewed as (..., -1, head_dim); the softmax scale is fixed in `__init__`
(`scale` / `scaling`), so slicing the head width keeps the temperature.
MLP: `fc1` -> activation -> `fc2`.
"""

from __future__ import annotations

import sys

from torch import nn

from ..structures import Structure
from . import FAMILIES
from ._shape import layer_index, linear, mlp_structure, modality_of, set_head_attributes

FAMILY = "clip_vit"
SUPPORTS = (
    "Hugging Face CLIPModel / CLIPVisionModel / CLIPTextModel",
    "SiglipModel (vision and text towers; the attention-pooling head stays unpruned)",
    "ViTModel / ViTForImageClassification",
    "DeiT (DeiTModel, DeiTForImageClassification[WithTeacher])",
    "VisionTextDualEncoderModel with supported towers",
)  # what `upop.SUPPORTED_FAMILIES` lists
ATTENTION_CLASSES = {"CLIPAttention", "SiglipAttention", "ViTAttention", "DeiTAttention"}
MLP_CLASSES = {"CLIPMLP", "SiglipMLP", "ViTMLP", "DeiTMLP"}
_VISION_ONLY = {"ViTAttention", "DeiTAttention", "ViTMLP", "DeiTMLP"}


def find(model: nn.Module, path: str, module: nn.Module) -> list[Structure]:
    cls = type(module).__name__
    default = "vision" if cls in _VISION_ONLY else "text"
    if cls in ATTENTION_CLASSES:
        out = linear(module, "out_proj") or linear(module, "o_proj")
        num_heads = getattr(module, "num_heads", None) or module.num_attention_heads
        return [
            Structure(
                name=path,
                kind="attention",
                modality=modality_of(path, default),
                layer=layer_index(path),
                family=FAMILY,
                num_heads=num_heads,
                head_dim=module.head_dim,
                q=module.q_proj,
                k=module.k_proj,
                v=module.v_proj,
                out=out,
                temperature_follows_width=False,
                set_shape=lambda h, d, m=module: set_head_attributes(m, h, d),
            )
        ]
    if cls in MLP_CLASSES:
        return [mlp_structure(path, module.fc1, module.fc2, FAMILY, default)]
    return []


FAMILIES.add(FAMILY, sys.modules[__name__])  # how upop sees this family: find (+ make_sliceable)
