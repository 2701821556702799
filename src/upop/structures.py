"""Structure: one prunable site (an attention module or an MLP) and the Linear layers it owns.

Attention layout assumed by every adapter: the projections' output rows (q, k, v) and the
out-projection's input columns are ordered head-major, index = h * head_dim + j. A fused qkv
Linear stacks q, k and v: index = t * (H * head_dim) + h * head_dim + j.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

ATTENTION_KINDS = ("attention", "cross_attention")


class UnsupportedStructureError(ValueError):
    """A structure that cannot be pruned exactly as asked."""
KINDS = (*ATTENTION_KINDS, "mlp")


@dataclass(eq=False)
class Structure:
    """A prunable site.

    name: module path of the attention or MLP module inside the model.
    kind: "attention", "cross_attention" or "mlp".
    modality: the tower it lives in: "vision", "text" or "decoder".
    layer: block index inside its tower (-1 if the path has none).
    num_heads, head_dim: current attention shape (0 for MLPs).
    hidden: MLP hidden width (0 for attention).
    q, k, v: separate projections, or qkv: one fused projection; out: output projection
        (attention). fc1, fc2 (MLP).
    temperature_follows_width: the module computes its softmax scale from the current head
        width, so compression must rescale the kept query rows to keep the original scale.
    set_shape: adapter callback writing the new (num_heads, head_dim) into the module
        attributes (and swapping in an equivalent module where the original cannot run
        at another width).
    """

    name: str
    kind: str
    modality: str
    layer: int
    family: str
    num_heads: int = 0
    head_dim: int = 0
    hidden: int = 0
    q: nn.Linear | None = None
    k: nn.Linear | None = None
    v: nn.Linear | None = None
    qkv: nn.Linear | None = None
    out: nn.Linear | None = None
    fc1: nn.Linear | None = None
    fc2: nn.Linear | None = None
    temperature_follows_width: bool = False
    set_shape: Callable[[int, int], None] | None = field(default=None, repr=False)
    per_head_norm: nn.Module | None = field(default=None, repr=False)  # e.g. timm qk_norm

    def check_granularity(self, granularity: str) -> None:
        """Refuse what cannot be exact: a norm over head_dim sees masked dims as zeros."""
        if self.is_attention and granularity == "head_dim" and self.per_head_norm is not None:
            raise UnsupportedStructureError(
                f"{self.name}: head_dim pruning is not exact under a per-head norm (qk_norm); "
                "use granularity='head'")

    @property
    def is_attention(self) -> bool:
        return self.kind in ATTENTION_KINDS

    @property
    def score_group(self) -> str:
        """Scores are standardised per group: all attention together, all MLPs together."""
        return "attention" if self.is_attention else "mlp"

    def unit(self, granularity: str) -> str:
        return granularity if self.is_attention else "neuron"

    def num_units(self, granularity: str) -> int:
        if not self.is_attention:
            return self.hidden
        return self.head_dim if granularity == "head_dim" else self.num_heads

    def unit_step(self, granularity: str, round_to: int) -> int:
        """Units per block so that kept *channel* widths are multiples of round_to: a whole
        head is head_dim channels, so heads come in blocks of round_to / gcd(round_to, head_dim)."""
        if self.is_attention and granularity == "head":
            return round_to // math.gcd(round_to, self.head_dim)
        return round_to

    def input_linears(self) -> list[nn.Linear]:
        """Linears whose output rows are pruned."""
        if not self.is_attention:
            return [self.fc1]
        return [self.qkv] if self.qkv is not None else [self.q, self.k, self.v]

    def output_linear(self) -> nn.Linear:
        """The Linear whose input columns are pruned."""
        return self.out if self.is_attention else self.fc2

    # ---- costs ----------------------------------------------------------------------------
    def unit_params(self, granularity: str) -> float:
        """Exact parameters removed with one unit (weights and biases of every row/column)."""
        if not self.is_attention:
            fc1, fc2 = self.fc1, self.fc2
            return float(fc1.in_features + (fc1.bias is not None) + fc2.out_features)
        per_dim = 0  # one dim j of every head: H rows in each of q, k, v, H columns of out
        for lin in self.input_linears():
            rows = 3 * self.num_heads if lin is self.qkv else self.num_heads
            per_dim += rows * (lin.in_features + (lin.bias is not None))
        per_dim += self.num_heads * self.out.out_features
        return float(self._per_unit(per_dim, granularity))

    def unit_flops(self, granularity: str, tokens_q: float, tokens_kv: float) -> float:
        """FLOPs (2 per multiply-add) of one sample's forward removed with one unit.

        tokens_q: tokens entering the query projection (or fc1); tokens_kv: tokens entering
        the key/value projections. Includes the QK^T and AV matmuls.
        """
        if not self.is_attention:
            return 2.0 * tokens_q * (self.fc1.in_features + self.fc2.out_features)
        h = self.num_heads
        if self.qkv is not None:
            proj = 3 * h * tokens_q * self.qkv.in_features
        else:
            proj = h * (
                tokens_q * self.q.in_features
                + tokens_kv * (self.k.in_features + self.v.in_features)
            )
        per_dim = proj + h * tokens_q * self.out.out_features + 2 * h * tokens_q * tokens_kv
        return 2.0 * self._per_unit(per_dim, granularity)

    def _per_unit(self, per_dim: float, granularity: str) -> float:
        """per_dim counts dim j of all H heads; a whole head is head_dim dims of one head."""
        return per_dim if granularity == "head_dim" else per_dim * self.head_dim / self.num_heads

    # ---- index maps ---------------------------------------------------------------------
    def expand(self, unit_values: torch.Tensor, granularity: str) -> torch.Tensor:
        """Per-unit values -> per-row values of one (non-fused) projection."""
        if not self.is_attention:
            return unit_values
        if granularity == "head_dim":
            return unit_values.repeat(self.num_heads)
        return unit_values.repeat_interleave(self.head_dim)

    def kept_rows(self, kept: list[int], granularity: str) -> torch.Tensor:
        """Kept units -> kept row indices of one (non-fused) projection."""
        if not self.is_attention:
            return torch.as_tensor(kept, dtype=torch.long)
        keep = torch.zeros(self.num_units(granularity), dtype=torch.bool)
        keep[torch.as_tensor(kept, dtype=torch.long)] = True
        return torch.nonzero(self.expand(keep, granularity)).flatten()

    def describe(self, granularity: str) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "modality": self.modality,
            "layer": self.layer,
            "family": self.family,
            "unit": self.unit(granularity),
            "units": self.num_units(granularity),
            "unit_params": self.unit_params(granularity),
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
        }
