"""Counting what we claim: parameters and FLOPs of a model, per unit and in total."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """All parameters of `model`, tied tensors counted once."""
    return sum(p.numel() for p in model.parameters())  # parameters() already deduplicates


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Route Hugging Face attention through the eager path so its matmuls are visible to
    the FLOP counter (fused SDPA kernels on CPU are not counted)."""
    configs = []
    seen = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or id(config) in seen or not hasattr(config, "_attn_implementation"):
            continue
        seen.add(id(config))
        configs.append((config, config._attn_implementation))
    try:
        for config, _ in configs:
            config._attn_implementation = "eager"
        yield
    finally:
        for config, previous in configs:
            config._attn_implementation = previous


def run_model(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


@torch.no_grad()
def count_flops(model: nn.Module, example_inputs: Any) -> int:
    """FLOPs of one forward on `example_inputs` (a tensor, tuple or dict of kwargs), counting
    2 per multiply-add, attention matmuls included (the model runs eager attention here)."""
    was_training = model.training
    model.eval()
    try:
        with eager_attention(model), FlopCounterMode(display=False) as counter:
            run_model(model, example_inputs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


@torch.inference_mode()
def measure_latency(model: nn.Module, example_inputs: Any, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of one forward in milliseconds, after `warmup` untimed runs."""
    import time

    was_training = model.training
    model.eval()
    try:
        for _ in range(warmup):
            run_model(model, example_inputs)
        times = []
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            run_model(model, example_inputs)
            times.append((time.perf_counter() - start) * 1000.0)
    finally:
        model.train(was_training)
    times.sort()
    return times[len(times) // 2]
