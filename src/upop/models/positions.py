"""`data.image_size` for a loaded checkpoint: its vision position tables resized to the new patch grid.

A ViT's position table holds one row per patch of the image size it was trained at (plus [CLS] /
distillation rows). Running it at another size needs a table of the new grid: the patch rows are
resized bicubically as a square grid and the prefix rows kept, as BLIP's `interpolate_pos_embed` and
DeiT's fine-tuning do. Done once at load, so the saved model carries the new table and its config the
new image size. Known families: BLIP vision, ViT, DeiT, CLIP and SigLIP vision towers (alone or inside
a dual encoder). A model of another family whose config names an image size refuses a different one
with one line, never ignores it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..runconfig import ConfigError

# embeddings class -> (position attribute, rows before the patch rows)
_TABLES = {
    "BlipVisionEmbeddings": ("position_embedding", 1),
    "ViTEmbeddings": ("position_embeddings", 1),
    "DeiTEmbeddings": ("position_embeddings", 2),  # [CLS] and distillation token
    "CLIPVisionEmbeddings": ("position_embedding", 1),
    "SiglipVisionEmbeddings": ("position_embedding", 0),
}


def resize_grid(table: torch.Tensor, prefix: int, grid: int) -> torch.Tensor:
    """(1, prefix + g*g, D) -> (1, prefix + grid*grid, D): the patch rows resized bicubically."""
    old = math.isqrt(table.shape[1] - prefix)
    if old * old != table.shape[1] - prefix:
        raise ConfigError(f"a position table of {table.shape[1] - prefix} patch rows is not a square grid")
    if old == grid:
        return table
    rows = table[:, prefix:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    rows = F.interpolate(rows.float(), size=(grid, grid), mode="bicubic", align_corners=False).to(table.dtype)
    return torch.cat([table[:, :prefix], rows.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


@torch.no_grad()
def _resize(module: nn.Module, attr: str, prefix: int, image_size: int) -> None:
    patch = module.patch_embeddings.patch_size if hasattr(module, "patch_embeddings") else module.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    grid = image_size // patch
    current = getattr(module, attr)
    if isinstance(current, nn.Embedding):  # CLIP / SigLIP: an Embedding indexed by position_ids
        table = resize_grid(current.weight[None], prefix, grid)[0]
        embedding = nn.Embedding(table.shape[0], table.shape[1]).to(table.device, table.dtype)
        embedding.weight.copy_(table)
        setattr(module, attr, embedding)
        module.register_buffer("position_ids", torch.arange(table.shape[0], device=table.device)[None],
                               persistent=False)
    else:
        setattr(module, attr, nn.Parameter(resize_grid(current.data, prefix, grid),
                                           requires_grad=current.requires_grad))
    if hasattr(module, "patch_embeddings"):  # ViT / DeiT check the input size against these
        module.patch_embeddings.image_size = (image_size, image_size)
        module.patch_embeddings.num_patches = grid * grid
    for name, value in (("num_patches", grid * grid), ("num_positions", grid * grid + prefix)):
        if hasattr(module, name):
            setattr(module, name, value)
    if hasattr(module, "image_size"):
        tuple_form = isinstance(module.image_size, (tuple, list))
        module.image_size = (image_size, image_size) if tuple_form else image_size


def _image_size_configs(model: nn.Module) -> list:
    config = getattr(model, "config", None)
    if config is None:
        return []
    return [c for c in (config, getattr(config, "vision_config", None))
            if c is not None and isinstance(getattr(c, "image_size", None), int)]


def fit_image_size(model: nn.Module, image_size: int, source: str) -> int:
    """Make `model` run at `image_size` (see the module docstring); returns the number of position
    tables resized. ConfigError when the size does not fit the patch or the family is unknown."""
    configs = _image_size_configs(model)
    native = configs[-1].image_size if configs else None
    if native is None or native == image_size:
        return 0
    tables = [(m, *_TABLES[type(m).__name__]) for m in model.modules() if type(m).__name__ in _TABLES]
    if not tables:
        raise ConfigError(f"model.name {source!r} was trained at image size {native} and its family "
                          f"({type(model).__name__}) cannot move to data.image_size {image_size}; "
                          f"set data.image_size: {native}")
    for module, _attr, _prefix in tables:
        patch = module.patch_embeddings.patch_size if hasattr(module, "patch_embeddings") else module.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else patch
        if image_size % patch:
            raise ConfigError(f"data.image_size {image_size} is not a multiple of the model's patch size {patch}")
    for module, attr, prefix in tables:
        _resize(module, attr, prefix, image_size)
    for config in configs:
        config.image_size = image_size
    return len(tables)


__all__ = ["fit_image_size", "resize_grid"]
