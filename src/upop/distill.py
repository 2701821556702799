"""Knowledge distillation from the dense model during the search and the retraining (off by default).

The dense model, frozen, is the teacher. `Distiller.capture(model)` records the one call of the
student's forward that a task's loss makes; `Distiller.loss()` runs the teacher on the same inputs
and compares what the task exposes (`Task.distill_views`): logits by temperature-scaled KL
(Hinton: times T^2), embeddings by 1 - cosine similarity. The training loop adds
`weight * loss()` to the task's loss. A task whose loss calls the model several times, or only
its sub-modules, says so in `Task.check_distillation` before any training starts.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .tasks.base import Task

DISTILL_PHASES = ("search", "retrain")
LOGITS, EMBEDS = "logits", "embeds"  # the prefixes of Task.distill_views' keys


MAX_TEMPERATURE = 1000.0


@dataclass
class DistillOptions:
    """The run config's `distill:` section."""

    enabled: bool = False  # distil the dense model (frozen teacher) into the model being pruned
    weight: float = 1.0  # total loss = task loss + weight * distillation loss
    temperature: float = 1.0  # KL temperature of the logits (the KL term is multiplied by T^2)
    logits: bool = True  # KL between the teacher's and the student's logits (softmax over the last dim)
    embeddings: bool = False  # 1 - cosine similarity between the teacher's and the student's embeddings
    # the phases that distil: a subset of search, retrain
    phases: list[str] = field(default_factory=lambda: list(DISTILL_PHASES))

    def validate(self) -> None:
        """One-line ConfigError naming the `distill.<key>` out of range."""
        from .runconfig import ConfigError  # runconfig imports this module to declare its section

        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) \
                or not math.isfinite(self.weight) or self.weight < 0:
            raise ConfigError(f"distill.weight must be a finite number >= 0, got {self.weight!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or not 0 < self.temperature <= MAX_TEMPERATURE:
            # above this every softmax is flat and T^2 (float32) turns the KL term into inf / nan
            raise ConfigError(f"distill.temperature must be in (0, {MAX_TEMPERATURE:g}], got {self.temperature!r}")
        if not isinstance(self.phases, list) or not all(isinstance(p, str) for p in self.phases):
            raise ConfigError(f"distill.phases must be a list of {' and '.join(DISTILL_PHASES)}, got {self.phases!r}")
        unknown = [p for p in self.phases if p not in DISTILL_PHASES]
        if unknown:
            raise ConfigError(f"distill.phases: unknown phase {unknown[0]!r} (known: {', '.join(DISTILL_PHASES)})")
        if self.enabled and not (self.logits or self.embeddings):
            raise ConfigError("distill.logits and distill.embeddings are both false: nothing to distil; "
                              "set one of them or distill.enabled: false")
        if self.enabled and not self.phases:
            raise ConfigError("distill.phases is empty while distill.enabled is true; name search and/or retrain")


def refusal(task: str, why: str) -> Exception:
    """The ConfigError of a task that cannot be distilled, and why (for Task.check_distillation)."""
    from .runconfig import ConfigError

    return ConfigError(f"task {task} does not support distillation ({why}); set distill.enabled: false")


ONE_FORWARD = "its loss does not call the model's forward exactly once"


class Distiller:
    """A frozen copy of `teacher` and the distillation loss of one training step (see the module)."""

    def __init__(self, teacher: nn.Module, options: DistillOptions, task: Task) -> None:
        options.validate()  # callers that build the options themselves (benchmarks) get the same checks
        # our own copy: the caller's module (e.g. a dense model other methods start from) is never touched
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
        self.options, self.task = options, task
        self._calls: list[tuple[tuple, dict[str, Any], Any]] = []
        self._device: torch.device | None = None

    @contextmanager
    def capture(self, model: nn.Module) -> Iterator[None]:
        """Record every call of `model`'s forward (of the module inside DistributedDataParallel) in the block."""
        from .tasks.base import unwrap  # tasks import runconfig, which imports this module

        inner = unwrap(model)
        self._calls = []
        self._device = next((p.device for p in inner.parameters()), None)

        def record(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            self._calls.append((args, kwargs, output))

        handle = inner.register_forward_hook(record, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def loss(self) -> torch.Tensor:
        """The distillation loss of the one forward recorded by the last `capture` block (then forgotten)."""
        calls, self._calls = self._calls, []
        if len(calls) != 1:
            raise RuntimeError(f"task {self.task.name}: distillation needs one forward of the model per loss, "
                               f"the loss made {len(calls)}; set distill.enabled: false for this task")
        args, kwargs, student_out = calls[0]
        if self._device is not None and next(self.teacher.parameters(), torch.empty(0)).device != self._device:
            self.teacher.to(self._device)  # lazily: the student may move after the Distiller is built
        with torch.no_grad():
            teacher_out = self.teacher(*args, **kwargs)
        inputs = {**kwargs, "args": args} if args else dict(kwargs)
        student = self._views(student_out, inputs)
        teacher = self._views(teacher_out, inputs)
        total: torch.Tensor | None = None
        for key, s in student.items():
            t = teacher.get(key)
            if t is None:
                raise RuntimeError(f"task {self.task.name}: the teacher's output has no {key!r} to distil")
            if s.shape != t.shape:
                raise RuntimeError(f"task {self.task.name}: distillation view {key!r} has shape {tuple(s.shape)} "
                                   f"in the model and {tuple(t.shape)} in the teacher; they must match")
            term = kl_loss(s, t, self.options.temperature) if key.startswith(LOGITS) else cosine_loss(s, t)
            total = term if total is None else total + term
        assert total is not None  # _views refuses an empty selection
        return total

    def _views(self, output: Any, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The task's views of `output` of the kinds options select (logits, embeddings)."""
        kinds = tuple(k for k, on in ((LOGITS, self.options.logits), (EMBEDS, self.options.embeddings)) if on)
        views = {k: v for k, v in self.task.distill_views(output, inputs).items() if k.startswith(kinds)}
        if not views:
            wanted = " or ".join("logits" if k == LOGITS else "embeddings" for k in kinds)
            raise RuntimeError(f"task {self.task.name}: the model's output ({type(output).__name__}) has no "
                               f"{wanted} to distil; change distill.logits / distill.embeddings")
        return views


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) over the last dim, mean over all other positions."""
    classes = student.shape[-1]
    s = F.log_softmax(student.float().reshape(-1, classes) / temperature, dim=-1)
    t = F.log_softmax(teacher.float().reshape(-1, classes) / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """mean(1 - cos(student, teacher)) over the last dim."""
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
