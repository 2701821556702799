"""Tasks: one module per task, each a registered `Task` subclass (see base.py). Every module of
this package is imported here, so a new task is one new file with `@register_task` on its class."""

from __future__ import annotations

import importlib
import pkgutil

from ..runconfig import RunConfig
from .base import TASKS, Task, evaluating, loss_in_forward, register_task

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")


def make_task(cfg: RunConfig) -> Task:
    """Check the data, build the model of `cfg.task` and check they fit (fails fast on bad input)."""
    task = TASKS[cfg.task](cfg)
    task.check_ready()
    return task


__all__ = ["TASKS", "Task", "evaluating", "loss_in_forward", "make_task", "register_task"]
