"""Bad inputs get one clear error, before anything is changed or written."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

import upop
from families import FAMILY_BY_NAME
from helpers import run_search


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target": 0.0}, "target must be in"),
        ({"target": 1.0}, "target must be in"),
        ({"target": -0.2}, "target must be in"),
        ({"target": "half"}, "target must be a number"),
        ({"granularity": "channel"}, "granularity must be one of"),
        ({"budget": "energy"}, "budget must be one of"),
        ({"total_steps": 0}, "total_steps"),
        ({"interval": 2.5}, "interval"),
        ({"min_units": 0}, "min_units"),
        ({"round_to": -8}, "round_to"),
        ({"ranking": "local"}, "ranking must be one of"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        upop.UPopConfig(**kwargs)


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown key.*'ratio'"):
        upop.UPopConfig.from_dict({"ratio": 0.5})


def test_unsupported_model_names_the_supported_families():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(upop.UnsupportedModelError, match="Supported families: .*CLIPModel"):
        upop.UPopSearch(model, upop.UPopConfig())


def test_search_needs_a_config_object():
    with pytest.raises(TypeError, match="UPopConfig"):
        upop.UPopSearch(FAMILY_BY_NAME["bert"].build(), {"target": 0.5})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    fam = FAMILY_BY_NAME["vit"]
    model, inputs, _, search = run_search(fam, upop.UPopConfig(total_steps=4, interval=2))
    search.compress()
    folder = tmp_path_factory.mktemp("ckpt") / "vit"
    upop.save_pretrained(model, folder)
    return folder


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_folder_and_missing_files(checkpoint, tmp_path):
    with pytest.raises(upop.CheckpointError, match="not found"):
        upop.from_pretrained(tmp_path / "nope")
    broken = _copy(checkpoint, tmp_path / "c")
    (broken / "model.safetensors").unlink()
    with pytest.raises(upop.CheckpointError, match="model.safetensors is missing"):
        upop.from_pretrained(broken)


def test_truncated_weights(checkpoint, tmp_path):
    broken = _copy(checkpoint, tmp_path / "c")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(upop.CheckpointError, match="safetensors"):
        upop.from_pretrained(broken)


def test_garbage_plan_and_meta(checkpoint, tmp_path):
    broken = _copy(checkpoint, tmp_path / "c")
    (broken / "upop_plan.json").write_text("{not json")
    with pytest.raises(upop.CheckpointError, match="not valid JSON"):
        upop.from_pretrained(broken)
    broken = _copy(checkpoint, tmp_path / "d")
    meta = json.loads((broken / "upop_model.json").read_text())
    meta["version"] = 99
    (broken / "upop_model.json").write_text(json.dumps(meta))
    with pytest.raises(upop.CheckpointError, match="version 99"):
        upop.from_pretrained(broken)


def test_plan_with_out_of_range_or_wrong_shape(checkpoint, tmp_path):
    broken = _copy(checkpoint, tmp_path / "c")
    plan = json.loads((broken / "upop_plan.json").read_text())
    name = next(iter(plan["structures"]))
    plan["structures"][name]["kept"] = [0, 999]
    (broken / "upop_plan.json").write_text(json.dumps(plan))
    with pytest.raises(upop.CheckpointError, match=r"kept indices must lie in"):
        upop.from_pretrained(broken)
    plan["structures"][name]["kept"] = [0]
    plan["structures"][name]["num_heads"] = 12
    (broken / "upop_plan.json").write_text(json.dumps(plan))
    with pytest.raises(upop.CheckpointError, match="plan was made for"):
        upop.from_pretrained(broken)


def test_weights_that_do_not_fit_the_plan(checkpoint, tmp_path):
    broken = _copy(checkpoint, tmp_path / "c")
    model = upop.from_pretrained(checkpoint)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k in state if k.endswith("fc1.weight"))
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_file(state, str(broken / "model.safetensors"))
    meta = json.loads((broken / "upop_model.json").read_text())  # a consistent hash: reach the shape check
    meta["weights_sha256"] = hashlib.sha256((broken / "model.safetensors").read_bytes()).hexdigest()
    (broken / "upop_model.json").write_text(json.dumps(meta))
    with pytest.raises(upop.CheckpointError, match=f"{key}.*shape"):
        upop.from_pretrained(broken)


def test_plan_for_another_model_leaves_the_model_untouched():
    _, _, _, search = run_search(FAMILY_BY_NAME["vit"], upop.UPopConfig(total_steps=3, interval=1))
    plan = search.plan()
    bert = FAMILY_BY_NAME["bert"].build()
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    with pytest.raises(upop.PlanError, match="does not have"):
        upop.apply_plan(bert, plan)
    assert all(torch.equal(before[k], v) for k, v in bert.state_dict().items())


def test_plan_applied_twice_is_refused():
    model, _, _, search = run_search(FAMILY_BY_NAME["vit"], upop.UPopConfig(total_steps=3, interval=1))
    plan = search.plan()
    search.compress()
    with pytest.raises(upop.PlanError, match="already pruned"):
        upop.apply_plan(model, plan)


def test_save_refuses_non_transformers_models_and_writes_nothing(tmp_path):
    model = torch.nn.Linear(3, 3)
    with pytest.raises(upop.CheckpointError, match="transformers"):
        upop.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text", ["", "[]", "null", '{"format": "upop-plan", "version": 1, "structures": {}}',
                                  '{"format": "upop-plan", "version": 1, "structures": {"a": {"kind": "x"}}}'])
def test_plan_load_rejects_malformed_files(tmp_path, text):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(upop.PlanError, match=str(path)):
        upop.PruningPlan.load(path)
