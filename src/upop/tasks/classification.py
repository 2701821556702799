"""Image classification (ViT / DeiT): cross-entropy with label smoothing; top-1 / top-5."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..data import CLASSES as FASHION_CLASSES
from ..data import DataError, FashionMNIST, ImageFolderDataset, drop_none, top_k_accuracy
from ..models import build_model
from ..runconfig import RunConfig
from .base import ImageOnly, Mapped, Task


class ClassificationTask(Task):
    name = "classification"
    metric = "top1"

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        data = cfg.data
        if data.format == "fashion_mnist":
            splits = {"train": FashionMNIST("train"), "val": None, "test": FashionMNIST("test")}
            classes = list(FASHION_CLASSES)
        elif data.format == "imagefolder":
            if data.train is None or data.test is None:
                raise DataError("data.format imagefolder needs data.train and data.test folders (data.val optional)")
            # evaluation splits are decoded up front under "skip", so their indices stay fixed
            splits = {s: ImageFolderDataset(Path(getattr(data, s)).expanduser(), on_bad_input=data.on_bad_input,
                                            check_images=s != "train") if getattr(data, s) else None
                      for s in ("train", "val", "test")}
            classes = splits["train"].classes
            for s in ("val", "test"):
                if splits[s] is not None and splits[s].classes != classes:
                    raise DataError(f"data.{s}: classes {splits[s].classes} differ from data.train's {classes}")
        else:
            raise DataError(f"task classification reads data.format imagefolder or fashion_mnist, not {data.format}")
        if splits["val"] is None:  # hold out a fixed 10% of train for checkpoint selection
            n = len(splits["train"])
            order = torch.randperm(n, generator=torch.Generator().manual_seed(1234)).tolist()
            held = max(1, n // 10)
            splits["val"] = Subset(splits["train"], order[:held])
            splits["train"] = Subset(splits["train"], order[held:])
        self.classes = classes
        self.built = build_model(cfg.model, "classification", data.image_size, len(classes))
        self._train_tf, self._eval_tf = self.train_transform(), self.eval_transform()
        if data.limit_train:
            splits["train"] = Subset(splits["train"], range(min(data.limit_train, len(splits["train"]))))
        self.splits = splits

    def build_fresh_model(self) -> nn.Module:
        return build_model(self.cfg.model, "classification", self.cfg.data.image_size, len(self.classes)).model

    def train_dataset(self) -> Dataset:
        return Mapped(self.splits["train"], ImageOnly(self._train_tf))

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        images, labels = zip(*items, strict=True)
        return {"pixel_values": torch.stack(images), "labels": torch.as_tensor(labels)}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(pixel_values=batch["pixel_values"]).logits
        return F.cross_entropy(logits, batch["labels"], label_smoothing=self.cfg.train.label_smoothing)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, device: torch.device) -> dict[str, float]:
        ds = Mapped(self.splits[split], ImageOnly(self._eval_tf))
        limit = self.cfg.data.limit_eval
        if limit:
            ds = Subset(ds, range(min(limit, len(ds))))
        was_training = model.training
        model.eval()
        logits, labels = [], []
        loader = DataLoader(ds, batch_size=self.cfg.train.eval_batch_size, collate_fn=drop_none(self.collate),
                            num_workers=self.cfg.data.num_workers)
        for batch in filter(None, loader):  # a validation split held out of train may skip images
            logits.append(model(pixel_values=batch["pixel_values"].to(device)).logits.float().cpu())
            labels.append(batch["labels"])
        model.train(was_training)
        return top_k_accuracy(torch.cat(logits), torch.cat(labels), ks=(1, 5))

    def example_inputs(self, batch_size: int) -> dict[str, Any]:
        size = self.built.image_size
        return {"pixel_values": torch.randn(batch_size, 3, size, size)}
