"""Physical compression: slice Linear layers by a plan and fix module attributes."""

from __future__ import annotations

import math

import torch
from torch import nn

from .adapters import discover
from .masks import is_masked
from .plan import PlanError, PruningPlan
from .structures import Structure


def _new_param(tensor: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(tensor.detach().clone().contiguous(), requires_grad=like.requires_grad)


@torch.no_grad()
def keep_rows(lin: nn.Linear, rows: torch.Tensor, row_scale: torch.Tensor | None = None) -> None:
    """Keep output rows `rows` of `lin` (weight and bias), optionally scaling each kept row."""
    rows = rows.to(lin.weight.device)
    weight = lin.weight.index_select(0, rows)
    bias = lin.bias.index_select(0, rows) if lin.bias is not None else None
    if row_scale is not None:
        row_scale = row_scale.to(weight)
        weight = weight * row_scale[:, None]
        bias = bias * row_scale if bias is not None else None
    lin.weight = _new_param(weight, lin.weight)
    if bias is not None:
        lin.bias = _new_param(bias, lin.bias)
    lin.out_features = len(rows)


@torch.no_grad()
def keep_columns(lin: nn.Linear, cols: torch.Tensor) -> None:
    """Keep input columns `cols` of `lin`; its bias (over outputs) is unchanged."""
    lin.weight = _new_param(lin.weight.index_select(1, cols.to(lin.weight.device)), lin.weight)
    lin.in_features = len(cols)


def slice_structure(structure: Structure, kept: list[int], unit: str) -> None:
    """Slice one structure in place to its kept units and update its module attributes."""
    s = structure
    if not s.is_attention:
        rows = torch.as_tensor(kept, dtype=torch.long)
        keep_rows(s.fc1, rows)
        keep_columns(s.fc2, rows)
        s.hidden = len(kept)
        return
    rows = s.kept_rows(kept, unit)
    heads, width = (s.num_heads, len(kept)) if unit == "head_dim" else (len(kept), s.head_dim)
    # Keep logits at q.k/sqrt(d_original) for modules whose scale follows the current width:
    # q'.k'/sqrt(d') with q' = q*sqrt(d'/d) equals q.k/sqrt(d) under any attention backend.
    q_scale = math.sqrt(width / s.head_dim) if s.temperature_follows_width and width != s.head_dim else None
    if s.qkv is not None:
        block = s.num_heads * s.head_dim
        keep_rows(s.qkv, torch.cat([rows + t * block for t in range(3)]),
                  _q_scale_vector(q_scale, len(rows), 3))
    else:
        keep_rows(s.q, rows, _q_scale_vector(q_scale, len(rows), 1))
        keep_rows(s.k, rows)
        keep_rows(s.v, rows)
    keep_columns(s.out, rows)
    s.set_shape(heads, width)
    s.num_heads, s.head_dim = heads, width


def _q_scale_vector(scale: float | None, rows_per_part: int, parts: int) -> torch.Tensor | None:
    if scale is None:
        return None
    vector = torch.ones(rows_per_part * parts)
    vector[:rows_per_part] = scale  # q comes first in a fused qkv
    return vector


def apply_plan(model: nn.Module, plan: PruningPlan, structures: list[Structure] | None = None) -> nn.Module:
    """Slice `model` in place as `plan` says. The plan is checked against the model first:
    on a mismatch a PlanError is raised and the model is left untouched.

    structures: the model's structures if the caller already found them (a search does)."""
    if is_masked(model):
        raise PlanError("this model has a UPop search attached: compress it with search.compress(), "
                        "or call search.remove() before apply_plan")
    structures = structures if structures is not None else discover(model)
    plan.check_fits(structures)
    by_name = {s.name: s for s in structures}
    for name, sp in plan.structures.items():
        try:
            if len(sp.kept) < sp.total:
                by_name[name].check_granularity(sp.unit)
        except ValueError as exc:
            raise PlanError(str(exc)) from None
    for name, sp in plan.structures.items():
        if len(sp.kept) < sp.total:
            slice_structure(by_name[name], sp.kept, sp.unit)
    model.upop_plan = plan  # save_pretrained stores it with the weights
    return model
