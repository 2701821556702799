"""dense -> search -> compress -> retrain -> evaluate: a loop over the phases, resumable, on one CPU or
under torchrun. Every phase runs one skeleton (`Run.train`): its epochs, each followed by a checkpoint
(upop.state); what the phase leaves (the dense measurement, the plan, the selected model) is on disk
before the progress names the next phase. The same command continues after the last finished epoch.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import report
from .adapters import discover
from .checkpoint import from_pretrained, save_pretrained
from .compress import apply_plan
from .costs import count_flops, count_params, measure_latency
from .files import write_text
from .runconfig import RunConfig
from .search import UPopSearch
from .state import Progress, RunState, claim_output_dir, config_hash, require_finite
from .tasks import Task, make_task
from .training import PHASES, Dist, Trainer, cosine, init_distributed, setup_logging

log = logging.getLogger("upop")


def measure(cfg: RunConfig, task: Task, model: nn.Module, device: torch.device, split: str = "test") -> dict:
    """Task metrics, params, FLOPs (batch 1) and CPU latency of `model`."""
    metrics = task.evaluate(model, split, device)
    result = {"metric": metrics[task.metric], "metrics": metrics, "params": count_params(model)}
    example = {k: v.to(device) for k, v in task.example_inputs(1).items()}
    result["flops"], result["latency_ms"] = count_flops(model, example), None
    if not cfg.eval.skip_latency:
        cpu_model = copy.deepcopy(model).cpu() if device.type != "cpu" else model
        result["latency_ms"] = {f"batch{b}": measure_latency(cpu_model, task.example_inputs(b),
                                                             repeats=cfg.eval.latency_repeats)
                                for b in cfg.eval.latency_batches}
    return result


def run_compress(cfg: RunConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """The whole job; returns the metrics written to `<output_dir>/metrics.json`. A finished run of another
    configuration there is replaced only with `overwrite`; the identical one is reported, not run again."""
    env = init_distributed()
    out = Path(cfg.output_dir).expanduser()
    with claim_output_dir(out, cfg, env, overwrite=overwrite) as finished:
        setup_logging(out, env.main)
        if finished is not None:
            log.info("%s holds this finished run; nothing to do\n%s", out, report.format_table(finished))
            return finished
        return Run(cfg, env, out).run()


class Run:
    """One compress job: the model, its progress and the phases that remain."""

    def __init__(self, cfg: RunConfig, env: Dist, out: Path) -> None:
        self.cfg, self.env, self.out, self.started = cfg, env, out, time.time()
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every rerun
        self.task = task = make_task(cfg)  # reads and checks the data, builds the model: fails before training
        self.trainer = Trainer(cfg, task, env)
        self.upop = cfg.upop_config(cfg.train.search_epochs * self.trainer.steps_per_epoch)
        self.state = RunState(out / "state", config_hash(cfg))
        self.progress = p = self.state.progress() or Progress()
        if p.phase != "dense" or p.epoch:
            log.info("resuming from %s: phase %s, epoch %d", self.state.folder, p.phase, p.epoch)
        self.model = task.model
        self.structures = [s.describe(self.upop.granularity) for s in discover(self.model)]
        log.info("%s: %d prunable structures, %.2fM params", type(self.model).__name__, len(self.structures),
                 count_params(self.model) / 1e6)
        self.plan = self.state.plan() if p.phase in ("retrain", "done") else None
        if self.plan is not None:  # the compressed model of an earlier process
            self.model = apply_plan(task.build_fresh_model(), self.plan)
        if p.phase != "dense" or p.epoch:
            self.state.load_model(self.model)

    def run(self) -> dict[str, Any]:
        for phase, following in zip(PHASES, PHASES[1:], strict=False):
            if self.progress.phase == phase:
                getattr(self, phase)()  # its epochs, then what it leaves on disk
                self.progress.phase, self.progress.epoch = following, 0
                self.checkpoint(f"end of {phase}")
        return self.final()

    def checkpoint(self, what: str, optimizer: torch.optim.Optimizer | None = None,
                   search: UPopSearch | None = None) -> None:
        require_finite(self.model, what)  # on every rank: all stop together
        if self.env.main:
            self.state.save(self.progress, self.model, optimizer, search, what=what)
        self.env.barrier()

    def train(self, phase: str, epochs: int, lr: float, search: UPopSearch | None = None,
              after=lambda epoch: "") -> None:
        """The phase skeleton: the epochs left, each followed by `after(epoch)` (what to log) and a checkpoint.
        The learning rate is constant during the search (the paper), a cosine otherwise."""
        p, t = self.progress, self.cfg.train
        steps = epochs * self.trainer.steps_per_epoch
        lr_at = (lambda _: lr) if search is not None else cosine(lr, t.min_lr, steps, t.warmup_steps)
        wrapped = self.trainer.wrap(self.model)
        optimizer = self.trainer.optimizer(self.model, lr)
        if p.epoch:
            self.state.load_optimizer(optimizer)
            if search is not None:
                self.state.load_search(search)
        for epoch in range(p.epoch, epochs):
            start = time.time()
            loss = self.trainer.epoch(wrapped, optimizer, phase=phase, epoch=epoch, lr_at=lr_at, search=search)
            p.wall[phase] = p.wall.get(phase, 0) + time.time() - start
            require_finite(self.model, f"{phase} epoch {epoch + 1}")  # before validating or saving it
            log.info("%s epoch %d: loss %.4f%s", phase, epoch + 1, loss, after(epoch))
            p.epoch = epoch + 1
            self.checkpoint(f"{phase} epoch {epoch + 1}", optimizer, search)

    def dense(self) -> None:
        self.train("dense", self.cfg.train.dense_epochs, self.cfg.train.dense_lr)
        d = self.progress.dense = measure(self.cfg, self.task, self.model, self.env.device)
        log.info("dense model: %s %.2f (test), %.2fM params, %.3f GFLOPs", self.task.metric, d["metric"],
                 d["params"] / 1e6, d["flops"] / 1e9)

    def search(self) -> None:
        t, env, task, model = self.cfg.train, self.env, self.task, self.model
        search = UPopSearch(model, self.upop)
        self.train("search", t.search_epochs, t.search_lr, search,
                   after=lambda _: f", ratio {search.current_ratio:.3f} of {self.upop.target:.2f}")
        plan = self.plan = search.plan()
        search.compress()
        log.info("compressed: %.2fM params (%.1f%% of the prunable %s removed, target %.1f%%)",
                 count_params(model) / 1e6, 100 * plan.stats["achieved"], self.upop.budget, 100 * self.upop.target)
        # the compressed model before retraining, on the same test split as the other columns
        example = {k: v.to(env.device) for k, v in task.example_inputs(1).items()}
        self.progress.searched = {"metric": task.evaluate(model, "test", env.device)[task.metric],
                                  "params": count_params(model), "flops": count_flops(model, example)}
        log.info("after search, before retraining: test %s %.2f", task.metric, self.progress.searched["metric"])
        if env.main:  # on disk before the progress names the retraining
            self.state.save_plan(plan)
            write_text(self.out / "plan.json", plan.to_json())
        if env.world > 1:  # every rank records its own decision, to show they agree
            write_text(self.out / f"plan.rank{env.rank}.json", plan.to_json())

    def retrain(self) -> None:
        t, p, task = self.cfg.train, self.progress, self.task

        def validate(epoch: int) -> str:  # the model kept is chosen on validation
            val = task.evaluate(self.model, "val", self.env.device)[task.metric]
            improved = p.best is None or val > p.best
            if improved:
                self.save_model(f"retrain epoch {epoch + 1}: best model")
                p.best = val
            return f", val {task.metric} {val:.2f}" + " (best)" * improved

        self.train("retrain", t.retrain_epochs, t.lr, after=validate)
        if t.retrain_epochs == 0:
            self.save_model("retrain: final model")

    def save_model(self, what: str) -> None:
        require_finite(self.model, what)
        if self.env.main:
            save_pretrained(self.model, self.out / "model")
        self.env.barrier()

    def final(self) -> dict[str, Any]:
        """Measure the selected compressed model; the report, with metrics.json last."""
        cfg, env, p, plan = self.cfg, self.env, self.progress, self.plan
        if not (self.out / "model").is_dir():
            raise self.state.damaged(self.out / "model", "is missing although the retraining ran")
        compressed = measure(cfg, self.task, from_pretrained(self.out / "model").to(env.device), env.device)
        metrics = {
            "task": self.task.name, "metric": self.task.metric, "model": cfg.model.preset or cfg.model.name,
            "dense": p.dense, "searched": p.searched, "compressed": compressed,
            "prunable_params": plan.stats.get("prunable_params"), "target": self.upop.target,
            "achieved": plan.stats.get("achieved"), "budget": self.upop.budget,
            "wall_time_s": {**p.wall, "total": time.time() - self.started}, "world_size": env.world,
            "config": cfg.to_dict(), "config_hash": self.state.config_hash, "versions": report.versions(),
        }
        if env.main:
            report.write_report(self.out, metrics, plan.to_dict(), self.structures)
            log.info("\n%s\nresults in %s", report.format_table(metrics), self.out)
        env.barrier()
        return metrics


def run_evaluate(cfg: RunConfig, model_dir: str | os.PathLike) -> dict[str, Any]:
    """Evaluate a model saved by upop.save_pretrained on the run config's test data."""
    env = init_distributed()
    setup_logging(Path(cfg.output_dir).expanduser(), env.main)
    model = from_pretrained(model_dir)  # checks the folder before the data is read
    task = make_task(cfg)
    result = measure(cfg, task, model.to(env.device), env.device)
    log.info("%s: %s %.2f, %.2fM params, %.3f GFLOPs, latency %s", model_dir, task.metric, result["metric"],
             result["params"] / 1e6, result["flops"] / 1e9, result["latency_ms"])
    return result
