"""dense -> search -> compress -> retrain -> evaluate: a loop over the phases, resumable, on one CPU or
under torchrun. Every phase runs one skeleton (`Run.train`): its epochs, each followed by a checkpoint
(upop.state); what a phase leaves (the dense model and its measurement, the plan, the selected model) is on
disk before the progress names the next one. The same command continues after the last finished epoch."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch

from . import report
from .adapters import discover
from .checkpoint import from_pretrained, save_pretrained
from .compress import apply_plan
from .costs import count_flops, count_params
from .distill import Distiller
from .files import write_text
from .measure import budget_latency_model, final_timings, measure
from .optim import lr_schedule
from .runconfig import RunConfig
from .search import UPopSearch
from .state import Progress, RunState, claim_output_dir, config_hash, require_finite
from .tasks import make_task
from .tracking import Tracker
from .training import PHASES, Dist, Trainer, init_distributed, setup_logging, start_tracking

log = logging.getLogger("upop")


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
        with start_tracking(cfg, out, env) as tracker:  # before any data is read
            return Run(cfg, env, out, tracker).run()


class Run:
    """One compress job: the model, its progress and the phases that remain."""

    def __init__(self, cfg: RunConfig, env: Dist, out: Path, tracker: Tracker) -> None:
        self.cfg, self.env, self.out, self.tracker, self.started = cfg, env, out, tracker, time.time()
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every rerun
        self.task = task = make_task(cfg)  # reads and checks the data, builds the model: fails before training
        if cfg.distill.enabled:
            task.check_distillation()
        self.distiller: Distiller | None = None  # built on first use, from the dense weights (state/dense)
        self.trainer = Trainer(cfg, task, env, tracker)
        self.upop = cfg.upop_config(cfg.train.search_epochs * self.trainer.steps_per_epoch)
        self.state = RunState(out / "state", config_hash(cfg))
        self.progress = p = self.state.progress() or Progress()
        if p.phase != "dense" or p.epoch:
            log.info("resuming from %s: phase %s, epoch %d", self.state.folder, p.phase, p.epoch)
        self.model = task.model
        self.found = discover(self.model)  # of the dense model: the search's structures
        self.structures = [s.describe(self.upop.granularity) for s in self.found]
        log.info("%s: %d prunable structures, %.2fM params", type(self.model).__name__, len(self.structures),
                 count_params(self.model) / 1e6)
        self.plan = self.state.plan() if p.phase in ("retrain", "done") else None
        if self.plan is not None:  # the compressed model of an earlier process
            self.model = apply_plan(task.build_fresh_model(), self.plan)
        if p.phase != "dense" or p.epoch:
            self.state.load_model(self.model)
            task.load_extra_state(self.state.load_extra())  # what the task keeps outside the model

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
            self.state.save(self.progress, self.model, optimizer, search, what=what, extra=self.task.extra_state())
        self.env.barrier()

    def teacher(self, phase: str) -> Distiller | None:
        """The distiller of `phase` (distill.phases), or None. Its teacher is the dense model as the search
        starts, read back from state/dense: the same weights whether or not the run was resumed."""
        options = self.cfg.distill
        if not (options.enabled and phase in options.phases):
            return None
        if self.distiller is None:
            dense = self.state.load_dense(self.task.build_fresh_model())
            self.distiller = Distiller(dense, options, self.task)
            log.info("distillation from the dense model (%s phase%s): weight %g, temperature %g, %s",
                     " and ".join(options.phases), "s" * (len(options.phases) > 1), options.weight,
                     options.temperature, " and ".join(k for k in ("logits", "embeddings") if getattr(options, k)))
        return self.distiller

    def train(self, phase: str, epochs: int, lr: float, search: UPopSearch | None = None,
              after=lambda epoch: "") -> None:
        """The phase skeleton: the epochs left, each followed by `after(epoch)` (what to log) and a checkpoint.
        The learning rate is constant during the search (the paper), train.schedule otherwise."""
        p, steps = self.progress, epochs * self.trainer.steps_per_epoch
        lr_at = (lambda _: lr) if search is not None else lr_schedule(self.cfg.train, lr, steps)
        wrapped = self.trainer.wrap(self.model)
        optimizer = self.trainer.optimizer(self.model, lr)
        distiller = self.teacher(phase)
        if p.epoch:
            self.state.load_optimizer(optimizer)
            if search is not None:
                self.state.load_search(search)
        for epoch in range(p.epoch, epochs):
            start = time.time()
            loss = self.trainer.epoch(wrapped, optimizer, phase=phase, epoch=epoch, lr_at=lr_at, search=search,
                                      step_offset=self.trainer.first_step(phase), distiller=distiller)
            p.wall[phase] = p.wall.get(phase, 0) + time.time() - start
            require_finite(self.model, f"{phase} epoch {epoch + 1}")  # before validating or saving it
            log.info("%s epoch %d: loss %.4f%s", phase, epoch + 1, loss, after(epoch))
            p.epoch = epoch + 1
            self.checkpoint(f"{phase} epoch {epoch + 1}", optimizer, search)

    def dense(self) -> None:
        self.train("dense", self.cfg.train.dense_epochs, self.cfg.train.dense_lr)
        # timed at the end, side by side with the compressed model (measure.cpu_latency)
        d = self.progress.dense = measure(self.cfg, self.task, self.model, self.env.device, latency=False)
        self.tracker.log_scalars(d, self.trainer.first_step("search"), prefix="dense")
        log.info("dense model: %s %.2f (test), %.2fM params, %.3f GFLOPs", self.task.metric, d["metric"],
                 d["params"] / 1e6, d["flops"] / 1e9)
        if self.env.main:  # on disk before the progress names the search
            self.state.save_dense(self.model)
        self.env.barrier()

    def search(self) -> None:
        t, env, task, model = self.cfg.train, self.env, self.task, self.model
        lm = self.state.shared_latency(env, lambda: budget_latency_model(  # measured before the masks exist
            task, model.to(env.device), self.found, self.upop)) if self.upop.budget == "latency" else None
        search = UPopSearch(model, self.upop, structures=self.found, latency=lm)
        self.train("search", t.search_epochs, t.search_lr, search,
                   after=lambda _: f", ratio {search.current_ratio:.3f} of {self.upop.target:.2f}")
        plan = self.plan = search.plan()
        task.after_compress(search.compress(), plan)  # e.g. a momentum copy sliced with the same plan
        log.info("compressed: %.2fM params (%.1f%% of the prunable %s removed, target %.1f%%)",
                 count_params(model) / 1e6, 100 * plan.stats["achieved"], self.upop.budget, 100 * self.upop.target)
        # the compressed model before retraining, on the same test split as the other columns
        example = {k: v.to(env.device) for k, v in task.example_inputs(1).items()}
        self.progress.searched = {"metric": task.evaluate(model, "test", env.device)[task.metric],
                                  "params": count_params(model), "flops": count_flops(model, example)}
        log.info("after search, before retraining: test %s %.2f", task.metric, self.progress.searched["metric"])
        self.tracker.log_scalars(self.progress.searched, self.trainer.first_step("retrain"), prefix="searched")
        if env.main:  # on disk before the progress names the retraining
            self.state.save_plan(plan)
            write_text(self.out / "plan.json", plan.to_json())
        if env.world > 1:  # every rank records its own decision, to show they agree
            write_text(self.out / f"plan.rank{env.rank}.json", plan.to_json())

    def retrain(self) -> None:
        t, p, task = self.cfg.train, self.progress, self.task

        def validate(epoch: int) -> str:  # the model kept is chosen on validation, or the last (vqa.select)
            if not task.select_on_validation():
                return self.save_model(f"retrain epoch {epoch + 1}: last model") or ""
            metrics = task.evaluate(self.model, "val", self.env.device)
            self.tracker.log_scalars(metrics, self.trainer.first_step("retrain", epoch + 1), prefix="val")
            val = metrics[task.metric]
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
            save_pretrained(self.model, self.out / "model", what=what, processor=self.task.built.tokenizer)
        self.env.barrier()

    def final(self) -> dict[str, Any]:
        """Measure the compressed model (timed side by side with the dense one); the report, metrics.json last."""
        cfg, env, p, plan, task = self.cfg, self.env, self.progress, self.plan, self.task
        if not (self.out / "model").is_dir():
            raise self.state.damaged(self.out / "model", "is missing although the retraining ran")
        model = from_pretrained(self.out / "model").to(env.device)
        dense, compressed = dict(p.dense), measure(cfg, task, model, env.device, latency=False)
        timed = env.agree(final_timings(cfg, task, self.upop, lambda: self.state.load_dense(task.build_fresh_model()),
                                        model, plan, lambda: self.state.latency(required=True)) if env.main else None)
        for name, section in (("dense", dense), ("compressed", compressed)):  # one side-by-side measurement
            section.update(timed.get("cpu", {}).get(name, {}))
        metrics = {
            "task": task.name, "metric": task.metric, "model": cfg.model.preset or cfg.model.name,
            "dense": dense, "searched": p.searched, "compressed": compressed,
            "speedup": report.speedups(dense, compressed), "prunable_params": plan.stats.get("prunable_params"),
            "target": self.upop.target, "achieved": plan.stats.get("achieved"), "budget": self.upop.budget,
            **({"latency_budget": timed["budget"]} if "budget" in timed else {}),
            "wall_time_s": {**p.wall, "total": time.time() - self.started}, "world_size": env.world,
            "distill": dataclasses.asdict(cfg.distill),
            "config": cfg.to_dict(), "config_hash": self.state.config_hash, "versions": report.versions(),
        }
        self.tracker.log_summary({k: metrics[k] for k in ("dense", "searched", "compressed", "speedup", "achieved",
                                                           "target", "wall_time_s")})
        if env.main:
            report.write_report(self.out, metrics, plan.to_dict(), self.structures)
            log.info("\n%s\nresults in %s", report.format_table(metrics), self.out)
        env.barrier()
        return metrics
