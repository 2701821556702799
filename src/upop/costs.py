"""Counting what we claim: parameters and FLOPs of a model, per unit and in total, and the time
models take side by side."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterator, Mapping
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


def measure_latency(model: nn.Module, example_inputs: Any, repeats: int = 10, warmup: int = 2) -> float:
    """Median time of one forward in milliseconds over `repeats` timed blocks (compare_latency of one model)."""
    return compare_latency({"model": model}, example_inputs, rounds=repeats, warmup=warmup)["model"]["median_ms"]


@torch.inference_mode()
def compare_latency(models: Mapping[str, nn.Module], inputs: Any, *, rounds: int = 10, warmup: int = 2,
                    block_ms: float = 10.0) -> dict[str, dict[str, float | None]]:
    """Time `models` on the same `inputs` in this process, interleaved, so that whatever the machine
    does meanwhile (other work, clock changes) falls on all of them alike.

    After `warmup` untimed calls of each, every round times one block of each model in turn (the
    order reversed every other round); a block is as many calls as fill about `block_ms` (at least
    one), timed by torch.utils.benchmark.Timer at this process's thread count (it synchronises
    CUDA). Per name: median_ms and iqr_ms (interquartile range) of one call over the rounds'
    blocks (iqr_ms None from a single round), rounds, and calls_per_block.
    """
    from torch.utils import benchmark  # imported here: its import warns about CUDA on machines without it

    names = list(models)
    modes = {name: models[name].training for name in names}
    timers, numbers = {}, {}
    try:
        for name in names:
            models[name].eval()
            for _ in range(max(0, warmup)):
                run_model(models[name], inputs)
            timers[name] = benchmark.Timer(stmt="run_model(model, inputs)", num_threads=torch.get_num_threads(),
                                           globals={"run_model": run_model, "model": models[name], "inputs": inputs})
            first_ms = timers[name].timeit(1).median * 1e3
            numbers[name] = max(1, int(block_ms / max(first_ms, 1e-4)))
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(max(1, rounds)):
            for name in names if r % 2 == 0 else names[::-1]:
                times[name].append(timers[name].timeit(numbers[name]).median * 1e3)
    finally:
        for name in names:
            models[name].train(modes[name])
    out = {}
    for name in names:
        q1, _, q3 = statistics.quantiles(times[name], n=4) if len(times[name]) > 1 else (None, None, None)
        out[name] = {"median_ms": statistics.median(times[name]), "iqr_ms": None if q1 is None else q3 - q1,
                     "rounds": len(times[name]), "calls_per_block": numbers[name]}
    return out
