"""search -> compress -> retrain -> evaluate, resumable, on one CPU or under torchrun.

Every epoch of every phase ends with a checkpoint in `<output_dir>/state` (weights as
safetensors, the optimizer through torch.save / torch.load(weights_only=True), the search as
safetensors, progress as JSON written last). Running the same command again continues after
the last finished epoch. Each epoch reseeds the RNGs from (seed, phase, epoch), so a resumed
run makes the same decisions as an uninterrupted one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from . import report
from .adapters import discover
from .checkpoint import from_pretrained, save_pretrained
from .compress import apply_plan
from .costs import count_flops, count_params, measure_latency
from .data import drop_none
from .plan import PruningPlan
from .runconfig import ConfigError, RunConfig
from .search import NonFiniteError, UPopSearch
from .tasks import Task, make_task

log = logging.getLogger("upop")
PHASES = ("dense", "search", "retrain", "done")


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


def setup_logging(out_dir: Path, main: bool) -> None:
    log.handlers.clear()
    log.setLevel(logging.INFO if main else logging.WARNING)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    log.addHandler(console)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(out_dir / "log.txt")
        file.setFormatter(fmt)
        log.addHandler(file)


# ---- resumable state -----------------------------------------------------------------------------
class RunState:
    """Checkpoints of a run in `<output_dir>/state`.

    Each save writes a new folder `<phase>-<epoch>.tmp`, renames it into place, then
    atomically replaces progress.json, which names the folder to resume from; older folders
    are removed last. A run killed at any moment therefore resumes from a complete checkpoint.
    The plan (`plan.json`) is written once, before progress first names the retrain phase.
    """

    def __init__(self, folder: Path, config_hash: str) -> None:
        self.folder = folder
        self.config_hash = config_hash

    def progress(self) -> dict[str, Any] | None:
        path = self.folder / "progress.json"
        if not path.is_file():
            return None
        try:
            progress = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConfigError(f"{path} is corrupted; delete {self.folder} to start over") from None
        if not isinstance(progress, dict) or progress.get("config_hash") != self.config_hash:
            raise ConfigError(f"{self.folder.parent} holds a run with another configuration; "
                              "choose another output_dir or delete it")
        self._checkpoint(progress)
        return progress

    def _checkpoint(self, progress: dict[str, Any] | None = None) -> Path:
        """The folder progress.json names (read again: another rank may have written it)."""
        if progress is None:
            progress = json.loads((self.folder / "progress.json").read_text())
        checkpoint = self.folder / str(progress.get("checkpoint", ""))
        if not (checkpoint.is_dir() and (checkpoint / "model.safetensors").is_file()):
            raise ConfigError(f"{self.folder}/progress.json names checkpoint {checkpoint.name!r}, which is "
                              f"missing; delete {self.folder} to start over")
        return checkpoint

    def save(self, progress: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer | None,
             search: UPopSearch | None = None, plan: PruningPlan | None = None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{progress['phase']}-{progress['epoch']}"
        staging = self.folder / f"{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        save_model(model, str(staging / "model.safetensors"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        if search is not None:
            save_file({k: v.contiguous() for k, v in search.state_dict().items()}, str(staging / "search.safetensors"))
        if plan is not None:
            _atomic(self.folder / "plan.json", lambda p: plan.save(p))
        target = self.folder / name
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        record = {**progress, "config_hash": self.config_hash, "checkpoint": name}
        _atomic(self.folder / "progress.json", lambda p: p.write_text(json.dumps(record, indent=1)))
        for old in self.folder.iterdir():  # only now is the previous checkpoint unneeded
            if old.is_dir() and old != target:
                shutil.rmtree(old, ignore_errors=True)

    def load_model(self, model: nn.Module) -> None:
        load_model(model, str(self._checkpoint() / "model.safetensors"))

    def load_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        path = self._checkpoint() / "optimizer.pt"
        if path.is_file():  # our own file; weights_only all the same
            optimizer.load_state_dict(torch.load(path, weights_only=True))

    def load_search(self, search: UPopSearch) -> None:
        search.load_state_dict(load_file(str(self._checkpoint() / "search.safetensors")))

    def plan(self) -> PruningPlan:
        return PruningPlan.load(self.folder / "plan.json")


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def config_hash(cfg: RunConfig) -> str:
    relevant = cfg.to_dict()
    relevant.pop("output_dir")
    relevant["eval"] = None  # measuring differently does not change the run
    return hashlib.sha1(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


# ---- training ------------------------------------------------------------------------------------
class Trainer:
    """One loop for the three phases: dense training, search, retraining."""

    def __init__(self, cfg: RunConfig, task: Task, env: Dist) -> None:
        self.cfg, self.task, self.env = cfg, task, env
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
            raise ValueError(f"the training set ({len(dataset)} examples) gives no full batch of "
                             f"{t.batch_size} x {t.grad_accum} per process; lower train.batch_size")
        self.steps_per_epoch = steps
        self.skipped: dict[str, int] = {}
        self.max_skipped = cfg.upop_config(1).max_skipped_fraction

    def wrap(self, model: nn.Module) -> nn.Module:
        model.to(self.env.device)
        if self.env.world > 1:
            ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        return model

    def optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        """AdamW; no weight decay on biases, norms, embeddings and position tables (DeiT's recipe);
        each group carries its `lr_scale` (train.lr_multipliers) for the schedules."""
        multipliers = self.cfg.train.lr_multipliers
        groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            scale = next((float(f) for prefix, f in multipliers.items() if name.startswith(prefix)), 1.0)
            exempt = p.ndim < 2 or "position" in name or "embedding" in name
            groups.setdefault((scale, exempt), []).append(p)
        wd = self.cfg.train.weight_decay
        return torch.optim.AdamW([{"params": ps, "weight_decay": 0.0 if exempt else wd, "lr_scale": scale}
                                  for (scale, exempt), ps in groups.items()], lr=lr)

    def epoch(self, wrapped: nn.Module, optimizer: torch.optim.Optimizer, *, phase: str, epoch: int,
              lr_at, search: UPopSearch | None = None) -> float:
        cfg, env = self.cfg, self.env
        _reseed(cfg.seed, phase, epoch)
        self.sampler.set_epoch(epoch)
        wrapped.train()
        accum = cfg.train.grad_accum
        batches = iter(self.loader)
        losses = []
        bar = tqdm(range(self.steps_per_epoch), desc=f"{phase} epoch {epoch + 1}", disable=not env.main,
                   dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 30)
        for step in bar:
            global_step = epoch * self.steps_per_epoch + step
            for group in optimizer.param_groups:
                group["lr"] = lr_at(global_step) * group.get("lr_scale", 1.0)
            for micro in range(accum):
                batch = next(b for b in batches if b is not None)  # None: every image skipped
                batch = {k: v.to(env.device) for k, v in batch.items()}
                sync = micro == accum - 1 or env.world == 1
                ctx = nullcontext() if sync else wrapped.no_sync()
                with ctx, torch.autocast(env.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    loss = self.task.loss(wrapped, batch)
                    total = loss + search.sparsity_loss() if search is not None else loss
                scaled = total / accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                losses.append(float(loss.detach()))
            grad_scale = self.scaler.get_scale() if self.scaler else None
            finite = self._finite_gradients(optimizer)
            if finite:
                self.scaler.step(optimizer) if self.scaler else optimizer.step()
            else:
                self._skipped(phase, global_step, search)
            if self.scaler:
                self.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if search is not None:
                search.step(grad_scale=grad_scale, skip=not finite)
            if env.main and step % 10 == 0:
                postfix = {"loss": f"{sum(losses[-10:]) / len(losses[-10:]):.3f}"}
                if search is not None:
                    postfix["ratio"] = f"{search.current_ratio:.3f}"
                bar.set_postfix(postfix, refresh=False)
        return sum(losses) / max(1, len(losses))


    def _finite_gradients(self, optimizer: torch.optim.Optimizer) -> bool:
        """After DDP's all-reduce every rank sees the same gradients, so every rank takes
        the same decision; a non-finite loss makes them non-finite too."""
        if self.scaler:
            self.scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        return bool(torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in params])))

    def _skipped(self, phase: str, step: int, search: UPopSearch | None) -> None:
        self.skipped[phase] = self.skipped.get(phase, 0) + 1
        log.warning("%s step %d: non-finite loss or gradient, step skipped (%d so far)", phase, step + 1,
                    self.skipped[phase])
        if search is None and self.skipped[phase] > max(1.0, self.max_skipped * self.steps_per_epoch):
            raise NonFiniteError(f"{phase}: {self.skipped[phase]} steps had a non-finite loss or gradient "
                                 f"(limit upop.max_skipped_fraction={self.max_skipped} of an epoch); "
                                 "lower the learning rate")


def _reseed(seed: int, phase: str, epoch: int) -> None:
    torch.manual_seed(seed * 100_003 + PHASES.index(phase) * 1009 + epoch)


def cosine(lr: float, min_lr: float, total: int, warmup: int = 0):
    """Linear warmup over `warmup` steps, then cosine decay from lr to min_lr at `total`."""
    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = min(step - warmup, total - warmup) / max(1, total - warmup)
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr_at


# ---- measuring -----------------------------------------------------------------------------------
def measure(cfg: RunConfig, task: Task, model: nn.Module, device: torch.device, split: str = "test") -> dict:
    """Task metrics, params, FLOPs (batch 1) and CPU latency of `model`."""
    metrics = task.evaluate(model, split, device)
    result = {"metric": metrics[task.metric], "metrics": metrics, "params": count_params(model)}
    example = {k: v.to(device) for k, v in task.example_inputs(1).items()}
    result["flops"] = count_flops(model, example)
    result["latency_ms"] = None
    if not cfg.eval.skip_latency:
        cpu_model = copy.deepcopy(model).cpu() if device.type != "cpu" else model
        result["latency_ms"] = {
            f"batch{b}": measure_latency(cpu_model, task.example_inputs(b), repeats=cfg.eval.latency_repeats)
            for b in cfg.eval.latency_batches
        }
    return result


def _versions() -> dict[str, str]:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "machine": platform.machine(),
            "cpu_threads": str(torch.get_num_threads())}


# ---- the job -------------------------------------------------------------------------------------
def run_compress(cfg: RunConfig) -> dict[str, Any]:
    """The whole job; returns the metrics written to `<output_dir>/metrics.json`."""
    env = init_distributed()
    out = Path(cfg.output_dir).expanduser()
    setup_logging(out, env.main)
    started = time.time()
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every rerun
    task = make_task(cfg)  # reads and checks the data, builds the model: fails before any training
    trainer = Trainer(cfg, task, env)
    t = cfg.train
    state = RunState(out / "state", config_hash(cfg))
    progress = state.progress() or {"phase": "dense", "epoch": 0, "dense": None, "searched": None,
                                    "best": None, "wall": {}}
    if progress["phase"] != "dense" or progress["epoch"]:
        log.info("resuming from %s: phase %s, epoch %d", state.folder, progress["phase"], progress["epoch"])
    model = task.model
    structures_before = [s.describe(cfg.upop.get("granularity", "head_dim")) for s in discover(model)]
    log.info("%s: %d prunable structures, %.2fM params", type(model).__name__, len(structures_before),
             count_params(model) / 1e6)

    # -- dense training and the dense reference
    if progress["phase"] == "dense":
        if progress["epoch"] or progress["dense"] is not None:
            state.load_model(model)
        wrapped = trainer.wrap(model)
        optimizer = trainer.optimizer(model, t.dense_lr)
        if progress["epoch"]:
            state.load_optimizer(optimizer)
        lr_at = cosine(t.dense_lr, t.min_lr, t.dense_epochs * trainer.steps_per_epoch, t.warmup_steps)
        for epoch in range(progress["epoch"], t.dense_epochs):
            phase_start = time.time()
            loss = trainer.epoch(wrapped, optimizer, phase="dense", epoch=epoch, lr_at=lr_at)
            progress["wall"]["dense"] = progress["wall"].get("dense", 0) + time.time() - phase_start
            log.info("dense epoch %d: loss %.4f", epoch + 1, loss)
            progress["epoch"] = epoch + 1
            if env.main:
                state.save(progress, model, optimizer)
            env.barrier()
        progress["dense"] = measure(cfg, task, model, env.device)
        log.info("dense model: %s %.2f (test), %.2fM params, %.3f GFLOPs", task.metric, progress["dense"]["metric"],
                 progress["dense"]["params"] / 1e6, progress["dense"]["flops"] / 1e9)
        progress.update(phase="search", epoch=0)
        if env.main:
            state.save(progress, model, None)
        env.barrier()

    # -- search
    upop_cfg = cfg.upop_config(t.search_epochs * trainer.steps_per_epoch)
    if progress["phase"] == "search":
        state.load_model(model)
        search = UPopSearch(model, upop_cfg)
        wrapped = trainer.wrap(model)
        optimizer = trainer.optimizer(model, t.search_lr)
        if progress["epoch"]:
            state.load_optimizer(optimizer)
            state.load_search(search)
        for epoch in range(progress["epoch"], t.search_epochs):
            phase_start = time.time()
            loss = trainer.epoch(wrapped, optimizer, phase="search", epoch=epoch, lr_at=lambda _: t.search_lr,
                                 search=search)
            progress["wall"]["search"] = progress["wall"].get("search", 0) + time.time() - phase_start
            log.info("search epoch %d: loss %.4f, ratio %.3f of %.2f", epoch + 1, loss, search.current_ratio,
                     upop_cfg.target)
            progress["epoch"] = epoch + 1
            if env.main:
                state.save(progress, model, optimizer, search)
            env.barrier()
        plan = search.plan()
        search.compress()
        log.info("compressed: %.2fM params (%.1f%% of the prunable %s removed, target %.1f%%)",
                 count_params(model) / 1e6, 100 * plan.stats["achieved"], upop_cfg.budget, 100 * upop_cfg.target)
        # the compressed model before retraining, on the same test split as the other columns
        example = {k: v.to(env.device) for k, v in task.example_inputs(1).items()}
        progress["searched"] = {"metric": task.evaluate(model, "test", env.device)[task.metric],
                                "params": count_params(model), "flops": count_flops(model, example)}
        log.info("after search, before retraining: test %s %.2f", task.metric, progress["searched"]["metric"])
        progress.update(phase="retrain", epoch=0, best=None)
        if env.main:
            state.save(progress, model, None, plan=plan)
            plan.save(out / "plan.json")
        if env.world > 1:  # every rank records its own decision, to show they agree
            plan.save(out / f"plan.rank{env.rank}.json")
        env.barrier()
    else:
        plan = state.plan()
        model = task.build_fresh_model()
        apply_plan(model, plan)
        state.load_model(model)

    # -- retraining, checkpoint chosen on validation
    best_dir = out / "model"
    if progress["phase"] == "retrain":
        wrapped = trainer.wrap(model)
        optimizer = trainer.optimizer(model, t.lr)
        if progress["epoch"]:
            state.load_optimizer(optimizer)
        lr_at = cosine(t.lr, t.min_lr, t.retrain_epochs * trainer.steps_per_epoch, t.warmup_steps)
        if t.retrain_epochs == 0 and env.main:
            save_pretrained(model, best_dir)
        for epoch in range(progress["epoch"], t.retrain_epochs):
            phase_start = time.time()
            loss = trainer.epoch(wrapped, optimizer, phase="retrain", epoch=epoch, lr_at=lr_at)
            progress["wall"]["retrain"] = progress["wall"].get("retrain", 0) + time.time() - phase_start
            val = task.evaluate(model, "val", env.device)[task.metric]
            improved = progress["best"] is None or val > progress["best"]
            log.info("retrain epoch %d: loss %.4f, val %s %.2f%s", epoch + 1, loss, task.metric, val,
                     " (best)" if improved else "")
            progress["epoch"] = epoch + 1
            if env.main:
                if improved:
                    save_pretrained(model, best_dir)
                progress["best"] = max(val, progress["best"] or val)
                state.save(progress, model, optimizer)
            env.barrier()
        progress.update(phase="done", epoch=0)
        if env.main:
            state.save(progress, model, None)
        env.barrier()

    # -- final measurement of the selected compressed model
    final = from_pretrained(best_dir).to(env.device)
    compressed = measure(cfg, task, final, env.device)
    metrics = {
        "task": task.name,
        "metric": task.metric,
        "model": cfg.model.preset or cfg.model.name,
        "dense": progress["dense"],
        "searched": progress["searched"],
        "compressed": compressed,
        "prunable_params": plan.stats.get("prunable_params"),
        "target": upop_cfg.target,
        "achieved": plan.stats.get("achieved"),
        "budget": upop_cfg.budget,
        "wall_time_s": {**progress["wall"], "total": time.time() - started},
        "world_size": env.world,
        "config": cfg.to_dict(),
        "versions": _versions(),
    }
    if env.main:
        report.write_report(out, metrics, plan.to_dict(), structures_before)
        log.info("\n%s", report.format_table(metrics))
        log.info("results in %s", out)
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
