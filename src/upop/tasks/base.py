"""The interface every task implements."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision import transforms as T

from ..data import DataError, KarpathyEval, KarpathyTrain, build_openmoji
from ..models import BuiltModel
from ..runconfig import DataConfig, RunConfig

DEFAULT_OPENMOJI_CACHE = Path("~/.cache/upop/openmoji").expanduser()


def openmoji_source(data: DataConfig) -> Path:
    """The OpenMoji image-text build (data.root, or the shared cache) that every task's
    `format: openmoji` data is, or is derived from; built on first use."""
    root = Path(data.root).expanduser() if data.root else DEFAULT_OPENMOJI_CACHE
    return build_openmoji(root, image_size=max(data.image_size, 64))


def karpathy_splits(data: DataConfig, task: str) -> tuple[KarpathyTrain, dict[str, KarpathyEval]]:
    """Train / val / test of `format: openmoji` or `format: karpathy`, every file parsed and checked."""
    if data.format == "openmoji":
        image_root = openmoji_source(data)
        files = {s: image_root / f"{s}.json" for s in ("train", "val", "test")}
    elif data.format == "karpathy":
        missing = [k for k in ("root", "train", "val", "test") if getattr(data, k) is None]
        if missing:
            raise DataError(f"data.format karpathy needs data.{', data.'.join(missing)}")
        files = {s: Path(getattr(data, s)).expanduser() for s in ("train", "val", "test")}
        image_root = Path(data.root).expanduser()
    else:
        raise DataError(f"task {task} reads data.format openmoji or karpathy, not {data.format}")
    bad = data.on_bad_input
    train = KarpathyTrain(files["train"], image_root, on_bad_input=bad)
    return train, {s: KarpathyEval(files[s], image_root, on_bad_input=bad) for s in ("val", "test")}


class Task:
    """name: task name; metric: the key of evaluate()'s result that selects checkpoints."""

    name = "task"
    metric = ""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.built: BuiltModel  # set by subclasses

    @property
    def model(self) -> nn.Module:
        return self.built.model

    def build_fresh_model(self) -> nn.Module:
        """A new base model with the same architecture (resuming after compression)."""
        raise NotImplementedError

    def train_dataset(self) -> Dataset:
        raise NotImplementedError

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, device: torch.device) -> dict[str, float]:
        raise NotImplementedError

    def example_inputs(self, batch_size: int) -> dict[str, Any]:
        """Inputs of one forward for FLOPs (batch 1) and latency."""
        raise NotImplementedError

    # ---- shared image transforms --------------------------------------------------------------
    def train_transform(self) -> T.Compose:
        size = self.built.image_size
        return T.Compose([
            T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(self.built.mean, self.built.std),
        ])

    def eval_transform(self) -> T.Compose:
        size = self.built.image_size
        return T.Compose([
            T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(self.built.mean, self.built.std),
        ])


class Mapped(Dataset):
    """`fn(*item)` for each item of `base` (a tuple); an item skipped under data.on_bad_input
    "skip" (None) stays None, for the collate function's drop_none."""

    def __init__(self, base: Dataset, fn: Callable[..., Any]) -> None:
        self.base, self.fn = base, fn

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Any:
        item = self.base[i]
        return None if item is None else self.fn(*item)


class ImageOnly:
    """Applies an image transform to the first element of an (image, ...) item (picklable for workers)."""

    def __init__(self, transform: Callable[[Any], Any]) -> None:
        self.transform = transform

    def __call__(self, image: Any, *rest: Any) -> tuple:
        return (self.transform(image), *rest)
