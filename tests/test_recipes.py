"""The paper's recipes wired end to end: official NLVR2 / Segmenter checkpoints as model.name, the
twin NLVR model reloading in a fresh process, data.image_size honoured (or refused) for hub
checkpoints, VQA training on several files with Visual Genome answers weighted 0.2, vqa.select,
and the paper configurations."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml

import upop
from test_task_nlvr import _write_split
from test_task_vqa import _image, _split
from upop.data.vqav2 import VG_WEIGHT, VQAv2Dataset, image_pattern
from upop.models import PRESETS, build_model
from upop.models.blip_nlvr import BlipNLVRTwinConfig, BlipNLVRTwinModel
from upop.models.segmenter import SegmenterConfig, SegmenterForSemanticSegmentation
from upop.runconfig import ConfigError, ModelConfig, load_run_config
from upop.tasks.classification import ClassificationTask
from upop.tasks.nlvr import NLVRTask
from upop.tasks.segmentation import SegmentationTask
from upop.tasks.vqa import VQATask

EXAMPLES = Path(__file__).parent.parent / "examples"
WORDS = ["the", "left", "right", "image", "is", "red", "green", "blue", "orange", "."]


# ---- NLVR2 from the official checkpoint -----------------------------------------------------------
def _twin() -> BlipNLVRTwinModel:
    vision = dict(image_size=16, patch_size=8, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=1, layer_norm_eps=1e-6, initializer_range=0.02)
    text = dict(vocab_size=20, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1,
                max_position_embeddings=32, layer_norm_eps=1e-12, encoder_hidden_size=64, pad_token_id=0,
                bos_token_id=None, sep_token_id=None, eos_token_id=None)
    return BlipNLVRTwinModel(BlipNLVRTwinConfig(vision_config=vision, text_config=text, merge_from_layer=1)).eval()


_VISION = [("embeddings.class_embedding", "cls_token"), ("embeddings.position_embedding", "pos_embed"),
           ("embeddings.patch_embedding.", "patch_embed.proj."), ("post_layernorm.", "norm."),
           ("encoder.layers.", "blocks."), (".layer_norm1.", ".norm1."), (".layer_norm2.", ".norm2."),
           (".self_attn.qkv.", ".attn.qkv."), (".self_attn.projection.", ".attn.proj.")]


def _official_nlvr(model: BlipNLVRTwinModel) -> dict[str, torch.Tensor]:
    """Our state dict under salesforce/BLIP's names (the inverse of convert's table)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("vision_model."):
            key = "visual_encoder." + key[len("vision_model."):]
            for ours, theirs in _VISION:
                key = key.replace(ours, theirs)
        out[key] = value.clone()
    out["text_encoder.embeddings.position_ids"] = torch.arange(32)[None]
    return out


