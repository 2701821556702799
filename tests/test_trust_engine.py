"""The engine can be trusted with untrusted folders and refuses misuse at the call.

A model folder is data, never code: a build description naming a file, a URL, a hub, a pickle
option or a pretrained source is refused before any model library is called; weights carry a
SHA-256; Hugging Face folders load without remote code."""

import json
import pickle
import shutil

import pytest
import torch
import transformers as tf

import upop
from families import FAMILY_BY_NAME
from helpers import run_search

TIMM_TINY = dict(img_size=16, patch_size=4, depth=1, embed_dim=16, num_heads=2, num_classes=3)


class _Payload:
    """Unpickling this creates the marker file: the proof that a pickle was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious_pickle(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(_Payload(marker)))
    probe = tmp_path / "probe_marker"  # the payload is real: unpickling it does create a file
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()
    return evil, marker


@pytest.fixture(scope="module")
def timm_folder(tmp_path_factory):
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_TINY)
    return upop.save_pretrained(model, tmp_path_factory.mktemp("ckpt") / "timm")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    import open_clip

    model = open_clip.CLIP(embed_dim=8, vision_cfg=dict(layers=1, width=16, head_width=8, image_size=16, patch_size=8),
                           text_cfg=dict(context_length=4, vocab_size=20, width=16, heads=2, layers=1))
    return upop.save_pretrained(model, tmp_path_factory.mktemp("ckpt") / "clip")


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    model = tf.ViTForImageClassification(tf.ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1,
                                                      num_attention_heads=2, intermediate_size=20, num_labels=3))
    return upop.save_pretrained(model, tmp_path_factory.mktemp("ckpt") / "vit")


def _edit_meta(src, dst, edit):
    shutil.copytree(src, dst)
    meta = json.loads((dst / "upop_model.json").read_text())
    edit(meta)
    (dst / "upop_model.json").write_text(json.dumps(meta))
    return dst


def _no_library_calls(monkeypatch):
    import open_clip
    import timm

    def called(*args, **kwargs):
        raise AssertionError("a model library was called for an unsafe description")

    for module, name in ((timm, "create_model"), (open_clip, "create_model"), (open_clip, "CLIP")):
        monkeypatch.setattr(module, name, called)


TIMM_ATTACKS = {
    "checkpoint_path": lambda m, evil: m["kwargs"].update(checkpoint_path=str(evil), weights_only=False),
    "weights_only": lambda m, evil: m["kwargs"].update(weights_only=False),
    "pretrained": lambda m, evil: m["kwargs"].update(pretrained=True),
    "pretrained_cfg_overlay": lambda m, evil: m["kwargs"].update(pretrained_cfg_overlay={"file": str(evil)}),
    "cache_dir": lambda m, evil: m["kwargs"].update(cache_dir=str(evil.parent)),
    "hf_hub_name": lambda m, evil: m.update(name="hf-hub:timm/vit_tiny_patch16_224"),
    "local_dir_name": lambda m, evil: m.update(name=f"local-dir:{evil.parent}"),
    "path_in_value": lambda m, evil: m["kwargs"].update(global_pool=str(evil)),
    "unregistered_name": lambda m, evil: m.update(name="not_a_timm_model"),
}
CLIP_ATTACKS = {
    "pretrained_image_path": lambda m, evil: m["kwargs"].update(pretrained_image_path=str(evil)),
    "timm_tower": lambda m, evil: m["kwargs"]["vision_cfg"].update(timm_model_name="vit_tiny_patch16_224",
                                                                   timm_model_pretrained=True),
    "hf_text_tower": lambda m, evil: m["kwargs"]["text_cfg"].update(hf_model_name="bert-base-uncased"),
    "create_model_pretrained": lambda m, evil: m.update(name="ViT-B-32", kwargs={"pretrained": str(evil)}),
    "local_dir_name": lambda m, evil: m.update(name=f"local-dir:{evil.parent}", kwargs={}),
    "nested_unknown": lambda m, evil: m["kwargs"].update(vision_cfg={"layers": {"checkpoint": str(evil)}}),
}


@pytest.mark.parametrize("attack", list(TIMM_ATTACKS))
def test_timm_folder_cannot_run_code(attack, timm_folder, tmp_path, monkeypatch):
    evil, marker = _malicious_pickle(tmp_path)
    folder = _edit_meta(timm_folder, tmp_path / "c", lambda m: TIMM_ATTACKS[attack](m, evil))
    if attack != "unregistered_name":  # that one is refused by the registry itself
        _no_library_calls(monkeypatch)
    with pytest.raises(upop.CheckpointError) as info:
        upop.from_pretrained(folder)
    assert "\n" not in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("attack", list(CLIP_ATTACKS))
def test_open_clip_folder_cannot_run_code(attack, clip_folder, tmp_path, monkeypatch):
    evil, marker = _malicious_pickle(tmp_path)
    folder = _edit_meta(clip_folder, tmp_path / "c", lambda m: CLIP_ATTACKS[attack](m, evil))
    _no_library_calls(monkeypatch)
    with pytest.raises(upop.CheckpointError) as info:
        upop.from_pretrained(folder)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_unsafe_descriptions_are_refused_at_save_and_in_create_model(tmp_path):
    evil, marker = _malicious_pickle(tmp_path)
    with pytest.raises(upop.CheckpointError, match="checkpoint_path"):
        upop.create_model("timm", "vit_tiny_patch16_224", checkpoint_path=str(evil), **TIMM_TINY)
    with pytest.raises(upop.CheckpointError, match="model name"):
        upop.create_model("timm", "hf-hub:timm/vit_tiny_patch16_224")
    model = upop.create_model("timm", "vit_tiny_patch16_224", **TIMM_TINY)
    bad = {"library": "timm", "name": "vit_tiny_patch16_224", "kwargs": {"pretrained_cfg_overlay": {"file": str(evil)}}}
    with pytest.raises(upop.CheckpointError, match="pretrained_cfg_overlay"):
        upop.save_pretrained(model, tmp_path / "out", build=bad)
    assert not (tmp_path / "out").exists() and not marker.exists()


def test_transformers_folder_with_custom_code_is_refused(vit_folder, tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(vit_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (folder / "modeling_evil.py").write_text(f"open({str(tmp_path / 'PWNED')!r}, 'w')\n")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(upop.CheckpointError, match="auto_map") as info:
        upop.from_pretrained(folder)
    assert "\n" not in str(info.value) and not (tmp_path / "PWNED").exists()


def test_transformers_failures_become_checkpoint_errors(vit_folder, tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(vit_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": "wide", "num_attention_heads": -1}))
    with pytest.raises(upop.CheckpointError) as info:
        upop.from_pretrained(folder)
    assert "\n" not in str(info.value)


def test_weights_hash_is_checked(vit_folder, tmp_path):
    meta = json.loads((vit_folder / "upop_model.json").read_text())
    assert meta["version"] == 2 and len(meta["weights_sha256"]) == 64
    folder = tmp_path / "flipped"
    shutil.copytree(vit_folder, folder)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-3] ^= 0x01  # one bit of one weight: still a readable safetensors file
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(upop.CheckpointError, match=r"model\.safetensors does not match the SHA-256") as info:
        upop.from_pretrained(folder)
    assert "\n" not in str(info.value)


def test_version_1_folders_without_hash_still_load(vit_folder, tmp_path):
    def old(meta):
        meta["version"] = 1
        del meta["weights_sha256"]

    upop.from_pretrained(_edit_meta(vit_folder, tmp_path / "v1", old))
    with pytest.raises(upop.CheckpointError, match="weights_sha256"):  # version 2 must declare it
        upop.from_pretrained(_edit_meta(vit_folder, tmp_path / "v2", lambda m: m.pop("weights_sha256")))
    wrong = _edit_meta(vit_folder, tmp_path / "v1bad", lambda m: m.update(version=1, weights_sha256="0" * 64))
    with pytest.raises(upop.CheckpointError, match="SHA-256"):  # a declared hash must match
        upop.from_pretrained(wrong)


# ---- misuse is refused at the call ---------------------------------------------------------------------
def _masked_vit():
    fam = FAMILY_BY_NAME["vit"]
    return fam, *run_search(fam, upop.UPopConfig(target=0.5, total_steps=4, interval=2))


def test_save_with_masks_attached_is_refused(tmp_path):
    _, model, _, _, search = _masked_vit()
    with pytest.raises(upop.CheckpointError, match=r"masks attached.*compress\(\)") as info:
        upop.save_pretrained(model, tmp_path / "m")
    assert "\n" not in str(info.value) and list(tmp_path.iterdir()) == []
    search.remove()  # the dense model may be saved once the masks are gone
    upop.save_pretrained(model, tmp_path / "m")


def test_second_search_and_apply_plan_on_a_masked_model_are_refused():
    _, model, _, _, search = _masked_vit()
    with pytest.raises(RuntimeError, match="already has a UPop search attached"):
        upop.UPopSearch(model, upop.UPopConfig(total_steps=2, interval=1))
    with pytest.raises(upop.PlanError, match="search attached"):
        upop.apply_plan(model, search.plan())


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0, -1.0, "2"])
def test_step_refuses_a_bad_grad_scale(scale):
    fam = FAMILY_BY_NAME["vit"]
    model = fam.build()
    search = upop.UPopSearch(model, upop.UPopConfig(total_steps=4, interval=2))
    fam.probe(model(**fam.inputs(torch.Generator().manual_seed(0)))).sum().backward()
    with pytest.raises(ValueError, match="grad_scale"):
        search.step(grad_scale=scale)
    assert search.step_count == 0  # nothing was accumulated
    search.step(grad_scale=1024.0)


def test_config_is_frozen_once_a_search_starts():
    config = upop.UPopConfig(target=0.5, total_steps=4, interval=2)
    config.target = 0.4  # before any search: an ordinary dataclass
    search = upop.UPopSearch(FAMILY_BY_NAME["vit"].build(), config)
    for field, value in (("target", 0.9), ("total_steps", 100)):
        with pytest.raises(AttributeError, match=f"frozen.*{field}"):
            setattr(config, field, value)
    assert (config.target, search.config.total_steps) == (0.4, 4)


def test_compressing_twice_composes_onto_the_base_model(tmp_path):
    fam = FAMILY_BY_NAME["vit"]
    inputs = fam.inputs(torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    base = fam.build().eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model, _, _, first = run_search(fam, upop.UPopConfig(target=0.3, total_steps=4, interval=2))
    first.compress()
    second = upop.UPopSearch(model, upop.UPopConfig(target=0.3, total_steps=4, interval=2))
    for _ in range(4):
        fam.probe(model(**inputs)).pow(2).mean().backward()
        second.step()
    plan = second.plan()
    second.compress()
    for name, sp in plan.structures.items():  # indices refer to the base model
        assert sp.total == first.plan().structures[name].total
        assert set(sp.kept) <= set(first.plan().structures[name].kept)
    assert any(len(sp.kept) < len(first.plan().structures[n].kept) for n, sp in plan.structures.items())
    with torch.no_grad():
        expected = fam.probe(model(**inputs))
    upop.save_pretrained(model, tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(fam.probe(upop.from_pretrained(tmp_path / "m")(**inputs)), expected)
    fresh = fam.build().eval()
    fresh.load_state_dict(base_state)
    upop.apply_plan(fresh, plan)
    with torch.no_grad():
        assert (fam.probe(fresh(**inputs)) - expected).abs().max() <= 1e-5


def test_a_second_search_with_another_attention_unit_is_refused():
    model, _, _, first = run_search(FAMILY_BY_NAME["vit"], upop.UPopConfig(target=0.5, total_steps=2, interval=1))
    first.compress()
    with pytest.raises(upop.PlanError, match="granularity='head_dim'") as info:
        upop.UPopSearch(model, upop.UPopConfig(total_steps=2, interval=1, granularity="head"))
    assert "\n" not in str(info.value)


# ---- a non-finite model is never saved -------------------------------------------------------------------
def test_a_model_with_nan_is_not_saved_and_the_folder_is_unchanged(vit_folder, tmp_path):
    from upop.files import NonFiniteWeightsError

    folder = tmp_path / "best"
    shutil.copytree(vit_folder, folder)
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    model = upop.from_pretrained(vit_folder)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("fc1.weight"))[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"retrain: best model: not saved, tensor '.*fc1\.weight'"):
        upop.save_pretrained(model, folder, what="retrain: best model")
    with pytest.raises(NonFiniteWeightsError, match="^save_pretrained: not saved"):
        upop.save_pretrained(model, tmp_path / "new")
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no staging folder left behind


def test_plan_save_is_atomic(vit_folder, tmp_path):
    plan = upop.PruningPlan.load(vit_folder / "upop_plan.json")
    plan.save(tmp_path / "plan.json")
    plan.save(tmp_path / "plan.json")  # over an existing file
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
    assert upop.PruningPlan.load(tmp_path / "plan.json").to_dict() == plan.to_dict()
