"""Latency budget (issue 17): tables, unit costs, cache, widths the hardware likes, real timing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers as tf

from families import FAMILY_BY_NAME, VISION
from upop import latency as L
from upop.adapters import discover
from upop.search import select_units

FAST = L.LatencySettings(min_run_time=0.002, warmup=1, rounds=1)


def _structures(family: str = "dual_encoder"):
    fam = FAMILY_BY_NAME[family]
    model = fam.build().eval()
    inputs = fam.inputs(torch.Generator().manual_seed(0))
    structures = discover(model)
    return model, inputs, structures, L.measure_tokens(model, structures, inputs)


def _linear_tables(structures, granularity="head_dim", intercept=0.0):
    """lat(w) = intercept + slope * w, a different slope in every structure."""
    tables = {}
    for i, s in enumerate(structures):
        n, slope = s.num_units(granularity), 0.02 * (i + 1) + (0.3 if s.is_attention else 0.0)
        widths = sorted({1, max(1, n // 2), n})
        tables[s.name] = L.Table(widths, [intercept + slope * w for w in widths])
    return tables


# ---- (a) the plan meets a synthetic latency table -------------------------------------------------
@pytest.mark.parametrize("target", [0.3, 0.5, 0.75])
def test_selection_meets_a_synthetic_latency_table(target):
    _, _, structures, _ = _structures()
    lm = L.LatencyModel.synthetic(_linear_tables(structures), fixed_ms=1.5)
    costs = lm.unit_costs()
    g = torch.Generator().manual_seed(3)
    scores = {s.name: torch.rand(s.num_units("head_dim"), generator=g, dtype=torch.float64) for s in structures}
    groups = {s.name: s.score_group for s in structures}
    selected = select_units(scores, costs, groups, target)
    widths = L.selection_widths(selected)
    one_block = max(costs.values())  # round_to 1: a block is one unit
    assert abs(lm.prunable_ms(widths) - (1 - target) * lm.prunable_ms()) <= one_block
    assert lm.predict(widths) == pytest.approx(1.5 + lm.prunable_ms(widths))
    report = lm.report(widths, target)
    assert report["removed_measured"] == pytest.approx(target, abs=one_block / lm.prunable_ms())
    assert report["removed_linear"] == pytest.approx(report["removed_measured"])
    assert report["predicted_speedup"] > 1.0
    fractions = {round(widths[s.name] / s.num_units("head_dim"), 3) for s in structures}
    assert len(fractions) > 1  # a global ranking: each structure keeps its own share


def test_intercepts_are_not_removable_and_slope_is_the_unit_cost():
    _, _, structures, _ = _structures("vit_model")
    lm = L.LatencyModel.synthetic(_linear_tables(structures, intercept=0.25))
    costs = lm.unit_costs()
    for s in structures:
        slope, intercept = lm.table(s.name).line()
        assert costs[s.name] == pytest.approx(slope) and intercept == pytest.approx(0.25)
    widths = {s.name: 1 for s in structures}
    report = lm.report(widths)
    assert report["overhead_ms"] == pytest.approx(0.25 * len(structures))
    assert report["width_dependent"] == pytest.approx(1 - report["overhead_ms"] / lm.prunable_ms())
    assert report["removed_measured"] < report["removed_linear"]  # overhead is not removable
    again = L.LatencyModel.from_dict(json.loads(json.dumps(lm.to_dict())))
    assert again.unit_costs() == costs and again.prunable_ms(widths) == lm.prunable_ms(widths)
    with pytest.raises(L.LatencyError, match="fixed part"):
        lm.predict(widths)


# ---- (b) the cache ----------------------------------------------------------------------------------
@pytest.fixture
def fake_timer(monkeypatch):
    """Replace the one timing function: ms = 0.01 * width * tokens; count the calls."""
    calls = {"replica": 0, "model": 0}

    def time_replica(sig, width, settings):
        calls["replica"] += 1
        return L.Timing(0.01 * width * sig["tokens_q"], 0.0, 1)

    def time_model(model, inputs, settings):
        calls["model"] += 1
        return L.Timing(calls.get("model_ms", 100.0), 0.0, 1)

    monkeypatch.setattr(L, "time_replica", time_replica)
    monkeypatch.setattr(L, "time_model", time_model)
    return calls


def test_cache_is_written_reread_and_invalidated(tmp_path, fake_timer):
    model, inputs, structures, tokens = _structures()
    settings = L.LatencySettings(batch=2, rounds=2)
    lm = L.build_latency_model(structures, "head_dim", tokens, settings, model=model, example_inputs=inputs,
                               cache=tmp_path)
    unique = {L._digest(L.signature(s, "head_dim", *tokens[s.name])): s for s in structures}
    assert len(lm.tables) == len(unique) < len(structures)  # identical layers share one measurement
    points = sum(len(L.width_grid(s.num_units("head_dim"))) for s in unique.values())
    assert fake_timer["replica"] == 2 * points and fake_timer["model"] == 2  # once per round
    assert lm.fixed_ms == pytest.approx(100.0 - lm.prunable_ms()) and not lm.fixed_clamped
    assert lm.predict() == pytest.approx(100.0)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["format"] == "upop-latency"

    again = L.build_latency_model(structures, "head_dim", tokens, settings, model=model, example_inputs=inputs,
                                  cache=tmp_path)
    assert fake_timer["replica"] == 2 * points and fake_timer["model"] == 2 and again.measured_points == 0
    assert again.unit_costs() == lm.unit_costs() and again.fixed_ms == lm.fixed_ms

    # other tokens (e.g. longer captions): a new key, measured again, the old file kept
    longer = dict(tokens)
    name = next(s.name for s in structures if s.modality == "text")
    longer[name] = (tokens[name][0] + 3, tokens[name][1] + 3)
    L.build_latency_model(structures, "head_dim", longer, settings, cache=tmp_path)
    assert fake_timer["replica"] > 2 * points and len(list(tmp_path.glob("*.json"))) == 2

    # another shape (a wider MLP): a new key again
    before = fake_timer["replica"]
    wide = tf.ViTModel(tf.ViTConfig(**{**VISION, "intermediate_size": 41}))
    wide_structures = discover(wide)
    wide_tokens = L.measure_tokens(wide, wide_structures, {"pixel_values": inputs["pixel_values"]})
    L.build_latency_model(wide_structures, "head_dim", wide_tokens, settings, cache=tmp_path)
    assert fake_timer["replica"] > before and len(list(tmp_path.glob("*.json"))) == 3

    # another batch: another key
    before = fake_timer["replica"]
    L.build_latency_model(structures, "head_dim", tokens, L.LatencySettings(batch=3, rounds=2), cache=tmp_path)
    assert fake_timer["replica"] == before + 2 * points


def test_corrupt_cache_is_ignored_and_rebuilt(tmp_path, fake_timer):
    _, _, structures, tokens = _structures("vit_model")
    lm = L.build_latency_model(structures, "head_dim", tokens, L.LatencySettings(), cache=tmp_path)
    first = fake_timer["replica"]
    path = Path(lm.cache_path)
    assert path.parent == tmp_path
    path.write_text('{"format": "upop-latency", "version": 1, "key": "x", "tab')
    with pytest.warns(UserWarning, match="unreadable"):
        rebuilt = L.build_latency_model(structures, "head_dim", tokens, L.LatencySettings(), cache=tmp_path)
    assert fake_timer["replica"] == 2 * first and rebuilt.unit_costs() == lm.unit_costs()
    data = json.loads(path.read_text())  # rewritten whole
    next(iter(data["tables"].values()))["ms"][0] = -1.0  # valid JSON, impossible content
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="unreadable"):
        L.build_latency_model(structures, "head_dim", tokens, L.LatencySettings(), cache=tmp_path)
    assert fake_timer["replica"] == 3 * first


def test_fixed_part_is_clamped_and_cache_dir_follows_the_environment(tmp_path, fake_timer, monkeypatch):
    model, inputs, structures, tokens = _structures("vit_model")
    fake_timer["model_ms"] = 0.001  # a whole model "faster" than its parts: noise, clamped and said
    monkeypatch.setenv("UPOP_CACHE_DIR", str(tmp_path / "root"))
    lm = L.build_latency_model(structures, "head_dim", tokens, L.LatencySettings(batch=2), model=model,
                               example_inputs=inputs)
    assert lm.fixed_ms == 0.0 and lm.fixed_clamped
    assert L.cache_dir() == tmp_path / "root" / "latency" and len(list(L.cache_dir().glob("*.json"))) == 1
    with pytest.raises(L.LatencyError, match="batch"):
        L.build_latency_model(structures, "head_dim", tokens, L.LatencySettings(batch=5), model=model,
                              example_inputs=inputs, use_cache=False)
    with pytest.raises(L.LatencyError, match="no token counts"):
        L.build_latency_model(structures, "head_dim", {}, use_cache=False)
    with pytest.raises(L.LatencyError, match="runtime"):
        L.build_latency_model(structures, "head_dim", tokens, L.LatencySettings(runtime="tvm"), use_cache=False)


def test_a_given_grid_is_timed_with_the_full_width(tmp_path, fake_timer):
    _, _, structures, tokens = _structures("vit_model")
    mlp = next(s for s in structures if not s.is_attention)
    lm = L.build_latency_model(structures, "head_dim", tokens, L.LatencySettings(rounds=1),
                               widths={mlp.name: [3, 9]}, cache=tmp_path)
    assert lm.table(mlp.name).widths == [3, 9, mlp.hidden]
    with pytest.raises(L.LatencyError, match=f"widths for {mlp.name}"):
        L.build_latency_model(structures, "head_dim", tokens, widths={mlp.name: [0, 9]}, use_cache=False)


# ---- (c) widths the hardware likes ---------------------------------------------------------------------
def _one(table: L.Table, channels: int = 1) -> L.LatencyModel:
    return L.LatencyModel.synthetic({"s": table}, channels={"s": channels})


def _table(fn, units: int = 64) -> L.Table:
    widths = L.width_grid(units)
    return L.Table(widths, [fn(w) for w in widths])


def test_auto_round_to_reads_the_staircase():
    assert L.auto_round_to(_one(_table(lambda w: 0.01 * w))) == 1
    assert L.auto_round_to(_one(_table(lambda w: 0.05 + 0.01 * w))) == 1
    assert L.auto_round_to(_one(_table(lambda w: 0.08 * math.ceil(w / 8)))) == 8
    assert L.auto_round_to(_one(_table(lambda w: 0.16 * math.ceil(w / 16)))) == 16
    assert L.auto_round_to(_one(_table(lambda w: 0.08 * math.ceil(w / 8), units=256))) == 8
    # at 3072 units, rounding up by < 8 changes the time by < 0.3%: below the 2% tolerance, no evidence
    assert L.auto_round_to(_one(_table(lambda w: 0.08 * math.ceil(w / 8), units=3072))) == 1
    # linear, but widths just below a multiple of 4 are 30% slower than the multiple
    penalty = _table(lambda w: 0.01 * w * (1.3 if w % 4 else 1.0), units=256)
    assert L.auto_round_to(_one(penalty)) == 4
    # whole heads of 64 channels: every head count is a multiple of 64 channels, nothing to round
    heads = L.LatencyModel.synthetic({"s": L.Table(list(range(1, 13)), [0.1 * h for h in range(1, 13)])},
                                     granularity="head", channels={"s": 64})
    assert L.auto_round_to(heads) == 1


def test_faster_width_rounds_up_only_to_a_faster_width():
    widths = L.width_grid(64)
    slow_below = L.Table(widths, [0.01 * w * (2.0 if w % 32 else 1.0) for w in widths])
    lm = _one(slow_below)
    assert L.faster_width(lm, "s", 60) == 64  # 60 costs 1.2, 64 costs 0.64
    assert L.faster_width(lm, "s", 63) == 64
    assert L.faster_width(lm, "s", 32) == 32 and L.faster_width(lm, "s", 64) == 64
    assert L.faster_width(lm, "s", 28) == 32
    linear = _one(_table(lambda w: 0.01 * w))
    assert all(L.faster_width(linear, "s", w) == w for w in widths)

    scores = {"s": torch.arange(64, dtype=torch.float64)}  # higher = pruned first
    selected = {"s": torch.zeros(64, dtype=torch.bool)}
    selected["s"][-4:] = True  # keep 60
    widened = L.widen_to_faster(selected, scores, lm)
    assert int((~widened["s"]).sum()) == 64
    selected["s"][:] = False
    selected["s"][44:] = True  # keep 44: interpolated 0.80 ms, 64 measures 0.64 ms
    kept = int((~L.widen_to_faster(selected, scores, lm)["s"]).sum())
    assert kept == L.faster_width(lm, "s", 44) == 64
    selected["s"][:] = False
    selected["s"][36:] = True  # keep 36: interpolated 0.48 ms, faster than any wider width
    assert torch.equal(L.widen_to_faster(selected, scores, lm)["s"], selected["s"])
    assert torch.equal(L.widen_to_faster(selected, scores, linear)["s"], selected["s"])


# ---- (d) real measurements -----------------------------------------------------------------------------
def _wide_vit():
    config = tf.ViTConfig(image_size=32, patch_size=4, hidden_size=256, intermediate_size=1024,
                          num_hidden_layers=1, num_attention_heads=4)
    model = tf.ViTModel(config).eval()
    structures = discover(model)
    inputs = {"pixel_values": torch.randn(4, 3, 32, 32)}
    return model, inputs, structures, L.measure_tokens(model, structures, inputs)


@pytest.mark.parametrize("granularity", ["head_dim", "head"])
def test_real_timing_follows_the_width(granularity):
    """The timed replica is built at the kept width (its FLOPs grow with it: counted, so a loaded
    machine cannot make this flaky), and timing it gives positive numbers."""
    from torch.utils.flop_counter import FlopCounterMode

    _, _, structures, tokens = _wide_vit()
    settings = L.LatencySettings(batch=4, min_run_time=0.01, warmup=1)

    def flops(sig, width):
        module, inputs = L.replica(sig, width, settings)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            module(*inputs)
        return counter.get_total_flops()

    for s in structures:
        n = s.num_units(granularity)
        if n == 1:
            continue
        sig = L.signature(s, granularity, *tokens[s.name])
        assert flops(sig, n) > 1.5 * flops(sig, 1), s.name  # a replica that ignored the width fails here
        narrow = L.time_structure(s, granularity, 1, *tokens[s.name], settings=settings).ms
        full = L.time_structure(s, granularity, n, *tokens[s.name], settings=settings).ms
        assert narrow > 0 and full > 0


def test_real_build_on_a_tiny_model(tmp_path):
    model, inputs, structures, tokens = _structures("vit_model")
    settings = L.LatencySettings(batch=2, min_run_time=0.002, warmup=1, rounds=1, attention="eager")
    lm = L.build_latency_model(structures, "head_dim", tokens, settings, model=model, example_inputs=inputs,
                               cache=tmp_path)
    assert lm.model_ms > 0 and lm.fixed_ms >= 0 and all(c > 0 for c in lm.unit_costs().values())
    assert all(t.ms[i] > 0 for t in lm.tables.values() for i in range(len(t.ms)))
    if not lm.fixed_clamped:
        assert lm.predict() == pytest.approx(lm.model_ms)
    assert L.auto_round_to(lm) in L.ROUND_CANDIDATES


def test_onnxruntime_runtime_times_the_replica():
    pytest.importorskip("onnxruntime")
    _, _, structures, tokens = _structures("vit_model")
    settings = L.LatencySettings(runtime="onnxruntime", min_run_time=0.002, warmup=1, batch=2)
    for s in structures:
        timing = L.time_structure(s, "head_dim", 2, *tokens[s.name], settings=settings)
        assert timing.ms > 0 and timing.runs >= 3


# ---- the search itself under budget="latency" ----------------------------------------------------
def _run_search(model, inputs, cfg, lm):
    from upop import UPopConfig, UPopSearch

    search = UPopSearch(model, UPopConfig(**cfg), latency=lm)
    for _ in range(search.config.total_steps):
        out = model(**inputs)
        loss = sum(v.float().pow(2).mean() for v in out.values() if torch.is_tensor(v) and v.is_floating_point())
        loss.backward()
        search.step()
        model.zero_grad(set_to_none=True)
    return search


def test_search_with_a_latency_budget_meets_the_table():
    model, inputs, structures, _ = _structures()
    lm = L.LatencyModel.synthetic(_linear_tables(structures), fixed_ms=1.0)
    search = _run_search(model, inputs, dict(target=0.5, total_steps=4, interval=1, budget="latency"), lm)
    plan = search.plan()
    widths = L.plan_widths(plan)
    assert abs(lm.prunable_ms(widths) - 0.5 * lm.prunable_ms()) <= max(lm.unit_costs().values())
    assert plan.stats["latency"]["removed_measured"] == pytest.approx(0.5, abs=0.05)
    assert plan.stats["budget"] == "latency"


def test_round_to_auto_reads_the_tables_in_the_search():
    model, inputs, structures, _ = _structures()
    # every table is a staircase of 4: widths below a multiple of 4 cost as much as the multiple
    tables = {}
    for s in structures:
        n = s.num_units("head_dim")
        widths = list(range(1, n + 1))
        tables[s.name] = L.Table(widths, [0.1 * (4 * math.ceil(w / 4)) for w in widths])
    lm = L.LatencyModel.synthetic(tables, fixed_ms=0.5)
    search = _run_search(model, inputs, dict(target=0.5, total_steps=3, interval=1, budget="latency",
                                             round_to="auto"), lm)
    step = search.round_to()
    assert step == L.auto_round_to(lm) > 1  # the tiny heads (8 dims) leave room for a multiple of 2
    assert all(len(sp.kept) % step == 0 or len(sp.kept) == sp.total for sp in search.plan().structures.values())


def test_round_to_auto_needs_the_latency_budget():
    from upop import UPopConfig

    with pytest.raises(ValueError, match="latency"):
        UPopConfig(target=0.5, total_steps=2, round_to="auto").validate()


def test_a_latency_target_counts_the_overhead_that_widths_cannot_remove():
    """target 0.5 = half the prunable part's *measured* latency: with a per-call intercept in every
    table the search cuts more than half of the width-dependent cost, and says when a target is
    beyond what widths control."""
    model, inputs, structures, _ = _structures()
    lm = L.LatencyModel.synthetic(_linear_tables(structures, intercept=0.5), fixed_ms=1.0)
    assert lm.linear_target(0.5) == pytest.approx(0.5 / lm.reachable()) and lm.linear_target(0.5) > 0.5
    search = _run_search(model, inputs, dict(target=0.5, total_steps=4, interval=1, budget="latency"), lm)
    report = search.plan().stats["latency"]
    assert report["removed_measured"] == pytest.approx(0.5, abs=max(lm.unit_costs().values()) / lm.prunable_ms())
    assert report["removed_linear"] > 0.5
    assert lm.reachable() < 0.9
    fresh, fresh_inputs, _, _ = _structures()
    with pytest.warns(UserWarning, match="more than cutting widths can remove"):
        _run_search(fresh, fresh_inputs, dict(target=0.95, total_steps=2, interval=1, budget="latency"), lm)
