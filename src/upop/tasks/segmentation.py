"""Semantic segmentation with a Segmenter (the paper's ADE20K task).

Loss: pixel cross-entropy, label 255 ignored. Metrics (percent, upop.metrics.segmentation): mIoU,
mean accuracy and pixel accuracy over the whole split from one confusion matrix, as mmseg's
`mean_iou`; `miou` selects checkpoints.

Inference at the original resolution: the image is resized so that its short side is
data.image_size (aspect kept), windows of image_size x image_size slide over the long side
(stride = window, the last one flush with the end; overlaps averaged) as Segmenter's
"sliding window 512/512", and the logits are upsampled bilinearly to the annotation's size.
segmentation.multiscale: short sides image_size x (0.5, 0.75, 1.0, 1.25, 1.5, 1.75), each also flipped
horizontally; the 12 logit maps are averaged at the original size.

Model: a preset, a Hugging Face ViT folder (encoder; new decoder), or the paper's start, an official
Segmenter checkpoint (model.name: rstrudel/segmenter's `checkpoint.pth`, a `.safetensors` of it, or
a folder holding it with its variant.yml), converted by `segmenter_from_official_state_dict`. The
paper's optimiser is SGD with polynomial decay: `train.optimizer: sgd`, `train.schedule: poly`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ..data.ade20k import ADE20K_CLASSES, ADE20KDataset
from ..data.openmoji_seg import SPLIT_FOLDERS, build_openmoji_seg, class_names
from ..metrics.segmentation import IGNORE_INDEX, confusion_matrix, segmentation_metrics
from ..models import BuiltModel, require_model_type
from ..models.official import SEGMENTER_FILE, load_official_segmenter, official_file
from ..models.segmenter import SegmenterForSemanticSegmentation, from_vit, segmentation_loss
from ..runconfig import ConfigError, RunConfig
from ._recipe import Recipe
from .base import Mapped, Task, evaluating, openmoji_source, register_task

MULTISCALE = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
SCALE_RANGE = (0.5, 2.0)  # training: random rescaling of the short side, as Segmenter's ratio_range


@dataclass
class SegmentationOptions:
    """The `segmentation:` section."""

    multiscale: bool = False  # evaluate at scales 0.5..1.75 plus flips instead of single-scale


@register_task
class SegmentationTask(Recipe, Task):
    name = "segmentation"
    metric = "miou"
    formats = ("openmoji", "ade20k")
    Options = SegmentationOptions
    options: SegmentationOptions
    image_transforms = False  # TrainTransform moves the image and its label map together

    @classmethod
    def load_model(cls, model_cfg: Any, image_size: int, num_labels: int | None = None) -> BuiltModel:
        """An official Segmenter checkpoint (model.name a .pth / .safetensors file, or a folder holding
        checkpoint.pth), else a preset or a Hugging Face ViT folder."""
        path = official_file(model_cfg.name, SEGMENTER_FILE)
        if path is not None:
            return load_official_segmenter(path, image_size)
        return super().load_model(model_cfg, image_size, num_labels)

    @classmethod
    def load_hub_model(cls, config: Any, source: str, num_labels: int | None, **kwargs: Any) -> tuple[nn.Module, Any]:
        # project-built Segmenter: a ViT checkpoint as encoder, new decoder
        require_model_type(cls.name, config, source, "vit", "ViT")
        if not num_labels:
            raise ConfigError("task segmentation from a ViT checkpoint needs the number of classes")
        return from_vit(source, num_labels, **kwargs), None

    def check_model(self, model: nn.Module) -> None:
        if not isinstance(model, SegmenterForSemanticSegmentation):
            raise ConfigError(f"task segmentation needs a Segmenter model, got {type(model).__name__}")
        super().check_model(model)

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        data = cfg.data
        bad = data.on_bad_input
        if data.format == "ade20k":
            root = Path(data.root).expanduser()
            num_labels = cfg.model.num_labels or ADE20K_CLASSES
            self.classes = [str(i) for i in range(num_labels)]
            folders = {"train": "training", "val": "validation", "test": "validation"}  # no public test labels
        else:
            source = openmoji_source(data)
            root = build_openmoji_seg(source.with_name(source.name + "-seg"), source,
                                      image_size=max(32, data.image_size))
            self.classes = class_names(root)  # annotation value 0 is ignored, 1 (class 0) is background
            if cfg.model.num_labels not in (None, len(self.classes)):
                raise ConfigError(f"model.num_labels is {cfg.model.num_labels}, the OpenMoji segmentation data "
                                  f"has {len(self.classes)} classes")
            num_labels = len(self.classes)
            folders = SPLIT_FOLDERS
        # every folder and pair is checked now; evaluation annotations are decoded too (labels in range)
        self.splits: dict[str, Dataset] = {}
        opened: dict[str, ADE20KDataset] = {}
        for split, folder in folders.items():
            if folder not in opened:
                opened[folder] = ADE20KDataset(root, folder, num_labels, on_bad_input=bad, check=split != "train")
            self.splits[split] = opened[folder]
        self.num_labels = num_labels
        self.build_model()
        train = self.limited(self.splits["train"], data.limit_train)
        self._train = Mapped(train, TrainTransform(data.image_size, self.built.mean, self.built.std))

    def train_dataset(self) -> Dataset:
        return self._train

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        images, labels = zip(*items, strict=True)
        return {"pixel_values": torch.stack(images), "labels": torch.stack(labels)}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(pixel_values=batch["pixel_values"]).logits
        return segmentation_loss(logits, batch["labels"])

    def distill_views(self, output: Any, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The logits per pixel: (B, K, H, W) with the classes last, so the KL runs over the classes."""
        return {"logits": output.logits.movedim(1, -1)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, device: torch.device) -> dict[str, float]:
        ds = self.limited(Mapped(self.splits[split], self._eval_item), self.cfg.data.limit_eval)
        loader = DataLoader(ds, batch_size=self.cfg.train.eval_batch_size, collate_fn=_keep_lists,
                            num_workers=self.cfg.data.num_workers)
        scales = MULTISCALE if self.options.multiscale else (1.0,)
        flips = (False, True) if self.options.multiscale else (False,)
        confusion = torch.zeros(self.num_labels, self.num_labels, dtype=torch.int64)
        with evaluating(model):
            for images, labels in loader:  # images: normalised (3, H, W) tensors at their original size
                for group in _same_size(images):
                    x = torch.stack([images[i] for i in group]).to(device)
                    logits = predict(model, x, self.cfg.data.image_size, scales, flips)
                    pred = logits.argmax(1).cpu()
                    for j, i in enumerate(group):
                        confusion += confusion_matrix(pred[j], labels[i], self.num_labels)
        return segmentation_metrics(confusion)

    def _eval_item(self, image: Any, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return TF.normalize(TF.to_tensor(image), self.built.mean, self.built.std), labels

    def example_inputs(self, batch_size: int) -> dict[str, Any]:
        size = self.built.image_size
        return {"pixel_values": torch.randn(batch_size, 3, size, size)}


# ---- transforms ----------------------------------------------------------------------------------
class TrainTransform:
    """Image and label map together: random rescale of the short side to size x U(0.5, 2) (bilinear
    image, nearest labels), padding to at least size x size (labels padded with 255), a random
    size x size crop and a horizontal flip with p = 0.5. Randomness comes from torch's RNG, which
    the trainer reseeds every epoch."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.size, self.mean, self.std = size, mean, std

    def __call__(self, image: Any, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.size
        low, high = SCALE_RANGE
        ratio = low + (high - low) * float(torch.rand(()))
        short = max(1, round(size * ratio))
        x = TF.normalize(TF.to_tensor(image), self.mean, self.std)
        x = TF.resize(x, short, interpolation=InterpolationMode.BILINEAR, antialias=True)
        y = TF.resize(labels[None], short, interpolation=InterpolationMode.NEAREST)[0]
        pad_h, pad_w = max(0, size - x.shape[1]), max(0, size - x.shape[2])
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
            y = F.pad(y, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        top = int(torch.randint(0, x.shape[1] - size + 1, ()))
        left = int(torch.randint(0, x.shape[2] - size + 1, ()))
        x, y = x[:, top:top + size, left:left + size], y[top:top + size, left:left + size]
        if float(torch.rand(())) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x.contiguous(), y.contiguous()


def _keep_lists(items: list) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    kept = [item for item in items if item is not None]
    return [i for i, _ in kept], [lab for _, lab in kept]


def _same_size(images: list[torch.Tensor]) -> list[list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    return list(groups.values())


# ---- inference -----------------------------------------------------------------------------------
def predict(model: nn.Module, images: torch.Tensor, size: int, scales: tuple[float, ...] = (1.0,),
            flips: tuple[bool, ...] = (False,)) -> torch.Tensor:
    """images (B, 3, H, W), all the same size -> logits (B, K, H, W), averaged over scales and flips."""
    height, width = images.shape[-2:]
    total = None
    for scale in scales:
        short = max(1, round(size * scale))
        factor = short / min(height, width)
        resized = (max(1, round(height * factor)), max(1, round(width * factor)))
        x = images if resized == (height, width) else F.interpolate(
            images, size=resized, mode="bilinear", align_corners=False, antialias=factor < 1)
        for flip in flips:
            logits = slide(model, x.flip(-1) if flip else x, size)
            logits = logits.flip(-1) if flip else logits
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            total = logits if total is None else total + logits
    return total / (len(scales) * len(flips))


def slide(model: nn.Module, x: torch.Tensor, window: int) -> torch.Tensor:
    """Logits of x (B, 3, h, w) from window x window crops (smaller when x is smaller), stride =
    window, the last crop flush with the edge; overlapping logits are averaged."""
    h, w = x.shape[-2:]
    wh, ww = min(window, h), min(window, w)
    tops, lefts = _starts(h, wh), _starts(w, ww)
    total, count = None, torch.zeros(1, 1, h, w, device=x.device)
    for top in tops:
        for left in lefts:
            out = model(pixel_values=x[..., top:top + wh, left:left + ww]).logits.float()
            if total is None:
                total = torch.zeros(x.shape[0], out.shape[1], h, w, device=x.device)
            total[..., top:top + wh, left:left + ww] += out
            count[..., top:top + wh, left:left + ww] += 1
    return total / count


def _starts(length: int, window: int) -> list[int]:
    n = max(1, math.ceil((length - window) / window) + 1)
    return sorted({min(i * window, length - window) for i in range(n)})
