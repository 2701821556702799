"""`Recipe`: the run config's augmentation and regularisation keys (upop.augment) for a task, mixed in
before `Task` (`class VQATask(Recipe, Task)`): `train.augment` / `train.eval_crop` /
`train.random_erasing` pick the image transforms, `train.drop_path` adds stochastic depth to the
model's vision tower (also to the fresh model a resumed retraining rebuilds), and keys a task cannot
use (Mixup outside classification, image-only augmentation where image and labels move together) stop
the run with one line. With the defaults every task keeps its plain transforms and model.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from .. import augment
from ..data import user_transform
from ..models import BuiltModel
from ..runconfig import ConfigError


class Recipe:
    """Mixin for Task subclasses (uses self.cfg and self.built)."""

    mixes_batches: ClassVar[bool] = False  # train.mixup / train.cutmix apply (classification)
    image_transforms: ClassVar[bool] = True  # train.augment / eval_crop apply (not with joint label maps)

    cfg: Any
    built: BuiltModel
    name: ClassVar[str]

    def check_recipe(self) -> None:
        t = self.cfg.train
        if not self.mixes_batches and (t.mixup or t.cutmix):
            raise ConfigError(f"train.mixup / train.cutmix mix class labels: task {self.name} has none")
        if not self.image_transforms:
            for key, default in (("augment", "none"), ("eval_crop", 1.0), ("random_erasing", 0.0)):
                if getattr(t, key) != default:
                    raise ConfigError(f"train.{key}: task {self.name} transforms images and labels together "
                                      "with its own transform; leave it at its default")
        own = [k for k in ("train_transform", "eval_transform") if getattr(self.cfg.data, k, None)]
        if own and not self.image_transforms:
            raise ConfigError(f"data.{own[0]}: task {self.name} transforms images and labels together; "
                              "its own transform cannot be replaced")
        if t.random_erasing and t.augment != "deit":
            raise ConfigError("train.random_erasing is part of train.augment: deit; set both")

    def _drop_path(self, model: nn.Module) -> nn.Module:
        try:
            augment.add_drop_path(model, self.cfg.train.drop_path)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return model

    def build_model(self) -> BuiltModel:
        self.check_recipe()
        built = super().build_model()  # type: ignore[misc]
        self._drop_path(built.model)
        return built

    def build_fresh_model(self) -> nn.Module:
        return self._drop_path(super().build_fresh_model())  # type: ignore[misc]

    def train_transform(self) -> Any:
        """The user's own (data.train_transform), else the recipe's."""
        b = self.built
        own = user_transform(self.cfg.data.train_transform, "data.train_transform", b.image_size)
        return own or augment.train_transform(self.cfg.train, b.image_size, b.mean, b.std,
                                              super().train_transform)  # type: ignore[misc]

    def eval_transform(self) -> Any:
        """The user's own (data.eval_transform), else the recipe's."""
        b = self.built
        own = user_transform(self.cfg.data.eval_transform, "data.eval_transform", b.image_size)
        return own or augment.eval_transform(self.cfg.train, b.image_size, b.mean, b.std)
