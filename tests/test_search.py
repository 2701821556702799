"""The search mechanics: schedule, threshold with costs, revival, min_units, round_to, AMP, resume."""

import math

import pytest
import torch

import upop
from families import FAMILY_BY_NAME
from helpers import run_search
from upop.search import ratio_at, select_units, standardise


def test_schedule_is_quarter_sine_reaching_target_at_last_step():
    total, p = 100, 0.6
    values = [ratio_at(t, total, p) for t in range(total)]
    assert values[-1] == pytest.approx(p, abs=1e-12)
    assert values[0] == pytest.approx(p * math.sin(math.pi / (2 * total)))
    assert values[49] == pytest.approx(p * math.sin(math.pi * 50 / 200))
    assert all(b > a for a, b in zip(values, values[1:], strict=False))  # rises
    diffs = [b - a for a, b in zip(values, values[1:], strict=False)]
    assert diffs[0] > diffs[-1]  # concave: fast early, slow late


def test_standardise_per_group():
    scores = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([10.0, 30.0]), "m": torch.tensor([5.0, 5.0])}
    z = standardise(scores, {"a": "attention", "b": "attention", "m": "mlp"})
    flat = torch.cat([z["a"], z["b"]])
    assert flat.mean().abs() < 1e-9 and (flat.std() - 1).abs() < 1e-9
    assert torch.equal(z["m"], torch.zeros(2, dtype=torch.float64))  # zero spread: no division by 0


def test_threshold_follows_exact_costs():
    # One expensive structure (cost 10/unit) and one cheap (cost 1/unit), same group.
    scores = {"big": torch.tensor([5.0, 4.0, 0.0, 0.0]), "small": torch.tensor([4.5, 3.0, 2.0, 1.0, 0.5, 0.1])}
    costs = {"big": 10.0, "small": 1.0}
    groups = {"big": "attention", "small": "attention"}
    total = 4 * 10 + 6
    sel = select_units(scores, costs, groups, ratio=21 / total)
    # rank order: big0 (10), small0 (1), big1 (10) -> exactly 21
    assert sel["big"].tolist() == [True, True, False, False]
    assert sel["small"].tolist() == [True, False, False, False, False, False]
    # a budget that the next expensive unit would overshoot is filled with cheaper units
    sel = select_units(scores, costs, groups, ratio=13 / total)
    removed = 10 * int(sel["big"].sum()) + int(sel["small"].sum())
    assert removed == 13 and sel["big"][0] and not sel["big"][1]


def test_min_units_protects_the_lowest_scores():
    scores = {"a": torch.tensor([9.0, 8.0, 7.0, 6.0]), "b": torch.tensor([0.0, 0.1, 0.2, 0.3])}
    sel = select_units(scores, {"a": 1.0, "b": 1.0}, {"a": "mlp", "b": "mlp"}, ratio=0.75, min_units=2)
    assert sel["a"].tolist() == [True, True, False, False]  # two of "a" always kept
    assert int(sel["b"].sum()) == 2 and not sel["b"][0]  # then b's best candidates


def test_round_to_keeps_multiples():
    g = torch.Generator().manual_seed(0)
    scores = {f"s{i}": torch.randn(12, generator=g) for i in range(4)}
    for ratio in (0.1, 0.33, 0.5, 0.8):
        sel = select_units(scores, dict.fromkeys(scores, 1.0), dict.fromkeys(scores, "mlp"), ratio, round_to=4)
        for s in sel.values():
            kept = int((~s).sum())
            assert kept % 4 == 0 and kept >= 4


def test_per_structure_ranking_cuts_every_structure_alike():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.randn(10, generator=g) * 100, "b": torch.randn(10, generator=g)}
    sel = select_units(scores, {"a": 1.0, "b": 1.0}, {"a": "mlp", "b": "mlp"}, 0.5, ranking="per_structure")
    assert int(sel["a"].sum()) == int(sel["b"].sum()) == 5


def test_progressive_values_and_revival():
    fam = FAMILY_BY_NAME["vit"]
    model = fam.build().eval()
    inputs = fam.inputs(torch.Generator().manual_seed(0))
    cfg = upop.UPopConfig(target=0.5, total_steps=10, interval=3)
    search = upop.UPopSearch(model, cfg)
    name = search.structures[0].name
    seen_values = set()
    for t in range(cfg.total_steps):
        fam.probe(model(**inputs)).sum().backward()
        if t == 9:  # invert the ranking before the last update: earlier choices must be revisable
            before = {n: s.clone() for n, s in search._selected.items()}
            for n in search.scores:
                search.scores[n] = -search.scores[n] * 1e6
        search.step()
        mask = search.mask_values()[name]
        seen_values |= set(mask.unique().tolist())
        if t % cfg.interval == 0 and t < cfg.total_steps - 1:
            expected = 1 - ratio_at(t, cfg.total_steps, cfg.target) / cfg.target
            assert all(v == 1.0 or v == pytest.approx(expected) for v in mask.unique().tolist())
    revived = [bool((before[n] & ~search._selected[n]).any()) for n in before]
    assert any(revived), "units selected earlier must be able to come back"
    assert 0.0 in seen_values and any(0 < v < 1 for v in seen_values)
    assert search.finished


