"""The interface every task implements."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision import transforms as T

from ..models import BuiltModel
from ..runconfig import RunConfig


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
