"""open_clip models with transformer towers (`open_clip.create_model(...)`).

open_clip's `ResidualAttentionBlock` uses torch's `nn.MultiheadAttention`, whose packed
`in_proj_weight` and C++ fast path cannot run at a smaller head width. Before the search, each
one is replaced by `PrunableMultiheadAttention`: separate q/k/v Linears holding the same
weights, the original softmax scale, and the same call signature and outputs, so the model
keeps working with `encode_image` / `encode_text` and matches the original to float precision.
MLP: the block's `mlp` Sequential `c_fc` -> activation -> `c_proj`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..structures import Structure
from ._shape import layer_index, mlp_structure, modality_of

FAMILY = "open_clip"


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


def prepare(model: nn.Module) -> None:
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
