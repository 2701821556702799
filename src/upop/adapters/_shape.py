"""Helpers shared by the adapters."""

from __future__ import annotations

import re

from torch import nn

from ..structures import Structure

_HEAD_COUNT = ("num_heads", "num_attention_heads")
_HEAD_WIDTH = ("head_dim", "attention_head_size")


def set_head_attributes(module: nn.Module, num_heads: int, head_dim: int) -> None:
    """Write a new head count and width into whichever attributes the module's forward reads.

    The softmax scale attribute (`scale`, `scaling`) is deliberately left alone: it holds the
    original temperature.
    """
    for attr in _HEAD_COUNT:
        if hasattr(module, attr):
            setattr(module, attr, num_heads)
    for attr in _HEAD_WIDTH:
        if hasattr(module, attr):
            setattr(module, attr, head_dim)
    if hasattr(module, "all_head_size"):
        module.all_head_size = num_heads * head_dim


def linear(module: nn.Module, name: str) -> nn.Linear | None:
    child = getattr(module, name, None)
    return child if isinstance(child, nn.Linear) else None


_LAYER = re.compile(r"\.(\d+)(?=\.|$)")


def layer_index(path: str) -> int:
    """Block index of a module path (the last integer component), -1 if none."""
    found = _LAYER.findall(path)
    return int(found[-1]) if found else -1


def modality_of(path: str, default: str) -> str:
    """The tower a module path lives in: decoder, vision or text."""
    lowered = path.lower()
    if "decoder" in lowered:
        return "decoder"
    if "vision" in lowered or "visual" in lowered:
        return "vision"
    if "text" in lowered:
        return "text"
    return default


def mlp_structure(path: str, fc1: nn.Linear, fc2: nn.Linear, family: str, default_modality: str) -> Structure:
    """An MLP site: fc1 -> activation -> fc2, pruned over fc1's output neurons."""
    return Structure(name=path, kind="mlp", modality=modality_of(path, default_modality), layer=layer_index(path),
                     family=family, hidden=fc1.out_features, fc1=fc1, fc2=fc2)
