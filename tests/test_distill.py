"""Distillation from the dense model (upop.distill): the KL / cosine terms against a hand computation, the
teacher a frozen copy that never touches the caller's module, weight 0 the plain training, one forward per
loss, tasks that cannot be distilled refused before training, the `distill:` keys, and `upop compress`
with distillation end to end and resumed with the same teacher."""

import copy
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from test_pipeline import _retrieval_config, _write, imagefolder, karpathy, run_killed_in_epoch  # noqa: F401
from upop import cli, pipeline
from upop.distill import Distiller, DistillOptions, cosine_loss, kl_loss
from upop.runconfig import ConfigError, load_run_config
from upop.state import config_hash
from upop.tasks import make_task
from upop.tasks.base import Task
from upop.training import Dist, Trainer


class Toy(Task):
    """A task with no data: Distiller only needs its name and distill_views."""

    name = "toy"

    def __init__(self) -> None:  # no config, no data
        pass


class Dual(nn.Module):
    """A CLIP-shaped output: logits both ways and embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.image, self.text = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> SimpleNamespace:
        a, b = self.image(x), self.text(y)
        return SimpleNamespace(logits_per_image=a @ b.T, logits_per_text=b @ a.T, image_embeds=a, text_embeds=b)


def _kl_by_hand(student: list[list[float]], teacher: list[list[float]], t: float) -> float:
    total = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        zs = sum(math.exp(v / t) for v in s_row)
        zt = sum(math.exp(v / t) for v in t_row)
        for s, u in zip(s_row, t_row, strict=True):
            p, q = math.exp(u / t) / zt, math.exp(s / t) / zs
            total += p * math.log(p / q)
    return total / len(student) * t * t


def test_kl_and_cosine_match_a_hand_computation():
    s, t = [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]], [[3.0, 1.0, 0.0], [0.0, 0.0, 2.0]]
    for temperature in (1.0, 2.0, 4.0):
        got = float(kl_loss(torch.tensor(s), torch.tensor(t), temperature))
        assert got == pytest.approx(_kl_by_hand(s, t, temperature), rel=1e-5)
    assert float(kl_loss(torch.tensor(s), torch.tensor(s), 2.0)) == pytest.approx(0.0, abs=1e-7)
    # leading dimensions are positions: (2, 1, 3) is the same two rows
    assert float(kl_loss(torch.tensor(s)[:, None], torch.tensor(t)[:, None], 2.0)) == pytest.approx(
        _kl_by_hand(s, t, 2.0), rel=1e-5)
    # cos 0 and cos 1 -> mean(1, 0)
    assert float(cosine_loss(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [2.0, 2.0]]))) \
        == pytest.approx(0.5)


def test_the_loss_sums_the_views_options_select():
    torch.manual_seed(0)
    student, teacher = Dual(), Dual()
    x, y = torch.randn(5, 4), torch.randn(5, 4)
    s, t = student(x, y), teacher(x, y)
    with torch.no_grad():
        kl = float(kl_loss(s.logits_per_image, t.logits_per_image, 3.0)
                   + kl_loss(s.logits_per_text, t.logits_per_text, 3.0))
        cos = float(cosine_loss(s.image_embeds, t.image_embeds) + cosine_loss(s.text_embeds, t.text_embeds))
    for logits, embeddings, expected in ((True, False, kl), (False, True, cos), (True, True, kl + cos)):
        options = DistillOptions(enabled=True, temperature=3.0, logits=logits, embeddings=embeddings)
        d = Distiller(teacher, options, Toy())
        with d.capture(student):
            student(x, y=y)  # positional and keyword arguments both reach the teacher
        assert float(d.loss()) == pytest.approx(expected, rel=1e-5)


def test_the_teacher_is_a_frozen_copy_and_the_callers_module_is_untouched():
    torch.manual_seed(0)
    dense = Dual()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    student = copy.deepcopy(dense)
    d = Distiller(dense, DistillOptions(enabled=True, embeddings=True), Toy())
    assert all(p.requires_grad for p in dense.parameters()) and dense.training
    assert not any(p.requires_grad for p in d.teacher.parameters()) and not d.teacher.training
    assert all(p is not q for p, q in zip(d.teacher.parameters(), dense.parameters(), strict=True))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    for _ in range(3):
        x, y = torch.randn(4, 4), torch.randn(4, 4)
        with d.capture(student):
            out = student(x, y)
        (out.logits_per_image.square().mean() + d.loss()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in d.teacher.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())  # the student learnt


def test_zero_or_two_forwards_per_loss_is_an_error_naming_the_task():
    model = Dual()
    d = Distiller(model, DistillOptions(enabled=True), Toy())
    x = torch.randn(2, 4)
    with d.capture(model):
        pass
    with pytest.raises(RuntimeError, match="task toy: distillation needs one forward of the model per loss, "
                                           "the loss made 0"):
        d.loss()
    with d.capture(model):
        model(x, x)
        model(x, x)
    model(x, x)  # outside the block: not recorded (the hook is gone)
    with pytest.raises(RuntimeError, match="the loss made 2"):
        d.loss()


def test_views_of_another_shape_or_none_selected_are_clear_errors():
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 5)  # a bare tensor output is the logits
    d = Distiller(teacher, DistillOptions(enabled=True), Toy())
    with d.capture(student):
        student(torch.randn(2, 4))
    with pytest.raises(RuntimeError, match=r"'logits' has shape \(2, 3\) in the model and \(2, 5\) in the teacher"):
        d.loss()
    d = Distiller(student, DistillOptions(enabled=True, logits=False, embeddings=True), Toy())
    with d.capture(student):
        student(torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="has no embeddings to distil"):
        d.loss()


# ---- the training loop -------------------------------------------------------------------------------
def _classification(root: Path, out: Path, **extra) -> dict:
    config = {
        "task": "classification", "output_dir": str(out), "model": {"preset": "tiny-vit"},
        "data": {"format": "imagefolder", "train": str(root / "train"), "test": str(root / "test"), "image_size": 32},
        "upop": {"target": 0.5, "interval": 2, "granularity": "head"},
        "train": {"batch_size": 8, "dense_epochs": 1, "search_epochs": 2, "retrain_epochs": 1,
                  "max_steps_per_epoch": 2},
        "eval": {"skip_latency": True}, "log": {"every_n_steps": 1},
        "distill": {"enabled": True, "temperature": 2.0},
    }
    for key, value in extra.items():
        config[key] = {**config.get(key, {}), **value}
    return config


def test_weight_zero_is_exactly_the_plain_loss_and_gradients(imagefolder, tmp_path):  # noqa: F811
    cfg = load_run_config(_write(tmp_path, _classification(imagefolder, tmp_path / "run")))
    task = make_task(cfg)
    dense = task.model
    batch = task.collate([task.train_dataset()[i] for i in range(4)])

    def gradients(weight: float | None) -> tuple[float, list[torch.Tensor]]:
        model = copy.deepcopy(dense).train()
        torch.manual_seed(1)
        if weight is None:
            loss = task.loss(model, batch)
        else:
            d = Distiller(dense, DistillOptions(enabled=True, weight=weight), task)
            with d.capture(model):
                loss = task.loss(model, batch)
            loss = loss + weight * d.loss()
        loss.backward()
        return float(loss), [p.grad.clone() for p in model.parameters()]

    plain, zero = gradients(None), gradients(0.0)
    assert plain[0] == zero[0] and all(torch.equal(a, b) for a, b in zip(plain[1], zero[1], strict=True))

    trainer = Trainer(cfg, task, Dist())

    def epoch(weight: float | None) -> tuple[float, dict[str, torch.Tensor]]:
        model = copy.deepcopy(dense)
        d = None if weight is None else Distiller(dense, DistillOptions(enabled=True, weight=weight), task)
        loss = trainer.epoch(model, trainer.optimizer(model, 1e-2), phase="retrain", epoch=0, lr_at=lambda _: 1e-2,
                             distiller=d)
        return loss, model.state_dict()

    (a, wa), (b, wb), (_, wc) = epoch(None), epoch(0.0), epoch(5.0)
    assert a == b and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)  # a weight > 0 changes the training


# ---- configuration --------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("distill.weight=-1", "distill.weight must be a finite number >= 0"),
    ("distill.weight=.nan", "distill.weight must be a finite number >= 0"),
    ("distill.temperature=0", "distill.temperature must be in (0, 1000]"),
    ("distill.temperature=.inf", "distill.temperature must be in (0, 1000]"),
    ("distill.temperature=1e4", "distill.temperature must be in (0, 1000]"),
    ("distill.phases=[search, dense]", "distill.phases: unknown phase 'dense'"),
    ("distill.phases=search", "config key 'distill.phases' must be a list of strings"),
    ("distill.teacher=x", "config key 'distill.teacher' does not exist"),
    ("distill.enabled=yes please", "config key 'distill.enabled' must be true or false"),
])
def test_bad_distill_keys_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_run_config(None, ["model.preset=tiny-dual", override])


def test_a_distiller_checks_options_built_in_code():
    with pytest.raises(ConfigError, match=r"distill\.temperature must be in \(0, 1000\]"):
        Distiller(nn.Linear(2, 2), DistillOptions(enabled=True, temperature=-1.0), Toy())


def test_enabled_without_anything_to_distil_and_unsupported_tasks_fail_at_load():
    base = ["model.preset=tiny-dual", "distill.enabled=true"]
    with pytest.raises(ConfigError, match="distill.logits and distill.embeddings are both false"):
        load_run_config(None, [*base, "distill.logits=false"])
    with pytest.raises(ConfigError, match="distill.phases is empty"):
        load_run_config(None, [*base, "distill.phases=[]"])
    with pytest.raises(ConfigError, match="task vqa does not support distillation"):
        load_run_config(None, [*base, "task=vqa"])
    load_run_config(None, ["model.preset=tiny-dual", "distill.logits=false"])  # off: nothing to check


def test_the_config_hash_changes_only_when_distillation_is_on():
    plain = load_run_config(None, ["model.preset=tiny-dual"])
    old = plain.to_dict()
    old.pop("distill")  # a run recorded before the section existed
    off = load_run_config(None, ["model.preset=tiny-dual", "distill.weight=3"])
    on = load_run_config(None, ["model.preset=tiny-dual", "distill.enabled=true"])
    assert config_hash(plain) == config_hash(old) == config_hash(off) != config_hash(on)


def test_the_user_guides_distill_section_loads(tmp_path):
    text = (Path(__file__).parents[1] / "docs" / "user_guide.md").read_text()
    section = re.search(r"^### Distillation\n(.*?)(?=^#)", text, flags=re.M | re.S).group(1)
    (block,) = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    path = tmp_path / "run.yaml"
    path.write_text(block + "model:\n  preset: tiny-dual\n")
    cfg = load_run_config(path)
    assert cfg.distill == DistillOptions(enabled=True, temperature=2.0)


def test_upop_keys_lists_the_distill_section(capsys):
    assert cli.main(["keys", "distill."]) == 0
    lines = capsys.readouterr().out.splitlines()
    keys = {line.split()[0]: line for line in lines}
    assert set(keys) == {f"distill.{k}" for k in ("enabled", "weight", "temperature", "logits", "embeddings",
                                                   "phases")}
    assert "teacher" in keys["distill.enabled"] and "T^2" in keys["distill.temperature"]


def test_a_task_that_cannot_be_distilled_is_refused_before_training(karpathy, tmp_path, monkeypatch, capsys):  # noqa: F811
    config = _retrieval_config(karpathy, tmp_path / "run")
    config["retrieval"] = {"momentum_distill": True, "queue_size": 12}
    config["distill"] = {"enabled": True}

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(pipeline.Trainer, "epoch", no_training)
    assert cli.main(["compress", "--config", str(_write(tmp_path, config))]) == 2
    err = capsys.readouterr().err
    assert "task retrieval does not support distillation (with retrieval.momentum_distill: true" in err
    assert not (tmp_path / "run" / "state").exists()


# ---- upop compress ---------------------------------------------------------------------------------------
def _scalars(out: Path, name: str) -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e["values"][name] for e in lines if e.get("event") == "scalars" and name in e["values"]]


def _result(out: Path) -> tuple:
    metrics = json.loads((out / "metrics.json").read_text())
    plan = json.loads((out / "plan.json").read_text())["structures"]
    return plan, metrics["searched"], metrics["compressed"]["metrics"], metrics["compressed"]["params"]


@pytest.fixture(scope="module")
def distilled(imagefolder, tmp_path_factory) -> Path:  # noqa: F811
    tmp = tmp_path_factory.mktemp("distilled")
    assert cli.main(["compress", "--config", str(_write(tmp, _classification(imagefolder, tmp / "run")))]) == 0
    return tmp / "run"


def test_compress_with_distillation_records_it(distilled):
    metrics = json.loads((distilled / "metrics.json").read_text())
    assert metrics["distill"] == {"enabled": True, "weight": 1.0, "temperature": 2.0, "logits": True,
                                  "embeddings": False, "phases": ["search", "retrain"]}
    search, retrain = _scalars(distilled, "search/distill"), _scalars(distilled, "retrain/distill")
    assert len(search) == 4 and len(retrain) == 2 and not _scalars(distilled, "dense/distill")
    # the search starts from the teacher's weights with every mask at 1: nothing to distil yet
    assert search[0] == pytest.approx(0.0, abs=1e-6) and max(search + retrain) > 1e-6


# Trainer.epoch calls: 1 = dense epoch 1, 2-3 = search epochs 1-2, 4 = retrain epoch 1
@pytest.mark.parametrize("crash_at", [3, 4])
def test_a_resumed_run_distils_from_the_same_teacher(imagefolder, tmp_path, distilled, crash_at):  # noqa: F811
    out = tmp_path / "run"
    config = _write(tmp_path, _classification(imagefolder, out))
    run_killed_in_epoch(config, crash_at)
    assert not (out / "metrics.json").exists()
    pipeline.run_compress(load_run_config(config))
    assert _result(out) == _result(distilled)
