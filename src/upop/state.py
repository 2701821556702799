"""The state of a run in its output folder: the exclusive lock, the progress record and the
resumable checkpoints in `<output_dir>/state`, and the check that a folder holding a finished
run is not replaced by a run of another configuration.

A checkpoint is a folder `state/<phase>-<epoch>` (weights and search as safetensors, the optimizer
through torch.save / torch.load(weights_only=True)), swapped in whole; progress.json, which names
it, is replaced after it; older folders are removed last. A run killed at any moment resumes from
a complete checkpoint. Every file goes through upop.files, and no weights that hold NaN or
infinity are ever saved.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from .files import atomic_folder, check_finite, write_json, write_text
from .latency import LatencyModel
from .plan import PlanError, PruningPlan
from .runconfig import ConfigError, RunConfig
from .search import UPopSearch
from .training import PHASES, Dist

PROGRESS = "progress.json"
MODEL = "model.safetensors"
OPTIMIZER = "optimizer.pt"
SEARCH = "search.safetensors"
TASK = "task.safetensors"  # what a task keeps outside the model (e.g. a momentum copy and its queue)
PLAN = "plan.json"
DENSE = "dense"  # state/dense/model.safetensors: the dense model, for the final side-by-side timing
LATENCY = "latency.json"  # upop.budget latency: the tables the search cut on (LatencyModel.to_dict)
# what a run writes at the top of its output folder (replaced together by overwrite=True);
# metrics.json comes last: it marks a finished run
PRODUCTS = ("metrics.json", "report.md", "kept_widths.png", PLAN, "model", "state",
            # upop.tracking's logs when log.dir is unset: the replaced run's curves are not continued
            "metrics.jsonl", "tensorboard", "wandb", "wandb_run_id", "mlruns", "mlflow_run_id")


class OutputDirBusyError(ConfigError):
    """Another process holds the output folder's lock."""


def require_finite(model: nn.Module, what: str) -> None:
    """NonFiniteWeightsError naming `what` (e.g. "retrain epoch 2") and the first bad tensor; nothing is written."""
    check_finite(model.state_dict(), what)


