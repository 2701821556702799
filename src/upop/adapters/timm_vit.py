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

from torch import nn

from ..structures import Structure, UnsupportedStructureError
from ._shape import layer_index, mlp_structure, modality_of

FAMILY = "timm_vit"


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
