"""open_clip models with transformer towers (`open_clip.create_model(...)`).

open_clip's `ResidualAttentionBlock` uses torch's `nn.MultiheadAttention`, whose packed
`in_proj_weight` and C++ fast path cannot run at a smaller head width. Before the search, each
one is replaced by `PrunableMultiheadAttention`: separate q/k/v Linears holding the same
weights, the original softmax scale, and the same call signature and outputs, so the model
keeps working with `encode_image` / `encode_text` and matches the original to float precision.
MLP: the block's `mlp` Sequential `c_fc` -> activation -> `c_proj`.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..structures import Structure
from . import FAMILIES
from ._shape import layer_index, mlp_structure, modality_of

FAMILY = "open_clip"
SUPPORTS = (
    "open_clip models with transformer towers (nn.MultiheadAttention is swapped for an equivalent)",
)  # what `upop.SUPPORTED_FAMILIES` lists


class PrunableMultiheadAttention(nn.Module):
    """Equivalent of `nn.MultiheadAttention` (self- or cross-attention, no bias_kv / zero_attn)
    whose head count and width are attributes and whose scale is fixed."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn or not mha._qkv_same_embed_dim:
            raise ValueError("only plain nn.MultiheadAttention (no bias_kv, zero_attn, kdim/vdim) is supported")
        d = mha.embed_dim
        self.batch_first = mha.batch_first
        self.num_heads = mha.num_heads
        self.head_dim = d // mha.num_heads
        self.mask_heads = mha.num_heads  # open_clip builds per-head masks with the original count
        self.scale = self.head_dim ** -0.5
        self.dropout = mha.dropout
        bias = mha.in_proj_bias is not None
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=bias) for _ in range(3))
        with torch.no_grad():
            for i, proj in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                proj.weight.copy_(mha.in_proj_weight[i * d:(i + 1) * d])
                if bias:
                    proj.bias.copy_(mha.in_proj_bias[i * d:(i + 1) * d])
        self.out_proj = nn.Linear(d, mha.out_proj.out_features, bias=mha.out_proj.bias is not None)
        self.out_proj.load_state_dict(mha.out_proj.state_dict())
        self.to(mha.in_proj_weight.device, mha.in_proj_weight.dtype)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        if need_weights:
            raise NotImplementedError("PrunableMultiheadAttention does not return attention weights")
        if not self.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        batch, q_len, _ = query.shape
        k_len = key.shape[1]
        q = self.q_proj(query).view(batch, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).view(batch, k_len, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(batch, k_len, self.num_heads, self.head_dim).transpose(1, 2)
        mask = _additive(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:  # (B * heads, L, S), identical across heads
            mask = mask.view(batch, self.mask_heads, q_len, k_len)[:, :1]
        if key_padding_mask is not None:
            pad = _additive(key_padding_mask, q.dtype).view(batch, 1, 1, k_len)
            mask = pad if mask is None else mask + pad
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                             dropout_p=self.dropout if self.training else 0.0, scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, q_len, self.num_heads * self.head_dim)
        out = self.out_proj(out)
        return (out if self.batch_first else out.transpose(0, 1)), None


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:  # True = not allowed
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _is_block(module: nn.Module) -> bool:
    return type(module).__name__ == "ResidualAttentionBlock" and type(module).__module__.startswith("open_clip")


def make_sliceable(model: nn.Module) -> None:
    """Swap every open_clip block's nn.MultiheadAttention for its prunable equivalent."""
    for module in list(model.modules()):
        if _is_block(module) and isinstance(module.attn, nn.MultiheadAttention):
            module.attn = PrunableMultiheadAttention(module.attn)


def _set_shape(module: PrunableMultiheadAttention, num_heads: int, head_dim: int) -> None:
    module.num_heads, module.head_dim = num_heads, head_dim


def find(model: nn.Module, path: str, module: nn.Module) -> list[Structure]:
    if not _is_block(module):
        return []
    found = []
    if isinstance(module.attn, PrunableMultiheadAttention):
        attn = module.attn
        found.append(Structure(
            name=f"{path}.attn", kind="attention", modality=modality_of(path, "text"), layer=layer_index(path),
            family=FAMILY, num_heads=attn.num_heads, head_dim=attn.head_dim, q=attn.q_proj, k=attn.k_proj,
            v=attn.v_proj, out=attn.out_proj, temperature_follows_width=False,
            set_shape=lambda h, d, m=attn: _set_shape(m, h, d)))
    mlp = module.mlp
    if isinstance(getattr(mlp, "c_fc", None), nn.Linear) and isinstance(getattr(mlp, "c_proj", None), nn.Linear):
        found.append(mlp_structure(f"{path}.mlp", mlp.c_fc, mlp.c_proj, FAMILY, "text"))
    return found


# ---- describing a model for reload ----------------------------------------------------------------
#: What a build description of an open_clip model may hold: `open_clip.CLIP` arguments and the
#: transformer-tower fields of its vision / text configs. Fields that load weights or name a hub,
#: a timm or HF model, a tokenizer or a file (timm_*, hf_*, tokenizer_*) are absent on purpose.
BUILD_KWARGS = frozenset({"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale",
                          "init_logit_bias", "nonscalar_logit_scale", "output_dict"})
_BLOCK_FIELDS = {"ls_init_value", "block_type", "qk_norm", "scaled_cosine_attn", "scale_heads",
                 "scale_attn_inner", "scale_attn", "scale_fc", "final_ln_after_pool", "pool_type",
                 "output_tokens", "layers", "width", "mlp_ratio"}
CFG_KEYS = {
    "vision_cfg": frozenset(_BLOCK_FIELDS | {"head_width", "patch_size", "image_size", "patch_dropout",
                                             "attentional_pool", "attn_pooler_queries", "attn_pooler_heads",
                                             "no_ln_pre", "pos_embed_type"}),
    "text_cfg": frozenset(_BLOCK_FIELDS | {"context_length", "vocab_size", "heads", "embed_cls", "pad_id",
                                           "eos_id", "no_causal_mask", "proj_bias", "proj_type"}),
}
#: Image preprocessing settings `open_clip.create_model` attaches to the model (not computation).
PREPROCESS_KEYS = frozenset({"size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color"})
#: `open_clip.create_model(name, ...)` options allowed beside a registered name (older folders).
CREATE_KWARGS = frozenset({"force_quick_gelu", "force_patch_dropout", "force_image_size",
                           "force_context_length", "output_dict"})


def _tower(blocks: nn.Module, prefix: str, base: dict[str, tuple[int, int, int]]) -> dict[str, Any]:
    from .timm_vit import ratio

    first = blocks[0]
    width = first.mlp.c_fc.in_features
    heads = base.get(f"{prefix}.0.attn", (first.attn.num_heads, 0, 0))[0]
    hidden = base.get(f"{prefix}.0.mlp", (0, 0, first.mlp.c_fc.out_features))[2]
    return {"layers": len(blocks), "width": width, "heads": heads, "mlp_ratio": ratio(hidden, width),
            "ls_init_value": None if isinstance(first.ls_1, nn.Identity) else 1.0}


def describe(model: nn.Module, base: dict[str, tuple[int, int, int]]) -> list[dict[str, Any]]:
    """The `open_clip.CLIP(...)` arguments of an open_clip CLIP with transformer towers, read
    from its modules (`base`: widths before pruning). [] for other models."""
    visual = getattr(model, "visual", None)
    if type(model).__name__ != "CLIP" or not type(model).__module__.startswith("open_clip") \
            or type(visual).__name__ != "VisionTransformer" or not len(model.transformer.resblocks):
        return []
    from open_clip.transformer import QuickGELU

    vision = _tower(visual.transformer.resblocks, "visual.transformer.resblocks", base)
    vision["head_width"] = vision["width"] // vision.pop("heads")
    vision.update(patch_size=list(visual.patch_size), image_size=list(visual.image_size),
                  patch_dropout=float(getattr(visual.patch_dropout, "prob", 0.0)),
                  no_ln_pre=isinstance(visual.ln_pre, nn.Identity), pool_type=visual.pool_type,
                  final_ln_after_pool=bool(visual.final_ln_after_pool), output_tokens=bool(visual.output_tokens))
    text = _tower(model.transformer.resblocks, "transformer.resblocks", base)
    proj = model.text_projection
    text.update(context_length=model.context_length, vocab_size=model.vocab_size, pool_type=model.text_pool_type,
                eos_id=model.text_eos_id, no_causal_mask=model.attn_mask is None,
                proj_type="none" if proj is None else "linear", proj_bias=isinstance(proj, nn.Linear))
    kwargs = {"embed_dim": visual.output_dim, "vision_cfg": vision, "text_cfg": text,
              "quick_gelu": isinstance(visual.transformer.resblocks[0].mlp.gelu, QuickGELU),
              "nonscalar_logit_scale": model.logit_scale.dim() > 0,
              "init_logit_bias": None if model.logit_bias is None else 0.0,
              "output_dict": bool(model.output_dict)}
    desc: dict[str, Any] = {"name": "CLIP", "kwargs": kwargs}
    preprocess = getattr(visual, "preprocess_cfg", None)
    if isinstance(preprocess, dict):
        desc["preprocess_cfg"] = {k: list(v) if isinstance(v, tuple) else v for k, v in preprocess.items()}
    return [desc]


FAMILIES.add(FAMILY, sys.modules[__name__])  # how upop sees this family: find (+ make_sliceable)
