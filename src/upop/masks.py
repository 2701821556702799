"""Masks act through forward hooks on the projections: no model source is edited.

A mask over units is expanded to the rows of each input projection (q, k, v or fused qkv;
fc1) and multiplies that projection's output. For attention this is the paper's mask on
q, k and v after the head split, shared by all heads; for an MLP it multiplies fc1's
output before the activation. Masks are plain leaf tensors owned by the search, never
parameters of the model, so no optimizer or weight decay ever touches them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .structures import Structure


def is_masked(model: nn.Module) -> bool:
    """True while a search's masks (forward hooks) are attached to `model`."""
    return any(getattr(hook, "upop_mask", False)
               for m in model.modules() for hook in m._forward_hooks.values())


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


class MaskSet:
    """One mask vector per structure, attached with forward hooks."""

    def __init__(self, structures: list[Structure], granularity: str, device: torch.device) -> None:
        self.structures = structures
        self.granularity = granularity
        self.values: dict[str, torch.Tensor] = {
            s.name: torch.ones(s.num_units(granularity), device=device, requires_grad=True)
            for s in structures
        }
        self.tokens: dict[str, TokenStats] = {s.name: TokenStats() for s in structures}
        self._handles: list[RemovableHandle] = []

    def attach(self) -> None:
        for s in self.structures:
            for lin in s.input_linears():
                side = 1 if lin is s.k else 0  # q, fused qkv and fc1 see the query-side tokens
                self._handles.append(lin.register_forward_hook(self._hook(s, lin, side)))

    def _hook(self, s: Structure, lin: nn.Linear, side: int):
        mask = self.values[s.name]
        stats = self.tokens[s.name]
        fused = lin is s.qkv
        granularity = self.granularity

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            stats.add(side, inputs[0])
            rows = s.expand(mask, granularity)
            if fused:
                rows = rows.repeat(3)
            return output * rows.to(dtype=output.dtype, device=output.device)

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
