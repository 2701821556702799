"""benchmarks/breakdown.py (per-part time and FLOPs of a forward) and benchmarks/memory.py (peak memory
of search vs plain training steps) on tiny random models."""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import upop
from families import FAMILIES, _pixels, _text

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.breakdown import (  # noqa: E402
    FIXED_PARTS,
    PARTS,
    assign_parts,
    compare_breakdown,
    describe,
    mlp_width_timing,
    module_breakdown,
)

FAMILY = {f.name: f for f in FAMILIES}


def _model_and_inputs(name: str):
    torch.manual_seed(0)
    fam = FAMILY[name]
    return fam.build().eval(), fam.inputs(torch.Generator().manual_seed(0))


def _owner_of(timed: dict, path: str) -> dict | None:
    """The innermost timed module holding `path` (itself or an ancestor)."""
    best = None
    for p, info in timed.items():
        if (p == path or path.startswith(p + ".")) and (best is None or len(p) > len(best[0])):
            best = (p, info)
    return None if best is None else best[1]


@pytest.mark.parametrize("name", ["clip", "dual_encoder", "vit", "timm_vit"])
def test_every_structure_in_exactly_one_part(name):
    model, _ = _model_and_inputs(name)
    structures = upop.discover(model)
    timed = assign_parts(model, structures)
    paths = {id(m): p for p, m in model.named_modules()}
    owners = {}
    for info in timed.values():
        owners.setdefault(info["owner"], set()).add(info["part"])
    for s in structures:
        part = "attention" if s.is_attention else "mlp"
        assert owners[s.name] == {part}, s.name
        for lin in [*s.input_linears(), s.output_linear()]:  # every Linear timed as this structure's
            assert _owner_of(timed, paths[id(lin)]) == {"part": part, "owner": s.name, "sub": "linear"}
    # nothing a structure owns is claimed by a fixed part, and every norm outside the structures is a norm
    for path, info in timed.items():
        if info["part"] in FIXED_PARTS:
            assert not any(path == s.name or path.startswith(s.name + ".") for s in structures), path
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm) and not any(path.startswith(s.name + ".") for s in structures):
            assert timed[path]["part"] == "norms", path


def test_bert_layer_norms_of_the_residual_are_norms_not_mlp():
    model, _ = _model_and_inputs("dual_encoder")
    timed = assign_parts(model)
    layer = "text_model.encoder.layer.0"
    assert timed[f"{layer}.output.dense"] == {"part": "mlp", "owner": f"{layer}.intermediate", "sub": "linear"}
    assert timed[f"{layer}.attention.output.dense"] == {"part": "attention", "owner": f"{layer}.attention.self",
                                                        "sub": "linear"}
    assert timed[f"{layer}.output.LayerNorm"]["part"] == "norms"
    assert f"{layer}.output" not in timed  # BertOutput itself untimed: its residual add is `other`


