"""Deployment: export a (compressed) model to ONNX or to a `torch.export` program (.pt2), and
check the file against the PyTorch model on the same inputs.

Inputs and outputs carry the model's own names (`pixel_values`, `input_ids`, `logits`,
`image_embeds`, `text_model_output.pooler_output`, ...): the model is wrapped so that it
returns a flat name -> tensor dict, which is also what makes a .pt2 file loadable with
`torch.export.load` by a Python that has only torch (no upop, no transformers).
"""

from __future__ import annotations

import inspect
import io
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .costs import measure_latency
from .files import atomic_write

FORMATS = {"onnx": ".onnx", "torch": ".pt2"}
MAX_BATCH = 1024  # upper bound of the dynamic batch dimension
# open_clip's CLIP returns a tuple; these are the keys its own `output_dict=True` mode uses
_OPEN_CLIP_OUTPUTS = ("image_features", "text_features", "logit_scale", "logit_bias")


class ExportError(ValueError):
    """A model that cannot be exported, or an export that does not match PyTorch."""


# ---- arguments, checked before any work -----------------------------------------------------------
def check_output_path(output: str | Path, model_dir: str | Path) -> Path:
    """Refuse an output inside the model folder (it would replace or pollute the model's own
    files) or onto a directory; returns the output as a Path."""
    output, model_dir = Path(output).expanduser(), Path(model_dir).expanduser()
    if output.is_dir():
        raise ExportError(f"--output {output} is a directory; give a file name, e.g. {output / 'model.onnx'}")
    if output.resolve().is_relative_to(model_dir.resolve()):
        raise ExportError(f"--output {output} is inside the model folder {model_dir}; "
                          "write the exported file somewhere else")
    return output


def default_output(model_dir: str | Path, fmt: str) -> Path:
    """Next to the model folder, never inside it: runs/demo/model -> runs/demo/model.onnx."""
    model_dir = Path(model_dir).expanduser()
    return model_dir.with_name(model_dir.name + FORMATS[fmt])


def check_numbers(batch: int, tolerance: float, opset: int | None, fmt: str, dynamic_batch: bool) -> None:
    """One line naming the bad argument, before the model is loaded."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if batch < 1:
        raise ExportError(f"--batch must be >= 1, got {batch}")
    if batch + (3 if dynamic_batch else 0) > MAX_BATCH:
        raise ExportError(f"--batch must be <= {MAX_BATCH - (3 if dynamic_batch else 0)}, got {batch}")
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise ExportError(f"--tolerance must be a finite number > 0, got {tolerance}")
    if opset is not None:
        if fmt != "onnx":
            raise ExportError("--opset applies to --format onnx only")
        lowest, highest = _opset_range()
        if not lowest <= opset <= highest:
            raise ExportError(f"--opset must be in [{lowest}, {highest}] (this onnx and torch.onnx), got {opset}")


def _opset_range() -> tuple[int, int]:
    import onnx

    # torch.onnx's exporter emits opset 18 operators and converts only upwards reliably
    return 18, int(onnx.defs.onnx_opset_version())


# ---- inputs and named outputs -------------------------------------------------------------------
def sample_inputs(model: nn.Module, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of the right names, shapes and ranges for a supported model."""
    g = torch.Generator().manual_seed(seed)
    if _is_open_clip(model):
        size = model.visual.image_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        return {"image": torch.randn(batch, 3, *size, generator=g),
                "text": torch.randint(1, model.vocab_size, (batch, model.context_length), generator=g)}
    if _is_timm(model):
        height, width = model.patch_embed.img_size
        return {"x": torch.randn(batch, 3, height, width, generator=g)}
    config = getattr(model, "config", None)
    if config is None:
        raise ExportError(f"cannot make sample inputs for {type(model).__name__}")
    inputs: dict[str, torch.Tensor] = {}
    vision = getattr(config, "vision_config", None) or (config if hasattr(config, "image_size") else None)
    text = getattr(config, "text_config", None) or (config if hasattr(config, "vocab_size") else None)
    if vision is not None:
        size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
        channels = getattr(vision, "num_channels", 3)
        inputs["pixel_values"] = torch.randn(batch, channels, size, size, generator=g)
    if text is not None:
        length = min(16, getattr(text, "max_position_embeddings", 16))
        inputs["input_ids"] = torch.randint(1, text.vocab_size, (batch, length), generator=g)
        inputs["attention_mask"] = torch.ones(batch, length, dtype=torch.long)
    if not inputs:
        raise ExportError(f"cannot make sample inputs for {type(model).__name__}")
    return inputs


def _is_open_clip(model: nn.Module) -> bool:
    build = getattr(model, "upop_build", None) or {}
    return build.get("library") == "open_clip" or type(model).__module__.startswith("open_clip")


def _is_timm(model: nn.Module) -> bool:
    build = getattr(model, "upop_build", None) or {}
    return build.get("library") == "timm" or type(model).__module__.startswith("timm.")


def named_outputs(model: nn.Module, output: Any) -> dict[str, torch.Tensor]:
    """The output's tensors by name, in the order the model returns them: the fields of a
    transformers ModelOutput (nested ones dotted: `vision_model_output.pooler_output`), the
    keys of a dict, open_clip's feature names, `logits` for a classifier's plain tensor."""
    if isinstance(output, torch.Tensor):
        classifier = getattr(model, "num_classes", 0) or getattr(getattr(model, "config", None), "num_labels", 0)
        return {"logits" if classifier else "output": output}
    if isinstance(output, (tuple, list)) and _is_open_clip(model) and len(output) <= len(_OPEN_CLIP_OUTPUTS):
        output = dict(zip(_OPEN_CLIP_OUTPUTS, output, strict=False))
    named: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            named[prefix] = value
        elif isinstance(value, Mapping):  # ModelOutput is an OrderedDict of its non-None fields
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                walk(f"{prefix}.{i}" if prefix else f"output_{i}", item)

    walk("", output)
    if not named:
        raise ExportError(f"{type(model).__name__} returns no tensors")
    return named


