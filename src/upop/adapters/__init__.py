"""Adapters: one file per model family. Each finds its prunable structures in a model.

Discovery walks `model.named_modules()` and asks every adapter about every module, so
composite models (CLIP's two towers, BLIP's vision encoder + text encoder + decoder,
VisionTextDualEncoderModel with any supported towers) need no adapter of their own.
"""

from __future__ import annotations

import warnings

from torch import nn

from ..registry import Registry
from ..structures import Structure

# family name -> adapter: an object (usually the adapter's module) with `find(model, path, module)`,
# optionally `make_sliceable(model)` and `SUPPORTS` (lines for SUPPORTED_FAMILIES). Each adapter module
# registers itself on its last line; a user's own family registers the same way.
FAMILIES: Registry = Registry("model family")

from . import bert, blip, clip_vit, open_clip, timm_vit  # noqa: E402,F401  (each registers itself)
from ._shape import layer_index, modality_of  # noqa: E402,F401  (re-exported)

SUPPORTED_FAMILIES = tuple(line for _, adapter in FAMILIES.items() for line in getattr(adapter, "SUPPORTS", ()))


class UnsupportedModelError(ValueError):
    """The model holds no attention or MLP structure that an adapter knows."""


def make_sliceable(model: nn.Module) -> nn.Module:
    """Swap, in place, the modules that cannot run at a smaller width for equivalent ones of the
    same outputs (open_clip's nn.MultiheadAttention); returns `model`. discover() calls it."""
    for _, adapter in FAMILIES.items():
        if hasattr(adapter, "make_sliceable"):
            adapter.make_sliceable(model)
    return model


def discover(model: nn.Module) -> list[Structure]:
    """All prunable structures of `model`, in module order, after `make_sliceable(model)` (the
    structures must own Linears that compression can slice). Raises UnsupportedModelError."""
    make_sliceable(model)
    found: list[Structure] = []
    for path, module in model.named_modules():
        for _, adapter in FAMILIES.items():
            found.extend(adapter.find(model, path, module))
    if not found:
        raise UnsupportedModelError(
            f"upop found no prunable attention or MLP structure in {type(model).__name__}. "
            "Supported families: " + "; ".join(_supported()) + "."
        )
    _warn_unclaimed(model, found)
    names = [s.name for s in found]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:  # an adapter bug, never a user error
        raise RuntimeError(f"structures claimed twice: {sorted(duplicates)}")
    return found


def _warn_unclaimed(model: nn.Module, found: list[Structure]) -> None:
    claimed = {s.name for s in found}
    for path, module in model.named_modules():
        if not type(module).__name__.endswith("Attention") or path in claimed:
            continue
        if any(c == path or c.startswith(path + ".") for c in claimed):
            continue  # a wrapper (e.g. BertAttention) around a claimed module
        warnings.warn(
            f"upop: {path} ({type(module).__name__}) is not a supported attention module; "
            "it is left unpruned",
            stacklevel=3,
        )


def _supported() -> tuple[str, ...]:
    """The built-in families' lines, plus the name of every family registered later."""
    return tuple(line for name, adapter in FAMILIES.items() for line in getattr(adapter, "SUPPORTS", (name,)))
