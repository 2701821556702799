"""`upop evaluate`: a model folder on a run config's task and data.

The folder is either one written by `upop.save_pretrained` (compressed or dense) or a dense
Hugging Face folder (config.json + safetensors weights). The model is checked against the task
(its `check_model`, and the number of classes against the data) before any evaluation; the
results go to `<model>/evaluate.json` (or `--output`) through the one atomic writer, and the
log goes to stderr only: evaluating never writes into the run folder of the config.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import META_FILE, PLAN_FILE, CheckpointError, from_pretrained
from .files import write_json
from .measure import measure  # the one implementation, shared with the compress pipeline
from .runconfig import ConfigError, RunConfig

log = logging.getLogger("upop")
RESULT_FILE = "evaluate.json"


# ---- the model folder -----------------------------------------------------------------------------
def model_kind(folder: Path) -> str:
    """"upop" (upop.save_pretrained) or "dense" (a Hugging Face folder); one line otherwise."""
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    if (folder / META_FILE).exists() or (folder / PLAN_FILE).exists():
        return "upop"
    if (folder / "config.json").is_file():
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.safetensors.index.json")):
            raise CheckpointError(f"{folder} has no safetensors weights (model.safetensors); upop does not read "
                                  "pickled weights (pytorch_model.bin): convert them with safetensors first")
        return "dense"
    raise CheckpointError(f"{folder} is neither a upop model folder ({META_FILE}) nor a Hugging Face one "
                          "(config.json + model.safetensors)")


def load_dense(folder: Path) -> nn.Module:
    """A Hugging Face folder through its own class's from_pretrained: local files, safetensors
    only, and a class of transformers or of this project named by config.json, so no code of the
    folder runs (its auto_map is never read)."""
    import transformers

    from .registry import architecture  # project-built classes (NLVR2, Segmenter), by name

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{folder / 'config.json'} cannot be read: {str(exc)[:200]}") from None
    names = config.get("architectures") if isinstance(config, dict) else None
    name = names[0] if isinstance(names, list) and names and isinstance(names[0], str) else None
    cls = (architecture(name) or getattr(transformers, name, None)) if name else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"{folder / 'config.json'}: architectures {str(names)[:80]} names no transformers "
                              "model class")
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                          output_loading_info=True)
    except (OSError, ValueError, RuntimeError, TypeError) as exc:  # transformers raises several types
        raise CheckpointError(f"{folder}: cannot load {name}: {str(exc).strip().splitlines()[0][:200]}") from None
    missing = list(info.get("missing_keys") or []) + [k for k, *_ in info.get("mismatched_keys") or []]
    if missing:  # from_pretrained would evaluate random weights for these
        raise CheckpointError(f"{folder}: the weights do not fit {name}: {len(missing)} tensors missing or "
                              f"of another shape, e.g. {sorted(missing)[0]!r}")
    return model.eval()


# ---- checks ---------------------------------------------------------------------------------------
def label_count(model: nn.Module) -> int | None:
    """Classes a classifier (or segmenter) predicts: transformers' num_labels, timm's num_classes."""
    if isinstance(getattr(model, "num_classes", None), int):
        return model.num_classes
    labels = getattr(getattr(model, "config", None), "num_labels", None)
    return labels if isinstance(labels, int) else None


def check_fits(task: Any, model: nn.Module, folder: Path) -> None:
    """One line when the model is not one of this task or predicts another number of classes."""
    check = getattr(task, "check_model", None)
    if callable(check):
        try:
            check(model)
        except ConfigError as exc:
            raise ConfigError(f"{folder}: {exc}") from None
    classes = getattr(task, "classes", None)
    expected = getattr(task, "num_labels", None) or (len(classes) if classes else None)
    got = label_count(model)
    if expected and got and got != expected:
        raise ConfigError(f"{folder}: the model predicts {got} classes, the {task.cfg.data.format} data of "
                          f"task {task.cfg.task} has {expected}")


def output_path(folder: Path, output: str | os.PathLike | None) -> Path:
    """Where the results go, checked to be writable before the long work."""
    path = Path(output).expanduser() if output else folder / RESULT_FILE
    if path.is_dir():
        raise ConfigError(f"--output {path} is a directory; give a file name, e.g. {path / RESULT_FILE}")
    # never onto the model's own files (weights, plan, config), however the path reaches them (.., links)
    if path.resolve() != (folder / RESULT_FILE).resolve() and path.resolve().is_relative_to(folder.resolve()):
        raise ConfigError(f"--output {path} is inside the model folder {folder}; only its {RESULT_FILE} is "
                          "written there: give a file outside it")
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        hint = "" if output else "; give --output FILE elsewhere"
        raise ConfigError(f"cannot write {path}: {parent} is not writable{hint}")
    return path


# ---- measuring ------------------------------------------------------------------------------------
@contextlib.contextmanager
def progress_bars(desc: str) -> Iterator[None]:
    """A progress bar on stderr for every DataLoader iterated inside the block. The tasks iterate
    their own loaders; wrapping DataLoader.__iter__ for the block shows their progress without
    each task knowing about it."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    original = DataLoader.__iter__

    def with_bar(loader: DataLoader) -> Iterator[Any]:
        try:
            total = len(loader)
        except TypeError:  # an iterable dataset
            total = None
        return iter(tqdm(original(loader), total=total, desc=desc, unit="batch", file=sys.stderr, leave=False))

    DataLoader.__iter__ = with_bar  # type: ignore[method-assign]
    try:
        yield
    finally:
        DataLoader.__iter__ = original  # type: ignore[method-assign]


