"""Speed: CPU latency in PyTorch and ONNX Runtime, and the cost of a search step.

Latency is the median of `repeats` timed forwards after `warmup` untimed ones, on random
inputs of the task's shape (upop.costs.measure_latency for PyTorch). ONNX models are
exported with torch.onnx.export(..., dynamo=True) and run by onnxruntime's
CPUExecutionProvider with as many intra-op threads as torch uses.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import upop
from upop.costs import measure_latency

from .methods import Bench, _output_tensor


def torch_latency(bench: Bench, model: nn.Module, batches: list[int], repeats: int, warmup: int = 2) -> dict:
    return {f"batch{b}": measure_latency(model, bench.task.example_inputs(b), repeats=repeats, warmup=warmup)
            for b in batches}


class _Logits(nn.Module):
    """Positional inputs -> one logits tensor, for export."""

    def __init__(self, model: nn.Module, keys: list[str]) -> None:
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return _output_tensor(self.model(**dict(zip(self.keys, args, strict=True))))


def export_onnx(model: nn.Module, inputs: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """Export with the dynamo exporter at the shape of `inputs`; returns the export time."""
    wrapper = _Logits(copy.deepcopy(model).eval(), list(inputs)).eval()
    start = time.time()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, tuple(inputs.values()), str(path), dynamo=True, input_names=list(inputs),
                          output_names=["logits"], verbose=False)
    return {"export_s": time.time() - start, "bytes": path.stat().st_size}


def ort_latency(path: Path, inputs: dict[str, torch.Tensor], repeats: int, warmup: int = 2) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feed = {n: v.numpy() for n, v in zip(names, inputs.values(), strict=True)}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def ort_check(path: Path, model: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    """Max |ORT - PyTorch| of the exported logits (the export is only timed if it is right)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, {n: v.numpy() for n, v in zip(names, inputs.values(), strict=True)})[0]
    with torch.no_grad():
        want = _output_tensor(model.eval()(**inputs)).numpy()
    return float(abs(got - want).max())


def speed_profile(bench: Bench, model: nn.Module, batches: list[int], repeats: int, onnx: bool,
                  onnx_batches: list[int] | None = None) -> dict:
    """PyTorch and (optionally) ONNX Runtime latency at every batch size, plus params and FLOPs."""
    out: dict[str, Any] = {"params": upop.count_params(model),
                           "flops": upop.count_flops(model, bench.task.example_inputs(1)),
                           "torch_ms": torch_latency(bench, model, batches, repeats)}
    if not onnx:
        return out
    out["ort_ms"], out["export"], out["ort_max_abs_diff"] = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for b in onnx_batches or batches:
            torch.manual_seed(b)
            inputs = bench.task.example_inputs(b)
            path = Path(tmp) / f"model_b{b}.onnx"
            try:
                out["export"][f"batch{b}"] = export_onnx(model, inputs, path)
                out["ort_max_abs_diff"][f"batch{b}"] = ort_check(path, model, inputs)
                out["ort_ms"][f"batch{b}"] = ort_latency(path, inputs, repeats)
            except Exception as exc:  # noqa: BLE001  (recorded, not hidden: the table shows the failure)
                out["ort_ms"][f"batch{b}"] = None
                out["export"][f"batch{b}"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    return out


def search_step_cost(bench: Bench, dense: nn.Module, steps: int, warmup: int = 2) -> dict:
    """Wall time of a training step with the UPop search attached (mask hooks, sparsity loss,
    search.step() with its periodic re-ranking) over a plain training step, on the same batch.
    The two models alternate step by step so that drifts in CPU speed hit both alike."""
    batch = next(iter(bench.trainer.loader))
    t = bench.cfg.train
    settings = {k: v for k, v in bench.cfg.upop.items() if k != "total_steps"}
    runs = {}
    for kind in ("plain", "search"):
        model = copy.deepcopy(dense).train()
        optimizer = bench.trainer.optimizer(model, t.search_lr)
        search = (upop.UPopSearch(model, upop.UPopConfig(**{**settings, "total_steps": 10**6}))
                  if kind == "search" else None)
        runs[kind] = (model, optimizer, search, [])

    def one_step(model, optimizer, search, times) -> None:
        start = time.perf_counter()
        loss = bench.task.loss(model, batch)
        if search is not None:
            loss = loss + search.sparsity_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if search is not None:
            search.step()
        times.append(time.perf_counter() - start)

    for i in range(warmup + steps):
        for kind in ("plain", "search") if i % 2 == 0 else ("search", "plain"):
            one_step(*runs[kind])
    plain, searched = (runs[k][3][warmup:] for k in ("plain", "search"))
    runs["search"][2].remove()
    return {
        "steps": steps, "batch_size": t.batch_size, "interval": settings.get("interval"),
        "plain_ms_median": 1000 * statistics.median(plain), "search_ms_median": 1000 * statistics.median(searched),
        "plain_ms_mean": 1000 * statistics.mean(plain), "search_ms_mean": 1000 * statistics.mean(searched),
        "ratio_median": statistics.median(searched) / statistics.median(plain),
        "ratio_mean": statistics.mean(searched) / statistics.mean(plain),
    }
