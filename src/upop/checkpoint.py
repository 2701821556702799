"""save_pretrained / from_pretrained for compressed (or dense) models.

A folder holds: `model.safetensors` (the weights, sliced), `upop_plan.json` (the plan that
rebuilds the pruned architecture from the base one), the base model's own config
(`config.json` for Hugging Face models) and `upop_model.json` (how to build the base model
and the weights' SHA-256; written last, so a folder without it is never taken for a finished
checkpoint).

A folder is data, never code: weights are safetensors, everything else JSON. A timm or
open_clip model is described by a registered name and architecture arguments from an
allow-list per library, read from the model itself at save and checked by rebuilding it;
anything naming a file, a URL, a hub, a pickle option or a pretrained source is refused before
any model library is called, at save and at load. Hugging Face models are rebuilt from
config.json alone, without remote code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from .adapters import discover
from .adapters import open_clip as open_clip_adapter
from .adapters import timm_vit as timm_adapter
from .compress import apply_plan
from .files import atomic_folder, atomic_write, check_finite, write_json
from .masks import is_masked
from .plan import PlanError, PruningPlan, StructurePlan
from .structures import Structure

FORMAT_VERSION = 2  # 2: the weights' SHA-256 is recorded and checked; 1 (no hash) still loads
META_FILE = "upop_model.json"
PLAN_FILE = "upop_plan.json"
WEIGHTS_FILE = "model.safetensors"
# what a transformers tokenizer / image processor / processor writes: the only files `processor=` adds
PROCESSOR_FILES = frozenset({
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
    "chat_template.json", "chat_template.jinja",
})
_META_KEYS = {"format", "version", "library", "class", "name", "kwargs", "fused_attn", "weights_sha256",
              "preprocess_cfg"}


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete, corrupted, unsafe or does not fit."""


def current_plan(model: nn.Module, structures: list[Structure] | None = None) -> PruningPlan:
    """The plan that turns the base model into `model` (all units kept if never pruned)."""
    plan = getattr(model, "upop_plan", None)
    if isinstance(plan, PruningPlan):
        return plan
    entries = {}
    for s in structures if structures is not None else discover(model):
        unit = s.unit("head_dim")
        entries[s.name] = StructurePlan(kind=s.kind, unit=unit, total=s.num_units("head_dim"),
                                        kept=list(range(s.num_units("head_dim"))),
                                        num_heads=s.num_heads, head_dim=s.head_dim, hidden=s.hidden)
    return PruningPlan(structures=entries, model_class=type(model).__name__)


# ---- build descriptions: validated data --------------------------------------------------------------
_SAFE_STRING = re.compile(r"^[A-Za-z0-9_.\-]*$")  # no ':', '/', '\\': nothing that names a file or URL


