"""timm VisionTransformer family (ViT, DeiT, DeiT with distillation token, LayerScale, qk_norm).

Attention: `timm.layers.Attention`, one fused `qkv` Linear viewed (B, N, 3, H, head_dim), then
`proj`. timm takes the fused SDPA path (scale = 1/sqrt of the *current* width) or the eager one
(`self.scale`), whichever `use_fused_attn()` says at construction. Compression therefore
rescales the kept query rows by sqrt(d'/d) and sets `scale = d'^-0.5`: both paths then compute
q.k / sqrt(d) with the original d. With `qk_norm` the norm over head_dim would see other
statistics after head_dim slicing: such modules support whole-head pruning only (exact).
MLP: `timm.layers.Mlp` (fc1 -> act -> norm -> fc2) with an identity norm.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

from ..structures import Structure, UnsupportedStructureError
from . import FAMILIES
from ._shape import layer_index, mlp_structure, modality_of

FAMILY = "timm_vit"
SUPPORTS = (
    "timm VisionTransformer (ViT, DeiT, DeiT distilled; qk_norm with granularity='head')",
)  # what `upop.SUPPORTED_FAMILIES` lists


def _is_timm(module: nn.Module) -> bool:
    return type(module).__module__.startswith("timm.")


def _set_shape(module: nn.Module, num_heads: int, head_dim: int) -> None:
    module.num_heads = num_heads
    module.head_dim = head_dim
    module.attn_dim = num_heads * head_dim
    module.scale = head_dim ** -0.5  # the eager path; kept query rows carry sqrt(d'/d)


def find(model: nn.Module, path: str, module: nn.Module) -> list[Structure]:
    cls = type(module).__name__
    if not _is_timm(module):
        return []
    if cls == "Attention" and isinstance(getattr(module, "qkv", None), nn.Linear):
        if getattr(module, "gate", None) is not None or not isinstance(module.norm, nn.Identity):
            raise UnsupportedStructureError(
                f"{path}: timm attention with an output gate or scale_norm cannot be pruned exactly")
        qk_norm = not isinstance(module.q_norm, nn.Identity)
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
                out=module.proj,
                temperature_follows_width=True,
                set_shape=lambda h, d, m=module: _set_shape(m, h, d),
                per_head_norm=module.q_norm if qk_norm else None,
            )
        ]
    if cls == "Mlp" and isinstance(getattr(module, "fc1", None), nn.Linear):
        if not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity):
            raise UnsupportedStructureError(f"{path}: a timm Mlp with a hidden norm cannot be pruned exactly")
        return [mlp_structure(path, module.fc1, module.fc2, FAMILY, "vision")]
    return []


# ---- describing a model for reload ----------------------------------------------------------------
#: The VisionTransformer arguments a build description may hold: architecture only. Whatever
#: names a file, a URL, a hub, a pickle option or a pretrained source is absent on purpose.
BUILD_KWARGS = frozenset({
    "img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim", "depth", "num_heads",
    "mlp_ratio", "qkv_bias", "qk_norm", "scale_attn_norm", "scale_mlp_norm", "proj_bias", "init_values",
    "class_token", "pos_embed", "no_embed_class", "reg_tokens", "pre_norm", "final_norm", "fc_norm",
    "pool_include_prefix", "dynamic_img_size", "dynamic_img_pad", "drop_rate", "pos_drop_rate",
    "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate", "weight_init", "fix_init",
    "act_layer",
})
# A registered name of each class; the description's kwargs then fix every architecture argument.
_CANONICAL = {"VisionTransformer": "vit_tiny_patch16_224",
              "VisionTransformerDistilled": "deit_tiny_distilled_patch16_224"}


def ratio(hidden: int, width: int) -> float:
    """An mlp_ratio that gives back `hidden` through the libraries' int(width * ratio)."""
    r = hidden / width
    return r if int(width * r) == hidden else (hidden + 0.5) / width


def _act_name(act: nn.Module) -> str | None:
    if type(act) is nn.GELU and act.approximate == "none":
        return None  # timm's default
    from timm.layers.create_act import _ACT_LAYER_DEFAULT

    names = [n for n, cls in _ACT_LAYER_DEFAULT.items() if cls is type(act)]
    return names[0] if names else None


def describe(model: nn.Module, base: dict[str, tuple[int, int, int]]) -> list[dict[str, Any]]:
    """Build descriptions ({"name", "kwargs"}) of a timm VisionTransformer read from its modules,
    most likely first; `base` gives the (num_heads, head_dim, hidden) each structure had before
    pruning. [] for other models. The caller rebuilds and compares, so a guess costs nothing."""
    cls = type(model).__name__
    if cls not in _CANONICAL or not _is_timm(model) or not len(getattr(model, "blocks", ())):
        return []
    blocks = list(model.blocks)
    attn, mlp, pe = blocks[0].attn, blocks[0].mlp, model.patch_embed
    heads = base.get("blocks.0.attn", (attn.num_heads, 0, 0))[0]
    hidden = base.get("blocks.0.mlp", (0, 0, mlp.fc1.out_features))[2]
    ls = blocks[0].ls1
    kwargs: dict[str, Any] = dict(
        img_size=list(pe.img_size), patch_size=list(pe.patch_size), in_chans=pe.proj.in_channels,
        num_classes=model.num_classes, global_pool=model.global_pool, embed_dim=model.embed_dim,
        depth=len(blocks), num_heads=heads, mlp_ratio=ratio(hidden, model.embed_dim),
        qkv_bias=attn.qkv.bias is not None, qk_norm=not isinstance(attn.q_norm, nn.Identity),
        proj_bias=attn.proj.bias is not None,
        init_values=None if isinstance(ls, nn.Identity) else float(getattr(ls, "init_values", 1.0)),
        class_token=bool(model.has_class_token), pos_embed="none" if model.pos_embed is None else "learn",
        no_embed_class=bool(model.no_embed_class), reg_tokens=int(model.num_reg_tokens),
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        final_norm=not (isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity)),
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
        pool_include_prefix=bool(model.pool_include_prefix), dynamic_img_size=bool(model.dynamic_img_size),
        dynamic_img_pad=bool(getattr(pe, "dynamic_img_pad", False)),
        drop_rate=float(model.head_drop.p), pos_drop_rate=float(model.pos_drop.p),
        patch_drop_rate=float(getattr(model.patch_drop, "prob", 0.0)),
        proj_drop_rate=float(attn.proj_drop.p), attn_drop_rate=float(attn.attn_drop.p),
        drop_path_rate=float(getattr(blocks[-1].drop_path1, "drop_prob", 0.0)),
        weight_init=model.weight_init_mode, fix_init=bool(model.fix_init),
    )
    act = _act_name(mlp.act)
    if act is not None:
        kwargs["act_layer"] = act
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = [cfg.get("architecture"), _CANONICAL[cls]]
    return [{"name": n, "kwargs": kwargs} for i, n in enumerate(names) if isinstance(n, str) and n not in names[:i]]


FAMILIES.add(FAMILY, sys.modules[__name__])  # how upop sees this family: find (+ make_sliceable)
