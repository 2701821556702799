"""A run's results can be trusted: nothing non-finite is saved, nothing is lost when a run is killed
at a phase boundary or the disk fills up, nothing is mixed when two runs meet in one folder, and
bad training data stops with one line. Tiny retrieval runs (tests/test_pipeline.py's data)."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_pipeline import _retrieval_config, _write, karpathy, run_killed_in_epoch  # noqa: F401  (karpathy: a fixture)
from upop import cli, files, pipeline, report, runconfig, state
from upop.files import DiskFullError
from upop.runconfig import ConfigError, load_run_config
from upop.search import NonFiniteError


def _config(root: Path, out: Path, **train) -> dict:
    config = _retrieval_config(root, out, **train)
    config["eval"] = {"skip_latency": True}
    return config


def _run(tmp_path: Path, config: dict, **kwargs) -> dict:
    return pipeline.run_compress(load_run_config(_write(tmp_path, config)), **kwargs)


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("upop: error")]


def _result(out: Path) -> tuple:
    metrics = json.loads((out / "metrics.json").read_text())
    plan = json.loads((out / "plan.json").read_text())["structures"]
    return plan, metrics["dense"]["metric"], metrics["searched"]["metric"], metrics["compressed"]["metric"]


@pytest.fixture(scope="module")
def reference(karpathy, tmp_path_factory) -> Path:  # noqa: F811
    """An uninterrupted run: the folder (plan, metrics) every resumed run must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    _run(tmp, _config(karpathy, tmp / "run"))
    return tmp / "run"


# ---- never save a non-finite model ------------------------------------------------------------------
@pytest.mark.parametrize("steps, message", [(1, "retrain epoch 1: not saved, tensor"),
                                            (2, "retrain step 2: 1 steps had a non-finite loss or gradient")])
def test_infinite_learning_rate_fails_with_one_line_and_saves_nothing(karpathy, tmp_path, capsys, monkeypatch,  # noqa: F811
                                                                      steps, message):
    # the run config now refuses train.lr=.inf itself; set it after that check to reach the run
    def infinite_lr(*args, **kwargs):
        cfg = load_run_config(*args, **kwargs)
        cfg.train.lr = float("inf")
        return cfg

    monkeypatch.setattr(runconfig, "load_run_config", infinite_lr)
    out = tmp_path / "run"
    config = _write(tmp_path, _config(karpathy, out, dense_epochs=0, search_epochs=1, max_steps_per_epoch=steps))
    assert cli.main(["compress", "--config", str(config)]) == 1
    [line] = _error_lines(capsys)
    assert message in line, line
    assert not (out / "model").exists() and not (out / "metrics.json").exists()
    progress = json.loads((out / "state" / "progress.json").read_text())
    assert (progress["phase"], progress["epoch"]) == ("retrain", 0)  # the last finite checkpoint stays


@pytest.mark.parametrize("phase, call", [("dense", 2), ("search", 3)])
def test_max_skipped_fraction_zero_tolerates_no_skip(karpathy, tmp_path, monkeypatch, phase, call):  # noqa: F811
    from upop.tasks.retrieval import RetrievalTask

    real_loss, calls = RetrievalTask.loss, {"n": 0}

    def once_nan(self, model, batch):
        calls["n"] += 1
        loss = real_loss(self, model, batch)
        return loss * float("nan") if calls["n"] == call else loss

    monkeypatch.setattr(RetrievalTask, "loss", once_nan)
    config = _config(karpathy, tmp_path / "run")
    config["upop"]["max_skipped_fraction"] = 0
    with pytest.raises(NonFiniteError, match=f"{phase} step {call - 2 * (phase == 'search')}: 1 steps"):
        _run(tmp_path, config)


# ---- nothing lost: killed at every phase boundary ---------------------------------------------------
# (phase the progress names next, killed before or after the progress names it); "metrics": killed
# after report.md, before metrics.json
BOUNDARIES = [("search", "before"), ("search", "after"), ("retrain", "before"), ("retrain", "after"),
              ("done", "before"), ("done", "after"), ("metrics", "before")]