def _tokenizer_folder(folder: Path) -> Path:
    """A BERT WordPiece tokenizer (no [DEC]/[ENC]: added as BLIP's init_tokenizer does)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tf.BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def official_nlvr(tmp_path_factory):
    root = tmp_path_factory.mktemp("nlvr_official")
    model = _twin()
    torch.save({"model": _official_nlvr(model)}, root / "model_base_nlvr.pth")
    for split, n in (("train", 8), ("dev", 4), ("test1", 4)):
        _write_split(root / "data", split, n, directories=split == "train")
    return root, model, _tokenizer_folder(root / "bert")


def _nlvr_config(root: Path, name: str, tokenizer: Path, image_size: int = 16) -> dict:
    data = root / "data"
    return {"task": "nlvr", "output_dir": str(root / "run"), "model": {"name": name, "tokenizer": str(tokenizer)},
            "data": {"format": "nlvr2", "root": str(data / "images"), "train": str(data / "train.json"),
                     "val": str(data / "dev.json"), "test": str(data / "test1.json"), "image_size": image_size,
                     "max_tokens": 12},
            "train": {"batch_size": 2, "dense_epochs": 0, "drop_path": 0.1}}


def test_nlvr_task_builds_the_twin_model_from_the_official_checkpoint(official_nlvr, tmp_path):
    root, original, tokenizer = official_nlvr
    for name in (str(root / "model_base_nlvr.pth"), str(root)):  # the file, or a folder holding it
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(_nlvr_config(root, name, tokenizer)))
        task = NLVRTask(load_run_config(path))
        model = task.model
        assert isinstance(model, BlipNLVRTwinModel) and model.config.merge_from_layer == 1
        ours = model.state_dict()
        assert all(torch.equal(ours[k], v) for k, v in original.state_dict().items())
        assert len(task.built.tokenizer) == 17 and task.built.tokenizer.enc_token_id == 16
        batch = task.collate([task.splits["val"][i] for i in range(2)])
        assert (batch["input_ids"][:, 0] == 16).all()  # [ENC] first, as BLIP's NLVR encoder reads
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        model.eval()
        with torch.no_grad():
            assert torch.allclose(model(**inputs).logits, original(**inputs).logits, atol=1e-6)
        # train.drop_path reached the vision tower (the official ViT's drop_path_rate)
        assert any(m._forward_hooks for m in model.vision_model.modules())


def test_nlvr_official_checkpoint_at_another_image_size_and_its_errors(official_nlvr, tmp_path):
    root, _, tokenizer = official_nlvr
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_nlvr_config(root, str(root / "model_base_nlvr.pth"), tokenizer, image_size=32)))
    task = NLVRTask(load_run_config(path))
    assert task.model.vision_model.embeddings.position_embedding.shape == (1, 1 + 16, 64)  # 4 x 4 grid
    assert task.model.config.vision_config.image_size == 32
    bad = _nlvr_config(root, str(root / "model_base_nlvr.pth"), tokenizer)
    del bad["model"]["tokenizer"]
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="model.tokenizer"):
        NLVRTask(load_run_config(path))
    bad["model"]["name"] = str(root / "missing.pth")
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="no such checkpoint file"):
        NLVRTask(load_run_config(path))


def test_twin_model_reloads_in_a_fresh_process(tmp_path):
    model = PRESETS["tiny-blip-nlvr-twin"].build(16, None).model.eval()
    upop.save_pretrained(model, tmp_path / "twin")
    code = ("import upop, sys; m = upop.from_pretrained(sys.argv[1]); "
            "print(type(m).__name__, sum(p.numel() for p in m.parameters()))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "twin")], capture_output=True, text=True,
                         env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                              "PATH": "/usr/bin:/bin"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["BlipNLVRTwinModel", str(sum(p.numel() for p in model.parameters()))]


# ---- Segmenter from the official checkpoint -------------------------------------------------------
def _official_segmenter(model: SegmenterForSemanticSegmentation) -> dict[str, torch.Tensor]:
    sd, out = model.state_dict(), {}
    for key, value in sd.items():
        new = key.replace("encoder.embeddings.cls_token", "encoder.cls_token")
        new = new.replace("encoder.embeddings.position_embeddings", "encoder.pos_embed")
        new = new.replace("encoder.embeddings.patch_embeddings.projection", "encoder.patch_embed.proj")
        new = new.replace("encoder.layers.", "encoder.blocks.").replace("encoder.layernorm.", "encoder.norm.")
        new = new.replace("layernorm_before", "norm1").replace("layernorm_after", "norm2")
        new = new.replace("attention.o_proj", "attn.proj")
        if ".attention.q_proj." in key:
            kind = key.rsplit(".", 1)[1]
            base = key.split(".attention.q_proj.")[0]
            fused = torch.cat([sd[f"{base}.attention.{p}_proj.{kind}"] for p in "qkv"])
            new = new.split(".attention.q_proj.")[0].replace("encoder.layers.", "encoder.blocks.") + f".attn.qkv.{kind}"
            out[new] = fused
            continue
        if ".attention.k_proj." in key or ".attention.v_proj." in key:
            continue
        out[new] = value.clone()
    return out


def test_segmentation_task_loads_the_official_segmenter(tmp_path):
    config = SegmenterConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, decoder_hidden_size=32, decoder_num_layers=1, decoder_num_heads=4,
                             decoder_intermediate_size=64, layer_norm_eps=1e-5, num_labels=5)
    original = SegmenterForSemanticSegmentation(config).eval()
    torch.save({"model": _official_segmenter(original)}, tmp_path / "checkpoint.pth")
    (tmp_path / "variant.yml").write_text(yaml.safe_dump({"net_kwargs": {"n_heads": 4, "normalization": "vit"},
                                                          "decoder_kwargs": {"n_heads": 4}}))
    built = SegmentationTask.load_model(ModelConfig(name=str(tmp_path / "checkpoint.pth")), 48, 5)
    model = built.model.eval()
    assert isinstance(model, SegmenterForSemanticSegmentation) and model.config.num_labels == 5
    assert built.image_size == 48 and built.mean == (0.5, 0.5, 0.5)
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        assert torch.allclose(model(pixel_values=x).logits, original(pixel_values=x).logits, atol=1e-5)
    (tmp_path / "variant.yml").unlink()  # 32 wide: the head count cannot be guessed as width / 64
    with pytest.raises(ConfigError, match="not a multiple of 64"):
        SegmentationTask.load_model(ModelConfig(name=str(tmp_path)), 48, 5)


# ---- data.image_size for hub checkpoints ----------------------------------------------------------
@pytest.fixture(scope="module")
def blip_vqa_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blip_vqa") / "model"
    built = PRESETS["tiny-blip-vqa"].build(32, None)
    built.model.save_pretrained(folder)
    built.tokenizer.save_pretrained(folder)
    return folder, built.model.eval()


def test_blip_positions_follow_data_image_size(blip_vqa_folder):
    folder, original = blip_vqa_folder
    same = build_model(ModelConfig(name=str(folder)), "vqa", 32, None, VQATask.load_hub_model).model.eval()
    assert all(torch.equal(same.state_dict()[k], v) for k, v in original.state_dict().items())  # native: unchanged
    bigger = build_model(ModelConfig(name=str(folder)), "vqa", 48, None, VQATask.load_hub_model)
    model = bigger.model.eval()
    assert bigger.image_size == 48 and model.config.vision_config.image_size == 48
    assert model.vision_model.embeddings.position_embedding.shape == (1, 1 + 36, 32)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():  # the same bicubic resize as transformers' own interpolate_pos_encoding
        want = original.vision_model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        assert torch.allclose(model.vision_model(pixel_values=x).last_hidden_state, want, atol=1e-5)


def test_vit_positions_resize_and_unknown_families_refuse(tmp_path):
    vit = tf.ViTForImageClassification(tf.ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=3))
    vit.save_pretrained(tmp_path / "vit")
    built = build_model(ModelConfig(name=str(tmp_path / "vit")), "classification", 32, 3,
                        ClassificationTask.load_hub_model)
    assert built.model.vit.embeddings.position_embeddings.shape == (1, 17, 16)
    assert built.model(pixel_values=torch.randn(1, 3, 32, 32)).logits.shape == (1, 3)
    with pytest.raises(ConfigError, match="not a multiple of the model's patch size 8"):
        build_model(ModelConfig(name=str(tmp_path / "vit")), "classification", 36, 3, ClassificationTask.load_hub_model)
    conv = tf.ConvNextForImageClassification(tf.ConvNextConfig(hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1],
                                                               num_labels=3, image_size=64))
    conv.save_pretrained(tmp_path / "conv")
    with pytest.raises(ConfigError, match="cannot move to data.image_size 32"):
        build_model(ModelConfig(name=str(tmp_path / "conv")), "classification", 32, 3,
                    ClassificationTask.load_hub_model)


# ---- VQA: several training files, Visual Genome, select last ----------------------------------------
@pytest.fixture(scope="module")
def vqa_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa_sources")
    _split(root, "train2014", 0, 4)
    _split(root, "val2014", 100, 3)
    _split(root, "test2015", 200, 2, annotate=False)
    vg = root / "vg"
    entries = []
    for k in range(3):
        _image(vg / "VG_100K" / f"{k}.jpg", "red", "circle")
        entries.append({"dataset": "vg", "image": f"VG_100K/{k}.jpg", "question": "What color is it?",
                        "answer": "Red."})
    (root / "vg_qa.json").write_text(json.dumps(entries))
    return root


def test_vqa_trains_on_vqav2_train_val_and_visual_genome(vqa_files, tmp_path):
    root = vqa_files
    files = [str(root / "v2_OpenEnded_mscoco_train2014_questions.json"),
             str(root / "v2_OpenEnded_mscoco_val2014_questions.json"), str(root / "vg_qa.json")]
    ds = VQAv2Dataset(files, image_pattern(root), train=True, vg_root=root / "vg")
    assert len(ds) == 8 + 6 + 3
    assert ds.weighted[-1] == (["red"], [VG_WEIGHT]) and VG_WEIGHT == 0.2
    assert ds.weighted[0] == (["red", "dark red"], [pytest.approx(0.8), pytest.approx(0.2)])
    with pytest.raises(ValueError, match="vqa.vg_root"):
        VQAv2Dataset(files, image_pattern(root), train=True)
    config = {"task": "vqa", "output_dir": str(tmp_path / "run"), "model": {"preset": "tiny-blip-vqa"},
              "data": {"format": "vqav2", "root": str(root), "train": files,
                       "val": str(root / "v2_OpenEnded_mscoco_val2014_questions.json"),
                       "test": str(root / "v2_OpenEnded_mscoco_test2015_questions.json"), "image_size": 32},
              "train": {"augment": "blip", "drop_path": 0.1},
              "vqa": {"vg_root": str(root / "vg"), "select": "last", "k_answers": 4}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    task = VQATask(load_run_config(path))
    assert len(task.train_dataset()) == 17 and not task.select_on_validation()
    assert "red" in task.answer_list
    item = task.train_dataset()[16]
    assert tuple(item[0].shape) == (3, 32, 32) and item[2:] == (["red"], [0.2])
    config["data"]["format"] = "karpathy"
    config["task"] = "retrieval"
    del config["vqa"]
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="data.train takes one path for data.format karpathy"):
        load_run_config(path)


# ---- the paper's configurations ---------------------------------------------------------------------
def test_paper_configs_carry_the_papers_recipes():
    load = {p.stem: load_run_config(p) for p in (EXAMPLES / "paper").glob("*.yaml")}
    seg = load["ade20k_segmenter"].train
    assert (seg.optimizer, seg.schedule, seg.lr, seg.min_lr, seg.dense_epochs) == ("sgd", "poly", 4e-3, 1e-5, 0)
    deit = load["imagenet_deit"].train
    assert (deit.augment, deit.mixup, deit.cutmix, deit.random_erasing, deit.drop_path, deit.eval_crop) == (
        "deit", 0.8, 1.0, 0.25, 0.1, 0.875)
    nlvr = load["nlvr2"]
    assert nlvr.model.name.endswith("model_base_nlvr.pth") and nlvr.train.dense_epochs == 0
    assert nlvr.train.augment == "blip" and nlvr.train.drop_path == 0.1
    vqa = load["vqav2"]
    assert isinstance(vqa.data.train, list) and len(vqa.data.train) == 3 and vqa.task_options.select == "last"
    assert vqa.train.augment == "blip" and vqa.train.drop_path == 0.1 and vqa.data.image_size == 480
    assert load["coco_caption"].train.augment == "blip"
