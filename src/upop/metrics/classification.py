"""Classification metrics: top-k accuracy (ImageNet-style tasks) and two-way accuracy (NLVR2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent for each k, keyed "top{k}"; k is clipped to the number of classes."""
    logits, labels = torch.as_tensor(logits).detach().cpu(), torch.as_tensor(labels).detach().cpu().long()
    if logits.dim() != 2 or labels.dim() != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected logits (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    n, n_classes = logits.shape
    if n == 0:
        raise ValueError("top_k_accuracy needs at least one example")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels must lie in 0..{n_classes - 1}")
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {tuple(ks)}")
    top = logits.topk(min(max(ks), n_classes), dim=1).indices
    hit = top == labels[:, None]
    return {f"top{k}": 100.0 * hit[:, : min(k, n_classes)].any(dim=1).float().mean().item() for k in ks}


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """accuracy (%) of argmax(logits) and how often "true" is predicted (%, to spot a collapsed model)."""
    if len(labels) == 0:
        raise ValueError("accuracy of an empty evaluation set")
    predicted = logits.argmax(dim=-1)
    return {"accuracy": 100.0 * float((predicted == labels).float().mean()),
            "predicted_true": 100.0 * float(predicted.float().mean())}
