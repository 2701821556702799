"""BLIP's vision encoder (Hugging Face transformers `BlipAttention`, `BlipMLP`).

BLIP's text encoder and decoder are BERT-style and handled by the `bert` adapter.
`BlipAttention` has one fused `qkv` Linear(d, 3d) and reshapes with `embed_dim // num_heads`
taken from the *input* width, so it cannot run once the head width shrinks. At compression
the adapter swaps in `PrunableBlipAttention`: the same parameters under the same names and
the same computation, reading its shape from attributes. The scale stays the original one.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ..structures import Structure
from . import FAMILIES
from ._shape import layer_index, mlp_structure, modality_of

FAMILY = "blip_vision"
SUPPORTS = (
    "BLIP (BlipForImageTextRetrieval, BlipForQuestionAnswering, BlipForConditionalGeneration)",
)  # what `upop.SUPPORTED_FAMILIES` lists


class PrunableBlipAttention(nn.Module):
    """Drop-in for transformers' BlipAttention whose head count and width are attributes."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.config = original.config
        self.embed_dim = original.embed_dim
        self.num_heads = original.num_heads
        self.head_dim = original.head_dim
        self.scale = original.scale  # the original temperature, never recomputed
        self.dropout = original.dropout
        self.qkv = original.qkv
        self.projection = original.projection

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        batch, tokens, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, tokens, head_dim)
        scores = torch.matmul(query, key.transpose(-1, -2)) * self.scale
        probs = self.dropout(nn.functional.softmax(scores, dim=-1))
        context = torch.matmul(probs, value).permute(0, 2, 1, 3)
        context = context.reshape(batch, tokens, self.num_heads * self.head_dim)
        return self.projection(context), probs


def _set_shape(model: nn.Module, path: str, num_heads: int, head_dim: int) -> None:
    module = model.get_submodule(path)
    if not isinstance(module, PrunableBlipAttention):
        parent_path, _, attr = path.rpartition(".")
        module = PrunableBlipAttention(module)
        setattr(model.get_submodule(parent_path), attr, module)
    module.num_heads = num_heads
    module.head_dim = head_dim


def find(model: nn.Module, path: str, module: nn.Module) -> list[Structure]:
    cls = type(module).__name__
    if cls in ("BlipAttention", "PrunableBlipAttention"):
        return [
            Structure(
                name=path,
                kind="attention",
                modality=modality_of(path, "vision"),
                layer=layer_index(path),
                family=FAMILY,
                num_heads=module.num_heads,
                head_dim=module.head_dim,
                qkv=module.qkv,
                out=module.projection,
                temperature_follows_width=False,
                set_shape=lambda h, d: _set_shape(model, path, h, d),
            )
        ]
    if cls == "BlipMLP":
        return [mlp_structure(path, module.fc1, module.fc2, FAMILY, "vision")]
    return []


FAMILIES.add(FAMILY, sys.modules[__name__])  # how upop sees this family: find (+ make_sliceable)
