"""Semantic-segmentation metrics over a whole split from one confusion matrix, as mmseg's `mean_iou`.

Per-class IoU = intersection / union, NaN when the class is in neither the prediction nor the
ground truth; per-class accuracy = intersection / ground-truth pixels, NaN when the class has no
ground-truth pixel; `miou` and `macc` are the means over the classes that are not NaN;
`pixel_acc` = correct / labelled pixels. All in percent.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = 255  # pixels with this label count nowhere (ADE20K "other", boundaries)


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(K, K) counts, rows = ground truth, columns = prediction; IGNORE_INDEX pixels left out."""
    valid = labels != IGNORE_INDEX
    index = labels[valid].long() * num_labels + pred[valid].long()
    return torch.bincount(index, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def segmentation_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """mIoU, mean accuracy and pixel accuracy (percent) of a confusion matrix, as mmseg's mean_iou."""
    c = confusion.double()
    intersect, area_label, area_pred = c.diag(), c.sum(1), c.sum(0)
    union = area_label + area_pred - intersect
    iou = intersect / union  # 0/0 = NaN: the class is in neither prediction nor ground truth
    acc = intersect / area_label  # NaN: no ground-truth pixel of the class
    labelled = float(area_label.sum())
    return {
        "miou": 100 * _nanmean(iou),
        "macc": 100 * _nanmean(acc),
        "pixel_acc": 100 * float(intersect.sum()) / labelled if labelled else float("nan"),
    }


def _nanmean(values: torch.Tensor) -> float:
    kept = values[~values.isnan()]
    return float(kept.mean()) if kept.numel() else float("nan")

