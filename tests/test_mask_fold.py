"""Masks folded into the projections' weights (upop.masks): the same loss and the same mask
gradients as multiplying each projection's output by its mask (the paper's formulation), with
fewer bytes saved for backward; the unfolded fallbacks; copies and remove()."""

import copy

import pytest
import torch
from torch import nn

from families import FAMILY_BY_NAME, _pixels, _text
from upop.adapters import discover
from upop.masks import MaskSet, is_masked

# Batches large enough that every projection sees at least in_features (32) input rows: the fold.
CASES = {
    "vit": lambda g: {"pixel_values": _pixels(g, batch=4)},
    "clip": lambda g: {**_text(g, batch=6), "pixel_values": _pixels(g, batch=4)},
    "open_clip": lambda g: {"image": _pixels(g, batch=4), "text": torch.randint(1, 99, (6, 8), generator=g)},
    "timm_vit": lambda g: {"x": _pixels(g, batch=4)},  # fused qkv
    "bert": lambda g: _text(g, batch=6),
    "blip_retrieval": lambda g: {**_text(g, batch=6), "pixel_values": _pixels(g, batch=6)},  # swapped attention
}


def _reference(structures, granularity: str, values: dict[str, torch.Tensor]):
    """The output-multiply formulation, written out: a forward hook scaling each output row."""
    masks = {n: v.clone().requires_grad_(True) for n, v in values.items()}
    handles = []
    for s in structures:
        for lin in s.input_linears():
            def hook(module, inputs, output, s=s, fused=lin is s.qkv):
                rows = s.expand(masks[s.name], granularity)
                return output * (rows.repeat(3) if fused else rows)
            handles.append(lin.register_forward_hook(hook))
    return masks, handles


def _saved_bytes(model: nn.Module, run) -> int:
    """Bytes of the (non-parameter) tensors autograd saves for backward while `run()` executes."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(saved.values()), out


def _loss(probe: torch.Tensor) -> torch.Tensor:
    """A fixed random projection of the output: normalised features make |probe|^2 a constant."""
    weights = torch.randn(probe.numel(), generator=torch.Generator().manual_seed(3))
    return (probe.reshape(-1) * weights).sum()


def _step(fam, model, inputs):
    saved, out = _saved_bytes(model, lambda: _loss(fam.probe(model(**inputs))))
    out.backward()
    return saved, out.detach()


@pytest.mark.parametrize("name", sorted(CASES))
def test_fold_matches_output_multiply(name):
    fam = FAMILY_BY_NAME[name]
    granularity = "head" if name == "clip" else "head_dim"
    model = fam.build().eval()
    twin = copy.deepcopy(model)  # before discover(): open_clip's attention is swapped in by each discover()
    inputs = CASES[name](torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    structures = discover(model)
    values = {s.name: 0.5 + torch.rand(s.num_units(granularity), generator=g) for s in structures}

    masks = MaskSet(structures, granularity, torch.device("cpu"))
    for n, v in values.items():
        masks.set(n, v)
    masks.attach()
    assert is_masked(model)
    folded = [lin for s in structures for lin in s.input_linears() if "forward" in lin.__dict__]
    assert folded and not any(lin._forward_hooks for lin in folded)  # every projection is folded, no hook
    saved, loss = _step(fam, model, inputs)

    ref_structures = discover(twin)
    ref_masks, handles = _reference(ref_structures, granularity, values)
    ref_saved, ref_loss = _step(fam, twin, inputs)

    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=0)
    for s in structures:
        ours, theirs = masks.values[s.name].grad, ref_masks[s.name].grad
        assert ours is not None and ours.abs().max() > 0
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max())), s.name
    weights = dict(twin.named_parameters())
    # the weights' gradients are those of the masked model too (some are 0 up to rounding, e.g. key biases:
    # compared at the scale of the largest gradient)
    scale = max(float(p.grad.abs().max()) for p in weights.values() if p.grad is not None)
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(p.grad, weights[n].grad, rtol=1e-5, atol=1e-6 * scale), n
    assert saved < ref_saved, (saved, ref_saved)

    masks.remove()
    for h in handles:
        h.remove()
    assert not is_masked(model) and not any("forward" in lin.__dict__ for lin in folded)
    with torch.no_grad():  # unmasked again: both models compute the same plain function
        assert torch.allclose(fam.probe(model(**inputs)), fam.probe(twin(**inputs)), atol=1e-6)


def test_few_rows_and_overridden_forwards_multiply_the_output():
    """Fewer input rows than in_features: the folded forward multiplies the output (cheaper); a Linear
    whose forward is not nn.Linear's gets the forward hook. Both give the reference gradients."""
    fam = FAMILY_BY_NAME["bert"]
    model = fam.build().eval()
    twin = copy.deepcopy(model)
    inputs = _text(torch.Generator().manual_seed(1), batch=2)  # 14 rows < 32 in_features

    class Traced(nn.Linear):
        def forward(self, x):
            return super().forward(x)

    layer = model.encoder.layer[0].attention.self
    layer.query.__class__ = Traced
    structures = discover(model)
    values = {s.name: 0.5 + torch.rand(s.num_units("head_dim")) for s in structures}
    masks = MaskSet(structures, "head_dim", torch.device("cpu"))
    for n, v in values.items():
        masks.set(n, v)
    masks.attach()
    assert "forward" not in layer.query.__dict__ and layer.query._forward_hooks  # the hook fallback
    assert "forward" in layer.key.__dict__
    _, loss = _step(fam, model, inputs)
    ref_masks, _ = _reference(discover(twin), "head_dim", values)
    _, ref_loss = _step(fam, twin, inputs)
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=0)
    for s in structures:
        assert torch.allclose(masks.values[s.name].grad, ref_masks[s.name].grad, rtol=1e-5, atol=1e-9), s.name
    masks.remove()
    assert not is_masked(model) and not layer.query._forward_hooks


def test_a_deep_copy_of_a_masked_model_is_plain():
    """A copy (momentum model, distillation teacher) does not carry the search's masks."""
    fam = FAMILY_BY_NAME["vit"]
    model = fam.build().eval()
    plain = copy.deepcopy(model)
    inputs = CASES["vit"](torch.Generator().manual_seed(1))
    structures = discover(model)
    masks = MaskSet(structures, "head_dim", torch.device("cpu"))
    for s in structures:
        masks.set(s.name, torch.zeros(s.num_units("head_dim")))
    masks.attach()
    clone = copy.deepcopy(model)
    assert is_masked(model) and not is_masked(clone)
    with torch.no_grad():
        expected = fam.probe(plain(**inputs))
        assert torch.allclose(fam.probe(clone(**inputs)), expected)
        assert not torch.allclose(fam.probe(model(**inputs)), expected)  # all masks 0: the original differs
