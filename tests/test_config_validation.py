"""Run-config validation: moved keys, task sections, numeric ranges, the typed upop section, and
the task's checks of the model (another task's model, label count, position table)."""

from __future__ import annotations

import dataclasses

import pytest

from upop.config import UPopConfig
from upop.runconfig import MOVED, ConfigError, RunConfig, load_run_config
from upop.tasks import TASKS

BASE = ["model.preset=tiny-dual"]


def _error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_run_config(None, [*BASE, *overrides])
    message = str(info.value)
    assert "\n" not in message
    return message


def test_moved_keys_say_where_they_went():
    for old, new in MOVED.items():
        assert _error(f"{old}=1") == f"{old} moved to {new}"
        section = new.split(".")[0]
        assert section in TASKS  # every new home is a task's section


def test_task_sections_are_typed_and_belong_to_their_task():
    cfg = load_run_config(None, [*BASE, "retrieval.k_test=7"])
    assert cfg.task_options.k_test == 7 and cfg.to_dict()["retrieval"]["k_test"] == 7
    assert load_run_config(None, ["task=caption", "model.preset=tiny-blip-caption"]).task_options.num_beams == 3
    assert "belongs to task caption" in _error("caption.num_beams=2")
    assert "'retrieval.k_tset' does not exist" in _error("retrieval.k_tset=2")
    assert "retrieval.k_test must be >= 1" in _error("retrieval.k_test=0")
    assert "caption.min_new_tokens" in _error("task=caption", "caption.min_new_tokens=30")
    assert "task must be one of" in _error("task=detection")


def test_upop_section_mirrors_upop_config():
    cfg = load_run_config(None, BASE)
    expected = {f.name: f.default for f in dataclasses.fields(UPopConfig) if f.name != "total_steps"}
    assert dataclasses.asdict(cfg.upop) == expected
    assert cfg.upop_config(12) == UPopConfig(total_steps=12)
    assert load_run_config(None, [*BASE, "upop.target=0.3"]).upop_config(5).target == 0.3
    assert "'upop.ratio' does not exist" in _error("upop.ratio=0.3")
    assert "target must be in (0, 1)" in _error("upop.target=1.5")
    assert "upop.total_steps is derived" in _error("upop.total_steps=3")
    assert "'upop.interval' must be an integer" in _error("upop.interval=2.5")


@pytest.mark.parametrize("override, key", [
    ("train.lr=.nan", "train.lr"), ("train.dense_lr=-1", "train.dense_lr"),
    ("train.search_lr=.inf", "train.search_lr"),
    ("train.min_lr=-0.1", "train.min_lr"), ("train.weight_decay=.nan", "train.weight_decay"),
    ("train.label_smoothing=1.0", "train.label_smoothing"), ("train.label_smoothing=.nan", "train.label_smoothing"),
    ("train.lr_multipliers={text_model: .inf}", "train.lr_multipliers.text_model"),
    ("train.lr_multipliers={text_model: -1}", "train.lr_multipliers.text_model"),
    ("train.grad_accum=100000", "train.grad_accum"), ("train.max_steps_per_epoch=-1", "train.max_steps_per_epoch"),
    ("data.limit_train=-1", "data.limit_train"), ("data.limit_eval=-5", "data.limit_eval"),
    ("data.num_workers=-1", "data.num_workers"), ("seed=-1", "seed"), (f"seed={2**63}", "seed"),
    ("data.image_size=100000", "data.image_size"), ("data.image_size=4", "data.image_size"),
    ("eval.latency_batches=[1, 0]", "eval.latency_batches"),
    ("eval.latency_batches=[10000000]", "eval.latency_batches"),
    ("eval.latency_repeats=0", "eval.latency_repeats"), ("model.num_labels=0", "model.num_labels"),
])
def test_ranges_are_refused_with_the_key(override, key):
    assert key in _error(override)


def test_output_dir_that_is_a_file(tmp_path):
    path = tmp_path / "taken"
    path.write_text("x")
    assert "is an existing file" in _error(f"output_dir={path}")
    assert load_run_config(None, [*BASE, f"output_dir={tmp_path / 'new'}"]).output_dir.endswith("new")


def test_defaults_unchanged():
    cfg = RunConfig()
    assert cfg.eval.latency_batches == [1, 32] and cfg.train.lr == 1e-4 and cfg.data.image_size == 64
    assert TASKS["caption"].Options().prompt == "a picture of "
    assert TASKS["vqa"].Options().k_answers == 128 and TASKS["retrieval"].Options().k_test == 128


def test_check_model_refuses_another_tasks_model_and_label_counts():
    from types import SimpleNamespace

    from upop.models import PRESETS

    def task(name: str, num_labels: int | None = None):  # the checks need no data: skip __init__
        instance = TASKS[name].__new__(TASKS[name])
        instance.num_labels = num_labels
        return instance

    nlvr = PRESETS["tiny-blip-nlvr"].build(16, None).model
    seg = PRESETS["tiny-segmenter"].build(16, 3).model
    task("nlvr").check_model(nlvr)
    task("segmentation", 3).check_model(seg)
    with pytest.raises(ConfigError, match="task segmentation needs a Segmenter model, got BlipForNLVR"):
        task("segmentation").check_model(nlvr)
    with pytest.raises(ConfigError, match="task nlvr needs a BlipForNLVR model"):
        task("nlvr").check_model(seg)
    with pytest.raises(ConfigError, match="the model predicts 3 classes, the data has 5"):
        task("segmentation", 5).check_model(seg)
    # data.max_tokens above the text model's position table (64 in the tiny BLIP presets)
    built = PRESETS["tiny-blip-nlvr"].build(16, None)
    fake = SimpleNamespace(built=built, cfg=SimpleNamespace(data=SimpleNamespace(max_tokens=65)))
    with pytest.raises(ConfigError, match="data.max_tokens 65 is above the model's 64 position embeddings"):
        TASKS["nlvr"]._check_max_tokens(fake, built.model)
