"""Image classification (ViT / DeiT): cross-entropy with label smoothing; top-1 / top-5.

The DeiT recipe (examples/paper/imagenet_deit.yaml) through the `train` keys of upop.augment:
`augment: deit` (timm's RandAugment rand-m9-mstd0.5-inc1, random erasing), `eval_crop: 0.875`,
`mixup: 0.8` / `cutmix: 1.0` (timm's Mixup; the loss is then timm's SoftTargetCrossEntropy on the
mixed, smoothed targets), `drop_path: 0.1`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import transformers as tf
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..augment import Mixing
from ..data import CLASSES as FASHION_CLASSES
from ..data import DataError, FashionMNIST, ImageFolderDataset, drop_none, split_folder
from ..data.hf_datasets import classification_splits
from ..metrics import top_k_accuracy
from ..runconfig import ConfigError, RunConfig
from ._recipe import Recipe
from .base import ImageOnly, Mapped, Task, evaluating, register_task


@register_task
class ClassificationTask(Recipe, Task):
    name = "classification"
    metric = "top1"
    formats = ("imagefolder", "fashion_mnist", "hf_datasets")
    mixes_batches = True

    @classmethod
    def load_hub_model(cls, config: Any, source: str, num_labels: int | None, **kwargs: Any) -> tuple[nn.Module, Any]:
        extra = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if num_labels else {}
        return tf.AutoModelForImageClassification.from_pretrained(source, **kwargs, **extra), None

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        data = cfg.data
        if data.format == "fashion_mnist":
            splits = {"train": FashionMNIST("train"), "val": None, "test": FashionMNIST("test")}
            classes = list(FASHION_CLASSES)
        elif data.format == "hf_datasets":  # the classes of val and test are checked against train's there
            splits = dict(classification_splits(data))
            classes = splits["train"].classes
        else:
            # evaluation splits are decoded up front under "skip", so their indices stay fixed
            splits = {s: ImageFolderDataset(folder, on_bad_input=data.on_bad_input, check_images=s != "train")
                      if (folder := split_folder(getattr(data, s), data.root)) else None
                      for s in ("train", "val", "test")}
            classes = splits["train"].classes
            for s in ("val", "test"):
                if splits[s] is not None and splits[s].classes != classes:
                    raise DataError(f"data.{s}: classes {splits[s].classes} differ from data.train's {classes}")
        if splits["val"] is None:  # hold out a fixed 10% of train for checkpoint selection
            n = len(splits["train"])
            order = torch.randperm(n, generator=torch.Generator().manual_seed(1234)).tolist()
            held = max(1, n // 10)
            splits["val"] = Subset(splits["train"], order[:held])
            splits["train"] = Subset(splits["train"], order[held:])
        self.classes = classes
        self.num_labels = len(classes)
        self.build_model()
        self._train_tf, self._eval_tf = self.train_transform(), self.eval_transform()
        t = cfg.train
        self.mixing = Mixing(t.mixup, t.cutmix, t.label_smoothing, self.num_labels)
        splits["train"] = self.limited(splits["train"], data.limit_train)
        self.splits = splits

    def check_model(self, model: nn.Module) -> None:
        if "ImageClassification" not in type(model).__name__:
            raise ConfigError(f"task classification needs an image classifier, got {type(model).__name__}")
        super().check_model(model)

    def train_dataset(self) -> Dataset:
        return Mapped(self.splits["train"], ImageOnly(self._train_tf))

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        images, labels = zip(*items, strict=True)
        return {"pixel_values": torch.stack(images), "labels": torch.as_tensor(labels)}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.mixing.active and model.training:
            images, targets = self.mixing(batch["pixel_values"], batch["labels"])
            return self.mixing.loss(model(pixel_values=images).logits, targets)
        logits = model(pixel_values=batch["pixel_values"]).logits
        return F.cross_entropy(logits, batch["labels"], label_smoothing=self.cfg.train.label_smoothing)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, device: torch.device) -> dict[str, float]:
        ds = self.limited(Mapped(self.splits[split], ImageOnly(self._eval_tf)), self.cfg.data.limit_eval)
        logits, labels = [], []
        loader = DataLoader(ds, batch_size=self.cfg.train.eval_batch_size, collate_fn=drop_none(self.collate),
                            num_workers=self.cfg.data.num_workers)
        with evaluating(model):
            for batch in filter(None, loader):  # a validation split held out of train may skip images
                logits.append(model(pixel_values=batch["pixel_values"].to(device)).logits.float().cpu())
                labels.append(batch["labels"])
        return top_k_accuracy(torch.cat(logits), torch.cat(labels), ks=(1, 5))

    def example_inputs(self, batch_size: int) -> dict[str, Any]:
        size = self.built.image_size
        return {"pixel_values": torch.randn(batch_size, 3, size, size)}