def _check_value(value: Any, key: str, where: str, nested: dict[str, frozenset] | None = None) -> None:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{where}: build argument {key!r} {why}")

    if value is None or isinstance(value, (bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise bad(f"must be finite, got {value!r}")
        return
    if isinstance(value, str):
        if len(value) > 64 or not _SAFE_STRING.match(value):
            raise bad(f"must be a plain word (no path, URL or hub name), got {value[:80]!r}")
        return
    if isinstance(value, list):
        if len(value) > 8:
            raise bad("must be a short list")
        for item in value:
            if isinstance(item, (list, dict)):
                raise bad("must be a list of numbers")
            _check_value(item, key, where)
        return
    if isinstance(value, dict) and nested and key in nested:
        _check_keys(value, nested[key], where, f"{key}.")
        return
    raise bad(f"has an unsupported type {type(value).__name__}")


def _check_keys(kwargs: dict[str, Any], allowed: frozenset, where: str, prefix: str = "",
                nested: dict[str, frozenset] | None = None) -> None:
    for key, value in kwargs.items():
        if key not in allowed:
            raise CheckpointError(f"{where}: build argument {prefix}{str(key)[:80]!r} is not an architecture "
                                  "argument upop accepts (files, URLs, hubs, pickles and pretrained sources "
                                  "are refused)")
        _check_value(value, f"{prefix}{key}", where, nested)


def validate_description(desc: Any, where: str) -> dict[str, Any]:
    """Check a timm / open_clip build description without calling any model library."""
    if not isinstance(desc, dict):
        raise CheckpointError(f"{where}: the model description must be an object")
    library, name, kwargs = desc.get("library"), desc.get("name"), desc.get("kwargs", {})
    if not isinstance(name, str) or not name or len(name) > 100 or not _SAFE_STRING.match(name):
        raise CheckpointError(f"{where}: model name must be a registered {library} name "
                              f"(no ':' or '/' prefix), got {str(name)[:80]!r}")
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{where}: 'kwargs' must be an object")
    if library == "timm":
        _check_keys(kwargs, timm_adapter.BUILD_KWARGS, where)
    elif library == "open_clip" and name == "CLIP":
        _check_keys(kwargs, open_clip_adapter.BUILD_KWARGS, where, nested=open_clip_adapter.CFG_KEYS)
    elif library == "open_clip":
        _check_keys(kwargs, open_clip_adapter.CREATE_KWARGS, where)
    else:
        raise CheckpointError(f"{where}: unknown model library {str(library)[:80]!r}")
    fused = desc.get("fused_attn")
    if fused is not None and not isinstance(fused, bool):
        raise CheckpointError(f"{where}: 'fused_attn' must be true or false")
    out = {"library": library, "name": name, "kwargs": kwargs}
    if fused is not None:
        out["fused_attn"] = fused
    preprocess = desc.get("preprocess_cfg")
    if preprocess is not None:
        if library != "open_clip" or not isinstance(preprocess, dict):
            raise CheckpointError(f"{where}: 'preprocess_cfg' must be an object (open_clip only)")
        _check_keys(preprocess, open_clip_adapter.PREPROCESS_KEYS, where, "preprocess_cfg.")
        out["preprocess_cfg"] = preprocess
    return out


def _registered(library: str) -> frozenset:
    if library == "timm":
        import timm

        return frozenset(timm.list_models())
    import open_clip

    return frozenset(open_clip.list_models())


def build_from_description(desc: dict[str, Any], where: str) -> nn.Module:
    """Build a timm / open_clip base model (random weights) from a validated description."""
    desc = validate_description(desc, where)
    library, name, kwargs = desc["library"], desc["name"], desc["kwargs"]
    if not (library == "open_clip" and name == "CLIP") and name not in _registered(library):
        raise CheckpointError(f"{where}: {name!r} is not a registered {library} model name")
    try:
        if library == "timm":
            import timm

            model = timm.create_model(name, pretrained=False, **kwargs)
        else:
            import open_clip

            if name == "CLIP":
                model = open_clip.CLIP(**kwargs)
            else:  # a registered config only: its fields pass the same allow-list
                config = open_clip.get_model_config(name) or {}
                for part in ("vision_cfg", "text_cfg"):
                    _check_keys(config.get(part, {}), open_clip_adapter.CFG_KEYS[part], where, f"{part}.")
                model = open_clip.create_model(name, pretrained=None, load_weights=False,
                                               pretrained_image=False, pretrained_text=False, **kwargs)
    except Exception as exc:  # a description that does not fit the library fails in arbitrary ways
        raise CheckpointError(f"{where}: cannot build {library} model {name!r}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None
    if "preprocess_cfg" in desc:  # what create_model attaches for open_clip's image transforms
        from open_clip.model import set_model_preprocess_cfg

        set_model_preprocess_cfg(model, desc["preprocess_cfg"])
    if isinstance(desc.get("fused_attn"), bool):
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = desc["fused_attn"]
    return model


# ---- describing a model at save, checked by rebuilding it ----------------------------------------------
_RUNTIME_ATTRS = {"training", "grad_checkpointing", "distilled_training"}


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (tuple, list)) and all(_plain(v) for v in value)


def _as_list(value: Any) -> Any:  # (32, 32) and [32, 32] configure a library alike
    return [_as_list(v) for v in value] if isinstance(value, (tuple, list)) else value


def signature(model: nn.Module) -> dict[str, Any]:
    """What must match for a rebuilt model to compute what `model` computes: every module's
    class and plain attributes (widths, flags, scales, drop rates) and every tensor's shape."""
    out: dict[str, Any] = {}
    for path, module in model.named_modules():
        attrs = {k: _as_list(v) for k, v in vars(module).items()
                 if not k.startswith("_") and k not in _RUNTIME_ATTRS and _plain(v)}
        out[f"module {path or '(root)'}"] = (f"{type(module).__module__}.{type(module).__qualname__}", attrs)
    for key, tensor in model.state_dict().items():
        out[f"tensor {key}"] = tuple(tensor.shape)
    return out


def _first_difference(want: dict[str, Any], got: dict[str, Any]) -> str | None:
    for key, value in want.items():
        if key not in got:
            return f"{key} is missing from the rebuilt model"
        if got[key] != value:
            if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict):
                if value[0] != got[key][0]:
                    return f"{key} is {value[0]}, rebuilt {got[key][0]}"
                attrs = sorted(set(value[1]) | set(got[key][1]))
                name = next(a for a in attrs if value[1].get(a, "?") != got[key][1].get(a, "?"))
                mine, theirs = value[1].get(name, "(absent)"), got[key][1].get(name, "(absent)")
                return f"{key}.{name} is {mine!r}, rebuilt {theirs!r}"
            return f"{key} is {value}, rebuilt {got[key]}"
    extra = next((k for k in got if k not in want), None)
    return f"the rebuilt model has an extra {extra}" if extra else None


def _rebuild_differs(model: nn.Module, plan: PruningPlan, desc: dict[str, Any]) -> str | None:
    """Rebuild from `desc` (on the meta device where the library allows it), apply the plan and
    return the first difference from `model`, or None."""
    def rebuilt_signature() -> dict[str, Any]:
        rebuilt = build_from_description(desc, "save_pretrained")
        apply_plan(rebuilt, plan)
        return signature(rebuilt)

    try:
        try:
            with torch.device("meta"):  # no memory, no init cost
                got = rebuilt_signature()
        except Exception:  # some libraries move tensors at construction: build for real
            got = rebuilt_signature()
    except (CheckpointError, PlanError) as exc:
        return str(exc)
    return _first_difference(signature(model), got)


def _describe_checked(model: nn.Module, plan: PruningPlan, library: str) -> dict[str, Any]:
    base = {n: (sp.num_heads, sp.head_dim, sp.hidden) for n, sp in plan.structures.items()}
    adapter = timm_adapter if library == "timm" else open_clip_adapter
    candidates = [{"library": library, **d} for d in adapter.describe(model, base)]
    recorded = getattr(model, "upop_build", None)
    if isinstance(recorded, dict) and recorded.get("library") == library:
        candidates.append({k: recorded[k] for k in ("library", "name", "kwargs") if k in recorded})
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if library == "timm" and isinstance(cfg.get("architecture"), str):
        candidates.append({"library": "timm", "name": cfg["architecture"], "kwargs": {}})
    if not candidates:
        raise CheckpointError(f"save_pretrained cannot describe this {library} model ({type(model).__name__}) "
                              "for reload; nothing was written")
    paths = {bool(m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")}
    first_problem = None
    for desc in candidates:
        desc = validate_description(desc, "save_pretrained")
        if len(paths) == 1:  # timm picks fused or eager attention per module; reload the same path
            desc["fused_attn"] = next(iter(paths))
        problem = _rebuild_differs(model, plan, desc)
        if problem is None:
            return desc
        first_problem = first_problem or problem
    raise CheckpointError(f"save_pretrained cannot describe this {type(model).__name__} for an exact reload "
                          f"({first_problem}); nothing was written")


def _library_of(model: nn.Module) -> str:
    try:
        import transformers
    except ImportError:  # pragma: no cover - transformers is a dependency
        transformers = None
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        return "transformers"
    if type(model).__module__.startswith("timm."):
        return "timm"
    if type(model).__module__.startswith("open_clip"):
        return "open_clip"
    raise CheckpointError(
        f"upop.save_pretrained supports transformers, timm and open_clip models; got {type(model).__name__}"
    )


def create_model(library: str, name: str, **kwargs: Any) -> nn.Module:
    """Build a timm or open_clip model with random weights from allow-listed architecture
    arguments (never a pretrained source): `timm.create_model(name, pretrained=False, **kwargs)`,
    or `open_clip.CLIP(**kwargs)` for name "CLIP". Any timm VisionTransformer or open_clip CLIP
    saves and reloads however it was made; this is a convenience."""
    if library not in ("timm", "open_clip"):
        raise ValueError(f"create_model builds timm or open_clip models, not {library!r}")
    desc = {"library": library, "name": name, "kwargs": kwargs}
    model = build_from_description(desc, f"create_model({library!r}, {name!r})")
    model.upop_build = validate_description(desc, "create_model")
    return model


# ---- transformers ---------------------------------------------------------------------------------------
def _build_transformers(meta: dict[str, Any], folder: Path) -> nn.Module:
    import transformers

    from .registry import architecture  # project-built classes (NLVR2, Segmenter), by name

    name = meta.get("class")
    cls = (architecture(name) or getattr(transformers, name, None)) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"{folder}: {str(name)[:80]!r} is not a transformers model class")
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path} cannot be read as JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    if "auto_map" in data:  # custom code: upop never runs code shipped in a model folder
        raise CheckpointError(f"{path} asks for custom model code (auto_map); upop loads no remote code")
    try:
        config = cls.config_class.from_dict(data)
        return cls(config)
    except Exception as exc:  # transformers fails in arbitrary ways on a config that does not fit
        raise CheckpointError(f"{folder}: cannot build {name} from config.json: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- processor / tokenizer files -----------------------------------------------------------------------
def processor_files(processor: Any, what: str = "save_pretrained") -> dict[str, bytes]:
    """The processor / tokenizer files (name -> bytes) of `processor`: an object with
    `.save_pretrained(dir)` (a tokenizer, image processor or processor), or the path of a folder
    whose files named in PROCESSOR_FILES are taken. Read into memory first, so that anything else
    is refused with one line before a byte of the model folder is written."""
    if isinstance(processor, (str, os.PathLike)):
        source = Path(processor).expanduser()
        if not source.is_dir():
            raise CheckpointError(f"{what}: processor folder not found: {source}")
        found = {p.name: p.read_bytes() for p in sorted(source.iterdir()) if p.name in PROCESSOR_FILES and p.is_file()}
        if not found:
            raise CheckpointError(f"{what}: {source} holds no processor or tokenizer files "
                                  "(preprocessor_config.json, tokenizer.json, vocab.txt, ...)")
        return found
    if isinstance(processor, nn.Module) or not callable(getattr(processor, "save_pretrained", None)):
        raise CheckpointError(f"{what}: processor= takes a tokenizer, image processor or processor (an object with "
                              f"save_pretrained) or a folder of their files, not {type(processor).__name__}")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            processor.save_pretrained(tmp)
        except Exception as exc:  # the processor's own code fails in its own ways
            raise CheckpointError(f"{what}: {type(processor).__name__}.save_pretrained failed: "
                                  f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None
        root = Path(tmp)
        written = sorted(root.rglob("*"))
        other = next((p for p in written if p.parent != root or not p.is_file() or p.name not in PROCESSOR_FILES), None)
        if other is not None:  # never let a processor replace the model's files or add unknown ones
            raise CheckpointError(f"{what}: {type(processor).__name__} writes {other.relative_to(root)}, "
                                  "which is not a processor or tokenizer file upop keeps")
        if not written:
            raise CheckpointError(f"{what}: {type(processor).__name__}.save_pretrained wrote no files")
        return {p.name: p.read_bytes() for p in written}


# ---- public API -----------------------------------------------------------------------------------------
def save_pretrained(model: nn.Module, folder: str | os.PathLike, build: dict[str, Any] | None = None,
                    what: str = "save_pretrained", processor: Any = None) -> Path:
    """Write `model` (pruned or not) to `folder`. Files appear only when all are written, and
    only for a finite model whose description rebuilds it exactly.

    build: optional extra description to try for a timm / open_clip model
    ({"library", "name", "kwargs"}); usually the description is read from the model itself.
    what: names the saved thing in errors (e.g. "retrain: best model").
    processor: the model's tokenizer, image processor or processor (anything with
    `.save_pretrained(dir)`), or the folder the model came from: its processor / tokenizer files
    (PROCESSOR_FILES) go into the folder, so `AutoProcessor.from_pretrained(folder)` works.
    """
    folder = Path(folder)
    if is_masked(model):
        raise CheckpointError(f"{what}: the model still has its search masks attached (the saved weights "
                              "would be the dense ones); call search.compress() first, or search.remove()")
    if build is not None:
        model.upop_build = validate_description(build, what)
    library = _library_of(model)
    found = discover(model)  # once: the plan check and the plan itself use the same structures
    plan = current_plan(model, found)
    structures = {s.name: s for s in found}
    for name, sp in plan.structures.items():  # the plan must describe the model as it is now
        s = structures.get(name)
        width = s.num_units(sp.unit if sp.unit != "neuron" else "head_dim") if s else None
        if width != len(sp.kept):
            raise CheckpointError(f"{name}: the model's width ({width}) does not match its plan "
                                  f"({len(sp.kept)} kept); was it modified after compression?")
    check_finite(model.state_dict(), what)
    extra = processor_files(processor, what) if processor is not None else {}
    if library == "transformers":
        description: dict[str, Any] = {"library": "transformers", "class": type(model).__name__}
    else:
        description = _describe_checked(model, plan, library)
    with atomic_folder(folder, last=META_FILE) as staging:
        if library == "transformers":
            model.config.save_pretrained(staging)
        save_model(model, str(staging / WEIGHTS_FILE))
        plan.save(staging / PLAN_FILE)
        for name, data in extra.items():
            atomic_write(staging / name, lambda f, data=data: f.write(data))
        write_json(staging / META_FILE, {"format": "upop-model", "version": FORMAT_VERSION, **description,
                                         "weights_sha256": _sha256(staging / WEIGHTS_FILE)})
    return folder


def read_meta(folder: Path) -> dict[str, Any]:
    """Read and validate upop_model.json (no model library is called)."""
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    for name in (META_FILE, PLAN_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder} is not a complete upop checkpoint: {name} is missing")
    path = folder / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, absurd nesting or numbers
        raise CheckpointError(f"{path} is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(meta, dict) or meta.get("format") != "upop-model":
        raise CheckpointError(f"{path} is not a upop model description")
    version = meta.get("version")
    if isinstance(version, bool) or version not in (1, FORMAT_VERSION):
        raise CheckpointError(f"{folder}: checkpoint format version {str(version)[:40]} "
                              f"is not supported (expected 1 or {FORMAT_VERSION})")
    unknown = sorted(str(k)[:40] for k in set(meta) - _META_KEYS)
    if unknown:
        raise CheckpointError(f"{path}: unknown field(s) {unknown[:3]}")
    digest = meta.get("weights_sha256")
    if digest is None and version != 1:
        raise CheckpointError(f"{path}: 'weights_sha256' is missing (format version {version} records it)")
    if digest is not None and (not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise CheckpointError(f"{path}: 'weights_sha256' must be 64 hexadecimal digits")
    library = meta.get("library")
    if not isinstance(library, str) or library not in ("transformers", "timm", "open_clip"):
        raise CheckpointError(f"{folder}: unknown model library {str(library)[:80]!r}")
    if library != "transformers":
        meta = {**meta, **validate_description(meta, str(path))}
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
    """Rebuild the pruned architecture from the base description and the plan, then load weights."""
    folder = Path(folder)
    meta = read_meta(folder)
    try:
        plan = PruningPlan.load(folder / PLAN_FILE)
    except PlanError as exc:
        raise CheckpointError(str(exc)) from None
    declared = meta.get("class") if meta["library"] == "transformers" else None
    if plan.model_class and declared and plan.model_class != declared:  # before building anything
        raise CheckpointError(f"{folder}: plan was made for {plan.model_class}, the checkpoint names {declared}")
    if meta.get("weights_sha256") is not None and _sha256(folder / WEIGHTS_FILE) != meta["weights_sha256"]:
        raise CheckpointError(f"{folder / WEIGHTS_FILE} does not match the SHA-256 recorded in {META_FILE}: "
                              "the file was changed or corrupted")
    if meta["library"] == "transformers":
        model = _build_transformers(meta, folder)
    else:
        model = build_from_description(meta, str(folder / META_FILE))
    if plan.model_class and plan.model_class != type(model).__name__:
        raise CheckpointError(f"{folder}: plan was made for {plan.model_class}, "
                              f"the checkpoint builds {type(model).__name__}")
    try:
        apply_plan(model, plan)
    except PlanError as exc:
        raise CheckpointError(f"{folder}: {exc}") from None
    model.upop_plan = plan
    if meta["library"] != "transformers":
        model.upop_build = validate_description(meta, str(folder / META_FILE))
    _check_weights(model, folder / WEIGHTS_FILE)
    missing, unexpected = load_model(model, str(folder / WEIGHTS_FILE), strict=False)
    if unexpected:
        raise CheckpointError(f"{folder}: unexpected tensors {sorted(unexpected)[:5]}")
    if missing:
        raise CheckpointError(f"{folder}: tensors missing from the file: {sorted(missing)[:5]}")
    return model.eval()
