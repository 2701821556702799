"""Experiment tracking for `upop compress`: the run's scalars, config and final numbers sent to
one or more backends (the run config's `log:` section).

    log:
      report_to: [jsonl, tensorboard]   # any of: jsonl, tensorboard, wandb, mlflow
      dir: null                         # default: the run's output_dir
      project: null                     # W&B project / MLflow experiment (default "upop")
      run_name: null                    # default: the output_dir's folder name
      every_n_steps: 10                 # training-step scalars every N optimiser steps

    with make_tracker(["jsonl"], run_dir, "run", config, main=env.main) as tracker:
        tracker.log_scalars({"loss": 0.7, "lr": 1e-4}, step, prefix="search")
        tracker.log_summary({"compressed": {"metric": 41.2, "params": 1.2e7}})

Only the main process logs: the others get a tracker with no backend, which writes nothing.
Where each backend writes, under the tracking folder (`log.dir/<run_name>`, or the output_dir):
  jsonl        metrics.jsonl, one JSON object a line, appended and flushed (no dependency)
  tensorboard  tensorboard/ event files (torch.utils.tensorboard, needs the `tensorboard` package)
  wandb        wandb/, offline unless WANDB_MODE says otherwise (`wandb sync` uploads it later)
  mlflow       mlruns/ (a file: store) unless MLFLOW_TRACKING_URI names another
A rerun into the same folder (a resumed run) appends to the same logs and the same W&B / MLflow
run: their ids are kept in the folder. Non-finite values are logged as they are (NaN is
information; metrics.jsonl writes Python's NaN / Infinity literals). A backend that fails
mid-run is switched off with one warning on the "upop" logger and the others go on: tracking
never ends a run. A backend that cannot start, on the other hand, stops the run at its start
with one line, before any training.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import numbers
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from .files import write_text
from .registry import Registry

log = logging.getLogger("upop")


class TrackingError(ValueError):
    """A tracking setting that cannot be used (unknown backend, package not installed, backend
    that cannot start). Its message names the config key; runconfig turns it into a ConfigError."""


@dataclass
class LogConfig:
    """The run config's `log:` section."""

    report_to: list[str] = field(default_factory=lambda: ["jsonl"])
    dir: str | None = None  # a shared folder for many runs: each run logs to dir/<run_name>
    project: str | None = None  # W&B project / MLflow experiment; default "upop"
    run_name: str | None = None  # default: the output_dir's folder name
    every_n_steps: int = 10  # training-step scalars every N optimiser steps (evaluations always)


class Backend(Protocol):
    """One place the numbers go. Methods may raise: the Tracker catches, warns and disables."""

    def log_scalars(self, values: dict[str, float], step: int) -> None: ...
    def log_config(self, config: dict[str, Any]) -> None: ...
    def log_summary(self, values: dict[str, float], step: int) -> None: ...
    def close(self, failed: bool) -> None: ...


@dataclass(frozen=True)
class BackendEntry:
    factory: Callable[[Path, str, str], Backend]  # (run_dir, run_name, project) -> Backend
    module: str | None = None  # the import it needs; None: no dependency
    package: str | None = None  # what `pip install` needs for it


BACKENDS: Registry[BackendEntry] = Registry("log.report_to backend", TrackingError)


# ---- the backends ------------------------------------------------------------------------------------
class JsonlBackend:
    """metrics.jsonl: {"event": "config"|"scalars"|"summary"|"end", "time": unix seconds, ...}.
    Appended and flushed a line at a time (rewriting the whole file atomically each step would be
    quadratic); a crash can leave at most a torn last line, which read_jsonl skips."""

    FILE = "metrics.jsonl"

    def __init__(self, run_dir: Path, run_name: str, project: str) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / self.FILE
        self.file: IO[str] | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open: one handle per run)
        if self.path.stat().st_size and not _ends_with_newline(self.path):
            self.file.write("\n")  # the torn last line of a killed run stays alone on its line

    def _write(self, record: dict[str, Any]) -> None:
        if self.file is None:
            raise RuntimeError(f"{self.path} is closed")
        self.file.write(json.dumps({**record, "time": round(time.time(), 3)}, default=str) + "\n")
        self.file.flush()

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        self._write({"event": "scalars", "step": step, "values": values})

    def log_config(self, config: dict[str, Any]) -> None:
        self._write({"event": "config", "config": config})

    def log_summary(self, values: dict[str, float], step: int) -> None:
        self._write({"event": "summary", "step": step, "values": values})

    def close(self, failed: bool) -> None:
        if self.file is not None:
            try:
                self._write({"event": "end", "failed": failed})
            finally:
                self.file.close()
                self.file = None


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a torn line (a killed run) is skipped, never guessed at."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class TensorBoardBackend:
    def __init__(self, run_dir: Path, run_name: str, project: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a killed run keeps its curves up to the last log

    def log_config(self, config: dict[str, Any]) -> None:
        text = json.dumps(config, indent=1, default=str)
        # TensorBoard's text tab renders markdown: an indented block shows the JSON as it is
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()))
        self.writer.flush()

    def log_summary(self, values: dict[str, float], step: int) -> None:
        self.log_scalars(values, step)

    def close(self, failed: bool) -> None:
        self.writer.close()


