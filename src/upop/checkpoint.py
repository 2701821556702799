"""save_pretrained / from_pretrained for compressed (or dense) models.

A folder holds: `model.safetensors` (the weights, sliced), `upop_plan.json` (the plan that
rebuilds the pruned architecture from the base one), the base model's own config
(`config.json` for Hugging Face models) and `upop_model.json` (how to build the base
model; written last, so a folder without it is never taken for a finished checkpoint).
Nothing is unpickled: weights are safetensors, everything else JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from .adapters import discover
from .compress import apply_plan
from .plan import PlanError, PruningPlan, StructurePlan

FORMAT_VERSION = 1
META_FILE = "upop_model.json"
PLAN_FILE = "upop_plan.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete, corrupted or does not fit."""


def current_plan(model: nn.Module) -> PruningPlan:
    """The plan that turns the base model into `model` (all units kept if never pruned)."""
    plan = getattr(model, "upop_plan", None)
    if isinstance(plan, PruningPlan):
        return plan
    entries = {}
    for s in discover(model):
        unit = s.unit("head_dim")
        entries[s.name] = StructurePlan(kind=s.kind, unit=unit, total=s.num_units("head_dim"),
                                        kept=list(range(s.num_units("head_dim"))),
                                        num_heads=s.num_heads, head_dim=s.head_dim, hidden=s.hidden)
    return PruningPlan(structures=entries, model_class=type(model).__name__)


# ---- how to rebuild a base model, per library ------------------------------------------------------
def _describe_transformers(model: nn.Module, folder: Path) -> dict[str, Any]:
    model.config.save_pretrained(folder)
    return {"library": "transformers", "class": type(model).__name__}


def _build_transformers(meta: dict[str, Any], folder: Path) -> nn.Module:
    import transformers

    from .architectures import ARCHITECTURES

    name = meta.get("class")
    cls = (ARCHITECTURES.get(name) or getattr(transformers, name, None)) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"{folder}: {str(name)[:80]!r} is not a transformers model class")
    try:
        config = cls.config_class.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises several types for a bad config.json
        raise CheckpointError(f"{folder}/config.json cannot be read: {str(exc)[:200]}") from None
    try:
        return cls(config)
    except Exception as exc:  # a config that does not fit the class fails in arbitrary ways
        raise CheckpointError(f"{folder}: cannot build {name} from config.json: {str(exc)[:200]}") from None


def _library_of(model: nn.Module) -> str:
    build = getattr(model, "upop_build", None)
    if isinstance(build, dict) and build.get("library") in _BUILD:
        return build["library"]
    try:
        import transformers
    except ImportError:  # pragma: no cover - transformers is a dependency
        transformers = None
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        return "transformers"
    if type(model).__module__.startswith("timm."):
        return "timm"
    if type(model).__module__.startswith("open_clip"):
        raise CheckpointError("this open_clip model does not record how it was built: create it with "
                              "upop.create_model('open_clip', name, **kwargs) or pass build={...}")
    raise CheckpointError(
        f"upop.save_pretrained supports transformers, timm and open_clip models; got {type(model).__name__}"
    )


def create_model(library: str, name: str, **kwargs: Any) -> nn.Module:
    """Build a timm or open_clip model (random weights) and record how, so that
    `save_pretrained` / `from_pretrained` can rebuild it offline. kwargs must be JSON values.

    library "timm": `timm.create_model(name, pretrained=False, **kwargs)`;
    library "open_clip": `open_clip.create_model(name, pretrained=None, **kwargs)`, or with
    name "CLIP" an `open_clip.CLIP(**kwargs)` from explicit vision_cfg / text_cfg dicts.
    """
    if library not in ("timm", "open_clip"):
        raise ValueError(f"create_model builds timm or open_clip models, not {library!r}")
    try:
        json.dumps(kwargs)
    except TypeError as exc:
        raise ValueError(f"create_model kwargs must be JSON values: {exc}") from None
    build = {"library": library, "name": name, "kwargs": kwargs}
    model = _build_recorded(build, Path("."))
    model.upop_build = build
    return model


