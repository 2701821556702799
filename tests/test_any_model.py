"""Any timm VisionTransformer or open_clip CLIP saves and reloads exactly, however it was built:
the build description is read from the model itself and checked by rebuilding it."""

import json

import open_clip
import pytest
import timm
import torch

import upop

TINY = dict(img_size=32, depth=2, embed_dim=48, num_heads=3)
TIMM_CASES = {
    "issue_vit_tiny": ("vit_tiny_patch16_224", dict(img_size=32, depth=3, embed_dim=96, num_classes=5)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(TINY, num_classes=5)),
    "qk_norm": ("vit_tiny_patch16_224", dict(TINY, qk_norm=True)),
    "layerscale": ("vit_tiny_patch16_224", dict(TINY, init_values=1e-5)),
    "no_class_token_avg": ("vit_tiny_patch16_224", dict(TINY, class_token=False, global_pool="avg")),
    "reg_tokens": ("vit_tiny_patch16_224", dict(TINY, reg_tokens=2)),
    "patch8_mlp2": ("vit_tiny_patch16_224", dict(TINY, patch_size=8, mlp_ratio=2)),
    "no_embed_class_quick_gelu": ("vit_tiny_patch16_224", dict(TINY, no_embed_class=True, act_layer="quick_gelu",
                                                                drop_path_rate=0.1, fc_norm=True)),
}
CLIP_ARGS = dict(embed_dim=16, vision_cfg=dict(layers=2, width=32, head_width=8, image_size=32, patch_size=8),
                 text_cfg=dict(context_length=8, vocab_size=99, width=32, heads=4, layers=2))


def _timm(case: str) -> torch.nn.Module:
    name, kwargs = TIMM_CASES[case]
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _outputs(model: torch.nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        out = model(*x)
    return torch.cat([t.flatten() for t in out[:2]]) if isinstance(out, tuple) else out


def _compress(model: torch.nn.Module, x, granularity: str) -> None:
    search = upop.UPopSearch(model, upop.UPopConfig(target=0.4, total_steps=2, interval=1, granularity=granularity))
    for _ in range(2):
        out = model(*x)
        out = torch.cat([t.flatten() for t in out[:2]]) if isinstance(out, tuple) else out
        out.pow(2).mean().backward()
        search.step()
    search.compress()


@pytest.mark.parametrize("compressed", [False, True], ids=["dense", "compressed"])
@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_any_timm_vit_reloads_exactly(case, compressed, tmp_path):
    model = _timm(case)
    x = (torch.randn(2, 3, 32, 32),)
    if compressed:
        _compress(model, x, "head" if case == "qk_norm" else "head_dim")
    assert not hasattr(model, "upop_build")  # built by timm itself, not by upop
    expected = _outputs(model, x)
    upop.save_pretrained(model, tmp_path / "m")
    reloaded = upop.from_pretrained(tmp_path / "m")
    assert type(reloaded) is type(model)
    assert (_outputs(reloaded, x) - expected).abs().max() <= 1e-6
    assert upop.count_params(reloaded) == upop.count_params(model)


def _tiny_registered_config(tmp_path) -> str:
    name = "upop-test-tiny-ViT"
    (tmp_path / f"{name}.json").write_text(json.dumps(CLIP_ARGS))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    return name


@pytest.mark.parametrize("compressed", [False, True], ids=["dense", "compressed"])
@pytest.mark.parametrize("how", ["CLIP", "create_model", "create_model_and_transforms"])
def test_any_open_clip_reloads_exactly(how, compressed, tmp_path):
    torch.manual_seed(0)
    if how == "CLIP":
        model = open_clip.CLIP(**CLIP_ARGS)
    elif how == "create_model":
        model = open_clip.create_model(_tiny_registered_config(tmp_path), pretrained=None, force_quick_gelu=True)
    else:
        model, _, _ = open_clip.create_model_and_transforms(_tiny_registered_config(tmp_path), pretrained=None)
    model.eval()
    x = (torch.randn(2, 3, 32, 32), torch.randint(1, 99, (2, 8)))
    if compressed:
        _compress(model, x, "head_dim")
    expected = _outputs(model, x)
    upop.save_pretrained(model, tmp_path / "m")
    reloaded = upop.from_pretrained(tmp_path / "m")
    assert type(reloaded) is type(model)
    assert (_outputs(reloaded, x) - expected).abs().max() <= 1e-6
    if how != "CLIP":  # the image-transform settings create_model attached come back too
        assert reloaded.visual.preprocess_cfg == {k: list(v) if isinstance(v, tuple) else v
                                                   for k, v in model.visual.preprocess_cfg.items()}


def test_what_cannot_be_described_is_refused_before_writing(tmp_path):
    model = _timm("issue_vit_tiny")
    model.blocks[1].attn.proj_drop = torch.nn.Dropout(0.3)  # no timm argument makes one block differ
    with pytest.raises(upop.CheckpointError, match=r"cannot describe .*blocks\.1\.attn\.proj_drop") as info:
        upop.save_pretrained(model, tmp_path / "m")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "m").exists() and list(tmp_path.iterdir()) == []


def test_create_model_still_works_and_matches_timm(tmp_path):
    model = upop.create_model("timm", "vit_tiny_patch16_224", img_size=32, depth=1, embed_dim=48, num_heads=3)
    assert type(model).__name__ == "VisionTransformer" and len(model.blocks) == 1
    upop.save_pretrained(model.eval(), tmp_path / "m")
    x = torch.randn(1, 3, 32, 32)
    assert (upop.from_pretrained(tmp_path / "m")(x) - model(x)).abs().max() <= 1e-6