def _persistent_id(path: Path, make: Callable[[], str]) -> str:
    """The id stored at `path`, or a new one written there: a resumed run continues its W&B /
    MLflow run instead of starting another."""
    if path.is_file():
        found = path.read_text(encoding="utf-8").strip()
        if found:
            return found
    new = make()
    write_text(path, new + "\n")
    return new


class WandbBackend:
    def __init__(self, run_dir: Path, run_name: str, project: str) -> None:
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        # offline unless the user asks for another mode: nothing leaves the machine unasked
        mode = os.environ.get("WANDB_MODE") or "offline"
        run_id = _persistent_id(run_dir / "wandb_run_id", lambda: secrets.token_hex(4))
        self.run = wandb.init(project=project, name=run_name, dir=str(run_dir), mode=mode, id=run_id,
                              resume="allow")

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_summary(self, values: dict[str, float], step: int) -> None:
        self.run.summary.update(values)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


_MLFLOW_BAD_CHARS = re.compile(r"[^/\w.\- ]")
_MLFLOW_PARAM_CHARS = 500  # the smallest param-value limit among MLflow servers still in use
_MLFLOW_PARAMS_PER_BATCH = 100
_MLFLOW_METRICS_PER_BATCH = 1000


class MLflowBackend:
    def __init__(self, run_dir: Path, run_name: str, project: str) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow >= 3.7 refuses its file store unless this is set; the file store is what a run
            # folder can hold without a database (an explicit "false" from the user still wins)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
        id_file = run_dir / "mlflow_run_id"
        self.run_id = ""
        if id_file.is_file():
            try:
                self.run_id = self.client.get_run(id_file.read_text(encoding="utf-8").strip()).info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
            except MlflowException:  # another store, or a deleted run: start a new one
                self.run_id = ""
        if not self.run_id:
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            write_text(id_file, self.run_id + "\n")

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(_MLFLOW_BAD_CHARS.sub("_", k), v, stamp, step) for k, v in values.items()]
        for i in range(0, len(metrics), _MLFLOW_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + _MLFLOW_METRICS_PER_BATCH])

    def log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # params cannot change once logged: a resumed run keeps the values it started with
        known = self.client.get_run(self.run_id).data.params
        params = [Param(_MLFLOW_BAD_CHARS.sub("_", k), _short_text(v, _MLFLOW_PARAM_CHARS))
                  for k, v in flatten(config, sep=".").items()]
        params = [p for p in params if p.key not in known]
        for i in range(0, len(params), _MLFLOW_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + _MLFLOW_PARAMS_PER_BATCH])

    def log_summary(self, values: dict[str, float], step: int) -> None:
        self.log_scalars(values, step)

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def _short_text(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


BACKENDS.add("jsonl", BackendEntry(JsonlBackend))
BACKENDS.add("tensorboard", BackendEntry(TensorBoardBackend, "tensorboard", "tensorboard"))
BACKENDS.add("wandb", BackendEntry(WandbBackend, "wandb", "wandb"))
BACKENDS.add("mlflow", BackendEntry(MLflowBackend, "mlflow", "mlflow"))


# ---- validation --------------------------------------------------------------------------------------
def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_backends(report_to: Iterable[str]) -> list[str]:
    """The backend names in order, duplicates dropped; raises TrackingError (one line) for an unknown
    name or one whose package is not installed. Imports nothing: cheap enough for config checks."""
    names: list[str] = []
    for name in report_to:
        entry = BACKENDS[name]  # unknown: "unknown log.report_to backend 'x'; known: jsonl, ..."
        if entry.module is not None and not _installed(entry.module):
            raise TrackingError(f"log.report_to: backend {name!r} needs the {entry.package!r} package, which is "
                                f"not installed: pip install {entry.package}")
        if name not in names:
            names.append(name)
    return names


def check_log_config(cfg: LogConfig) -> None:
    """Every check of the `log:` section; raises TrackingError with one line naming the key."""
    if not isinstance(cfg.report_to, list) or not all(isinstance(n, str) for n in cfg.report_to):
        raise TrackingError(f"config key 'log.report_to' must be a list of backend names "
                            f"(known: {', '.join(BACKENDS.names())})")
    check_backends(cfg.report_to)
    if isinstance(cfg.every_n_steps, bool) or not isinstance(cfg.every_n_steps, int) or cfg.every_n_steps < 1:
        raise TrackingError(f"config key 'log.every_n_steps' must be an integer of at least 1, "
                            f"got {cfg.every_n_steps!r}")
    for key in ("project", "run_name", "dir"):
        value = getattr(cfg, key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise TrackingError(f"config key 'log.{key}' must be a non-empty string or null")
    if cfg.run_name is not None and ("/" in cfg.run_name or "\\" in cfg.run_name or cfg.run_name in (".", "..")):
        raise TrackingError(f"config key 'log.run_name' must be a plain name, not a path: {cfg.run_name!r}")


# ---- values ------------------------------------------------------------------------------------------
def flatten(values: Mapping[str, Any], sep: str = "/", prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a/b": 1}; keys become strings (a latency table keyed by batch size)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, sep, name))
        else:
            out[name] = value
    return out


def _as_float(value: Any) -> float | None:
    """A number (Python, NumPy or 0-d tensor) as a float, NaN and infinity included; else None."""
    if isinstance(value, (str, bytes)) or value is None:
        return None
    if isinstance(value, numbers.Number) and not isinstance(value, numbers.Real):
        return None  # complex
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        return None


# ---- the tracker ---------------------------------------------------------------------------------------
class Tracker:
    """Fans each call out to its backends; a backend that raises is warned about once and dropped.
    A Tracker with no backend (a non-main process, or `report_to: []`) does nothing."""

    def __init__(self, backends: Mapping[str, Backend] | None = None, every_n_steps: int = 1) -> None:
        self.backends: dict[str, Backend] = dict(backends or {})
        self.every_n_steps = max(1, int(every_n_steps))
        self.last_step = 0
        self.closed = False

    @property
    def names(self) -> list[str]:
        """The backends still logging."""
        return list(self.backends)

    def due(self, step: int) -> bool:
        """Whether training-step scalars are logged at `step` (every `every_n_steps`)."""
        return bool(self.backends) and step % self.every_n_steps == 0

    def log_scalars(self, values: Mapping[str, Any], step: int, prefix: str | None = None) -> None:
        """Numbers under `prefix/` (e.g. the phase) at `step`; nested mappings become a/b keys and
        what is not a number is left out."""
        if not self.backends:
            return
        numbers_ = self._numbers(values, prefix)
        if numbers_:
            self.last_step = max(self.last_step, int(step))
            self._each("log_scalars", numbers_, int(step))

    def log_config(self, config: Mapping[str, Any]) -> None:
        if self.backends:
            self._each("log_config", json.loads(json.dumps(config, default=str)))

    def log_summary(self, values: Mapping[str, Any], step: int | None = None) -> None:
        """The final numbers (at the last step logged unless told)."""
        if not self.backends:
            return
        numbers_ = self._numbers(values, None)
        if numbers_:
            self._each("log_summary", numbers_, self.last_step if step is None else int(step))

    def close(self, failed: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        for name in list(self.backends):
            self._call(name, "close", failed)
        self.backends.clear()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(failed=exc_type is not None)

    @staticmethod
    def _numbers(values: Mapping[str, Any], prefix: str | None) -> dict[str, float]:
        out = {}
        for key, value in flatten(values).items():
            number = _as_float(value)
            if number is not None:
                out[f"{prefix}/{key}" if prefix else key] = number
        return out

    def _each(self, method: str, *args: Any) -> None:
        for name in list(self.backends):
            self._call(name, method, *args)

    def _call(self, name: str, method: str, *args: Any) -> None:
        backend = self.backends.get(name)
        if backend is None:
            return
        try:
            getattr(backend, method)(*args)
        except Exception as exc:  # noqa: BLE001 - tracking must never end a run
            self.backends.pop(name, None)
            log.warning("tracking: %s backend failed in %s (%s); it is off for the rest of the run", name,
                        method, _one_line(exc))
            if method != "close":
                with contextlib.suppress(Exception):  # already broken; the warning above says so
                    backend.close(True)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def make_tracker(report_to: Sequence[str], run_dir: str | os.PathLike, run_name: str,
                 config: Mapping[str, Any] | None = None, *, main: bool = True, project: str | None = None,
                 every_n_steps: int = 1) -> Tracker:
    """Start each backend of `report_to` in `run_dir` and log `config`. Not on the main process:
    a tracker that does nothing. Raises TrackingError (one line) for an unknown backend, a missing
    package, or a backend that cannot start; the ones already started are closed first."""
    names = check_backends(report_to)
    if not main:
        return Tracker(every_n_steps=every_n_steps)
    run_dir = Path(run_dir).expanduser()
    started: dict[str, Backend] = {}
    for name in names:
        try:
            started[name] = BACKENDS[name].factory(run_dir, run_name, project or "upop")
        except Exception as exc:
            for backend in started.values():
                with contextlib.suppress(Exception):  # the error below is the one to report
                    backend.close(True)
            raise TrackingError(f"log.report_to: backend {name!r} could not start in {run_dir}: "
                                f"{_one_line(exc)}") from exc
    tracker = Tracker(started, every_n_steps)
    if config is not None:
        tracker.log_config(config)
    return tracker


def tracker_from_config(cfg: LogConfig, output_dir: str | os.PathLike, config: Mapping[str, Any] | None = None,
                        *, main: bool = True) -> Tracker:
    """make_tracker for a run config's `log:` section: logs go to the output_dir, or to
    `log.dir/<run_name>` when a folder shared by several runs is named."""
    output_dir = Path(output_dir).expanduser()
    run_name = cfg.run_name or output_dir.resolve().name or "upop"
    run_dir = Path(cfg.dir).expanduser() / run_name if cfg.dir else output_dir
    return make_tracker(cfg.report_to, run_dir, run_name, config, main=main, project=cfg.project,
                        every_n_steps=cfg.every_n_steps)
