"""Every supported family: compressed == masked at binary masks, exact params, exact reload, on target."""

import pytest
import torch

import upop
from families import FAMILIES
from helpers import run_search

GRANULARITIES = ["head_dim", "head"]


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_compressed_equals_masked_and_reloads(fam, granularity, tmp_path):
    config = upop.UPopConfig(target=0.5, total_steps=24, interval=4, granularity=granularity)
    model, inputs, dense, search = run_search(fam, config)
    assert search.finished
    for mask in search.mask_values().values():  # binary at the last step
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
    with torch.no_grad():
        masked = fam.probe(model(**inputs))
    assert (masked - dense).abs().max() > 1e-6, "the masks must change the output"

    plan = search.plan()
    params_before = upop.count_params(model)
    compressed = search.compress()
    assert compressed is model and type(compressed).__name__ == type(model).__name__
    with torch.no_grad():
        got = fam.probe(compressed(**inputs))
    assert (got - masked).abs().max() <= 1e-5
    assert params_before - upop.count_params(compressed) == plan.stats["pruned_params"]
    # the search ends on target, measured in the exact costs it ranks with
    assert abs(plan.stats["achieved"] - 0.5) <= 0.01
    # every structure keeps what the plan says and at least min_units
    for s in upop.structures(compressed, granularity):
        sp = plan.structures[s["name"]]
        assert s["units"] == len(sp.kept) >= 1

    upop.save_pretrained(compressed, tmp_path / "ckpt")
    reloaded = upop.from_pretrained(tmp_path / "ckpt")
    assert type(reloaded) is type(model)
    with torch.no_grad():
        again = fam.probe(reloaded(**inputs))
    assert torch.equal(again, got)
    assert upop.count_params(reloaded) == upop.count_params(compressed)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_apply_plan_on_fresh_model_matches(fam):
    config = upop.UPopConfig(target=0.4, total_steps=8, interval=2, round_to=2)
    model, inputs, _, search = run_search(fam, config)
    plan = upop.PruningPlan.from_dict(search.plan().to_dict())  # through JSON-able dicts
    state = {k: v.clone() for k, v in model.state_dict().items()}
    search.compress()
    fresh = fam.build().eval()
    fresh.load_state_dict(state)
    upop.apply_plan(fresh, plan)
    with torch.no_grad():
        assert torch.equal(fam.probe(fresh(**inputs)), fam.probe(model(**inputs)))
    for sp in plan.structures.values():  # round_to=2: kept widths are even (totals here are even)
        if sp.total % 2 == 0:
            assert len(sp.kept) % 2 == 0


def test_structures_report_modalities():
    from families import FAMILY_BY_NAME

    found = upop.structures(FAMILY_BY_NAME["blip_vqa"].build())
    groups = {(s["modality"], s["kind"]) for s in found}
    assert groups == {
        ("vision", "attention"), ("vision", "mlp"),
        ("text", "attention"), ("text", "cross_attention"), ("text", "mlp"),
        ("decoder", "attention"), ("decoder", "cross_attention"), ("decoder", "mlp"),
    }
    for s in found:
        assert s["units"] > 0 and s["unit_params"] > 0 and s["layer"] in (0, 1)