@pytest.mark.parametrize("phase, when", BOUNDARIES)
def test_killed_at_a_phase_boundary_resumes_to_the_same_result(karpathy, tmp_path, monkeypatch, reference,  # noqa: F811
                                                               phase, when):
    out = tmp_path / "run"
    config = _config(karpathy, out)
    real_save, real_write = state.RunState.save, report.write_text

    def save(self, progress, *args, **kwargs):
        boundary = progress.phase == phase and progress.epoch == 0
        if boundary and when == "before":
            raise KeyboardInterrupt
        real_save(self, progress, *args, **kwargs)
        if boundary:
            raise KeyboardInterrupt

    def write(path, text):
        if Path(path).name == "metrics.json":
            raise KeyboardInterrupt
        return real_write(path, text)

    monkeypatch.setattr(state.RunState, "save", save)
    monkeypatch.setattr(report, "write_text", write)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, config)
    assert not (out / "metrics.json").exists()
    named = json.loads((out / "state" / "progress.json").read_text())["phase"]
    if named in ("retrain", "done"):  # what the named phase needs is on disk before the progress names it
        assert (out / "plan.json").is_file() and (out / "state" / "plan.json").is_file()
    if named == "done":
        assert (out / "model" / "model.safetensors").is_file()
    monkeypatch.setattr(state.RunState, "save", real_save)
    monkeypatch.setattr(report, "write_text", real_write)
    _run(tmp_path, config)  # the same command again
    assert _result(out) == _result(reference)
    assert (out / "report.md").is_file()


@pytest.mark.parametrize("where", ["checkpoint", "plan"])
def test_disk_full_is_one_line_and_the_rerun_completes(karpathy, tmp_path, monkeypatch, reference, where):  # noqa: F811
    out = tmp_path / "run"
    config = _config(karpathy, out)
    calls = {"n": 0}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "checkpoint":  # the weights of the third checkpoint (search epoch 1)
        real = state.save_model

        def save_model(model, path, *args, **kwargs):
            calls["n"] += 1
            return full() if calls["n"] == 3 else real(model, path, *args, **kwargs)

        monkeypatch.setattr(state, "save_model", save_model)
    else:  # state/plan.json, through the one atomic writer
        monkeypatch.setattr(state, "write_text", lambda path, text: files.atomic_write(path, full))
    with pytest.raises(DiskFullError) as info:
        _run(tmp_path, config)
    assert "no space left" in str(info.value) and len(str(info.value).splitlines()) == 1
    assert cli._describe(info.value) == (1, str(info.value.strerror))  # the CLI's one line, exit code 1
    assert not list((out / "state").glob(".*.tmp")) and not list(out.glob(".*.tmp"))  # no half-written file
    monkeypatch.undo()
    _run(tmp_path, config)
    assert _result(out) == _result(reference)


# ---- nothing mixed --------------------------------------------------------------------------------------
def test_a_second_run_on_a_locked_folder_fails_at_once(karpathy, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(  # another process holding the lock the way a run does
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, str(os.getpid()).encode())\nprint('locked', flush=True)\ntime.sleep(120)", str(out / ".lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        config = _write(tmp_path, _config(karpathy, out))
        assert cli.main(["compress", "--config", str(config)]) == 2
        [line] = _error_lines(capsys)
        assert f"pid {holder.pid}" in line and str(out) in line, line
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written, not even log.txt
    finally:
        holder.kill()
        holder.wait()
    with state.OutputLock(out):  # the kernel dropped the dead holder's lock
        pass


def test_finished_run_is_kept_unless_overwrite(karpathy, tmp_path, reference, capsys):  # noqa: F811
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = (out / "metrics.json").read_bytes()
    mtime = (out / "metrics.json").stat().st_mtime_ns
    # the identical run: reported, not run again, metrics.json untouched
    again = _run(tmp_path, _config(karpathy, out))
    assert json.loads(before) == again and (out / "metrics.json").stat().st_mtime_ns == mtime

    other = _config(karpathy, out, lr=3e-4)
    path = _write(tmp_path, other)
    assert cli.main(["compress", "--config", str(path)]) == 2
    [line] = _error_lines(capsys)
    assert "finished run of another configuration" in line and "--overwrite" in line, line
    shutil.rmtree(out / "state")  # the finished run is recognised without its state too
    assert cli.main(["compress", "--config", str(path)]) == 2
    assert (out / "metrics.json").read_bytes() == before

    metrics = _run(tmp_path, other, overwrite=True)
    assert metrics["config"]["train"]["lr"] == 3e-4
    assert json.loads((out / "metrics.json").read_text())["config_hash"] == metrics["config_hash"]
    assert metrics["config_hash"] != json.loads(before)["config_hash"]


def test_unfinished_run_of_another_config_is_refused(karpathy, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "run"
    real_epoch = pipeline.Trainer.epoch

    def crash_in_search(self, *args, phase, **kwargs):
        if phase == "search":
            raise KeyboardInterrupt
        return real_epoch(self, *args, phase=phase, **kwargs)

    monkeypatch.setattr(pipeline.Trainer, "epoch", crash_in_search)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, _config(karpathy, out))
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="another configuration.*--overwrite"):
        _run(tmp_path, _config(karpathy, out, lr=3e-4))