class NamedOutputs(nn.Module):
    """`model` returning a flat {name: tensor} dict: plain pytree types only, so an exported
    program refers to no class of upop or transformers. Build it with `NamedOutputs.wrap`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return named_outputs(self.model, self.model(**inputs))

    @classmethod
    def wrap(cls, model: nn.Module, input_names: list[str]) -> NamedOutputs:
        """The wrapper with a forward that names its inputs: torch.export's dynamic-shape guards
        fail on a bare **kwargs forward."""
        def forward(self: NamedOutputs, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
            return named_outputs(self.model, self.model(**inputs))

        keyword = inspect.Parameter.KEYWORD_ONLY
        forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
            + [inspect.Parameter(name, keyword) for name in input_names])
        return type(cls.__name__, (cls,), {"forward": forward})(model).eval()


def _dynamic_shapes(inputs: dict[str, torch.Tensor], dynamic_batch: bool) -> dict[str, Any] | None:
    if not dynamic_batch:
        return None
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return {name: {0: batch} for name in inputs}


def _exported(model: nn.Module, inputs: dict[str, torch.Tensor], dynamic_batch: bool) -> torch.export.ExportedProgram:
    model.eval()
    try:
        return torch.export.export(NamedOutputs.wrap(model, list(inputs)), (), kwargs=dict(inputs),
                                   dynamic_shapes=_dynamic_shapes(inputs, dynamic_batch), strict=False)
    except Exception as exc:  # the exporter raises many types; the first line says what failed
        raise ExportError(f"torch.export of {type(model).__name__} failed: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---- ONNX -----------------------------------------------------------------------------------------
def export_onnx(model: nn.Module, path: str | Path, inputs: dict[str, torch.Tensor],
                dynamic_batch: bool = False, opset: int | None = None) -> Path:
    """Export with torch.onnx (dynamo) to one self-contained file, written atomically; the ONNX
    inputs and outputs carry the model's names."""
    model.eval()
    with torch.no_grad():
        names = list(named_outputs(model, model(**inputs)))
    try:
        onnx_program = torch.onnx.export(NamedOutputs.wrap(model, list(inputs)), (), kwargs=dict(inputs),
                                         input_names=list(inputs), output_names=names, opset_version=opset, dynamo=True,
                                         dynamic_shapes=_dynamic_shapes(inputs, dynamic_batch), external_data=False)
        data = onnx_program.model_proto.SerializeToString()
    except Exception as exc:  # the exporter raises many types; the first line says what failed
        raise ExportError(f"ONNX export of {type(model).__name__} failed: {_first_line(exc)}") from exc
    return atomic_write(path, lambda f: f.write(data))


def check_onnx(model: nn.Module, path: str | Path, inputs: dict[str, torch.Tensor],
               repeats: int = 10) -> dict[str, Any]:
    """Run the ONNX file in onnxruntime and PyTorch on the same inputs: max |difference| of
    every output (matched by name) and the median latency of both (ms)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, feed), strict=True))

    def run() -> None:
        session.run(None, feed)

    result = _compare(model, inputs, got, str(path))
    result["onnxruntime_ms"] = _median_ms(run, repeats)
    result["torch_ms"] = measure_latency(model, inputs, repeats=repeats)
    return result


# ---- torch.export ---------------------------------------------------------------------------------
def export_torch(model: nn.Module, path: str | Path, inputs: dict[str, torch.Tensor],
                 dynamic_batch: bool = False) -> Path:
    """Write a `torch.export` program (.pt2): `torch.export.load(path).module()(**inputs)` returns
    the {name: tensor} outputs, in a Python with torch only."""
    program = _exported(model, inputs, dynamic_batch)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))


def check_torch(model: nn.Module, path: str | Path, inputs: dict[str, torch.Tensor],
                repeats: int = 10) -> dict[str, Any]:
    """Load the .pt2 file and compare its outputs with the PyTorch model's, as check_onnx does."""
    try:
        program = torch.export.load(str(path)).module()
    except Exception as exc:  # a file torch.export cannot read
        raise ExportError(f"{path} cannot be loaded with torch.export.load: {_first_line(exc)}") from exc
    with torch.inference_mode():
        got = {k: v.numpy() for k, v in program(**inputs).items()}

    def run() -> None:
        with torch.inference_mode():
            program(**inputs)

    result = _compare(model, inputs, got, str(path))
    result["exported_ms"] = _median_ms(run, repeats)
    result["torch_ms"] = measure_latency(model, inputs, repeats=repeats)
    return result


# ---- shared -------------------------------------------------------------------------------------
def _compare(model: nn.Module, inputs: dict[str, torch.Tensor], got: dict[str, Any], what: str) -> dict[str, Any]:
    with torch.inference_mode():
        expected = named_outputs(model, model(**inputs))
    if set(got) != set(expected):  # a file exported elsewhere: compare in order
        if len(got) != len(expected):
            raise ExportError(f"{what}: {len(got)} outputs, PyTorch gives {len(expected)}")
        got = dict(zip(expected, got.values(), strict=True))
    diff = max(float((torch.as_tensor(got[name]).float() - e.float()).abs().max()) for name, e in expected.items())
    return {"max_abs_diff": diff, "outputs": len(got), "names": list(expected),
            "batch": int(next(iter(inputs.values())).shape[0])}


def _median_ms(run: Any, repeats: int) -> float:
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        run()
        if i >= 2:  # warm-up
            times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return times[len(times) // 2]
