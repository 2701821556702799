"""BERT-style text encoders and decoders (BertModel, BlipTextModel, BLIP's text decoder).

Attention: `<layer>.attention.self` (or `.crossattention.self`) holds `query`, `key`,
`value`; the out-projection is the sibling `<...>.output.dense`. Cross-attention key/value
take the encoder's width as input; only their output rows are pruned. BLIP's NLVR text layer has
two cross-attention branches `crossattention.self0` / `self1` whose out-projections are
`crossattention.output.dense0` / `dense1`: each branch is a structure of its own.
Temperature: transformers' BertSelfAttention keeps `self.scaling` from `__init__`;
BlipTextSelfAttention divides by sqrt(attention_head_size) at every call, so its kept
query rows are rescaled at compression.
MLP: `<layer>.intermediate.dense` -> activation -> `<layer>.output.dense`.
"""

from __future__ import annotations

import sys

from torch import nn

from ..structures import Structure
from . import FAMILIES
from ._shape import layer_index, linear, mlp_structure, modality_of, set_head_attributes

FAMILY = "bert"
SUPPORTS = (
    "BERT-style encoders (BertModel, BlipTextModel, with self- and cross-attention; BLIP NLVR2 twin branches)",
)  # what `upop.SUPPORTED_FAMILIES` lists


def _parent(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model


def _branch(path: str) -> str:
    """The digit of a twin branch `.self0` / `.self1` (whose out-projection is `dense0` / `dense1`), else ""."""
    attr = path.rsplit(".", 1)[-1]
    suffix = attr[len("self"):] if attr.startswith("self") else ""
    return suffix if suffix.isdigit() else ""


def _is_bert_attention(module: nn.Module) -> bool:
    return (
        type(module).__name__.endswith(("SelfAttention", "CrossAttention"))
        and all(linear(module, n) is not None for n in ("query", "key", "value"))
        and hasattr(module, "attention_head_size")
        and hasattr(module, "num_attention_heads")
    )


def find(model: nn.Module, path: str, module: nn.Module) -> list[Structure]:
    if _is_bert_attention(module) and "." in path:
        owner = _parent(model, path)  # BertAttention: .self and .output
        out = linear(getattr(owner, "output", None), "dense" + _branch(path))
        if out is None:
            return []
        cross = "CrossAttention" in type(module).__name__ or "crossattention" in path.split(".")
        return [
            Structure(
                name=path,
                kind="cross_attention" if cross else "attention",
                modality=modality_of(path, "text"),
                layer=layer_index(path),
                family=FAMILY,
                num_heads=module.num_attention_heads,
                head_dim=module.attention_head_size,
                q=module.query,
                k=module.key,
                v=module.value,
                out=out,
                # v5 BERT passes `scaling` fixed at init; BLIP's text attention has none and
                # divides by sqrt(attention_head_size) at every call.
                temperature_follows_width=not hasattr(module, "scaling"),
                set_shape=lambda h, d, m=module: set_head_attributes(m, h, d),
            )
        ]
    if type(module).__name__.endswith("Intermediate") and linear(module, "dense") is not None:
        layer = _parent(model, path) if "." in path else None
        fc2 = linear(getattr(layer, "output", None), "dense")
        if fc2 is None or fc2.in_features != module.dense.out_features:
            return []
        return [mlp_structure(path, module.dense, fc2, FAMILY, "text")]
    return []


FAMILIES.add(FAMILY, sys.modules[__name__])  # how upop sees this family: find (+ make_sliceable)
