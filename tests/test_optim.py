"""upop.optim: the optimiser and schedule choices of `train.optimizer` / `train.schedule`."""

import math

import pytest
import torch
from torch import nn

from upop.optim import build_optimizer, cosine, lr_schedule, poly
from upop.runconfig import ConfigError, TrainConfig, load_run_config


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(5, 4)
        self.body = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)


def test_poly_is_segmenters_polynomial_decay():
    cfg = TrainConfig(schedule="poly", min_lr=1e-5, poly_power=0.9)
    lr_at = lr_schedule(cfg, 4e-3, 100)
    assert lr_at(0) == pytest.approx(4e-3)  # no warmup: the first step runs at the base rate
    for step in (1, 37, 50, 99):
        assert lr_at(step) == pytest.approx((4e-3 - 1e-5) * (1 - step / 100) ** 0.9 + 1e-5)
    assert lr_at(100) == pytest.approx(1e-5) and lr_at(150) == pytest.approx(1e-5)
    values = [lr_at(s) for s in range(101)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))  # strictly decreasing
    warm = poly(1.0, 0.0, 100, 0.9, warmup=10)
    assert warm(0) == 0.0 and warm(5) == pytest.approx(0.5 * 0.9 ** 0.9) and warm(10) == pytest.approx(0.9 ** 0.9)


def test_cosine_and_constant_schedules():
    cfg = TrainConfig(min_lr=0.1, warmup_steps=2)
    lr_at = lr_schedule(cfg, 1.0, 12)
    assert lr_at(0) == pytest.approx(0.5) and lr_at(1) == pytest.approx(1.0)
    assert lr_at(7) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(12) == pytest.approx(0.1)
    assert lr_schedule(TrainConfig(), 1.0, 10)(5) == cosine(1.0, 0.0, 10)(5)
    constant = lr_schedule(TrainConfig(schedule="constant"), 3e-4, 10)
    assert {constant(s) for s in range(20)} == {3e-4}


def test_sgd_nesterov_keeps_the_parameter_groups():
    model = Net()
    cfg = TrainConfig(optimizer="sgd", weight_decay=0.01, lr_multipliers={"head": 10.0})
    opt = build_optimizer(model, 4e-3, cfg)
    assert isinstance(opt, torch.optim.SGD)
    for group in opt.param_groups:
        assert group["momentum"] == 0.9 and group["nesterov"] is True and group["lr"] == 4e-3
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_param[id(model.body.weight)]["weight_decay"] == 0.01
    for p in (model.body.bias, model.norm.weight, model.embeddings.weight):  # no decay: DeiT's rule
        assert by_param[id(p)]["weight_decay"] == 0.0
    assert by_param[id(model.head.weight)]["lr_scale"] == 10.0 and by_param[id(model.body.weight)]["lr_scale"] == 1.0
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    adamw = build_optimizer(model, 1e-4, TrainConfig())
    assert isinstance(adamw, torch.optim.AdamW)
    # exempt: the embedding, biases and norm; decayed: the two Linear weights
    assert sorted((g["weight_decay"], len(g["params"])) for g in adamw.param_groups) == [(0.0, 5), (0.05, 2)]


def test_one_step_of_sgd_moves_the_weights():
    model = Net()
    opt = build_optimizer(model, 0.1, TrainConfig(optimizer="sgd", weight_decay=0.0))
    before = model.head.weight.detach().clone()
    model.head(model.body(torch.randn(3, 4))).sum().backward()
    opt.step()
    assert not torch.equal(before, model.head.weight)


@pytest.mark.parametrize("override, needle", [
    ("train.optimizer=lamb", "train.optimizer must be adamw or sgd"),
    ("train.schedule=step", "train.schedule must be cosine, poly or constant"),
    ("train.momentum=1.0", "train.momentum must be in [0, 1)"),
    ("train.poly_power=0", "train.poly_power must be a finite number > 0"),
])
def test_bad_choices_are_one_line(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_run_config(None, ["model.preset=tiny-dual", override])
