"""UPopCallback in a real transformers Trainer: kill and resume gives the plan of an uninterrupted
run, a checkpoint without the search state stops the resume at its start, trainer.save_model()
writes a upop folder, and the ratio / achieved fraction reach every logging callback.

The model is a tiny BERT classifier: transformers 5's Trainer reloads a ViT checkpoint under its
legacy tensor names without converting them back (the weights silently stay random), which no
callback can make resume exactly."""

import pytest
import torch
from torch.utils.data import Dataset
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

import upop
from families import TEXT
from upop.checkpoint import CheckpointError
from upop.integrations import STATE_FILE, UPopCallback

STEPS = 12


class _Texts(Dataset):
    def __init__(self, n: int = 48) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(1, TEXT["vocab_size"], (n, 12), generator=g)
        self.y = torch.randint(0, 5, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**TEXT, num_labels=5))


class _Spy(TrainerCallback):
    def __init__(self, stop_at: int | None = None) -> None:
        self.logs: list[dict] = []
        self.steps = 0
        self.stop_at = stop_at

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        if state.global_step == self.stop_at:
            raise KeyboardInterrupt  # killed after this step

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def _trainer(out, callbacks, **overrides):
    model = _model()
    kwargs = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=1e-3,
                  report_to=[], save_strategy="steps", save_steps=4, logging_steps=2, use_cpu=True,
                  dataloader_num_workers=0, seed=0, disable_tqdm=True)
    kwargs.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**kwargs), train_dataset=_Texts(), callbacks=callbacks)


def _kept(plan: upop.PruningPlan) -> dict[str, list[int]]:
    return {name: s.kept for name, s in plan.structures.items()}


def _config() -> upop.UPopConfig:
    return upop.UPopConfig(target=0.5, interval=2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    callback = UPopCallback(_config())
    _trainer(tmp_path_factory.mktemp("reference"), [callback]).train()
    return callback.plan


@pytest.mark.parametrize("stop_at", [6, 9])
def test_interrupted_and_resumed_trainer_gives_the_same_plan(tmp_path, reference, stop_at):
    resume_from = tmp_path / f"checkpoint-{stop_at // 4 * 4}"
    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path, [UPopCallback(_config()), _Spy(stop_at=stop_at)]).train()
    assert (resume_from / STATE_FILE).is_file()
    callback = UPopCallback(_config())
    _trainer(tmp_path, [callback]).train(resume_from_checkpoint=str(resume_from))
    assert callback.search.step_count == STEPS
    assert _kept(callback.plan) == _kept(reference)
    assert callback.plan.stats["achieved"] == pytest.approx(reference.stats["achieved"])


def test_resume_without_the_search_state_fails_at_the_start(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path, [UPopCallback(_config()), _Spy(stop_at=5)]).train()
    (tmp_path / "checkpoint-4" / STATE_FILE).unlink()
    spy = _Spy()
    with pytest.raises(CheckpointError, match="no UPop search state") as info:
        _trainer(tmp_path, [UPopCallback(_config()), spy]).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert spy.steps == 0 and "\n" not in str(info.value)


def test_save_model_writes_a_folder_upop_loads(tmp_path):
    callback = UPopCallback(_config())
    trainer = _trainer(tmp_path, [callback], max_steps=4, save_strategy="no")
    trainer.train()
    model = trainer.model
    assert upop.count_params(model) < upop.count_params(_model())
    trainer.save_model(str(tmp_path / "final"))
    reloaded = upop.from_pretrained(tmp_path / "final")
    x = _Texts().x[:3]
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=x).logits, model.eval()(input_ids=x).logits, atol=1e-5)
    assert _kept(reloaded.upop_plan) == _kept(callback.plan)


def test_ratio_and_achieved_reach_every_logging_callback(tmp_path):
    before, after = _Spy(), _Spy()
    trainer = _trainer(tmp_path, [before, UPopCallback(_config()), after], save_strategy="no")
    trainer.train()
    for spy in (before, after):  # `before` stands for the report_to backends, placed ahead of user callbacks
        logged = [logs for logs in spy.logs if "loss" in logs]
        assert len(logged) == STEPS // 2 and all("upop/ratio" in logs and "upop/achieved" in logs for logs in logged)
        assert logged[-1]["upop/ratio"] == pytest.approx(0.5)
        assert logged[-1]["upop/achieved"] == pytest.approx(0.5, abs=0.02)
        assert 0 < logged[0]["upop/ratio"] < logged[-1]["upop/ratio"]
    assert all("upop/ratio" in h for h in trainer.state.log_history if "loss" in h)