def config_hash(cfg: RunConfig | dict[str, Any]) -> str:
    """What identifies a run's training: its config less output_dir, eval and log (measuring or
    tracking differently does not change the run; `log` is dropped, not blanked, so the hash of a
    run recorded before the section existed is unchanged), and less `distill` while it is off (the
    same reason: a run without distillation keeps the hash it had before the section existed)."""
    relevant = dict(cfg.to_dict() if isinstance(cfg, RunConfig) else cfg)
    relevant.pop("output_dir", None)
    relevant.pop("log", None)
    if not (relevant.get("distill") or {}).get("enabled"):
        relevant.pop("distill", None)
    relevant["eval"] = None
    return hashlib.sha1(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- the lock ----------------------------------------------------------------------------------------
class OutputLock:
    """fcntl.flock on `<folder>/.lock` for the whole run; the file holds the holder's PID.

    The lock file is written in place, not through upop.files: replacing it would give the next
    process another file to lock. The kernel drops the lock when its holder dies, however it dies.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise OutputDirBusyError(f"{self.path.parent} is in use by another upop run (pid {holder}); wait for "
                                     "it to end or choose another output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextmanager
def claim_output_dir(out: Path, cfg: RunConfig, env: Dist, *, overwrite: bool = False) -> Iterator[dict | None]:
    """Hold `out`'s lock (rank 0) for the block; yield the metrics of the identical finished run, or None.

    Rank 0 decides under the lock (finished_run) and every rank follows, so all stop together."""
    lock, verdict, error = OutputLock(out), None, None
    try:
        if env.main:
            try:
                lock.acquire()
                verdict = ("ok", finished_run(out, cfg, overwrite))
            except ConfigError as exc:
                verdict, error = ("error", str(exc)), exc
        verdict = env.agree(verdict)
        if error is not None or verdict[0] == "error":
            raise error or ConfigError(verdict[1])
        yield verdict[1]
    finally:
        lock.release()


# ---- a finished run ------------------------------------------------------------------------------------
def finished_run(out: Path, cfg: RunConfig, overwrite: bool = False) -> dict[str, Any] | None:
    """The metrics of the identical finished run in `out` (nothing left to do), or None (run).

    A finished run of another configuration is never replaced unless `overwrite`, which removes
    every product of the earlier run first. Call it under the output lock.
    """
    if overwrite:
        for name in PRODUCTS:  # metrics.json first: a half-removed folder is no longer "finished"
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        for path in out.glob("plan.rank*.json"):
            path.unlink()
        return None
    path = out / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
        earlier = metrics.get("config_hash") or config_hash(metrics["config"])
        measured = metrics["config"]["eval"]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise ConfigError(f"{path} is damaged; delete it to measure the run again, or pass --overwrite "
                          "to start over") from None
    if earlier != config_hash(cfg):
        raise ConfigError(f"{out} holds a finished run of another configuration (config {earlier}, this one "
                          f"{config_hash(cfg)}); choose another output_dir or pass --overwrite to replace it")
    same_eval = measured == json.loads(json.dumps(cfg.to_dict()["eval"]))  # as JSON stores it
    return metrics if same_eval and (out / "model").is_dir() else None


# ---- progress ----------------------------------------------------------------------------------------
@dataclass
class Progress:
    """Where a run stands: the phase running and the epochs it finished, what earlier phases measured."""

    phase: str = "dense"
    epoch: int = 0  # finished epochs of `phase`
    dense: dict[str, Any] | None = None  # the dense model measured (metric, params, FLOPs, latency)
    searched: dict[str, Any] | None = None  # the compressed model before retraining
    best: float | None = None  # the best validation metric of the retraining so far
    wall: dict[str, float] = field(default_factory=dict)  # seconds per phase

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Progress:
        names = {f.name for f in dataclasses.fields(cls)}
        progress = cls(**{k: v for k, v in data.items() if k in names})
        ok = (progress.phase in PHASES and isinstance(progress.epoch, int) and progress.epoch >= 0
              and isinstance(progress.wall, dict) and all(isinstance(v, (dict, type(None)))
                                                          for v in (progress.dense, progress.searched))
              and (progress.best is None or isinstance(progress.best, (int, float))))
        if not ok:
            raise ValueError("fields out of range")
        return progress


class RunState:
    """Checkpoints of a run in `<output_dir>/state`, and what later phases need of earlier ones:
    the dense model (state/dense, written once at the end of the dense phase), the plan, and the
    latency tables of a latency budget."""

    def __init__(self, folder: Path, config_hash: str) -> None:
        self.folder = folder
        self.config_hash = config_hash
        self.checkpoint: Path | None = None

    def damaged(self, path: Path, problem: str) -> ConfigError:
        return ConfigError(f"{path}: {problem}; to start over delete {self.folder} or pass --overwrite")

    def progress(self) -> Progress | None:
        """The progress of the run to resume (None: nothing to resume); checks what it names exists."""
        path = self.folder / PROGRESS
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(record, dict):
                raise ValueError("not an object")
            if record.get("config_hash") != self.config_hash:
                raise ConfigError(f"{self.folder.parent} holds a run of another configuration (config "
                                  f"{record.get('config_hash')}, this one {self.config_hash}); choose another "
                                  f"output_dir, delete {self.folder} or pass --overwrite")
            progress = Progress.from_dict(record)
            name = str(record["checkpoint"])
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise self.damaged(path, "is corrupted") from None
        checkpoint = self.folder / name
        if not checkpoint.is_dir():
            raise self.damaged(path, f"names checkpoint {name!r}, which is missing")
        needed = [checkpoint / MODEL] + [checkpoint / OPTIMIZER] * (progress.epoch > 0 and progress.phase != "done")
        needed += [checkpoint / SEARCH] * (progress.epoch > 0 and progress.phase == "search")
        needed += [self.folder / PLAN] * (progress.phase in ("retrain", "done"))
        needed += [self.folder / DENSE / MODEL] * (progress.phase != "dense")
        for file in needed:
            if not file.is_file():
                raise self.damaged(file, "is missing")
        self.checkpoint = checkpoint
        return progress

    def save(self, progress: Progress, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
             search: UPopSearch | None = None, *, what: str, extra: dict[str, torch.Tensor] | None = None) -> None:
        """Write a checkpoint, then progress.json naming it. `what` names the save in a refusal."""
        require_finite(model, what)
        name = f"{progress.phase}-{progress.epoch}"
        target = self.folder / name
        shutil.rmtree(target, ignore_errors=True)  # an earlier attempt, never the checkpoint progress names
        with atomic_folder(target) as staging:
            save_model(model, str(staging / MODEL))
            if optimizer is not None:
                torch.save(optimizer.state_dict(), staging / OPTIMIZER)
            if search is not None:
                save_file({k: v.contiguous() for k, v in search.state_dict().items()}, str(staging / SEARCH))
            if extra:
                check_finite(extra, f"{what}: the task's state")
                save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, str(staging / TASK))
        write_json(self.folder / PROGRESS, {**dataclasses.asdict(progress), "config_hash": self.config_hash,
                                            "checkpoint": name})
        self.checkpoint = target
        for old in self.folder.iterdir():  # only now is the previous checkpoint unneeded
            if old.is_dir() and old != target and old.name != DENSE:
                shutil.rmtree(old, ignore_errors=True)

    def save_plan(self, plan: PruningPlan) -> None:
        write_text(self.folder / PLAN, plan.to_json())

    def save_dense(self, model: nn.Module) -> None:
        require_finite(model, "the dense model")
        with atomic_folder(self.folder / DENSE) as staging:
            save_model(model, str(staging / MODEL))

    def load_dense(self, model: nn.Module) -> nn.Module:
        """`model` (a fresh one of the dense architecture) with the dense weights of this run."""
        path = self.folder / DENSE / MODEL
        try:
            load_model(model, str(path))
        except Exception as exc:
            raise self.damaged(path, f"cannot be loaded ({_first_line(exc)})") from None
        return model

    def save_latency(self, lm: LatencyModel) -> LatencyModel:
        write_json(self.folder / LATENCY, lm.to_dict())
        return lm

    def shared_latency(self, env: Dist, build: Callable[[], LatencyModel]) -> LatencyModel:
        """upop.budget latency: the tables built once on rank 0 (kept here for a resumed search and the
        final report) and the same on every rank, so all cut on the same numbers."""
        lm = (self.latency() or self.save_latency(build())) if env.main else None
        return LatencyModel.from_dict(env.agree(lm.to_dict() if lm else None))

    def latency(self, required: bool = False) -> LatencyModel | None:
        """The latency tables saved by save_latency; None when there are none (unless `required`)."""
        path = self.folder / LATENCY
        if not path.is_file():
            if required:
                raise self.damaged(path, "is missing (upop.budget latency)")
            return None
        try:
            return LatencyModel.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise self.damaged(path, _first_line(exc)) from None

    def _file(self, name: str) -> Path:
        if self.checkpoint is None:
            raise RuntimeError("RunState.progress() names the checkpoint to load; call it first")
        return self.checkpoint / name

    # every failure reading our own files means they are damaged (torch.load raises many types)
    def load_model(self, model: nn.Module) -> None:
        path = self._file(MODEL)
        try:
            load_model(model, str(path))
        except Exception as exc:
            raise self.damaged(path, f"cannot be loaded ({_first_line(exc)})") from None

    def load_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        path = self._file(OPTIMIZER)
        try:
            optimizer.load_state_dict(torch.load(path, weights_only=True))
        except Exception as exc:
            raise self.damaged(path, f"cannot be loaded ({_first_line(exc)})") from None

    def load_search(self, search: UPopSearch) -> None:
        path = self._file(SEARCH)
        try:
            search.load_state_dict(load_file(str(path)))
        except Exception as exc:
            raise self.damaged(path, f"cannot be loaded ({_first_line(exc)})") from None

    def load_extra(self) -> dict[str, torch.Tensor]:
        """The task's own state saved with the checkpoint ({} when it kept none)."""
        path = self._file(TASK)
        if not path.is_file():
            return {}
        try:
            return load_file(str(path))
        except Exception as exc:
            raise self.damaged(path, f"cannot be loaded ({_first_line(exc)})") from None

    def plan(self) -> PruningPlan:
        try:
            return PruningPlan.load(self.folder / PLAN)
        except PlanError as exc:
            raise self.damaged(self.folder / PLAN, _first_line(exc)) from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__
