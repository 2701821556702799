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
    upop.structures(fresh)  # discovery swaps in equivalent modules (open_clip) as on the searched model
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


def test_per_head_norm_allows_whole_heads_only(tmp_path):
    from families import HEAD_ONLY

    fam = HEAD_ONLY[0]
    with pytest.raises(ValueError, match="qk_norm.*granularity='head'"):
        upop.UPopSearch(fam.build(), upop.UPopConfig(granularity="head_dim"))
    config = upop.UPopConfig(target=0.5, total_steps=12, interval=3, granularity="head")
    model, inputs, _, search = run_search(fam, config)
    with torch.no_grad():
        masked = fam.probe(model(**inputs))
    search.compress()
    with torch.no_grad():
        assert (fam.probe(model(**inputs)) - masked).abs().max() <= 1e-5
    upop.save_pretrained(model, tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(fam.probe(upop.from_pretrained(tmp_path / "m")(**inputs)), fam.probe(model(**inputs)))


@pytest.mark.parametrize("fam", [f for f in FAMILIES if f.name in ("timm_vit", "open_clip")], ids=lambda f: f.name)
def test_swapped_modules_match_the_original_before_pruning(fam):
    """open_clip's nn.MultiheadAttention is replaced by an equivalent; timm is untouched."""
    torch.manual_seed(0)
    model = fam.build().eval()
    inputs = fam.inputs(torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = fam.probe(model(**inputs)).clone()
        upop.UPopSearch(model, upop.UPopConfig()).remove()  # discovery swaps, hooks removed
        after = fam.probe(model(**inputs))
    assert (before - after).abs().max() <= 1e-5


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("fam", [f for f in FAMILIES if f.name in ("timm_vit", "timm_deit_distilled", "open_clip")],
                         ids=lambda f: f.name)
def test_round_to_8_and_onnx_export(fam, granularity, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    config = upop.UPopConfig(target=0.5, total_steps=12, interval=3, granularity=granularity, round_to=8)
    model, inputs, _, search = run_search(fam, config)
    plan = search.plan()
    search.compress()
    for sp in plan.structures.values():  # kept channel widths are multiples of 8
        assert len(sp.kept) * (sp.head_dim if sp.unit == "head" else 1) % 8 == 0
    names = list(inputs)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, tuple(inputs.values()), str(path), input_names=names, dynamo=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {n: inputs[n].numpy() for n in names})
    with torch.no_grad():
        expected = fam.probe(model(**inputs)).reshape(-1)
    got = torch.cat([torch.as_tensor(o).reshape(-1) for o in outputs[: (3 if fam.name == "open_clip" else 1)]])
    got = got[: expected.numel()] if fam.name == "open_clip" else got
    assert (got - expected).abs().max() <= 1e-4
