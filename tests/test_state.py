"""upop.state on its own: the output lock, checkpoints and the progress record, the refusal to save
non-finite weights, the finished-run check; and log lines that survive file names that are not UTF-8."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from upop.data._common import load_image_or_none, printable
from upop.files import NonFiniteWeightsError
from upop.runconfig import ConfigError, RunConfig
from upop.state import OutputDirBusyError, OutputLock, Progress, RunState, config_hash, finished_run
from upop.training import setup_logging


def test_the_lock_is_exclusive_and_names_its_holder(tmp_path):
    with OutputLock(tmp_path / "out") as first:
        assert (tmp_path / "out" / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(OutputDirBusyError, match=rf"in use by another upop run \(pid {os.getpid()}\)"):
            OutputLock(tmp_path / "out").acquire()  # another open file: flock refuses it
        assert first.fd is not None
    OutputLock(tmp_path / "out").acquire().release()  # released at the end of the block


def _optimizer_after_a_step(model: nn.Module) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    return optimizer


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = _optimizer_after_a_step(model)
    state = RunState(tmp_path / "state", "abc")
    assert state.progress() is None
    progress = Progress(phase="retrain", epoch=2, dense={"metric": 1.5}, best=3.0, wall={"dense": 1.0})
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "plan.json").write_text("{}")  # the retrain phase needs its plan
    state.save_dense(model)  # and every phase after the dense one its dense model
    state.save(progress, model, optimizer, what="retrain epoch 2")
    state.save(Progress(phase="retrain", epoch=3), model, optimizer, what="retrain epoch 3")
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["dense", "plan.json", "progress.json",
                                                                      "retrain-3"]
    state.save(progress, model, optimizer, what="retrain epoch 2")

    again = RunState(tmp_path / "state", "abc")
    assert again.progress() == progress
    fresh = nn.Linear(4, 3)
    again.load_model(fresh)
    assert torch.equal(fresh.weight, model.weight)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    again.load_optimizer(fresh_optimizer)
    loaded, saved = fresh_optimizer.state_dict()["state"][0], optimizer.state_dict()["state"][0]
    assert torch.equal(loaded["exp_avg"], saved["exp_avg"])
    assert torch.equal(again.load_dense(nn.Linear(4, 3)).weight, model.weight)


def test_the_dense_model_is_kept_finite_and_required_after_the_dense_phase(tmp_path):
    model = nn.Linear(4, 3)
    state = RunState(tmp_path / "state", "abc")
    state.save(Progress(phase="search", epoch=0), model, what="end of dense")
    with pytest.raises(ConfigError, match=r"state/dense/model.safetensors: is missing; to start over delete"):
        RunState(tmp_path / "state", "abc").progress()
    with torch.no_grad():
        model.bias[0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match="the dense model: not saved"):
        state.save_dense(model)
    assert not (tmp_path / "state" / "dense").exists()
    (tmp_path / "state" / "dense").mkdir()
    (tmp_path / "state" / "dense" / "model.safetensors").write_bytes(b"half a file")
    again = RunState(tmp_path / "state", "abc")
    assert again.progress().phase == "search"
    with pytest.raises(ConfigError, match=r"dense/model.safetensors: cannot be loaded"):
        again.load_dense(nn.Linear(4, 3))


def test_latency_tables_round_trip_and_damage(tmp_path):
    from upop.latency import LatencyModel, Table

    state = RunState(tmp_path / "state", "abc")
    assert state.latency() is None
    with pytest.raises(ConfigError, match="latency.json: is missing"):
        state.latency(required=True)
    lm = LatencyModel.synthetic({"a": Table([1, 2, 4], [1.0, 1.5, 2.5], [0.0, 0.0, 0.0])}, fixed_ms=0.5)
    state.save_latency(lm)
    assert state.latency().to_dict() == lm.to_dict()
    (tmp_path / "state" / "latency.json").write_text('{"format": "something else"}')
    with pytest.raises(ConfigError, match="latency.json: LatencyError"):
        state.latency()


def test_config_hash_ignores_output_dir_eval_and_log():
    cfg = RunConfig()
    other = RunConfig(output_dir="elsewhere")
    other.eval.skip_latency = True
    other.log.report_to, other.log.every_n_steps = ["tensorboard"], 3
    assert config_hash(cfg) == config_hash(other)
    without_log = {k: v for k, v in cfg.to_dict().items() if k != "log"}  # a run recorded before log: existed
    assert config_hash(without_log) == config_hash(cfg)
    other.train.lr = 1.0
    assert config_hash(other) != config_hash(cfg)


def test_non_finite_weights_are_never_saved(tmp_path):
    model = nn.Linear(4, 3)
    state = RunState(tmp_path / "state", "abc")
    state.save(Progress(phase="dense", epoch=1), model, what="dense epoch 1")
    before = (tmp_path / "state" / "progress.json").read_bytes()
    with torch.no_grad():
        model.bias[1] = float("nan")
    with pytest.raises(NonFiniteWeightsError) as info:
        state.save(Progress(phase="dense", epoch=2), model, what="dense epoch 2")
    assert str(info.value).startswith("dense epoch 2: not saved, tensor 'bias' holds NaN or infinity")
    assert (tmp_path / "state" / "progress.json").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["dense-1", "progress.json"]


def test_progress_with_fields_out_of_range_is_damaged(tmp_path):
    folder = tmp_path / "state"
    (folder / "dense-1").mkdir(parents=True)
    for bad in ({"phase": "lunch"}, {"epoch": -1}, {"epoch": "1"}, {"wall": []}, {"best": "high"}):
        record = {"phase": "dense", "epoch": 1, "config_hash": "abc", "checkpoint": "dense-1", **bad}
        (folder / "progress.json").write_text(json.dumps(record))
        with pytest.raises(ConfigError, match=f"progress.json: is corrupted; to start over delete {folder}"):
            RunState(folder, "abc").progress()


def test_finished_run_with_damaged_metrics(tmp_path):
    cfg = RunConfig(output_dir=str(tmp_path))
    assert finished_run(tmp_path, cfg) is None  # nothing there
    (tmp_path / "metrics.json").write_text('{"config_hash": "x", "conf')
    with pytest.raises(ConfigError, match="metrics.json is damaged.*--overwrite"):
        finished_run(tmp_path, cfg)
    assert finished_run(tmp_path, cfg, overwrite=True) is None and not (tmp_path / "metrics.json").exists()
    # an older metrics.json without config_hash: the hash comes from its config
    (tmp_path / "model").mkdir()
    (tmp_path / "metrics.json").write_text(json.dumps({"config": cfg.to_dict()}))
    assert finished_run(tmp_path, cfg) == {"config": cfg.to_dict()}
    assert config_hash(cfg) == config_hash(cfg.to_dict())


def test_file_names_that_are_not_utf8_reach_log_txt(tmp_path):
    folder = os.fsencode(tmp_path / "imgs")
    os.mkdir(folder)
    raw = os.path.join(folder, b"caf\xe9-\xff.png")  # Latin-1 bytes: not valid UTF-8
    with open(raw, "wb") as f:
        f.write(b"not an image")
    path = Path(os.fsdecode(raw))  # what os.listdir gives Python: surrogate escapes
    assert printable(path).endswith("caf\\xe9-\\xff.png")
    setup_logging(tmp_path / "out", main=True)
    try:
        skipped: list[str] = []
        assert load_image_or_none(path, "skip", skipped) is None
        logging.getLogger("upop").warning("skipped %s", path)  # a raw name passed by any caller
    finally:
        for handler in logging.getLogger("upop").handlers:
            handler.close()
        logging.getLogger("upop").handlers.clear()
    text = (tmp_path / "out" / "log.txt").read_text(encoding="utf-8")
    assert "caf\\xe9-\\xff.png: cannot decode image" in text and "skipped " in text
    assert text.count("caf\\xe9-\\xff.png") == 2