def test_not_progressive_keeps_masks_at_one_until_the_end():
    cfg = upop.UPopConfig(target=0.5, total_steps=6, interval=1, progressive=False)
    fam = FAMILY_BY_NAME["vit"]
    model = fam.build().eval()
    inputs = fam.inputs(torch.Generator().manual_seed(0))
    search = upop.UPopSearch(model, cfg)
    for t in range(6):
        fam.probe(model(**inputs)).sum().backward()
        search.step()
        values = torch.cat(list(search.mask_values().values()))
        assert (values == 1).all() if t < 5 else set(values.unique().tolist()) == {0.0, 1.0}


def test_amp_scale_and_non_finite_steps():
    fam = FAMILY_BY_NAME["vit"]
    model = fam.build().eval()
    inputs = fam.inputs(torch.Generator().manual_seed(0))
    # progressive=False: masks stay 1, so every forward is the same
    search = upop.UPopSearch(model, upop.UPopConfig(total_steps=10, progressive=False))
    fam.probe(model(**inputs)).sum().backward()
    grads = {n: g.clone().double() for n, g in search.masks.grads().items()}
    search.step()
    one = {n: s.clone() for n, s in search.scores.items()}
    (fam.probe(model(**inputs)).sum() * 1024).backward()
    search.step(grad_scale=1024.0)  # unscaled: adds the same gradient again
    for n in grads:
        assert torch.allclose(one[n], grads[n]) and torch.allclose(search.scores[n], 2 * grads[n])
    (fam.probe(model(**inputs)).sum() * float("nan")).backward()
    with pytest.warns(UserWarning, match="non-finite"):
        search.step()
    assert search.skipped_steps == 1
    for n in grads:
        assert torch.allclose(search.scores[n], 2 * grads[n])


def test_plan_before_the_end_and_steps_after_the_end_are_errors():
    cfg = upop.UPopConfig(total_steps=2, interval=1)
    model, inputs, _, search = run_search(FAMILY_BY_NAME["bert"], cfg)
    search2 = upop.UPopSearch(FAMILY_BY_NAME["bert"].build(), cfg)
    with pytest.raises(RuntimeError, match="steps"):
        search2.plan()
    with pytest.raises(RuntimeError, match="already ran"):
        search.step()


def test_masks_are_not_model_parameters():
    fam = FAMILY_BY_NAME["clip"]
    model = fam.build()
    n_params = len(list(model.parameters()))
    search = upop.UPopSearch(model, upop.UPopConfig())
    assert len(list(model.parameters())) == n_params
    ids = {id(p) for p in model.parameters()}
    assert not any(id(m) in ids for m in search.masks.values.values())
    assert not any("mask" in k for k in model.state_dict())


def test_resume_from_state_gives_the_same_plan():
    fam = FAMILY_BY_NAME["clip"]
    cfg = upop.UPopConfig(target=0.5, total_steps=12, interval=3)
    inputs = fam.inputs(torch.Generator().manual_seed(0))

    def steps(model, search, n):
        for _ in range(n):
            fam.probe(model(**inputs)).pow(2).mean().backward()
            search.step()

    torch.manual_seed(0)
    model_a = fam.build().eval()
    search_a = upop.UPopSearch(model_a, cfg)
    steps(model_a, search_a, 12)

    torch.manual_seed(0)
    model_b = fam.build().eval()
    search_b = upop.UPopSearch(model_b, cfg)
    steps(model_b, search_b, 7)
    state = {k: v.clone() for k, v in search_b.state_dict().items()}
    torch.manual_seed(0)
    model_c = fam.build().eval()
    search_c = upop.UPopSearch(model_c, cfg)
    search_c.load_state_dict(state)
    steps(model_c, search_c, 5)
    assert search_c.plan().structures == search_a.plan().structures


def test_flops_budget_and_count_flops_agree():
    """Removed FLOPs counted on the real model equal the plan's unit costs (batch of 1)."""
    fam = FAMILY_BY_NAME["vit"]
    torch.manual_seed(0)
    model = fam.build().eval()
    pixels = fam.inputs(torch.Generator().manual_seed(0))["pixel_values"][:1]
    cfg = upop.UPopConfig(target=0.5, total_steps=6, interval=2, budget="flops")
    search = upop.UPopSearch(model, cfg)
    for _ in range(6):
        model(pixel_values=pixels).logits.pow(2).sum().backward()
        search.step()
    plan = search.plan()
    costs = search.unit_costs()
    expected = sum(costs[n] * sp.pruned for n, sp in plan.structures.items())
    search.remove()
    dense_flops = upop.count_flops(model, {"pixel_values": pixels})
    upop.apply_plan(model, plan)
    pruned_flops = upop.count_flops(model, {"pixel_values": pixels})
    assert dense_flops - pruned_flops == pytest.approx(expected, rel=1e-9)
    assert abs(plan.stats["achieved"] - 0.5) <= 0.01


def test_count_flops_includes_attention_matmuls():
    fam = FAMILY_BY_NAME["vit"]
    model = fam.build().eval()
    pixels = torch.randn(1, 3, 16, 16)
    flops = upop.count_flops(model, {"pixel_values": pixels})
    cfg = model.config
    tokens, d, layers = (16 // 4) ** 2 + 1, cfg.hidden_size, cfg.num_hidden_layers
    linear = 2 * tokens * (4 * d * d + 2 * d * cfg.intermediate_size)
    attention = 2 * 2 * tokens * tokens * d
    patch = 2 * (16 // 4) ** 2 * 3 * 16 * d
    head = 2 * d * cfg.num_labels
    assert flops == layers * (linear + attention) + patch + head
