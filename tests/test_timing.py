"""Honest timing: models compared are timed in one process, interleaved, as a median with its
spread (costs.compare_latency); a run's dense and compressed latency and its speed-up come from
one such measurement, the dense model rebuilt from the weights the run kept; `upop evaluate` and
the pipeline measure with one implementation."""

from __future__ import annotations

import itertools
import json
import time

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from test_pipeline import _retrieval_config, _write, karpathy  # noqa: F401  (karpathy: a fixture)
from upop import costs, evaluate, measure, pipeline, report
from upop.runconfig import load_run_config


class Recorder(nn.Module):
    """Appends its name to `calls` at every forward; sleeps `seconds` (a model of known cost)."""

    def __init__(self, name: str, calls: list[str], seconds: float = 0.0) -> None:
        super().__init__()
        self.name, self.calls, self.seconds = name, calls, seconds
        self.lin = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(self.name)
        if self.seconds:
            time.sleep(self.seconds)
        return self.lin(x)


def test_models_are_timed_interleaved_in_alternating_order():
    calls: list[str] = []
    models = {"dense": Recorder("dense", calls), "compressed": Recorder("compressed", calls)}
    models["compressed"].eval()
    result = costs.compare_latency(models, torch.zeros(1, 2), rounds=4, warmup=1, block_ms=1e-9)  # 1 call a block
    # each model: its warm-up call and a calibration block; then per round one block of each, the order
    # reversed every other round: d c | c d | d c | c d. A block is k calls (the timer warms up too).
    runs = [(name, len(list(group))) for name, group in itertools.groupby(calls)]
    k = runs[2][1]
    assert runs == [("dense", 1 + k), ("compressed", 1 + k), ("dense", k), ("compressed", 2 * k), ("dense", 2 * k),
                    ("compressed", 2 * k), ("dense", k)]
    assert models["dense"].training and not models["compressed"].training  # each model's own mode restored
    for r in result.values():
        assert r["rounds"] == 4 and r["calls_per_block"] == 1 and r["iqr_ms"] >= 0 and r["median_ms"] > 0


def test_median_and_spread_tell_a_slower_model_apart():
    calls: list[str] = []
    models = {"slow": Recorder("slow", calls, seconds=0.004), "fast": Recorder("fast", calls)}
    result = costs.compare_latency(models, torch.zeros(1, 2), rounds=5, warmup=1, block_ms=1.0)
    assert result["slow"]["median_ms"] >= 4.0 > result["fast"]["median_ms"]
    assert result["slow"]["calls_per_block"] == 1 < result["fast"]["calls_per_block"]
    single = costs.compare_latency({"slow": models["slow"]}, torch.zeros(1, 2), rounds=1)
    assert single["slow"]["iqr_ms"] is None  # no spread from one timed block
    assert costs.measure_latency(models["slow"], torch.zeros(1, 2), repeats=3) >= 4.0


def test_evaluate_and_the_pipeline_share_one_measure():
    assert evaluate.measure is measure.measure
    assert not hasattr(pipeline, "measure") or pipeline.measure is measure.measure


def test_speedups_from_one_measurement():
    dense = {"latency_ms": {"batch1": 10.0, "batch8": 40.0}}
    compressed = {"latency_ms": {"batch1": 5.0, "batch8": None}}
    assert report.speedups(dense, compressed) == {"batch1": 2.0, "batch8": None}
    assert report.speedups({"latency_ms": None}, compressed) is None
    table = report.format_table({"metric": "acc", "dense": {"latency_ms": {"batch1": 10.0},
                                                            "latency_iqr_ms": {"batch1": 0.25}},
                                 "compressed": {"latency_ms": {"batch1": 5.0}}})
    row = next(line for line in table.splitlines() if line.startswith("latency batch 1"))
    assert row.split()[4:] == ["10.0±0.2", "5.0", "2.00x", "faster"]


def test_run_times_dense_and_compressed_side_by_side(karpathy, tmp_path, monkeypatch):  # noqa: F811
    seen = []
    real = measure.compare_latency

    def recording(models, inputs, **kwargs):
        seen.append({name: (type(m).__name__, costs.count_params(m), {k: v.clone() for k, v in m.state_dict().items()})
                     for name, m in models.items()})
        result = real(models, inputs, **kwargs)
        result["dense"]["median_ms"], result["compressed"]["median_ms"] = 3.0, 2.0  # known numbers to find again
        return result

    monkeypatch.setattr(measure, "compare_latency", recording)
    out = tmp_path / "run"
    config = _retrieval_config(karpathy, out)
    config["eval"] = {"latency_batches": [1, 2], "latency_repeats": 3}
    metrics = pipeline.run_compress(load_run_config(_write(tmp_path, config)))
    assert len(seen) == 2 and all(set(call) == {"dense", "compressed"} for call in seen)  # one call per batch
    dense_class, dense_params, dense_weights = seen[0]["dense"]
    assert dense_params == metrics["dense"]["params"] > seen[0]["compressed"][1] == metrics["compressed"]["params"]
    # the dense model timed is the run's own dense model, rebuilt from the weights kept at the end of the dense phase
    kept = load_file(str(out / "state" / "dense" / "model.safetensors"))
    assert all(torch.equal(kept[k], dense_weights[k]) for k in kept)
    written = json.loads((out / "metrics.json").read_text())
    for name, ms in (("dense", 3.0), ("compressed", 2.0)):
        assert written[name]["latency_ms"] == {"batch1": ms, "batch2": ms}
        assert set(written[name]["latency_iqr_ms"]) == {"batch1", "batch2"}
    assert written["speedup"] == {"batch1": pytest.approx(1.5), "batch2": pytest.approx(1.5)}
    assert "±" in (out / "report.md").read_text()