def test_parts_add_up_to_the_whole_forward_vit():
    model, inputs = _model_and_inputs("vit")
    result = module_breakdown(model, inputs, repeats=3, warmup=1)
    ms = result["parts_ms"]
    assert set(ms) == set(PARTS)
    assert sum(ms.values()) == pytest.approx(result["hooked_trimmed_ms"], rel=1e-9)
    assert min(ms.values()) >= -1e-6  # other >= 0: no module counted twice
    assert ms["attention"] > 0 and ms["mlp"] > 0 and ms["norms"] > 0 and ms["embeddings"] > 0
    assert sum(result["shares"].values()) == pytest.approx(1.0)
    assert result["whole_ms"] > 0 and result["threads"] == torch.get_num_threads()
    # FLOPs: the parts add up to count_flops, and in a ViT every matmul sits in a module
    flops = result["parts_flops"]
    assert sum(flops.values()) == result["flops"] == upop.count_flops(model, inputs)
    assert flops["other"] == 0 and flops["norms"] == 0
    # the split: Linears and the rest add up to their part; the rest of attention is QK^T and AV
    split, split_flops = result["split_ms"], result["split_flops"]
    for p in ("attention", "mlp"):
        assert split[f"{p}.linear"] + split[f"{p}.rest"] == pytest.approx(ms[p], rel=1e-9, abs=1e-9)
        assert split_flops[f"{p}.linear"] + split_flops[f"{p}.rest"] == flops[p]
    batch, tokens, width, layers = inputs["pixel_values"].shape[0], (16 // 4) ** 2 + 1, 32, 2
    assert split_flops["attention.rest"] == layers * 2 * (2 * batch * tokens * tokens * width)
    assert split_flops["mlp.rest"] == 0  # GELU: no multiply-adds
    for s in upop.discover(model):
        if not s.is_attention:  # fc1 + fc2 of one MLP: 2 FLOPs per multiply-add
            expected = 2 * batch * tokens * 2 * s.fc1.in_features * s.hidden
            assert result["modules"][s.name]["part"] == "mlp"
            assert result["modules"][s.name]["flops"] == expected


def test_nested_modules_and_top_level_matmul_dual_encoder():
    """BertEmbeddings holds a timed LayerNorm (exclusive timing must not count it twice); the logit
    matmul of VisionTextDualEncoderModel.forward belongs to no module, so its FLOPs are `other`'s."""
    model, inputs = _model_and_inputs("dual_encoder")
    result = module_breakdown(model, inputs, repeats=3, warmup=1)
    assert result["parts_ms"]["other"] >= -1e-6
    assert sum(result["parts_ms"].values()) == pytest.approx(result["hooked_trimmed_ms"], rel=1e-9)
    batch, dim = inputs["input_ids"].shape[0], model.config.projection_dim
    assert result["parts_flops"]["other"] == 2 * batch * batch * dim
    assert sum(result["parts_flops"].values()) == upop.count_flops(model, inputs)
    assert result["modules"]["text_model.embeddings.LayerNorm"]["part"] == "norms"


def _uniform_plan(model: torch.nn.Module, keep: float) -> upop.PruningPlan:
    entries = {}
    for s in upop.discover(model):
        total = s.num_units("head_dim")
        kept = list(range(max(1, int(total * keep))))
        entries[s.name] = upop.StructurePlan(kind=s.kind, unit=s.unit("head_dim"), total=total, kept=kept,
                                             num_heads=s.num_heads, head_dim=s.head_dim, hidden=s.hidden)
    return upop.PruningPlan(structures=entries, model_class=type(model).__name__, stats={})


def test_compare_breakdown_clip():
    g = torch.Generator().manual_seed(0)
    dense, _ = _model_and_inputs("clip")
    inputs = {**_text(g), "pixel_values": _pixels(g)}
    compressed = copy.deepcopy(dense)
    upop.apply_plan(compressed, _uniform_plan(compressed, 0.25))
    result = compare_breakdown(dense, compressed, inputs, repeats=3, warmup=1)
    parts, whole = result["parts"], result["whole"]
    assert set(parts) == set(PARTS)
    assert whole["flops_ratio"] == pytest.approx(upop.count_flops(dense, inputs) / upop.count_flops(compressed, inputs))
    assert whole["speedup"] > 0 and whole["hooked_speedup"] > 0
    # every MLP (37 neurons) keeps 9: exactly 37/9 fewer FLOPs; every head keeps 2 of its 8 dims, which
    # shrinks the projections and both attention matmuls alike: exactly 4x
    assert {s.hidden for s in upop.discover(dense) if not s.is_attention} == {37}
    assert parts["mlp"]["flops_ratio"] == pytest.approx(37 / 9)
    assert parts["attention"]["flops_ratio"] == pytest.approx(4.0)
    assert result["split"]["mlp.linear"]["flops_ratio"] == pytest.approx(37 / 9)
    assert result["split"]["attention.rest"]["flops_ratio"] == pytest.approx(4.0)
    for p in ("embeddings", "head"):
        assert parts[p]["flops_ratio"] == pytest.approx(1.0)
    for p in PARTS:
        assert parts[p]["dense_ms"] >= -1e-6 and parts[p]["compressed_ms"] >= -1e-6
    for side in ("dense_share", "compressed_share"):
        assert sum(parts[p][side] for p in PARTS) == pytest.approx(1.0)
        assert result["fixed"][side] == pytest.approx(sum(parts[p][side] for p in FIXED_PARTS))
    assert "fewer FLOPs" in describe(result)


def test_mlp_width_timing():
    model, _ = _model_and_inputs("vit")
    mlp = next(s for s in upop.discover(model) if not s.is_attention)
    times = mlp_width_timing(mlp, tokens=5, widths=[3, 8], repeats=2, block_ms=1.0)
    assert set(times) == {3, 8} and all(t > 0 for t in times.values())
    with pytest.raises(ValueError, match="outside"):
        mlp_width_timing(mlp, tokens=5, widths=[mlp.hidden + 1])


# ---- memory ----------------------------------------------------------------------------------------
def test_memory_tiny_search_and_plain():
    """Both modes in fresh processes (started together: the test waits for the slower one)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    procs = {mode: subprocess.Popen([sys.executable, "-m", "benchmarks.memory", "--task", "retrieval", "--mode", mode,
                                     "--steps", "2", "--mode-set", "tiny"], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for mode in ("plain", "search")}
    results = {}
    for mode, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        result = json.loads(out.strip().splitlines()[-1])
        assert result["mode"] == mode and result["task"] == "retrieval" and result["steps"] == 2
        assert result["peak_rss"] > 0 and result["base_rss"] > 0
        assert result["peak_rss"] >= result["base_rss"] or not result["peak_reset"]
        assert len(result["step_s"]) == 2 and all(t > 0 for t in result["step_s"])
        assert all(math.isfinite(x) for x in result["losses"])
        results[mode] = result
    # the search's masks keep more for backward than plain training does, never less
    assert results["search"]["saved_for_backward"] >= results["plain"]["saved_for_backward"] > 0


def test_memory_refuses_an_unknown_task(capsys):
    from benchmarks.memory import main

    assert main(["--task", "nope", "--mode", "plain", "--mode-set", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--task must be one of" in err[0] and "'nope'" in err[0]
