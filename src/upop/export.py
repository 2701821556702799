"""Deployment: export a (compressed) model to ONNX and check it in onnxruntime against PyTorch."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .costs import measure_latency


class ExportError(ValueError):
    """A model that cannot be exported, or an export that does not match PyTorch."""


def sample_inputs(model: nn.Module, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of the right names, shapes and ranges for a supported model."""
    g = torch.Generator().manual_seed(seed)
    build = getattr(model, "upop_build", None) or {}
    if build.get("library") == "open_clip" or type(model).__module__.startswith("open_clip"):
        size = model.visual.image_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        return {"image": torch.randn(batch, 3, *size, generator=g),
                "text": torch.randint(1, model.vocab_size, (batch, model.context_length), generator=g)}
    if build.get("library") == "timm" or type(model).__module__.startswith("timm."):
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


def _tensors(output: Any) -> list[torch.Tensor]:
    if hasattr(output, "to_tuple"):  # transformers ModelOutput
        output = output.to_tuple()
    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]


def export_onnx(model: nn.Module, path: str | Path, inputs: dict[str, torch.Tensor],
                dynamic_batch: bool = False) -> Path:
    """Export with torch.onnx (dynamo); the ONNX inputs carry the names of `inputs`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1024)
        shapes = {name: {0: batch} for name in inputs}
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.onnx.export(model, (), str(tmp), kwargs=dict(inputs), input_names=list(inputs),
                          dynamo=True, dynamic_shapes=shapes, external_data=False)
    except Exception as exc:  # the exporter raises many types; the first line says what failed
        tmp.unlink(missing_ok=True)
        raise ExportError(f"ONNX export of {type(model).__name__} failed: {str(exc).splitlines()[0]}") from exc
    tmp.replace(path)
    return path


def check_onnx(model: nn.Module, path: str | Path, inputs: dict[str, torch.Tensor],
               repeats: int = 10) -> dict[str, Any]:
    """Run the ONNX file in onnxruntime and PyTorch on the same inputs: max |difference| of
    every output and the median latency of both (ms)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    with torch.inference_mode():
        expected = _tensors(model(**inputs))
    got = session.run(None, feed)
    if len(got) != len(expected):
        raise ExportError(f"{path}: {len(got)} outputs, PyTorch gives {len(expected)}")
    diff = max(float((torch.as_tensor(o) - e.float()).abs().max()) for o, e in zip(got, expected, strict=True))
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        session.run(None, feed)
        if i >= 2:  # warm-up
            times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {"max_abs_diff": diff, "onnxruntime_ms": times[len(times) // 2],
            "torch_ms": measure_latency(model, inputs, repeats=repeats), "outputs": len(got),
            "batch": int(next(iter(inputs.values())).shape[0])}
