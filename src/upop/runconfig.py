"""The run configuration of `upop compress` / `upop evaluate`: YAML -> validated dataclasses.

Every key is checked: an unknown key, a wrong type or a value out of range stops the run with
one line naming the key, before any model is built or data is read. The shared sections (model,
data, upop, train, eval) are here; each task's own section (YAML key = the task's name, e.g.
`caption:`) is the `Options` dataclass of its task module, found in the task registry, and lands
in `RunConfig.task_options`. The known tasks and data formats come from their registries
(`upop.tasks.TASKS`, `upop.data.formats.FORMATS`), never from a list kept here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from .config import UPopConfig
from .data._common import BAD_INPUT_MODES
from .distill import ONE_FORWARD, DistillOptions, refusal
from .tracking import LogConfig, TrackingError, check_log_config


class ConfigError(ValueError):
    """A run configuration that cannot be used."""


@dataclass
class ModelConfig:
    preset: str | None = None  # a named preset built from a config (see upop.models.PRESETS)
    name: str | None = None  # a Hugging Face name or a local folder; nlvr / segmentation: also an official .pth
    # a tokenizer folder (BERT's or BLIP's vocabulary) for a model.name that holds none (official .pth files)
    tokenizer: str | None = None
    allow_download: bool = False  # hub names are fetched only when the user asks for it
    num_labels: int | None = None  # classification: taken from the data when unset


@dataclass
class DataConfig:
    format: str = "openmoji"  # a name of upop.data.formats.FORMATS; each task says which it reads
    # image root (karpathy), the folder relative data.train / val / test folders are in (imagefolder),
    # the dataset folder (hf_datasets), cache (openmoji)
    root: str | None = None
    # karpathy annotation files, or imagefolder split folders; vqav2: also a list of files (VQAv2
    # questions, BLIP-style JSON lists such as vg_qa.json), read as one training set
    train: str | list[str] | None = None
    val: str | None = None
    test: str | None = None
    image_size: int = 64
    max_tokens: int = 24
    limit_train: int | None = None  # use only the first N training examples (quick runs, tests)
    limit_eval: int | None = None
    num_workers: int = 0
    # what a missing image file, an empty caption or an image that fails to decode does:
    # "stop" ends the run with one line naming the file (and entry); "skip" drops the example,
    # counts it and logs the count and the first paths on the "upop" logger
    on_bad_input: str = "stop"
    image_column: str = "image"  # hf_datasets: the column of images (datasets.Image)
    label_column: str = "label"  # hf_datasets, classification: ClassLabel or integer class ids
    text_column: str = "caption"  # hf_datasets, retrieval: a caption, or a list of captions per image
    image_id_column: str | None = None  # hf_datasets, retrieval: groups the rows of one image's captions
    # hf_datasets: run split -> the dataset's split name, e.g. {train: train, val: validation, test: test}
    # (unset: train, validation or val, test)
    splits: dict[str, str] = field(default_factory=dict)
    # your own image transforms, "package.module:name" of a callable PIL image -> tensor (3, size, size)
    # (classification, retrieval); unset: the task's transforms (train.augment, train.eval_crop)
    train_transform: str | None = None
    eval_transform: str | None = None  # the same for evaluation (val, test): "package.module:name"


@dataclass
class TrainConfig:
    batch_size: int = 64
    eval_batch_size: int = 128
    dense_epochs: int = 0  # train the dense model first (towers without pretrained weights)
    search_epochs: int = 1
    retrain_epochs: int = 1
    dense_lr: float = 3e-4
    search_lr: float = 1e-4  # constant during the search, as in the paper
    lr: float = 1e-4  # retraining: cosine decay to min_lr
    min_lr: float = 0.0
    warmup_steps: int = 0  # linear warmup of dense training and retraining
    # learning-rate multipliers by parameter-name prefix, e.g. {text_model: 0.1} for a pretrained tower
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16
    max_steps_per_epoch: int | None = None  # cap (quick runs and tests)
    # optimiser and schedule (upop.optim): adamw | sgd (nesterov, momentum); cosine | poly | constant
    optimizer: str = "adamw"
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"  # dense training and retraining; the search is always constant
    poly_power: float = 0.9  # schedule poly: (1 - step/total)^power, per step (Segmenter)
    # augmentation and regularisation (upop.augment); the defaults keep each task's plain transforms
    augment: str = "none"  # none | blip | deit
    eval_crop: float = 1.0  # deit-style evaluation: resize to size/eval_crop, centre crop size (0.875)
    random_erasing: float = 0.0  # augment deit: probability of timm's RandomErasing
    mixup: float = 0.0  # classification: timm Mixup alpha (0: off)
    cutmix: float = 0.0  # classification: timm CutMix alpha (0: off)
    drop_path: float = 0.0  # stochastic depth of the vision tower, rising linearly over the depth to this


@dataclass
class EvalConfig:
    latency_batches: list[int] = field(default_factory=lambda: [1, 32])
    latency_repeats: int = 10
    skip_latency: bool = False


def _upop_section() -> type:
    """UPopSection: UPopConfig's fields except total_steps (derived from the data), same types and
    defaults; built from the dataclass so that no default is written twice."""
    hints = get_type_hints(UPopConfig)
    specs = [(f.name, hints[f.name], field(default=f.default)) for f in dataclasses.fields(UPopConfig)
             if f.name != "total_steps"]
    return dataclasses.make_dataclass("UPopSection", specs, namespace={
        "__doc__": "The run config's `upop:` section: UPopConfig's fields except total_steps.",
        "__module__": __name__,
        # mapping-style reads, for callers written when this section was a dict
        "get": lambda self, key, default=None: getattr(self, key, default),
        "items": lambda self: dataclasses.asdict(self).items(),
    })


UPopSection = _upop_section()


@dataclass
class RunConfig:
    task: str = "retrieval"  # retrieval | classification | caption | vqa | nlvr | segmentation
    seed: int = 0
    output_dir: str = "runs/upop"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    upop: UPopSection = field(default_factory=UPopSection)  # UPopConfig's fields except total_steps
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)  # experiment tracking (upop.tracking)
    distill: DistillOptions = field(default_factory=DistillOptions)  # the dense model as teacher (upop.distill)
    # the task's own section (YAML key: the task's name), an instance of its task's `Options`
    task_options: Any = None

    def upop_config(self, total_steps: int) -> UPopConfig:
        return UPopConfig(**dataclasses.asdict(self.upop), total_steps=max(1, total_steps))

    def to_dict(self) -> dict[str, Any]:
        """As the YAML reads: the task's section under the task's name."""
        out = dataclasses.asdict(self)
        options = out.pop("task_options")
        if options:
            out[self.task] = options
        return out


# keys that moved to their task's section: one line tells where
MOVED = {
    "eval.k_test": "retrieval.k_test",
    "eval.num_beams": "caption.num_beams",
    "eval.max_new_tokens": "caption.max_new_tokens",
    "eval.min_new_tokens": "caption.min_new_tokens",
    "data.prompt": "caption.prompt",
    "eval.k_answers": "vqa.k_answers",
    "data.answer_list": "vqa.answer_list",
    "eval.multiscale": "segmentation.multiscale",
}
MAX_IMAGE_SIZE = 8192
MAX_WORKERS = 256
MAX_GRAD_ACCUM = 4096
MAX_LATENCY_BATCH = 65536
MAX_SEED = 2**63 - 1  # torch.manual_seed's range


def _tasks() -> Any:
    """The task registry (imported here, not at the top: the task modules import this one)."""
    from .tasks import TASKS

    return TASKS


def _formats() -> Any:
    from .data.formats import FORMATS

    return FORMATS

# values quoted in error messages are shortened: a YAML alias bomb would otherwise make repr() run forever
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 80, 80, 40
_REPR.maxlist = _REPR.maxdict = _REPR.maxtuple = _REPR.maxset = 6


def _short(value: Any) -> str:
    try:
        return _REPR.repr(value)
    except Exception:  # a value whose repr itself fails
        return f"<{type(value).__name__}>"


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix or 'top level'}' must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)} - {"task_options"}
    values = {}
    if cls is RunConfig:
        task = data.get("task", RunConfig.task)
        tasks = _tasks()
        task_cls = tasks.get(task) if isinstance(task, str) else None
        if task_cls is not None:
            values["task_options"] = _build(task_cls.Options, data.get(task) or {}, task)
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if path in MOVED:
            raise ConfigError(f"{path} moved to {MOVED[path]}")
        if path == "upop.total_steps":
            raise ConfigError("upop.total_steps is derived from train.search_epochs and the data; remove it")
        if cls is RunConfig and key in _tasks():
            if key != data.get("task", RunConfig.task):
                raise ConfigError(f"config section '{key}' belongs to task {key}; the task is "
                                  f"{_short(data.get('task', RunConfig.task))}")
            continue  # built above
        if key not in known:
            raise ConfigError(f"config key '{path}' does not exist (known: {', '.join(sorted(known))})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = _build(hint, value, path)
        else:
            values[key] = _check_type(value, hint, path)
    return cls(**values)


def _check_type(value: Any, hint: Any, path: str) -> Any:
    args = [a for a in get_args(hint) if a is not type(None)]
    optional = type(None) in get_args(hint)
    base = args[0] if optional and len(args) == 1 else hint
    origin = get_origin(base) or base
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key '{path}' must not be empty")
    if origin is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{path}' must be true or false, got {_short(value)}")
    if origin is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer beyond the float range
                raise ConfigError(f"config key '{path}' is out of range: {_short(value)}") from None
        raise ConfigError(f"config key '{path}' must be a number, got {_short(value)}")
    if origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{path}' must be an integer, got {_short(value)}")
    if origin is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{path}' must be a string, got {_short(value)}")
    if origin is list:
        item = (get_args(base) or (int,))[0]
        def ok(v: Any) -> bool:
            return isinstance(v, str) if item is str else isinstance(v, int) and not isinstance(v, bool)

        if isinstance(value, list) and all(ok(v) for v in value):
            return value
        raise ConfigError(f"config key '{path}' must be a list of {'strings' if item is str else 'integers'}, "
                          f"got {_short(value)}")
    if origin in (Union, UnionType):  # such as str | list[str]: the first alternative the value fits
        for alternative in args:
            with contextlib.suppress(ConfigError):
                return _check_type(value, alternative, path)
        names = " or ".join("a list" if get_origin(a) is list else getattr(a, "__name__", str(a)) for a in args)
        raise ConfigError(f"config key '{path}' must be {names}, got {_short(value)}")
    if origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"config key '{path}' must be a mapping, got {_short(value)}")
    raise ConfigError(f"config key '{path}' has a value of the wrong type: {_short(value)}")


def validate(cfg: RunConfig) -> RunConfig:
    """Every check that needs no data and no model; the task checks the rest (its data files, the
    model's label count and position table) before any training starts."""
    def bad(msg: str) -> None:
        raise ConfigError(msg)

    tasks, formats = _tasks(), _formats()
    if cfg.task not in tasks:
        bad(f"task must be one of {', '.join(tasks.names())}, got {_short(cfg.task)}")
    if cfg.data.format not in formats:
        bad(f"data.format must be one of {', '.join(formats.names())}, got {_short(cfg.data.format)}")
    if (cfg.model.preset is None) == (cfg.model.name is None):
        bad("give exactly one of model.preset and model.name")
    if cfg.model.num_labels is not None and cfg.model.num_labels < 1:
        bad("model.num_labels must be >= 1")
    if not 0 <= cfg.seed <= MAX_SEED:
        bad(f"seed must be in [0, 2**63 - 1] (torch.manual_seed's range), got {_short(cfg.seed)}")
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        bad(f"output_dir {cfg.output_dir!r} is an existing file, not a folder")
    t = cfg.train
    for key in ("batch_size", "eval_batch_size", "grad_accum"):
        if getattr(t, key) < 1:
            bad(f"train.{key} must be >= 1")
    if t.grad_accum > MAX_GRAD_ACCUM:
        bad(f"train.grad_accum must be <= {MAX_GRAD_ACCUM}, got {t.grad_accum}")
    for key in ("dense_epochs", "search_epochs", "retrain_epochs"):
        if getattr(t, key) < 0:
            bad(f"train.{key} must be >= 0")
    if t.search_epochs < 1:
        bad("train.search_epochs must be >= 1 (the search needs steps)")
    for key in ("dense_lr", "search_lr", "lr"):
        value = getattr(t, key)
        if not (math.isfinite(value) and value > 0):
            bad(f"train.{key} must be a finite number > 0, got {_short(value)}")
    for key in ("min_lr", "weight_decay"):
        value = getattr(t, key)
        if not (math.isfinite(value) and value >= 0):
            bad(f"train.{key} must be a finite number >= 0, got {_short(value)}")
    for key in ("lr", "dense_lr"):  # the schedules decay from the rate to min_lr, never rise to it
        if t.min_lr > getattr(t, key) and (key == "lr" or t.dense_epochs > 0):
            bad(f"train.min_lr ({_short(t.min_lr)}) must not exceed train.{key} ({_short(getattr(t, key))})")
    for prefix, factor in t.lr_multipliers.items():
        if not isinstance(prefix, str):
            bad(f"train.lr_multipliers keys must be parameter-name prefixes (strings), got {_short(prefix)}")
        if (isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor)
                or not factor > 0):
            bad(f"train.lr_multipliers.{prefix} must be a finite number > 0, got {_short(factor)}")
    if t.warmup_steps < 0:
        bad("train.warmup_steps must be >= 0")
    if not 0 <= t.label_smoothing < 1:  # NaN fails too
        bad(f"train.label_smoothing must be in [0, 1), got {_short(t.label_smoothing)}")
    if t.mixed_precision not in ("no", "fp16", "bf16"):
        bad(f"train.mixed_precision must be no, fp16 or bf16, got {_short(t.mixed_precision)}")
    if t.max_steps_per_epoch is not None and t.max_steps_per_epoch < 0:
        bad("train.max_steps_per_epoch must be >= 0")
    choices = {"optimizer": ("adamw", "sgd"), "schedule": ("cosine", "poly", "constant"),
               "augment": ("none", "blip", "deit")}
    for key, allowed in choices.items():
        if getattr(t, key) not in allowed:
            bad(f"train.{key} must be {', '.join(allowed[:-1])} or {allowed[-1]}, got {_short(getattr(t, key))}")
    if not 0 <= t.momentum < 1:
        bad(f"train.momentum must be in [0, 1), got {_short(t.momentum)}")
    if not (math.isfinite(t.poly_power) and t.poly_power > 0):
        bad(f"train.poly_power must be a finite number > 0, got {_short(t.poly_power)}")
    if not 0 < t.eval_crop <= 1:
        bad(f"train.eval_crop must be in (0, 1], got {_short(t.eval_crop)}")
    for key in ("random_erasing", "drop_path"):
        if not 0 <= getattr(t, key) < 1:
            bad(f"train.{key} must be in [0, 1), got {_short(getattr(t, key))}")
    for key in ("mixup", "cutmix"):
        if not (math.isfinite(getattr(t, key)) and getattr(t, key) >= 0):
            bad(f"train.{key} must be a finite number >= 0, got {_short(getattr(t, key))}")
    d = cfg.data
    if not 8 <= d.image_size <= MAX_IMAGE_SIZE:
        bad(f"data.image_size must be in [8, {MAX_IMAGE_SIZE}], got {d.image_size}")
    if d.max_tokens < 4:
        bad("data.max_tokens must be >= 4")
    if cfg.data.format in formats:
        for key in ("train", "val", "test"):
            value = getattr(d, key)
            if isinstance(value, list):
                if key not in formats[d.format].lists:
                    bad(f"data.{key} takes one path for data.format {d.format}, not a list")
                if not value:
                    bad(f"data.{key} is an empty list")
    for key in ("limit_train", "limit_eval", "num_workers"):
        value = getattr(d, key)
        if value is not None and value < 0:
            bad(f"data.{key} must be >= 0")
    if d.num_workers > MAX_WORKERS:  # each worker is a process
        bad(f"data.num_workers must be <= {MAX_WORKERS}, got {_short(d.num_workers)}")
    if d.on_bad_input not in BAD_INPUT_MODES:
        bad(f"data.on_bad_input must be {' or '.join(BAD_INPUT_MODES)}, got {_short(d.on_bad_input)}")
    e = cfg.eval
    for b in e.latency_batches:
        if not 1 <= b <= MAX_LATENCY_BATCH:
            bad(f"eval.latency_batches entries must be in [1, {MAX_LATENCY_BATCH}], got {b}")
    if e.latency_repeats < 1:
        bad("eval.latency_repeats must be >= 1")
    try:
        check_log_config(cfg.log)
    except TrackingError as exc:
        raise ConfigError(str(exc)) from None
    cfg.distill.validate()
    if cfg.distill.enabled and cfg.task in tasks and not tasks[cfg.task].supports_distillation:
        raise refusal(cfg.task, ONE_FORWARD)
    if cfg.task_options is not None:
        check = getattr(cfg.task_options, "validate", None)
        if check is not None:
            check()  # the task section's own ranges, named `<task>.<key>`
    try:
        cfg.upop_config(total_steps=1)
    except (ValueError, TypeError, OverflowError) as exc:
        bad(str(exc).replace("UPopConfig: ", "config section upop: "))
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: a tag with a bad value, e.g. !!int x
        value = raw
    return key.strip().split("."), value


def load_run_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config (or start from the defaults) and apply `key.sub=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except RecursionError:
            raise ConfigError(f"config file {path} is not valid YAML: nested too deeply") from None
        except (yaml.YAMLError, ValueError) as exc:  # ValueError: undecodable text or a tag with a bad value
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"config file {path} is not valid YAML: {first}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{k}' is not a section")
        node[keys[-1]] = value
    return validate(_build(RunConfig, data, ""))
