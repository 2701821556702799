"""A task is one registered unit: a `Task` subclass declaring its name, the data formats it reads,
its own config section (`Options`, YAML key = the name) and which class a hub checkpoint loads
into (`load_hub_model`), registered with `@register_task`. The base class owns what every task
repeats: building the model and checking it fits the task and the data, split limits, the image
transforms, `evaluating(model)` (eval mode restored however evaluation ends), and
`loss_in_forward` (a loss made of several sub-module calls, run inside DistributedDataParallel's
forward).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, Subset
from torchvision import transforms as T

from ..data import DataError, KarpathyEval, KarpathyTrain, build_openmoji
from ..data.formats import FORMATS
from ..distill import ONE_FORWARD, refusal
from ..models import BuiltModel, build_model
from ..registry import Registry
from ..runconfig import ConfigError, DataConfig, RunConfig

DEFAULT_OPENMOJI_CACHE = Path("~/.cache/upop/openmoji").expanduser()


def openmoji_source(data: DataConfig) -> Path:
    """The OpenMoji image-text build (data.root, or the shared cache) that every task's
    `format: openmoji` data is, or is derived from; built on first use."""
    root = Path(data.root).expanduser() if data.root else DEFAULT_OPENMOJI_CACHE
    return build_openmoji(root, image_size=max(data.image_size, 64))


def karpathy_splits(data: DataConfig) -> tuple[KarpathyTrain, dict[str, KarpathyEval]]:
    """Train / val / test of `format: openmoji` or `format: karpathy` (checked by the task before),
    every file parsed and checked."""
    if data.format == "openmoji":
        image_root = openmoji_source(data)
        files = {s: image_root / f"{s}.json" for s in ("train", "val", "test")}
    else:
        files = {s: Path(getattr(data, s)).expanduser() for s in ("train", "val", "test")}
        image_root = Path(data.root).expanduser()
    bad = data.on_bad_input
    train = KarpathyTrain(files["train"], image_root, on_bad_input=bad)
    return train, {s: KarpathyEval(files[s], image_root, on_bad_input=bad) for s in ("val", "test")}


@dataclass
class NoOptions:
    """The section of a task that has no settings of its own."""


class Task:
    """name: the task's name (its registry key and its config section); metric: the key of
    evaluate()'s result that selects checkpoints; formats: the data.format names it reads."""

    name: ClassVar[str] = "task"
    metric: ClassVar[str] = ""
    formats: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type] = NoOptions
    num_labels: int | None = None  # classes the model predicts, where the data decides them
    # distill.enabled works: the loss calls the model's forward once (upop.distill); see check_distillation
    supports_distillation: ClassVar[bool] = True

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.options = cfg.task_options if cfg.task_options is not None else self.Options()
        self.built: BuiltModel  # set by build_model()
        self._check_format()

    @property
    def model(self) -> nn.Module:
        return self.built.model

    # ---- the model ------------------------------------------------------------------------------
    @classmethod
    def load_hub_model(cls, config: Any, source: str, num_labels: int | None,
                       **kwargs: Any) -> tuple[nn.Module, Any]:
        """(model, tokenizer) of a hub name or folder whose config is `config`; the default: none."""
        raise ConfigError(f"task {cls.name} has no loader for hub models; use a model.preset")

    @classmethod
    def load_model(cls, model_cfg: Any, image_size: int, num_labels: int | None = None) -> BuiltModel:
        """A preset of this task, or a hub checkpoint through `load_hub_model`."""
        return build_model(model_cfg, cls.name, image_size, num_labels, cls.load_hub_model)

    def build_model(self) -> BuiltModel:
        """Build the run's model (after the data is checked) and check that it fits."""
        self.built = self.load_model(self.cfg.model, self.cfg.data.image_size, self.num_labels)
        self.check_model(self.built.model)
        self._check_max_tokens(self.built.model)
        return self.built

    def build_fresh_model(self) -> nn.Module:
        """A new base model with the same architecture (resuming after compression)."""
        return self.load_model(self.cfg.model, self.cfg.data.image_size, self.num_labels).model

    def check_model(self, model: nn.Module) -> None:
        """One-line ConfigError when `model` is not a model of this task (e.g. `upop evaluate` with
        another task's config) or predicts another number of classes than the data has."""
        labels = getattr(getattr(model, "config", None), "num_labels", None)
        if self.num_labels is not None and labels is not None and labels != self.num_labels:
            raise ConfigError(f"the model predicts {labels} classes, the data has {self.num_labels}")

    def _check_max_tokens(self, model: nn.Module) -> None:
        config = getattr(model, "config", None)
        text = getattr(config, "text_config", config)
        limit = getattr(text, "max_position_embeddings", None)
        if self.built.tokenizer is not None and isinstance(limit, int) and self.cfg.data.max_tokens > limit:
            raise ConfigError(f"data.max_tokens {self.cfg.data.max_tokens} is above the model's "
                              f"{limit} position embeddings")

    def select_on_validation(self) -> bool:
        """True: retraining keeps the epoch best on validation; False: the last epoch (e.g. vqa.select: last)."""
        return True

    def check_ready(self) -> None:
        """Checks that need the data and the model, done before any training starts."""
        t = self.cfg.train
        if t.grad_accum > 1:
            batches = len(self.train_dataset()) // t.batch_size
            if batches and t.grad_accum > batches:
                raise ConfigError(f"train.grad_accum {t.grad_accum} is above the {batches} batches of an epoch")

    # ---- data -----------------------------------------------------------------------------------
    def _check_format(self) -> None:
        data = self.cfg.data
        if data.format not in self.formats:
            raise DataError(f"task {self.name} reads data.format {' or '.join(self.formats)}, not {data.format}")
        FORMATS[data.format].check(data)

    @staticmethod
    def limited(ds: Dataset, limit: int | None) -> Dataset:
        """The first `limit` items of `ds` (data.limit_train / limit_eval; None or 0: all)."""
        return Subset(ds, range(min(limit, len(ds)))) if limit else ds

    def train_dataset(self) -> Dataset:
        raise NotImplementedError

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # ---- training and evaluation ----------------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, device: torch.device) -> dict[str, float]:
        raise NotImplementedError

    def example_inputs(self, batch_size: int) -> dict[str, Any]:
        """Inputs of one forward for FLOPs (batch 1) and latency."""
        raise NotImplementedError

    # ---- distillation from the dense model (upop.distill) -----------------------------------------
    def check_distillation(self) -> None:
        """One-line ConfigError, before any training, when this task's loss cannot be distilled (it calls
        the model's sub-modules or its forward several times); a task whose answer depends on its options
        overrides it."""
        if not self.supports_distillation:
            raise refusal(self.name, ONE_FORWARD)

    def distill_views(self, output: Any, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """What of one forward's `output` is distilled (the same for the model and the teacher): keys
        starting with "logits" (KL over the last dim) or "embeds" (cosine over the last dim). `inputs`: the
        call's keyword arguments (its positional ones, if any, under "args"). The default reads the
        Hugging Face outputs: logits; CLIP-style logits_per_image / logits_per_text, image_embeds /
        text_embeds; pooler_output. A bare tensor output is taken as logits."""
        if isinstance(output, torch.Tensor):
            return {"logits": output}
        views = {}
        for attr, key in (("logits", "logits"), ("logits_per_image", "logits_image"),
                          ("logits_per_text", "logits_text"), ("image_embeds", "embeds_image"),
                          ("text_embeds", "embeds_text"), ("pooler_output", "embeds")):
            value = getattr(output, attr, None)
            if isinstance(value, torch.Tensor):
                views[key] = value
        return views

    # ---- hooks of the training loop: state a task keeps outside the model (no-ops by default) -----
    def before_step(self, phase: str, epoch: int, step: int, steps_per_epoch: int) -> None:
        """Before the losses of optimiser step `step` (0-based, within `epoch`) of `phase`."""

    def after_optimizer_step(self, model: nn.Module) -> None:
        """After every optimiser step that was taken (e.g. an EMA copy follows the model)."""

    def after_compress(self, model: nn.Module, plan: Any) -> None:
        """After the search compressed `model` with `plan` (a upop.PruningPlan)."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors to save with every resumable checkpoint (safetensors: names -> tensors)."""
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what extra_state() returned, when a run resumes (before its first step)."""

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


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode for the block; its train/eval mode is restored however the block ends."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel, or the model itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def loss_in_forward(model: nn.Module, fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor],
                    batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`fn(module, batch)`, a loss made of several sub-module calls. Under DistributedDataParallel
    it must run inside the wrapper's forward (its gradient synchronisation hooks there), so the
    wrapped module's forward is routed to `fn` for this one call and restored afterwards."""
    if not isinstance(model, DistributedDataParallel):
        return fn(model, batch)
    inner = model.module
    own = inner.__dict__.get("forward")  # an instance-level forward someone else set
    inner.forward = lambda **b: fn(inner, b)
    try:
        return model(**batch)
    finally:
        if own is None:
            del inner.forward
        else:
            inner.forward = own


TASKS: Registry[type[Task]] = Registry("task", error=ConfigError)


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make a Task subclass a task (its formats must be registered data formats)."""
    for name in cls.formats:
        FORMATS[name]  # raises for a format no reader registered
    return TASKS.add(cls.name, cls)


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
