"""Use UPop inside a Hugging Face `Trainer` in a few lines.

    callback = UPopCallback(UPopConfig(target=0.5, interval=50))
    Trainer(model, args, train_dataset=..., callbacks=[callback]).train()  # the search
    # at the end of training the model is compressed in place (a plain model of the same class)
    Trainer(model, retrain_args, train_dataset=...).train()  # retrain the smaller model
    upop.save_pretrained(model, "out/")

The search lasts the Trainer's `max_steps` (its total optimisation steps) unless the config
says otherwise. Masks are not model parameters, so the Trainer's optimizer never sees them.
"""

from __future__ import annotations

import dataclasses
import warnings

from transformers import TrainerCallback

from .config import UPopConfig
from .plan import PruningPlan
from .search import UPopSearch


class UPopCallback(TrainerCallback):
    def __init__(self, config: UPopConfig, compress_at_end: bool = True, use_max_steps: bool = True) -> None:
        self.config = config
        self.compress_at_end = compress_at_end
        self.use_max_steps = use_max_steps
        self.search: UPopSearch | None = None
        self.plan: PruningPlan | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("UPopCallback needs the Trainer's model")
        config = self.config
        if self.use_max_steps and state.max_steps and state.max_steps > 0:
            config = dataclasses.replace(config, total_steps=state.max_steps)
        if args.fp16:
            warnings.warn("UPopCallback under fp16: mask gradients carry the loss scale; bf16 avoids this",
                          stacklevel=2)
        self.search = UPopSearch(model, config)

    def on_step_end(self, args, state, control, **kwargs):
        if self.search is not None and not self.search.finished:
            self.search.step()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.search is None:
            return
        if not self.search.finished:
            self.search.remove()
            raise RuntimeError(f"training stopped after {self.search.step_count} of "
                               f"{self.search.config.total_steps} search steps; the masks are not binary yet")
        self.plan = self.search.plan()
        if self.compress_at_end:
            self.search.compress()
