"""Measuring models for a run's report and for `upop evaluate`, one implementation for both: the
task's metrics, params, FLOPs (batch 1) and CPU latency, and, for `upop.budget: latency`, the
measured latency tables the search cuts on and the compressed model timed against them.

CPU latency always comes from costs.compare_latency: the models to compare are timed in this
process on the same inputs, interleaved, as a median with its interquartile range (IQR).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .config import UPopConfig
from .costs import compare_latency, count_flops, count_params
from .latency import LatencyModel, LatencySettings, build_latency_model, measure_tokens, plan_widths, time_model
from .plan import PruningPlan
from .runconfig import RunConfig
from .structures import Structure

log = logging.getLogger("upop")


def measure(cfg: RunConfig, task: Any, model: nn.Module, device: torch.device, split: str = "test", *,
            latency: bool = True) -> dict[str, Any]:
    """Task metrics, params, FLOPs (batch 1) and, with `latency` unless eval.skip_latency, the CPU
    latency of `model` alone (latency_ms and latency_iqr_ms per batch; None when not timed)."""
    metrics = task.evaluate(model, split, device)
    result = {"metric": metrics[task.metric], "metrics": metrics, "params": count_params(model)}
    example = {k: v.to(device) for k, v in task.example_inputs(1).items()}
    result["flops"], result["latency_ms"] = count_flops(model, example), None
    if latency and not cfg.eval.skip_latency:
        result.update(cpu_latency(cfg, task, {"model": model})["model"])
    return result


def cpu_latency(cfg: RunConfig, task: Any, models: dict[str, nn.Module]) -> dict[str, dict[str, dict[str, float]]]:
    """Per name: {"latency_ms": {"batch<B>": median}, "latency_iqr_ms": {"batch<B>": IQR}} for every
    B of eval.latency_batches, every model timed on CPU on the same inputs, interleaved, with
    eval.latency_repeats timed blocks each."""
    on_cpu = {name: m if next(m.parameters()).device.type == "cpu" else copy.deepcopy(m).cpu()
              for name, m in models.items()}
    out: dict[str, dict[str, dict[str, float]]] = {name: {"latency_ms": {}, "latency_iqr_ms": {}} for name in models}
    for b in cfg.eval.latency_batches:
        timed = compare_latency(on_cpu, task.example_inputs(b), rounds=cfg.eval.latency_repeats)
        for name, t in timed.items():
            out[name]["latency_ms"][f"batch{b}"] = t["median_ms"]
            out[name]["latency_iqr_ms"][f"batch{b}"] = t["iqr_ms"]
    return out


# ---- upop.budget: latency --------------------------------------------------------------------------
def budget_latency_model(task: Any, model: nn.Module, structures: list[Structure], upop: UPopConfig) -> LatencyModel:
    """The latency tables of `model`'s structures (and its whole forward, for the fixed part) on
    upop.latency_runtime at upop.latency_batch, on the device of its weights. Call it before the
    search attaches its masks: the model is timed as it is."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in task.example_inputs(upop.latency_batch).items()}
    tokens = measure_tokens(model, structures, inputs)
    settings = LatencySettings(runtime=upop.latency_runtime, batch=upop.latency_batch)
    log.info("timing %d structures on %s (%s, batch %d) for the latency budget", len(structures),
             upop.latency_runtime, device, upop.latency_batch)
    lm = build_latency_model(structures, upop.granularity, tokens, settings, model=model, example_inputs=inputs)
    log.info("latency tables: %d points measured, the rest from %s; whole model %.2f ms", lm.measured_points,
             lm.cache_path, lm.model_ms or float("nan"))
    return lm


def latency_budget(lm: LatencyModel, plan: PruningPlan, target: float, task: Any, model: nn.Module) -> dict[str, Any]:
    """The compressed `model` against the latency target: LatencyModel.report of the plan's widths
    (predicted_ms, ...) with measured_ms, the model timed as the tables' whole-model time was (same
    runtime, device, batch, threads, statistic; the fastest of the same rounds), its IQR, and
    measured_speedup = the dense model's measured time / measured_ms."""
    s = lm.settings
    settings = LatencySettings(runtime=s["runtime"], device=s.get("device_str"), dtype=s["dtype"], batch=s["batch"],
                               threads=s["threads"], attention=s["attention"], statistic=s["statistic"])
    model = model.to(settings.device)
    inputs = {k: v.to(settings.device) for k, v in task.example_inputs(settings.batch).items()}
    best = min((time_model(model, inputs, settings) for _ in range(settings.rounds)), key=lambda t: t.ms)
    report = lm.report(plan_widths(plan), target, measured_ms=best.ms)
    report["measured_iqr_ms"] = best.iqr_ms
    report["measured_speedup"] = lm.model_ms / best.ms if lm.model_ms and best.ms else None
    return report


def final_timings(cfg: RunConfig, task: Any, upop: UPopConfig, dense: Callable[[], nn.Module], compressed: nn.Module,
                  plan: PruningPlan, lm: Callable[[], LatencyModel]) -> dict[str, Any]:
    """What a run times at its end: "cpu", the dense model (built by `dense()`) and the compressed
    one side by side (cpu_latency), unless eval.skip_latency; "budget", for upop.budget latency,
    latency_budget with the tables `lm()` the search cut on."""
    out: dict[str, Any] = {}
    if not cfg.eval.skip_latency:
        out["cpu"] = cpu_latency(cfg, task, {"dense": dense(), "compressed": compressed})
    if upop.budget == "latency":
        out["budget"] = latency_budget(lm(), plan, upop.target, task, compressed)
    return out
