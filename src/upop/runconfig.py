"""The run configuration of `upop compress` / `upop evaluate`: YAML -> validated dataclasses.

Every key is checked: an unknown key, a wrong type or a value out of range stops the run with
one line naming the key, before any model is built or data is read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from .config import UPopConfig


class ConfigError(ValueError):
    """A run configuration that cannot be used."""


@dataclass
class ModelConfig:
    preset: str | None = None  # a named preset built from a config (see upop.models.PRESETS)
    name: str | None = None  # a Hugging Face name or a local folder
    allow_download: bool = False  # hub names are fetched only when the user asks for it
    num_labels: int | None = None  # classification: taken from the data when unset


@dataclass
class DataConfig:
    # openmoji (each task's OpenMoji-derived data) | karpathy | imagefolder | fashion_mnist | vqav2 | nlvr2 | ade20k
    format: str = "openmoji"
    root: str | None = None  # image root (karpathy), dataset root (imagefolder), cache (openmoji)
    train: str | None = None  # karpathy annotation files, or imagefolder split folders
    val: str | None = None
    test: str | None = None
    image_size: int = 64
    max_tokens: int = 24
    prompt: str = "a picture of "  # caption: the decoder prompt, excluded from the loss (BLIP)
    answer_list: str | None = None  # vqa: JSON list of candidate answers (default: the training answers)
    limit_train: int | None = None  # use only the first N training examples (quick runs, tests)
    limit_eval: int | None = None
    num_workers: int = 0
    # what a missing image file, an empty caption or an image that fails to decode does:
    # "stop" ends the run with one line naming the file (and entry); "skip" drops the example,
    # counts it and logs the count and the first paths on the "upop" logger
    on_bad_input: str = "stop"


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


@dataclass
class EvalConfig:
    latency_batches: list[int] = field(default_factory=lambda: [1, 32])
    latency_repeats: int = 10
    skip_latency: bool = False
    k_test: int = 128  # BLIP retrieval: ITC top-k candidates re-ranked by ITM (paper: 256 COCO, 128 Flickr)
    num_beams: int = 3  # caption: beam search (paper: 3 beams, length 5..20)
    max_new_tokens: int = 20
    min_new_tokens: int = 5
    k_answers: int = 128  # vqa: answers ranked by first-token probability, re-ranked by likelihood
    multiscale: bool = False  # segmentation: scales 0.5..1.75 plus flip instead of single-scale


@dataclass
class RunConfig:
    task: str = "retrieval"  # retrieval | classification | caption | vqa | nlvr | segmentation
    seed: int = 0
    output_dir: str = "runs/upop"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    upop: dict[str, Any] = field(default_factory=dict)  # UPopConfig fields except total_steps
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def upop_config(self, total_steps: int) -> UPopConfig:
        return UPopConfig.from_dict({**self.upop, "total_steps": max(1, total_steps)})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TASKS = ("retrieval", "classification", "caption", "vqa", "nlvr", "segmentation")
FORMATS = ("openmoji", "karpathy", "imagefolder", "fashion_mnist", "vqav2", "nlvr2", "ade20k")
BAD_INPUT_MODES = ("stop", "skip")

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
    known = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
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
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return value
        raise ConfigError(f"config key '{path}' must be a list of integers, got {_short(value)}")
    if origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"config key '{path}' must be a mapping, got {_short(value)}")
    raise ConfigError(f"config key '{path}' has a value of the wrong type: {_short(value)}")


def validate(cfg: RunConfig) -> RunConfig:
    def bad(msg: str) -> None:
        raise ConfigError(msg)

    if cfg.task not in TASKS:
        bad(f"task must be one of {TASKS}, got {_short(cfg.task)}")
    if cfg.data.format not in FORMATS:
        bad(f"data.format must be one of {FORMATS}, got {_short(cfg.data.format)}")
    if (cfg.model.preset is None) == (cfg.model.name is None):
        bad("give exactly one of model.preset and model.name")
    t = cfg.train
    for key in ("batch_size", "eval_batch_size", "grad_accum"):
        if getattr(t, key) < 1:
            bad(f"train.{key} must be >= 1")
    for key in ("dense_epochs", "search_epochs", "retrain_epochs"):
        if getattr(t, key) < 0:
            bad(f"train.{key} must be >= 0")
    if t.search_epochs < 1:
        bad("train.search_epochs must be >= 1 (the search needs steps)")
    for key in ("dense_lr", "search_lr", "lr"):
        if not getattr(t, key) > 0:
            bad(f"train.{key} must be > 0")
    for prefix, factor in t.lr_multipliers.items():
        if not isinstance(prefix, str):
            bad(f"train.lr_multipliers keys must be parameter-name prefixes (strings), got {_short(prefix)}")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            bad(f"train.lr_multipliers.{prefix} must be a number > 0, got {_short(factor)}")
    if t.warmup_steps < 0:
        bad("train.warmup_steps must be >= 0")
    if not 0 <= t.label_smoothing < 1:
        bad("train.label_smoothing must be in [0, 1)")
    if t.mixed_precision not in ("no", "fp16", "bf16"):
        bad(f"train.mixed_precision must be no, fp16 or bf16, got {_short(t.mixed_precision)}")
    if cfg.data.image_size < 8 or cfg.data.max_tokens < 4:
        bad("data.image_size must be >= 8 and data.max_tokens >= 4")
    e = cfg.eval
    for key in ("k_test", "num_beams", "max_new_tokens", "k_answers"):
        if getattr(e, key) < 1:
            bad(f"eval.{key} must be >= 1")
    if not 0 <= e.min_new_tokens <= e.max_new_tokens:
        bad("eval.min_new_tokens must be in [0, eval.max_new_tokens]")
    if cfg.data.on_bad_input not in BAD_INPUT_MODES:
        bad(f"data.on_bad_input must be stop or skip, got {_short(cfg.data.on_bad_input)}")
    if "total_steps" in cfg.upop:
        bad("upop.total_steps is derived from train.search_epochs and the data; remove it")
    for key, value in cfg.upop.items():  # every UPopConfig field is a scalar
        if not isinstance(key, str):
            bad(f"config key 'upop.{_short(key)}' does not exist (keys are strings)")
        if not isinstance(value, (bool, int, float, str)):
            bad(f"config key 'upop.{key}' must be a number, a string or true/false, got {_short(value)}")
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
