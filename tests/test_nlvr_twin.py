"""BlipNLVRTwinModel: the official NLVR2 twin cross-attention (one branch per image), its 4 attention +
2 MLP structures per layer, compressed == masked (random plans and a real search, both granularities)
and an exact save_pretrained / from_pretrained round trip."""

import copy
import random

import pytest
import torch

import upop
from families import Family
from helpers import run_search
from upop.compress import apply_plan
from upop.masks import MaskSet
from upop.models import ARCHITECTURES
from upop.models.blip_nlvr import BlipNLVRTwinConfig, BlipNLVRTwinModel
from upop.plan import PruningPlan, StructurePlan

TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=32, bos_token_id=None, sep_token_id=None, eos_token_id=None)
VISION = dict(image_size=16, patch_size=4, hidden_size=24, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=4, initializer_range=0.02)  # BLIP's default 1e-10 ignores the image


def _model() -> BlipNLVRTwinModel:
    # 4 text layers, merging from layer 2: both the averaged and the merged regime
    return BlipNLVRTwinModel(BlipNLVRTwinConfig(text_config=TEXT, vision_config=VISION, merge_from_layer=2))


def _inputs(g: torch.Generator) -> dict:
    ids = torch.randint(1, 99, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, -2:] = 0  # padding is part of the test
    return {"input_ids": ids, "attention_mask": mask, "pixel_values_left": torch.randn(3, 3, 16, 16, generator=g),
            "pixel_values_right": torch.randn(3, 3, 16, 16, generator=g)}


TWIN = Family("blip_nlvr_twin", _model, _inputs, lambda o: o.logits)


def test_structures_per_layer_are_the_papers_four_attention_and_two_mlp():
    model = _model()
    found = upop.structures(model)
    text = {(s["layer"], s["name"].split("encoder.layer.")[1].split(".", 1)[1], s["kind"])
            for s in found if s["modality"] == "text"}
    assert text == {(n, part, kind) for n in range(4) for part, kind in [
        ("attention.self", "attention"), ("crossattention.self0", "cross_attention"),
        ("crossattention.self1", "cross_attention"), ("intermediate", "mlp")]}
    vision = sorted((s["layer"], s["kind"]) for s in found if s["modality"] == "vision")
    assert vision == [(0, "attention"), (0, "mlp"), (1, "attention"), (1, "mlp")]
    assert len(found) == 4 * 4 + 2 * 2
    # each branch owns its out-projection; the merge Linear and the head are never structures
    by_name = {s.name: s for s in upop.adapters.discover(model)}
    layer = model.text_encoder.encoder.layer[3]
    assert by_name["text_encoder.encoder.layer.3.crossattention.self0"].out is layer.crossattention.output.dense0
    assert by_name["text_encoder.encoder.layer.3.crossattention.self1"].out is layer.crossattention.output.dense1
    assert layer.crossattention.self0.key.in_features == 24  # key/value read the vision width
    merges = [lay.crossattention.output.merge_layer for lay in model.text_encoder.encoder.layer]
    assert [m is None for m in merges] == [True, True, False, False]
    assert merges[2].in_features == 64 and merges[2].out_features == 32


def test_forward_forms_labels_and_both_branches_matter():
    torch.manual_seed(0)
    model = _model().eval()
    inputs = _inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(**inputs).logits
        both = torch.cat([inputs["pixel_values_left"], inputs["pixel_values_right"]])
        joined = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       pixel_values=both).logits
        labels = torch.tensor([0, 1, 1])
        loss = model(**inputs, labels=labels).loss
        swapped = model(**{**inputs, "pixel_values_left": inputs["pixel_values_right"],
                           "pixel_values_right": inputs["pixel_values_left"]}).logits
    assert base.shape == (3, 2) and torch.equal(base, joined)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(base, labels))
    assert (swapped - base).abs().max() > 1e-6  # self0 reads the left image, self1 the right one
    with pytest.raises(ValueError, match="pixel_values_left and pixel_values_right") as info:
        model(input_ids=inputs["input_ids"], pixel_values_left=inputs["pixel_values_left"])
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="holds 3 images; 3 statements need 6"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values_left"])


def _random_plan(model: BlipNLVRTwinModel, granularity: str, rng: random.Random) -> PruningPlan:
    entries = {}
    for s in upop.adapters.discover(model):
        total = s.num_units(granularity)
        kept = sorted(rng.sample(range(total), rng.randint(1, total - 1)))
        entries[s.name] = StructurePlan(kind=s.kind, unit=s.unit(granularity), total=total, kept=kept,
                                        num_heads=s.num_heads, head_dim=s.head_dim, hidden=s.hidden)
    return PruningPlan(structures=entries, model_class=type(model).__name__)


@pytest.mark.parametrize("granularity", ["head_dim", "head"])
def test_random_plan_compressed_equals_masked_and_reloads(granularity, tmp_path):
    torch.manual_seed(1)
    model = _model().eval()
    inputs = _inputs(torch.Generator().manual_seed(1))
    plan = _random_plan(model, granularity, random.Random(granularity))
    with torch.no_grad():
        dense = model(**inputs).logits
    structures = upop.adapters.discover(model)
    masks = MaskSet(structures, granularity, torch.device("cpu"))
    for s in structures:  # 0/1 masks: the units the plan drops are zero
        values = torch.zeros(s.num_units(granularity))
        values[plan.structures[s.name].kept] = 1.0
        masks.set(s.name, values)
    masks.attach()
    with torch.no_grad():
        masked = model(**inputs).logits
    masks.remove()
    assert (masked - dense).abs().max() > 1e-4, "the masks must change the output"

    compressed = apply_plan(copy.deepcopy(model), plan)
    with torch.no_grad():
        got = compressed(**inputs).logits
    assert (got - masked).abs().max() <= 1e-5
    layer = compressed.text_encoder.encoder.layer[2].crossattention
    kept0 = len(plan.structures["text_encoder.encoder.layer.2.crossattention.self0"].kept)
    width0 = kept0 * (4 if granularity == "head_dim" else 8)
    assert layer.self0.query.out_features == layer.output.dense0.in_features == width0
    assert layer.output.merge_layer.in_features == 64  # the merge reads full-width branch outputs

    upop.save_pretrained(compressed, tmp_path / "ckpt")
    reloaded = upop.from_pretrained(tmp_path / "ckpt")
    assert type(reloaded) is BlipNLVRTwinModel and reloaded.config.merge_from_layer == 2
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, got)
    assert upop.count_params(reloaded) == upop.count_params(compressed)


@pytest.mark.parametrize("granularity", ["head_dim", "head"])
def test_search_compressed_equals_masked(granularity):
    config = upop.UPopConfig(target=0.5, total_steps=12, interval=3, granularity=granularity)
    model, inputs, dense, search = run_search(TWIN, config)
    with torch.no_grad():
        masked = model(**inputs).logits
    assert (masked - dense).abs().max() > 1e-6, "the masks must change the output"
    plan = search.plan()
    compressed = search.compress()
    assert type(compressed) is BlipNLVRTwinModel
    with torch.no_grad():
        assert (compressed(**inputs).logits - masked).abs().max() <= 1e-5
    assert abs(plan.stats["achieved"] - 0.5) <= 0.02


def test_registered_for_from_pretrained():
    assert ARCHITECTURES["BlipNLVRTwinModel"] is BlipNLVRTwinModel
