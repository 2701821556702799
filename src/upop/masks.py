"""Masks act on the projections without editing any model source.

A mask over units is expanded to the rows of each input projection (q, k, v or fused qkv;
fc1) and scales those rows. For attention this is the paper's mask on q, k and v after the head
split, shared by all heads; for an MLP it multiplies fc1's output before the activation. Masks
are plain leaf tensors owned by the search, never parameters of the model, so no optimizer or
weight decay ever touches them.

How the mask is applied (same function, same gradients, different memory):
- fold: a plain nn.Linear (its class keeps nn.Linear.forward) gets an instance `forward` computing
  F.linear(x, W * m[:, None], b * m). Multiplying the output instead makes autograd keep the
  unmasked output for the mask's gradient while the next op keeps the masked one: every masked
  activation stored twice. The fold keeps a weight-sized W * m instead, so it is chosen per call
  when the input has at least in_features rows (batch * tokens), else the output is multiplied.
- hook: a forward hook multiplying the output, for Linears whose forward is not nn.Linear's (a
  subclass overriding it, or a forward another library already replaced, e.g. accelerate's
  device hooks): the fold cannot know what such a forward computes.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from .structures import Structure


class _FoldedForward:
    """The masked forward of one plain nn.Linear, bound to it as its instance `forward`.

    Bound with types.MethodType, so a deep copy of the model (a momentum or teacher copy) gets
    this object bound to the copied Linear: it then runs the plain nn.Linear forward, since the
    masks belong to the searched model only (see `is_masked`).
    """

    upop_mask = True  # how `is_masked` recognises a model under search

    def __init__(self, lin: nn.Linear, rows: Callable[[], torch.Tensor], stats: TokenStats, side: int) -> None:
        self.owner = weakref.ref(lin)
        self.rows, self.stats, self.side = rows, stats, side

    def __call__(self, module: nn.Linear, input: torch.Tensor) -> torch.Tensor:
        if module is not self.owner():
            return nn.Linear.forward(module, input)
        self.stats.add(self.side, input)
        weight, bias = module.weight, module.bias
        rows = self.rows().to(dtype=weight.dtype, device=weight.device)
        if input.numel() < weight.shape[1] ** 2:  # fewer input rows than in_features: W * m costs more
            return F.linear(input, weight, bias) * rows
        return F.linear(input, weight * rows[:, None], None if bias is None else bias * rows)


def _folds(lin: nn.Module) -> bool:
    return isinstance(lin, nn.Linear) and type(lin).forward is nn.Linear.forward and "forward" not in lin.__dict__


def _folded(module: nn.Module) -> _FoldedForward | None:
    """The module's own _FoldedForward, if the search folded its mask into it."""
    fold = getattr(module.__dict__.get("forward"), "__func__", None)
    return fold if isinstance(fold, _FoldedForward) and fold.owner() is module else None


def is_masked(model: nn.Module) -> bool:
    """True while a search's masks (folded forwards or forward hooks) are attached to `model`."""
    return any(_folded(m) is not None or any(getattr(hook, "upop_mask", False) for hook in m._forward_hooks.values())
               for m in model.modules())


class TokenStats:
    """Mean tokens per sample seen by a structure's query side and key/value side."""

    def __init__(self) -> None:
        self.sums = [0.0, 0.0]
        self.count = [0, 0]

    def add(self, side: int, x: torch.Tensor) -> None:
        self.sums[side] += float(x.shape[-2]) if x.dim() >= 3 else 1.0
        self.count[side] += 1

    def mean(self) -> tuple[float, float]:
        q = self.sums[0] / self.count[0] if self.count[0] else 0.0
        kv = self.sums[1] / self.count[1] if self.count[1] else q
        return q, kv


class _Unfold:
    """Handle removing a folded forward (restores the class's nn.Linear.forward)."""

    def __init__(self, lin: nn.Linear) -> None:
        self.lin = lin

    def remove(self) -> None:
        if _folded(self.lin) is not None:
            del self.lin.__dict__["forward"]


class MaskSet:
    """One mask vector per structure, applied to its input projections (see the module docstring)."""

    def __init__(self, structures: list[Structure], granularity: str, device: torch.device) -> None:
        self.structures = structures
        self.granularity = granularity
        self.values: dict[str, torch.Tensor] = {
            s.name: torch.ones(s.num_units(granularity), device=device, requires_grad=True)
            for s in structures
        }
        self.tokens: dict[str, TokenStats] = {s.name: TokenStats() for s in structures}
        self._handles: list[RemovableHandle | _Unfold] = []

    def attach(self) -> None:
        for s in self.structures:
            for lin in s.input_linears():
                side = 1 if lin is s.k else 0  # q, fused qkv and fc1 see the query-side tokens
                rows = self._rows(s, lin)
                if _folds(lin):
                    lin.forward = types.MethodType(_FoldedForward(lin, rows, self.tokens[s.name], side), lin)
                    self._handles.append(_Unfold(lin))
                else:
                    self._handles.append(lin.register_forward_hook(self._hook(rows, self.tokens[s.name], side)))

    def _rows(self, s: Structure, lin: nn.Linear) -> Callable[[], torch.Tensor]:
        """The per-output-row mask of `lin` (a fused qkv repeats it for q, k and v), built at each call
        so that the mask's gradient flows through it."""
        mask, granularity, fused = self.values[s.name], self.granularity, lin is s.qkv

        def rows() -> torch.Tensor:
            expanded = s.expand(mask, granularity)
            return expanded.repeat(3) if fused else expanded

        return rows

    @staticmethod
    def _hook(rows: Callable[[], torch.Tensor], stats: TokenStats, side: int):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            stats.add(side, inputs[0])
            return output * rows().to(dtype=output.dtype, device=output.device)

        hook.upop_mask = True  # how `is_masked` recognises a model under search
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @torch.no_grad()
    def set(self, name: str, values: torch.Tensor) -> None:
        self.values[name].copy_(values)

    def grads(self) -> dict[str, torch.Tensor | None]:
        return {name: m.grad for name, m in self.values.items()}

    def zero_grad(self) -> None:
        for m in self.values.values():
            m.grad = None