# ---- damaged state --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def interrupted(karpathy, tmp_path_factory) -> Path:  # noqa: F811
    """A run killed in its second search epoch: state/search-1 holds model, optimizer and search."""
    tmp = tmp_path_factory.mktemp("interrupted")
    run_killed_in_epoch(_write(tmp, _config(karpathy, tmp / "run")), 3)
    assert (tmp / "run" / "state" / "search-1" / "search.safetensors").is_file()
    return tmp / "run"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


DAMAGE = {
    "truncated progress": ("progress.json", _truncate, "progress.json: is corrupted"),
    "garbage progress": ("progress.json", lambda p: p.write_bytes(b"\x00\xff garbage"), "progress.json: is corrupted"),
    "missing weights": ("search-1/model.safetensors", Path.unlink, "model.safetensors: is missing"),
    "truncated weights": ("search-1/model.safetensors", _truncate, "model.safetensors: cannot be loaded"),
    "garbage optimizer": ("search-1/optimizer.pt", lambda p: p.write_bytes(b"garbage" * 50),
                          "optimizer.pt: cannot be loaded"),
    "garbage search": ("search-1/search.safetensors", lambda p: p.write_bytes(b"garbage" * 50),
                       "search.safetensors: cannot be loaded"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_state_is_one_line_naming_the_file(karpathy, tmp_path, interrupted, capsys, case):  # noqa: F811
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    file, damage, message = DAMAGE[case]
    damage(out / "state" / file)
    config = _write(tmp_path, _config(karpathy, out))
    assert cli.main(["compress", "--config", str(config)]) == 2
    [line] = _error_lines(capsys)
    assert message in line and f"delete {out / 'state'} or pass --overwrite" in line, line
    assert not (out / "metrics.json").exists()


# ---- bad training data ----------------------------------------------------------------------------------
def test_every_training_image_broken_is_one_line(karpathy, tmp_path, capsys):  # noqa: F811
    root = tmp_path / "data"
    shutil.copytree(karpathy, root)
    train = json.loads((root / "train.json").read_text())
    for entry in train:
        entry["image"] = "broken/" + Path(entry["image"]).name
        (root / entry["image"]).parent.mkdir(exist_ok=True)
        (root / entry["image"]).write_bytes(b"not an image")
    (root / "train.json").write_text(json.dumps(train))
    config = _config(root, tmp_path / "run", dense_epochs=1)
    config["data"].update(root=str(root), train=str(root / "train.json"), on_bad_input="skip")
    assert cli.main(["compress", "--config", str(_write(tmp_path, config))]) == 2
    [line] = _error_lines(capsys)
    assert "no usable training example: all 24 skipped" in line, line
    assert "cannot decode image" in (tmp_path / "run" / "log.txt").read_text()  # the skips reached log.txt


@pytest.mark.parametrize("override, words", [("train.batch_size=1000", ["train.batch_size=1000", "24 examples"]),
                                             ("train.grad_accum=100", ["train.grad_accum"])])
def test_batch_larger_than_the_data_is_one_line(karpathy, tmp_path, capsys, override, words):  # noqa: F811
    config = _write(tmp_path, _config(karpathy, tmp_path / "run", max_steps_per_epoch=None))
    assert cli.main(["compress", "--config", str(config), override]) == 2
    [line] = _error_lines(capsys)
    assert all(word in line for word in words), line
    assert not (tmp_path / "run" / "state").exists()
