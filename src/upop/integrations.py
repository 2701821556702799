"""Use UPop inside a Hugging Face `Trainer` in a few lines.

    callback = UPopCallback(UPopConfig(target=0.5, interval=50))
    trainer = Trainer(model, args, train_dataset=..., callbacks=[callback])
    trainer.train()        # the search; at the end the model is compressed in place
    trainer.save_model()   # a folder upop.from_pretrained loads (safetensors + plan + config)
    Trainer(model, retrain_args, train_dataset=...).train()  # retrain the smaller model

The search lasts the Trainer's `max_steps` (its total optimisation steps) unless the config
says otherwise. Masks are not model parameters, so the Trainer's optimizer never sees them.

- Resuming: the search state (scores, masks, step counters; safetensors, never pickle) is saved
  into every `checkpoint-N` folder, and `trainer.train(resume_from_checkpoint=...)` restores it,
  so an interrupted run ends with the plan of an uninterrupted one. A checkpoint without that
  state stops the resumed run at its start, with one line.
- Logging: `upop/ratio` (the scheduled fraction pi_t) and `upop/achieved` (the fraction of the
  prunable cost the current masks select) are added to the Trainer's logs, so every `report_to`
  backend sees them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
import warnings
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn
from transformers import TrainerCallback

from .checkpoint import CheckpointError, save_pretrained
from .config import UPopConfig
from .files import atomic_write
from .plan import PruningPlan
from .search import UPopSearch

STATE_FILE = "upop_search.safetensors"
STATE_FORMAT = "upop-search"


class UPopCallback(TrainerCallback):
    """config: the search's settings; compress_at_end: slice the model when training ends;
    use_max_steps: the search lasts the Trainer's max_steps; resume_from: the checkpoint folder
    to restore the search from when it is not `<output_dir>/checkpoint-<step>` (found by default)."""

    def __init__(self, config: UPopConfig, compress_at_end: bool = True, use_max_steps: bool = True,
                 resume_from: str | os.PathLike | None = None) -> None:
        self.config = config
        self.compress_at_end = compress_at_end
        self.use_max_steps = use_max_steps
        self.resume_from = resume_from
        self.search: UPopSearch | None = None
        self.plan: PruningPlan | None = None

    # ---- start and resume -------------------------------------------------------------------------
    def on_init_end(self, args, state, control, **kwargs):
        self._run_before_reporters()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("UPopCallback needs the Trainer's model")
        self._run_before_reporters()
        config = self.config
        if self.use_max_steps and state.max_steps and state.max_steps > 0:
            config = dataclasses.replace(config, total_steps=state.max_steps)
        if args.fp16:
            warnings.warn("UPopCallback under fp16: mask gradients carry the loss scale; bf16 avoids this",
                          stacklevel=2)
        resumed = state.global_step > 0  # the Trainer restored a checkpoint's state before this event
        path = self._state_path(args, state) if resumed else None  # checked before masks are attached
        self.plan = None
        self.search = UPopSearch(model, config)
        if path is not None:
            self._load(path, state.global_step)

    def _state_path(self, args, state) -> Path:
        candidates = [Path(self.resume_from)] if self.resume_from else []
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            candidates.append(Path(args.resume_from_checkpoint))
        candidates.append(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        name = _state_name(args)
        for folder in candidates:
            if (folder / name).is_file():
                return folder / name
        raise CheckpointError(f"resuming at step {state.global_step}: no UPop search state ({name}) in "
                              f"{', '.join(str(c) for c in dict.fromkeys(candidates))}; the checkpoint was not "
                              "saved with UPopCallback (pass UPopCallback(resume_from=<checkpoint folder>) if "
                              "it is elsewhere, or start the search again)")

    def _load(self, path: Path, step: int) -> None:
        assert self.search is not None
        try:
            data = path.read_bytes()
            tensors = load(data)
            meta = _metadata(data)
        except (OSError, SafetensorError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable UPop search state: {str(exc)[:200]}") from None
        saved = meta.get("config")
        if meta.get("format") != STATE_FORMAT or not isinstance(saved, dict):
            raise CheckpointError(f"{path} is not a UPop search state")
        if saved != self.search.config.to_dict():
            changed = sorted(k for k in saved.keys() | self.search.config.to_dict().keys()
                             if saved.get(k) != self.search.config.to_dict().get(k))
            raise CheckpointError(f"{path}: the search was started with other settings ({', '.join(changed)}); "
                                  "resume with the same UPopConfig and max_steps")
        try:
            self.search.load_state_dict(tensors)
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        expected = min(step, self.search.config.total_steps)
        if self.search.step_count != expected:
            raise CheckpointError(f"{path}: the search state is at step {self.search.step_count}, "
                                  f"the Trainer resumes at step {step}")

    # ---- the search --------------------------------------------------------------------------------
    def on_step_end(self, args, state, control, **kwargs):
        if self.search is not None and not self.search.finished:
            self.search.step()

    def on_save(self, args, state, control, **kwargs):
        if self.search is None or self.plan is not None:  # nothing searched, or already compressed
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        meta = {"format": STATE_FORMAT, "version": "1", "config": json.dumps(self.search.config.to_dict())}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.search.state_dict().items()}
        data = save(tensors, metadata=meta)
        atomic_write(folder / _state_name(args), lambda f: f.write(data))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.search is None or logs is None:
            return
        values = {"upop/ratio": float(self.search.current_ratio), "upop/achieved": self._achieved()}
        logs.update(values)
        # the Trainer appended a copy of `logs` to its history before this event
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def _achieved(self) -> float:
        if self.plan is not None:
            return float(self.plan.stats["achieved"])
        assert self.search is not None
        selected = self.search._selected
        if not selected:
            return 0.0
        try:
            costs = self.search.unit_costs()
        except RuntimeError:  # FLOPs budget before any forward pass
            return 0.0
        g = self.search.config.granularity
        total = sum(costs[s.name] * s.num_units(g) for s in self.search.structures)
        removed = sum(costs[name] * int(sel.sum()) for name, sel in selected.items())
        return removed / total if total else 0.0

    # ---- the end ---------------------------------------------------------------------------------
    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.search is None or self.plan is not None:
            return
        if not self.search.finished:
            self.search.remove()
            raise RuntimeError(f"training stopped after {self.search.step_count} of "
                               f"{self.search.config.total_steps} search steps; the masks are not binary yet")
        self.plan = self.search.plan()
        if self.compress_at_end:
            compressed = self.search.compress()
            _save_as_upop(compressed)

    # ---- report_to backends see our keys ---------------------------------------------------------
    def _run_before_reporters(self) -> None:
        """Move this callback to the front of the Trainer's callback list. The Trainer places the
        report_to callbacks (TensorBoard, W&B, ...) before the user's, and calls on_log in list
        order, so without this they would log before the upop keys are added. The list is the
        calling CallbackHandler's; moving an earlier item forward during its loop skips nothing."""
        frame = sys._getframe(2)  # on_* <- call_event(self=CallbackHandler)
        handler = frame.f_locals.get("self")
        callbacks = getattr(handler, "callbacks", None)
        if isinstance(callbacks, list) and any(c is self for c in callbacks) and callbacks[0] is not self:
            callbacks[:] = [self] + [c for c in callbacks if c is not self]


def _state_name(args: Any) -> str:
    """One file per process under DDP: every rank keeps its own scores."""
    world = getattr(args, "world_size", 1) or 1
    return STATE_FILE if world <= 1 else f"upop_search.rank{args.process_index}.safetensors"


def _metadata(data: bytes) -> dict[str, Any]:
    """The safetensors header's metadata, with the config decoded."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    meta = dict(header.get("__metadata__") or {})
    if "config" in meta:
        meta["config"] = json.loads(meta["config"])
    return meta


def _save_as_upop(model: nn.Module) -> None:
    """Make `model.save_pretrained` (what `trainer.save_model()` calls) write a upop folder: the
    compressed model's shapes no longer match its config, so only upop.from_pretrained can
    rebuild it."""
    def save_pretrained_upop(self: nn.Module, save_directory: str | os.PathLike, *args: Any,
                             is_main_process: bool = True, **kwargs: Any) -> None:
        if is_main_process:
            save_pretrained(self, save_directory)

    model.save_pretrained = types.MethodType(save_pretrained_upop, model)


__all__ = ["STATE_FILE", "UPopCallback"]
