"""Optimisers and learning-rate schedules of the run config (`train.optimizer`, `train.schedule`).

- `build_optimizer(model, lr, train_cfg)`: AdamW (default) or SGD with Nesterov momentum (the
  paper's Segmenter). Parameter groups as DeiT's recipe: no weight decay on biases, norms,
  embeddings and position tables; each group carries `lr_scale` from `train.lr_multipliers`
  (the first matching parameter-name prefix), which the training loop multiplies into the rate.
- `lr_schedule(train_cfg, base_lr, total_steps)`: lr_at(step) for dense training and retraining:
  cosine to `train.min_lr` after `train.warmup_steps` of linear warmup (default), Segmenter's
  polynomial decay (per step, power `train.poly_power`, to `train.min_lr`, no warmup unless
  `train.warmup_steps` asks), or constant. The search phase always runs at a constant rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

LrAt = Callable[[int], float]


def parameter_groups(model: nn.Module, weight_decay: float,
                     multipliers: dict[str, float]) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (lr_scale, exempt from weight decay), in first-seen order."""
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((float(f) for prefix, f in multipliers.items() if name.startswith(prefix)), 1.0)
        exempt = p.ndim < 2 or "position" in name or "embedding" in name
        groups.setdefault((scale, exempt), []).append(p)
    return [{"params": ps, "weight_decay": 0.0 if exempt else weight_decay, "lr_scale": scale}
            for (scale, exempt), ps in groups.items()]


def build_optimizer(model: nn.Module, lr: float, train_cfg: Any) -> torch.optim.Optimizer:
    """The optimiser `train.optimizer` names over `model`'s trainable parameters (groups above)."""
    groups = parameter_groups(model, train_cfg.weight_decay, train_cfg.lr_multipliers)
    kind = getattr(train_cfg, "optimizer", "adamw")
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if kind == "sgd":  # Segmenter's optimiser: SGD, Nesterov momentum 0.9
        momentum = getattr(train_cfg, "momentum", 0.9)
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    raise ValueError(f"train.optimizer must be adamw or sgd, got {kind!r}")


def cosine(lr: float, min_lr: float, total: int, warmup: int = 0) -> LrAt:
    """Linear warmup over `warmup` steps, then cosine decay from lr to min_lr at `total`."""
    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = min(step - warmup, total - warmup) / max(1, total - warmup)
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr_at


def poly(lr: float, min_lr: float, total: int, power: float = 0.9, warmup: int = 0) -> LrAt:
    """Segmenter's PolynomialLR (segm/optim/scheduler.py), per step:
    (lr - min_lr) * (1 - step/total)^power + min_lr; during a warmup the coefficient rises
    linearly to its value at the warmup's end."""
    def coefficient(step: int) -> float:
        return max(0.0, 1 - min(step, total) / max(1, total)) ** power

    def lr_at(step: int) -> float:
        coef = coefficient(step)
        if step < warmup:
            coef = step / warmup * coefficient(warmup)
        return (lr - min_lr) * coef + min_lr
    return lr_at


def lr_schedule(train_cfg: Any, base_lr: float, total_steps: int) -> LrAt:
    """lr_at(step) of `train.schedule` from `base_lr` over `total_steps` steps."""
    kind = getattr(train_cfg, "schedule", "cosine")
    if kind == "cosine":
        return cosine(base_lr, train_cfg.min_lr, total_steps, train_cfg.warmup_steps)
    if kind == "poly":
        return poly(base_lr, train_cfg.min_lr, total_steps, getattr(train_cfg, "poly_power", 0.9),
                    train_cfg.warmup_steps)
    if kind == "constant":
        return lambda _step: base_lr
    raise ValueError(f"train.schedule must be cosine, poly or constant, got {kind!r}")


__all__ = ["LrAt", "build_optimizer", "cosine", "lr_schedule", "parameter_groups", "poly"]