def _log_to_stderr() -> None:
    log.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def run_evaluate(cfg: RunConfig, model_dir: str | os.PathLike, split: str = "test",
                 output: str | os.PathLike | None = None) -> dict[str, Any]:
    """Evaluate the model of `model_dir` on the run config's `split`; write and return the results."""
    from .tasks import make_task

    start = time.perf_counter()
    _log_to_stderr()
    folder = Path(model_dir).expanduser()
    if split not in ("val", "test"):
        raise ConfigError(f"split must be val or test, got {split!r}")
    kind = model_kind(folder)  # the folder and the destination are checked before anything is loaded
    path = output_path(folder, output)
    log.info("loading %s (%s)", folder, "upop folder" if kind == "upop" else "dense Hugging Face folder")
    model = from_pretrained(folder) if kind == "upop" else load_dense(folder)
    log.info("reading the %s data of task %s", cfg.data.format, cfg.task)
    task = make_task(cfg)
    check_fits(task, model, folder)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log.info("evaluating %s on the %s split (%s)", type(model).__name__, split, device)
    with progress_bars(f"evaluate {split}"):
        result = measure(cfg, task, model.to(device), device, split)
    import transformers

    result = {"model": str(folder), "kind": kind, "model_class": type(model).__name__, "task": cfg.task,
              "split": split, "metric_name": task.metric, **result,
              "seconds": round(time.perf_counter() - start, 2),
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__}}
    write_json(path, result)
    result["written"] = str(path)
    return result


def format_table(result: dict[str, Any]) -> str:
    """The results as aligned lines: model, task, every metric, params, FLOPs, latency."""
    rows = [("model", f"{result['model']} ({result['model_class']}, "
                      f"{'upop' if result['kind'] == 'upop' else 'dense Hugging Face'} folder)"),
            ("task", f"{result['task']}, {result['split']} split")]
    for i, (name, value) in enumerate(result["metrics"].items()):
        mark = "  <- the task's metric" if name == result["metric_name"] else ""
        rows.append(("metrics" if i == 0 else "", f"{name:16s} {_number(value)}{mark}"))
    rows.append(("params", f"{result['params'] / 1e6:.2f}M"))
    rows.append(("FLOPs", f"{result['flops'] / 1e9:.3f} G (batch 1)"))
    latency = result.get("latency_ms")
    rows.append(("CPU latency", ", ".join(f"{k.replace('batch', 'batch ')}: {v:.2f} ms" for k, v in latency.items())
                 if latency else "not measured (eval.skip_latency)"))
    if result.get("written"):
        rows.append(("written", result["written"]))
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(f"{k:{width}s}{v}" for k, v in rows)


def print_table(result: dict[str, Any]) -> None:
    print(format_table(result))


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 and value else f"{value:.2f}"
    return str(value)
