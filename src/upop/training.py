"""The training loop of every phase (dense training, search, retraining), process set-up
(one process, or one per rank under torchrun), mixed precision and the learning-rate schedule.

Each epoch reseeds the RNGs from (seed, phase, epoch), so a resumed run makes the same decisions
as an uninterrupted one. A step whose loss or gradients are not finite is skipped and counted;
more than `upop.max_skipped_fraction` of them stops the run with one line.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from .data import DataError, drop_none
from .data._common import printable
from .distill import Distiller
from .optim import build_optimizer
from .runconfig import ConfigError, RunConfig
from .search import NonFiniteError, UPopSearch
from .tasks import Task
from .tracking import Tracker, TrackingError, tracker_from_config

log = logging.getLogger("upop")
PHASES = ("dense", "search", "retrain", "done")  # the order of a run; the index seeds each phase


# ---- processes ---------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def agree(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (a decision only rank 0 can take, e.g. under the output lock)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed() -> Dist:
    """One process, or one per rank under torchrun (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cpu")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    return Dist(rank=rank, world=world, device=device)


class _PrintableFormatter(logging.Formatter):
    """File names that are not valid UTF-8 (surrogate escapes) would make a handler fail and drop the line."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def setup_logging(out_dir: Path, main: bool) -> None:
    """The "upop" logger to stdout and, on rank 0, to `<out_dir>/log.txt` (appended)."""
    log.handlers.clear()
    log.setLevel(logging.INFO if main else logging.WARNING)
    log.propagate = False
    fmt = _PrintableFormatter("%(asctime)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    log.addHandler(console)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(out_dir / "log.txt", encoding="utf-8", errors="backslashreplace")
        file.setFormatter(fmt)
        log.addHandler(file)


def start_tracking(cfg: RunConfig, out_dir: Path, env: Dist) -> Tracker:
    """The run's tracker (upop.tracking, the `log:` section; rank 0 only logs); a backend that cannot
    start is a one-line ConfigError."""
    try:
        return tracker_from_config(cfg.log, out_dir, cfg.to_dict(), main=env.main)
    except TrackingError as exc:
        raise ConfigError(str(exc)) from None


# ---- training ------------------------------------------------------------------------------------
class Trainer:
    """One loop for the three phases: dense training, search, retraining."""

    def __init__(self, cfg: RunConfig, task: Task, env: Dist, tracker: Tracker | None = None) -> None:
        self.cfg, self.task, self.env = cfg, task, env
        self.tracker = tracker or Tracker()  # no backend: logs nothing
        t = cfg.train
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(t.mixed_precision)
        self.scaler = torch.amp.GradScaler(env.device.type) if t.mixed_precision == "fp16" else None
        dataset = task.train_dataset()
        self.sampler = DistributedSampler(dataset, num_replicas=env.world, rank=env.rank, shuffle=True,
                                          seed=cfg.seed, drop_last=True)
        self.loader = DataLoader(dataset, batch_size=t.batch_size, sampler=self.sampler,
                                 collate_fn=drop_none(task.collate), num_workers=cfg.data.num_workers, drop_last=True)
        steps = len(self.loader) // t.grad_accum
        if t.max_steps_per_epoch:
            steps = min(steps, t.max_steps_per_epoch)
        if steps < 1:
            per = f" per process ({env.world} processes)" if env.world > 1 else ""
            raise ConfigError(f"the training set ({len(dataset)} examples) gives no full step of train.batch_size="
                              f"{t.batch_size} x train.grad_accum={t.grad_accum} examples{per}; "
                              "lower train.batch_size or train.grad_accum")
        self.steps_per_epoch = steps
        self.skipped: dict[str, int] = {}
        self.max_skipped = cfg.upop_config(1).max_skipped_fraction

    def first_step(self, phase: str, epoch: int = 0) -> int:
        """The run's step count where `epoch` of `phase` starts (the tracker's x axis; the same on a resume)."""
        t = self.cfg.train
        before = {"dense": 0, "search": t.dense_epochs, "retrain": t.dense_epochs + t.search_epochs}
        return (before.get(phase, t.dense_epochs + t.search_epochs + t.retrain_epochs) + epoch) * self.steps_per_epoch

    def wrap(self, model: nn.Module) -> nn.Module:
        model.to(self.env.device)
        if self.env.world > 1:
            ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        return model

    def optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        """train.optimizer over `model` (upop.optim: DeiT's weight-decay groups, each with its lr_scale)."""
        return build_optimizer(model, lr, self.cfg.train)

    def epoch(self, wrapped: nn.Module, optimizer: torch.optim.Optimizer, *, phase: str, epoch: int,
              lr_at: Callable[[int], float], search: UPopSearch | None = None, step_offset: int = 0,
              distiller: Distiller | None = None) -> float:
        """One epoch; returns its mean loss (the task's, without distillation or sparsity). Every
        log.every_n_steps optimiser steps the tracker gets `<phase>/loss` (of that step), lr, epoch
        (fractional: 1.0 at the end of the first), the search's ratio and, with a `distiller`, the
        distillation loss `distill`, at the run's step `step_offset` + the step within the phase.
        A `distiller` adds its weight times its loss (upop.distill) to the task's loss of every step."""
        cfg, env = self.cfg, self.env
        _reseed(cfg.seed, phase, epoch)
        self.sampler.set_epoch(epoch)
        wrapped.train()
        accum = cfg.train.grad_accum
        batches = self._usable(iter(self.loader))  # iter() draws from the RNG: here, as it always did
        losses, distilled = [], []
        bar = tqdm(range(self.steps_per_epoch), desc=f"{phase} epoch {epoch + 1}", disable=not env.main,
                   dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 30)
        for step in bar:
            global_step = epoch * self.steps_per_epoch + step
            self.task.before_step(phase, epoch, step, self.steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(global_step) * group.get("lr_scale", 1.0)
            for micro in range(accum):
                batch = {k: v.to(env.device) for k, v in next(batches).items()}
                sync = micro == accum - 1 or env.world == 1
                ctx = nullcontext() if sync else wrapped.no_sync()
                with ctx, torch.autocast(env.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    if distiller is None:
                        loss = self.task.loss(wrapped, batch)
                        total = loss
                    else:
                        with distiller.capture(wrapped):
                            loss = self.task.loss(wrapped, batch)
                        kd = distiller.loss()
                        total = loss + distiller.options.weight * kd
                        distilled.append(float(kd.detach()))
                    total = total + search.sparsity_loss() if search is not None else total
                scaled = total / accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                losses.append(float(loss.detach()))
            grad_scale = self.scaler.get_scale() if self.scaler else None
            finite = self._finite_gradients(optimizer)
            if finite:
                self.scaler.step(optimizer) if self.scaler else optimizer.step()
                self.task.after_optimizer_step(wrapped)  # e.g. a momentum copy follows; skipped steps do not
            else:
                self._skipped(phase, global_step, search)
            if self.scaler:
                self.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if search is not None:
                search.step(grad_scale=grad_scale, skip=not finite)
            if self.tracker.due(step_offset + global_step):
                values = {"loss": sum(losses[-accum:]) / accum, "lr": lr_at(global_step),
                          "epoch": epoch + (step + 1) / self.steps_per_epoch}
                if search is not None:
                    values["ratio"] = search.current_ratio
                if distiller is not None:
                    values["distill"] = sum(distilled[-accum:]) / accum
                self.tracker.log_scalars(values, step_offset + global_step, prefix=phase)
            if env.main and step % 10 == 0:
                postfix = {"loss": f"{sum(losses[-10:]) / len(losses[-10:]):.3f}"}
                if search is not None:
                    postfix["ratio"] = f"{search.current_ratio:.3f}"
                bar.set_postfix(postfix, refresh=False)
        return sum(losses) / max(1, len(losses))

    def _usable(self, batches: Iterator[Any]) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of one pass that hold an example (None: every example skipped, data.on_bad_input)."""
        usable = 0
        for batch in batches:
            if batch is not None:
                usable += 1
                yield batch
        examples = len(self.sampler)
        if usable == 0:
            raise DataError(f"no usable training example: all {examples} skipped (data.on_bad_input: skip); "
                            "fix the training data (see the warnings above for the files)")
        raise DataError(f"the training data ran out: only {usable} of {len(self.loader)} batches of a pass over "
                        f"{examples} examples held a usable example (data.on_bad_input: skip), "
                        f"{self.steps_per_epoch * self.cfg.train.grad_accum} needed; fix the training data or "
                        "lower train.batch_size")

    def _finite_gradients(self, optimizer: torch.optim.Optimizer) -> bool:
        """After DDP's all-reduce every rank sees the same gradients, so every rank takes
        the same decision; a non-finite loss makes them non-finite too."""
        if self.scaler:
            self.scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        return bool(torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in params])))

    def _skipped(self, phase: str, step: int, search: UPopSearch | None) -> None:
        """Count a skipped step; stop once more than max_skipped_fraction of the steps were skipped
        (of an epoch when training, of the whole search when searching; 0 tolerates none)."""
        self.skipped[phase] = self.skipped.get(phase, 0) + 1
        if search is not None:
            skipped, steps, of = search.skipped_steps + 1, search.config.total_steps, "the search"
        else:
            skipped, steps, of = self.skipped[phase], self.steps_per_epoch, "an epoch"
        if skipped > self.max_skipped * steps:
            raise NonFiniteError(f"{phase} step {step + 1}: {skipped} steps had a non-finite loss or gradient "
                                 f"(limit upop.max_skipped_fraction={self.max_skipped} of {of}, {steps} steps); "
                                 "lower the learning rate")
        log.warning("%s step %d: non-finite loss or gradient, step skipped (%d so far)", phase, step + 1, skipped)


def _reseed(seed: int, phase: str, epoch: int) -> None:
    torch.manual_seed(seed * 100_003 + PHASES.index(phase) * 1009 + epoch)