def _build_recorded(meta: dict[str, Any], folder: Path) -> nn.Module:
    library, name, kwargs = meta.get("library"), meta.get("name"), meta.get("kwargs") or {}
    if not isinstance(name, str) or not isinstance(kwargs, dict):
        raise CheckpointError(f"{folder}: the model description needs a name and a kwargs mapping")
    try:
        if library == "timm":
            import timm

            model = timm.create_model(name, pretrained=False, **kwargs)
            if isinstance(meta.get("fused_attn"), bool):
                for module in model.modules():
                    if hasattr(module, "fused_attn"):
                        module.fused_attn = meta["fused_attn"]
            return model
        import open_clip

        if name == "CLIP":
            return open_clip.CLIP(**kwargs)
        return open_clip.create_model(name, pretrained=None, **kwargs)
    except (RuntimeError, TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{folder}: cannot build {library} model {name!r}: {exc}") from None


def _attention_paths(model: nn.Module) -> dict[str, bool]:
    """timm picks fused SDPA or eager attention per module at construction; both are exact
    after compression, but a bit-identical reload needs the same path."""
    return {n: bool(m.fused_attn) for n, m in model.named_modules() if hasattr(m, "fused_attn")}


def _describe_recorded(model: nn.Module, folder: Path) -> dict[str, Any]:
    build = getattr(model, "upop_build", None)
    if isinstance(build, dict):
        build = {k: build[k] for k in ("library", "name", "kwargs") if k in build}
        paths = set(_attention_paths(model).values())
        return {**build, "fused_attn": paths.pop()} if len(paths) == 1 else build
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    arch = cfg.get("architecture")
    if not arch:
        raise CheckpointError("this timm model does not say its architecture: create it with "
                              "upop.create_model('timm', name, **kwargs)")
    model.upop_build = {"library": "timm", "name": arch, "kwargs": {}}
    return _describe_recorded(model, folder)


_DESCRIBE = {"transformers": _describe_transformers, "timm": _describe_recorded, "open_clip": _describe_recorded}
_BUILD = {"transformers": _build_transformers, "timm": _build_recorded, "open_clip": _build_recorded}


# ---- public API ------------------------------------------------------------------------------------
def save_pretrained(model: nn.Module, folder: str | os.PathLike, build: dict[str, Any] | None = None) -> Path:
    """Write `model` (pruned or not) to `folder`. Files appear only when all are written.

    build: for timm / open_clip models not made by `upop.create_model`, how to rebuild the base
    model: {"library": "timm" | "open_clip", "name": ..., "kwargs": {...}}.
    """
    folder = Path(folder)
    if build is not None:
        model.upop_build = build
    library = _library_of(model)
    plan = current_plan(model)
    structures = {s.name: s for s in discover(model)}
    for name, sp in plan.structures.items():  # the plan must describe the model as it is now
        s = structures.get(name)
        width = s.num_units(sp.unit if sp.unit != "neuron" else "head_dim") if s else None
        if width != len(sp.kept):
            raise CheckpointError(f"{name}: the model's width ({width}) does not match its plan "
                                  f"({len(sp.kept)} kept); was it modified after compression?")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        meta = {"format": "upop-model", "version": FORMAT_VERSION, **_DESCRIBE[library](model, staging)}
        save_model(model, str(staging / WEIGHTS_FILE))
        plan.save(staging / PLAN_FILE)
        (staging / META_FILE).write_text(json.dumps(meta, indent=1))
        folder.mkdir(exist_ok=True)
        (folder / META_FILE).unlink(missing_ok=True)  # the folder is incomplete until the end
        for item in sorted(staging.iterdir(), key=lambda p: p.name == META_FILE):
            os.replace(item, folder / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def read_meta(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    for name in (META_FILE, PLAN_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder} is not a complete upop checkpoint: {name} is missing")
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, absurd nesting or numbers
        raise CheckpointError(f"{folder / META_FILE} is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(meta, dict) or meta.get("format") != "upop-model":
        raise CheckpointError(f"{folder / META_FILE} is not a upop model description")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder}: checkpoint format version {meta.get('version')!r} "
                              f"is not supported (expected {FORMAT_VERSION})")
    if not isinstance(meta.get("library"), str) or meta["library"] not in _BUILD:
        raise CheckpointError(f"{folder}: unknown model library {meta.get('library')!r}")
    return meta


def _check_weights(model: nn.Module, path: Path) -> None:
    """Compare the file's tensor names and shapes with the model before loading anything."""
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118  (safe_open is not iterable)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, shape in shapes.items():
        if key not in expected:
            raise CheckpointError(f"{path}: tensor {key!r} does not exist in the rebuilt model")
        if expected[key] != shape:
            raise CheckpointError(f"{path}: tensor {key!r} has shape {shape}, "
                                  f"the rebuilt model expects {expected[key]}")


def from_pretrained(folder: str | os.PathLike) -> nn.Module:
    """Rebuild the pruned architecture from the base config and the plan, then load weights."""
    folder = Path(folder)
    meta = read_meta(folder)
    try:
        plan = PruningPlan.load(folder / PLAN_FILE)
    except PlanError as exc:
        raise CheckpointError(str(exc)) from None
    declared = meta.get("class") if meta["library"] == "transformers" else None
    if plan.model_class and declared and plan.model_class != declared:  # before building anything
        raise CheckpointError(f"{folder}: plan was made for {plan.model_class}, the checkpoint names {declared}")
    model = _BUILD[meta["library"]](meta, folder)
    if plan.model_class and plan.model_class != type(model).__name__:
        raise CheckpointError(f"{folder}: plan was made for {plan.model_class}, "
                              f"the checkpoint builds {type(model).__name__}")
    try:
        apply_plan(model, plan)
    except PlanError as exc:
        raise CheckpointError(f"{folder}: {exc}") from None
    model.upop_plan = plan
    if meta["library"] != "transformers":
        model.upop_build = {k: meta[k] for k in ("library", "name", "kwargs") if k in meta}
    _check_weights(model, folder / WEIGHTS_FILE)
    missing, unexpected = load_model(model, str(folder / WEIGHTS_FILE), strict=False)
    if unexpected:
        raise CheckpointError(f"{folder}: unexpected tensors {sorted(unexpected)[:5]}")
    if missing:
        raise CheckpointError(f"{folder}: tensors missing from the file: {sorted(missing)[:5]}")
    return model.eval()
