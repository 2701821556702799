"""`upop compress --dry-run`: a paper config run end to end at a reduced size, offline."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from upop import cli
from upop.dryrun import (
    ARCHITECTURES,
    GIB,
    architecture_for,
    project_gpu_memory,
    relative_difference,
    saved_tensor_bytes,
)
from upop.runconfig import load_run_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PAPER = Path(__file__).resolve().parents[1] / "examples" / "paper"


def test_every_paper_config_has_a_real_architecture() -> None:
    seen = {}
    for path in sorted(PAPER.glob("*.yaml")):
        seen[path.stem] = architecture_for(load_run_config(path)).key
    assert seen["coco_clip"] == seen["flickr_clip"] == "clip-l14-336"
    assert seen["coco_blip_retrieval"] == "blip-retrieval"
    assert {"blip-caption", "blip-vqa", "blip-nlvr", "deit-s", "segmenter-s16"} <= set(seen.values())
    assert set(seen.values()) <= set(ARCHITECTURES)


def test_saved_tensor_bytes_counts_what_autograd_keeps() -> None:
    x = torch.randn(1000, requires_grad=True)
    w = torch.randn(1000, requires_grad=True)
    # exp saves its output (4000 bytes); mul saves both inputs: x is excluded, exp's output counted once
    assert saved_tensor_bytes(lambda: (x.exp() * w).sum(), {x.untyped_storage().data_ptr()}) == 8000
    assert saved_tensor_bytes(lambda: (x * 2).sum(), {x.untyped_storage().data_ptr()}) == 0


def test_projection_is_linear_in_the_batch() -> None:
    p = project_gpu_memory(params=1_000_000, extra_state_bytes=GIB, act_at=(1, 2), act_bytes=(3 * GIB, 5 * GIB),
                           batch=32, ddp=True)
    assert p["activations_per_example_gib"] == pytest.approx(2.0)
    assert p["activations_gib"] == pytest.approx(1 + 2 * 32)
    assert p["states_gib"] == pytest.approx(20e6 / GIB)
    assert p["total_gib"] == pytest.approx(20e6 / GIB + 1 + 65)


def test_relative_difference() -> None:
    a = [torch.tensor([1.0, -4.0]), torch.ones(3)]
    assert relative_difference(a, [torch.tensor([1.0, -4.0]), torch.ones(3)]) == 0
    assert relative_difference(a, [torch.tensor([1.0, -3.0]), torch.ones(3)]) == pytest.approx(0.25)


def test_dry_run_of_a_paper_config_at_reduced_size(tmp_path, monkeypatch, capsys) -> None:
    """coco_blip_retrieval (BLIP ITC + ITM, momentum distillation, queue, learned temperature), shrunk:
    two search steps, compression, one retraining step; compressed == masked; nothing left behind."""
    config = PAPER / "coco_blip_retrieval.yaml"
    output_dir = Path(load_run_config(config).output_dir)
    existed = output_dir.exists()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code = cli.main(["compress", "--config", str(config), "--dry-run", "--dry-run-scale", "tiny"])
    assert code == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("dry-run result: "))
    result = json.loads(line.removeprefix("dry-run result: "))
    assert result["task"] == "retrieval" and result["scale"] == "tiny"
    assert result["max_relative_diff"] <= 1e-4
    assert result["params_after"] < result["params_before"]
    assert result["flops_after"] < result["flops_before"]
    assert result["seconds_per_search_step"] > 0 and result["seconds_per_retrain_step"] > 0
    small, large = result["activation_bytes"]
    assert 0 < small < large  # more examples keep more activations
    assert result["extra_state_bytes"] > 0  # the momentum copy and its queue
    assert result["optimizer_state_bytes"] >= 8 * result["params_before"]  # AdamW: two fp32 moments
    assert result["projected"]["total_gib"] > result["projected"]["states_gib"] > 0
    assert result["peak_rss_gib"] > 0
    assert list(tmp_path.iterdir()) == []  # the synthetic data and the run folder are removed
    assert output_dir.exists() == existed  # the config's output_dir is never written
