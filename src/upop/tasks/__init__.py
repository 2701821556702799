"""Tasks: each builds its model and data, gives the loss of a batch and evaluates a model."""

from __future__ import annotations

from ..runconfig import RunConfig
from .base import Task
from .caption import CaptionTask
from .classification import ClassificationTask
from .nlvr import NLVRTask
from .retrieval import RetrievalTask
from .segmentation import SegmentationTask
from .vqa import VQATask

TASKS: dict[str, type[Task]] = {"retrieval": RetrievalTask, "classification": ClassificationTask,
                                "nlvr": NLVRTask, "caption": CaptionTask}
TASKS["segmentation"] = SegmentationTask
TASKS["vqa"] = VQATask


def make_task(cfg: RunConfig) -> Task:
    """Validate the data and build the model of `cfg.task` (fails fast on bad input)."""
    if cfg.task not in TASKS:
        raise NotImplementedError(f"task {cfg.task} is not available yet")
    return TASKS[cfg.task](cfg)


__all__ = ["TASKS", "CaptionTask", "ClassificationTask", "NLVRTask", "RetrievalTask", "SegmentationTask", "Task",
           "VQATask", "make_task"]
