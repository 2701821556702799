"""`upop compress --config X.yaml --dry-run`: a paper configuration proven at its real size, offline.

The run config is loaded and validated as the real job would load it; then the paper's model is built
at its REAL size with random weights from the real architecture's configuration (`ARCHITECTURES`: no
download, the hub names of examples/paper/ are not reachable offline), a few synthetic examples are
written in the task's REAL data format at the real image size into a temporary folder, and the
project's own task and training code run on them: two search steps (batch 2), compression, one
retraining step. At that size it checks that the compressed model computes what the masked model
computed (binary masks, same batch, eval mode, fp32), and measures peak memory, seconds per step and
the activation memory per example, from which it projects the GPU memory at the paper's batch size
(`project_gpu_memory`). Nothing is written outside the temporary folder, which is removed at the end;
the config's output_dir is never touched.

`scale="tiny"` shrinks every width, depth and image size (the same code path, for the tests).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import math
import re
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .costs import count_flops, count_params
from .files import atomic_write, write_json, write_text
from .runconfig import ConfigError, RunConfig, load_run_config, validate

log = logging.getLogger("upop")

SCALES = ("full", "tiny")
SEARCH_STEPS, DRY_BATCH, TRAIN_EXAMPLES = 2, 2, 6
TOLERANCE = 1e-4  # max |masked - compressed| relative to max |masked|
GIB = 1024 ** 3


# ---- the real architectures --------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    """What a paper config's model stands for: `build(image_size, num_labels, scale, work)` -> BuiltModel."""

    key: str
    description: str
    build: Callable[[int, int | None, str, Path], Any]
    tiny_image_size: int = 64


def _blip_sizes(scale: str) -> dict[str, int]:
    # BLIP base: ViT-B/16 + BERT-base (12 layers, 768 wide, 12 heads). transformers' BlipTextConfig
    # defaults to 8 heads; the released Salesforce/blip-* configs (and BERT-base) have 12.
    if scale == "tiny":
        return dict(patch=16, vision_width=32, vision_depth=2, vision_heads=2, text_width=32, text_depth=2,
                    text_heads=2)
    return dict(patch=16, vision_width=768, vision_depth=12, vision_heads=12, text_width=768, text_depth=12,
                text_heads=12)


def _blip_config(image_size: int, scale: str) -> tuple[Any, Any]:
    import transformers as tf

    from .models.blip import blip_tokenizer

    tok = blip_tokenizer()  # bert-base-uncased's vocabulary + [DEC] / [ENC]: 30524 tokens, as BLIP's
    s = _blip_sizes(scale)
    vision = dict(image_size=image_size, patch_size=s["patch"], hidden_size=s["vision_width"],
                  intermediate_size=4 * s["vision_width"], num_hidden_layers=s["vision_depth"],
                  num_attention_heads=s["vision_heads"], initializer_range=0.02)
    text = dict(vocab_size=len(tok), hidden_size=s["text_width"], intermediate_size=4 * s["text_width"],
                num_hidden_layers=s["text_depth"], num_attention_heads=s["text_heads"],
                encoder_hidden_size=s["vision_width"], max_position_embeddings=512 if scale == "full" else 64,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id)
    projection = {} if scale == "full" else dict(projection_dim=16, image_text_hidden_size=16)
    return tf.BlipConfig(vision_config=vision, text_config=text, **projection), tok


def _blip(kind: str, native: int | None = None) -> Callable[[int, int | None, str, Path], Any]:
    """BLIP base of `kind` (retrieval / caption / vqa). `native`: the image size its checkpoint was
    trained at; the model is built there and moved to data.image_size by the loader's own resizing
    (models.positions.fit_image_size), as a hub checkpoint would be."""
    def build(image_size: int, num_labels: int | None, scale: str, work: Path) -> Any:
        from .models import BuiltModel
        from .models.blip import BLIP_CLASSES
        from .models.positions import fit_image_size

        start = native if native is not None and scale == "full" else image_size
        config, tok = _blip_config(start, scale)
        model = BLIP_CLASSES[kind](config)
        fit_image_size(model, image_size, f"dry-run BLIP {kind}")
        return BuiltModel(model, tok, image_size)
    return build


def _nlvr(image_size: int, num_labels: int | None, scale: str, work: Path) -> Any:
    """The paper's NLVR2 model: the official BLIP-base NLVR encoder (two cross-attention branches)."""
    from .models import CLIP_MEAN, CLIP_STD, BuiltModel
    from .models.blip import blip_tokenizer
    from .models.blip_nlvr import BlipNLVRTwinModel
    from .models.convert import official_nlvr_config

    tok = blip_tokenizer()
    config = official_nlvr_config(image_size)
    config.text_config.pad_token_id = tok.pad_token_id
    if scale == "tiny":
        s = _blip_sizes(scale)
        v, t = config.vision_config, config.text_config
        v.hidden_size, v.intermediate_size = s["vision_width"], 4 * s["vision_width"]
        v.num_hidden_layers, v.num_attention_heads = s["vision_depth"], s["vision_heads"]
        t.hidden_size, t.intermediate_size = s["text_width"], 4 * s["text_width"]
        t.num_hidden_layers, t.num_attention_heads = 4, s["text_heads"]
        t.encoder_hidden_size, t.max_position_embeddings = s["vision_width"], 64
        config.merge_from_layer = 2
    return BuiltModel(BlipNLVRTwinModel(config).train(), tok, image_size, CLIP_MEAN, CLIP_STD)


def clip_tokenizer(folder: Path) -> Any:
    """CLIP's BPE tokenizer (49408 tokens) as a transformers CLIPTokenizer, built offline from the
    vocabulary file open_clip ships (the same construction as CLIP's SimpleTokenizer)."""
    import transformers as tf
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as f:
        merges = f.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    write_json(folder / "vocab.json", {t: i for i, t in enumerate(vocab)})
    write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n")
    return tf.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def _clip(image_size: int, num_labels: int | None, scale: str, work: Path) -> Any:
    """openai/clip-vit-large-patch14-336: ViT-L/14 at 336 (24 x 1024, 16 heads) + the 12 x 768 text
    transformer with 77 positions, projections to 768."""
    import transformers as tf

    from .models import BuiltModel

    tok = clip_tokenizer(work / "clip-tokenizer")
    if scale == "tiny":
        text = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
        vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      patch_size=16)
        projection = 16
    else:
        text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      patch_size=14)
        projection = 768
    config = tf.CLIPConfig(text_config=dict(vocab_size=len(tok), max_position_embeddings=77, **text),
                           vision_config=dict(image_size=image_size, **vision), projection_dim=projection)
    return BuiltModel(tf.CLIPModel(config), tok, image_size)


def _deit(image_size: int, num_labels: int | None, scale: str, work: Path) -> Any:
    """facebook/deit-small-patch16-224 as the classification task loads it (a transformers
    ViTForImageClassification): 12 x 384, 6 heads, MLP 1536, patch 16."""
    import transformers as tf

    from .models import BuiltModel
    from .models.official import IMAGENET_MEAN, IMAGENET_STD  # DeiT's processor statistics

    width, depth, heads = (32, 2, 2) if scale == "tiny" else (384, 12, 6)
    config = tf.ViTConfig(image_size=image_size, patch_size=16, hidden_size=width, num_hidden_layers=depth,
                          num_attention_heads=heads, intermediate_size=4 * width, num_labels=num_labels or 1000,
                          layer_norm_eps=1e-12)
    return BuiltModel(tf.ViTForImageClassification(config), None, image_size, IMAGENET_MEAN, IMAGENET_STD)


def _segmenter(image_size: int, num_labels: int | None, scale: str, work: Path) -> Any:
    """Segmenter ViT-S/16 (12 x 384, 6 heads) + its 2-layer mask transformer (384 wide, 6 heads)."""
    from .models import BuiltModel
    from .models.segmenter import SEGMENTER_MEAN, SEGMENTER_STD, SegmenterConfig, SegmenterForSemanticSegmentation

    width, depth, heads = (32, 2, 2) if scale == "tiny" else (384, 12, 6)
    config = SegmenterConfig(image_size=image_size, patch_size=16, hidden_size=width, num_hidden_layers=depth,
                             num_attention_heads=heads, intermediate_size=4 * width, decoder_hidden_size=width,
                             decoder_num_layers=2, decoder_num_heads=heads, decoder_intermediate_size=4 * width,
                             num_labels=num_labels or 150)
    model = SegmenterForSemanticSegmentation(config)
    return BuiltModel(model, None, image_size, SEGMENTER_MEAN, SEGMENTER_STD)


ARCHITECTURES: dict[str, Arch] = {a.key: a for a in (
    Arch("blip-retrieval", "BLIP base retrieval (ViT-B/16 + BERT-base, ITC + ITM), 384", _blip("retrieval")),
    Arch("blip-caption", "BLIP base captioner (ViT-B/16 + BERT-base decoder), 384", _blip("caption")),
    Arch("blip-vqa", "BLIP base VQA (ViT-B/16, question encoder + answer decoder), trained at 384",
         _blip("vqa", native=384)),
    Arch("blip-nlvr", "official BLIP-base NLVR2 twin-branch encoder (models.convert.official_nlvr_config)", _nlvr),
    Arch("clip-l14-336", "CLIP ViT-L/14 at 336, 77-token text (openai/clip-vit-large-patch14-336)", _clip),
    Arch("deit-s", "DeiT-S/16 (transformers ViT, 12 x 384, 6 heads)", _deit),
    Arch("segmenter-s16", "Segmenter ViT-S/16 + 2-layer mask transformer", _segmenter),
)}


def architecture_for(cfg: RunConfig) -> Arch:
    """The real architecture a paper config's task + model stand for; ConfigError when unknown."""
    name = (cfg.model.name or cfg.model.preset or "").lower()
    if cfg.task == "retrieval":
        return ARCHITECTURES["clip-l14-336" if "clip" in name else "blip-retrieval"]
    key = {"caption": "blip-caption", "vqa": "blip-vqa", "nlvr": "blip-nlvr", "classification": "deit-s",
           "segmentation": "segmenter-s16"}.get(cfg.task)
    if key is None:
        raise ConfigError(f"--dry-run knows no real architecture for task {cfg.task!r}")
    return ARCHITECTURES[key]


# ---- synthetic data in the real formats ---------------------------------------------------------
_WORDS = ["a", "man", "woman", "dog", "cat", "red", "blue", "small", "large", "sitting", "on", "the", "table",
          "next", "to", "street", "with", "two"]


def _sentence(rng: torch.Generator, words: int = 9) -> str:
    return " ".join(_WORDS[int(i)] for i in torch.randint(len(_WORDS), (words,), generator=rng))


def _image(path: Path, size: tuple[int, int], rng: torch.Generator, mode: str = "RGB") -> None:
    import numpy as np
    from PIL import Image

    channels = 3 if mode == "RGB" else 1
    pixels = torch.randint(0, 256, (size[1], size[0], channels), generator=rng, dtype=torch.uint8).numpy()
    image = Image.fromarray(pixels if channels == 3 else pixels[..., 0].astype(np.uint8), mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix == ".png" else "JPEG"
    atomic_write(path, lambda f: image.save(f, format=fmt))


def _labels(path: Path, size: tuple[int, int], classes: int, rng: torch.Generator) -> None:
    from PIL import Image

    values = torch.randint(0, classes + 1, (size[1], size[0]), generator=rng, dtype=torch.int32)
    image = Image.fromarray(values.to(torch.uint8).numpy(), "L")  # ADE20K: 0 ignored, 1..K the classes
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def _files(spec: Any) -> list[str]:
    return [str(s) for s in spec] if isinstance(spec, list) else [str(spec)] if spec else []


def write_data(cfg: RunConfig, root: Path, image_size: int, classes: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Synthetic examples of cfg.data.format under `root`, the files named as the config names them;
    returns (data.* values, task-section values) pointing at them."""
    rng = torch.Generator().manual_seed(0)
    size = (image_size * 5 // 4, image_size)  # not square: the transforms' resizing runs as on real photos
    fmt, n = cfg.data.format, TRAIN_EXAMPLES
    name = {s: Path(f).name if f else f"{s}.json" for s, f in
            (("val", cfg.data.val), ("test", cfg.data.test))}
    if fmt == "karpathy":
        images = root / "images"
        train = [{"image": f"train2014/{i}.jpg", "caption": _sentence(rng), "image_id": f"img{i}"} for i in range(n)]
        evals = [{"image": f"val2014/{i}.jpg", "caption": [_sentence(rng) for _ in range(5)]} for i in range(2)]
        for e in train + evals:
            _image(images / e["image"], size, rng)
        ann = root / "annotations"
        train_file = ann / Path(_files(cfg.data.train)[0] if cfg.data.train else "train.json").name
        write_json(train_file, train)
        for s in ("val", "test"):
            write_json(ann / name[s], evals)
        return {"root": str(images), "train": str(train_file), "val": str(ann / name["val"]),
                "test": str(ann / name["test"])}, {}
    if fmt == "vqav2":
        return _write_vqa(cfg, root, size, rng)
    if fmt == "nlvr2":
        images, lines = root / "images", {}
        for split, count in (("train", n), ("dev", 2), ("test1", 2)):
            rows = []
            for i in range(count):
                pair = f"{split}-{i}-0"
                directory = str(i % 2)
                folder = images / split / directory if split == "train" else images / split
                for side in (0, 1):
                    _image(folder / f"{pair}-img{side}.png", size, rng)
                row = {"identifier": f"{pair}-0", "sentence": _sentence(rng), "label": ["True", "False"][i % 2]}
                if split == "train":
                    row["directory"] = directory
                rows.append(json.dumps(row))
            lines[split] = rows
        files = {"train": Path(_files(cfg.data.train)[0]).name if cfg.data.train else "train.json",
                 "dev": name["val"], "test1": name["test"]}
        for split, rows in lines.items():
            write_text(root / files[split], "\n".join(rows) + "\n")
        return {"root": str(images), "train": str(root / files["train"]), "val": str(root / files["dev"]),
                "test": str(root / files["test1"])}, {}
    if fmt == "imagefolder":
        out = {}
        for split, per_class in (("train", 1), ("val", 1)):
            for c in range(classes):
                count = per_class + (1 if split == "train" and c < n - per_class * classes else 0)
                for i in range(count):
                    _image(root / split / f"n{c:08d}" / f"{split}_{c}_{i}.JPEG", size, rng)
            out[split] = str(root / split)
        return {"root": None, "train": out["train"], "val": out["val"], "test": out["val"]}, {}
    if fmt == "ade20k":
        for split, count in (("training", n), ("validation", 2)):
            for i in range(count):
                stem = f"ADE_{'train' if split == 'training' else 'val'}_{i:08d}"
                _image(root / "images" / split / f"{stem}.jpg", size, rng)
                _labels(root / "annotations" / split / f"{stem}.png", size, classes, rng)
        return {"root": str(root)}, {}
    raise ConfigError(f"--dry-run cannot write synthetic data of data.format {fmt!r}")


def _write_vqa(cfg: RunConfig, root: Path, size: tuple[int, int], rng: torch.Generator
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """VQAv2 questions + annotations (official names and layout), BLIP-style lists (vqa / vg entries)
    for the other training files, test-dev questions without annotations, an answer list."""
    images, answers = root / "coco", ["yes", "no", "two", "blue", "dog"]
    qid = iter(range(1, 10 ** 6))

    def vqav2(file_name: str, count: int, annotated: bool) -> str:
        match = re.search(r"(test-dev|test|train|val)(\d{4})", file_name)
        subtype = match.group(0) if match else "train2014"
        folder = subtype.replace("test-dev", "test")
        questions, notes = [], []
        for i in range(count):
            image_id, q = 1000 + i, next(qid)
            _image(images / folder / f"COCO_{folder}_{image_id:012d}.jpg", size, rng)
            questions.append({"image_id": image_id, "question": _sentence(rng, 6) + "?", "question_id": q})
            picks = [answers[int(j)] for j in torch.randint(len(answers), (10,), generator=rng)]
            notes.append({"question_id": q, "image_id": image_id, "multiple_choice_answer": picks[0],
                          "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                      for k, a in enumerate(picks)],
                          "answer_type": "other", "question_type": "what"})
        path = root / file_name
        write_json(path, {"data_subtype": subtype, "questions": questions})
        if annotated:
            write_json(root / file_name.replace("OpenEnded_", "").replace("_questions", "_annotations"),
                       {"annotations": notes})
        return str(path)

    train, vg_root = [], None
    for spec in _files(cfg.data.train) or ["v2_OpenEnded_mscoco_train2014_questions.json"]:
        file_name = Path(spec.split(".json:")[0] + ".json" if ".json:" in spec else spec).name
        if "questions" in file_name:
            train.append(vqav2(file_name, TRAIN_EXAMPLES, annotated=True))
            continue
        vg = "vg" in file_name.lower()  # BLIP's vg_qa.json; otherwise its vqa_train / vqa_val lists
        entries = []
        for i in range(TRAIN_EXAMPLES):
            image = f"VG_100K/{i}.jpg" if vg else f"train2014/COCO_train2014_{2000 + i:012d}.jpg"
            _image((root / "vg" if vg else images) / image, size, rng)
            entry = {"dataset": "vg" if vg else "vqa", "image": image, "question": _sentence(rng, 6) + "?",
                     "answer": answers[i % len(answers)] if vg else [answers[i % len(answers)]] * 10}
            if not vg:
                entry["question_id"] = next(qid)
            entries.append(entry)
        write_json(root / file_name, entries)
        train.append(str(root / file_name))
        vg_root = str(root / "vg") if vg else vg_root
    val = vqav2(Path(str(cfg.data.val or "v2_OpenEnded_mscoco_val2014_questions.json").split(".json:")[0]).name
                .removesuffix(".json") + ".json", 2, annotated=True)
    test = vqav2(Path(str(cfg.data.test or "v2_OpenEnded_mscoco_test-dev2015_questions.json")).name, 2,
                 annotated=False)
    write_json(root / "answer_list.json", answers)
    section = {"answer_list": str(root / "answer_list.json")}
    if vg_root is not None:
        section["vg_root"] = vg_root
    return {"root": str(images), "train": train if isinstance(cfg.data.train, list) else train[0], "val": val,
            "test": test}, section


# ---- measuring ---------------------------------------------------------------------------------
def peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def saved_tensor_bytes(fn: Callable[[], Any], exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn()` runs (the activation
    memory a training step holds between forward and backward), storages in `exclude` (the
    parameters) left out. The graph is freed without a backward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in exclude and ptr not in seen:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def _float_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        return [t for v in out.values() for t in _float_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _float_outputs(v)]
    return []


def relative_difference(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    """max |a - b| / max |a| over every output tensor pair of the same shape."""
    worst = 0.0
    pairs = [(a, b) for a, b in zip(reference, other, strict=False) if a.shape == b.shape]
    if not pairs:
        raise RuntimeError("the masked and the compressed model have no output of the same shape to compare")
    for a, b in pairs:
        scale = float(a.abs().max()) or 1.0
        worst = max(worst, float((a.float() - b.float()).abs().max()) / scale)
    return worst


def project_gpu_memory(params: int, extra_state_bytes: int, act_at: tuple[int, int], act_bytes: tuple[int, int],
                       batch: int, ddp: bool = True, optimizer_bytes: int | None = None) -> dict[str, float]:
    """GiB on one GPU during the search (the dense model, masks attached) at `batch` examples per GPU:
    fp32 weights + gradients (8 B/param), the optimizer's state (as measured; default AdamW's two fp32
    moments, 8 B/param), DDP's gradient buckets (4 B/param, gradient_as_bucket_view off), the task's
    state outside the model (momentum copy, queue), and the activations saved for backward, linear
    in the batch through the two measured points."""
    (b1, b2), (m1, m2) = act_at, act_bytes
    slope = (m2 - m1) / (b2 - b1)
    intercept = m1 - slope * b1  # batch-independent saved tensors: e.g. autocast's low-precision weight copies
    optimizer_bytes = 8 * params if optimizer_bytes is None else optimizer_bytes
    states = params * (8 + (4 if ddp else 0)) + optimizer_bytes
    activations = intercept + slope * batch
    return {"states_gib": states / GIB, "extra_state_gib": extra_state_bytes / GIB,
            "activations_per_example_gib": slope / GIB, "activations_gib": activations / GIB,
            "total_gib": (states + extra_state_bytes + activations) / GIB}


# ---- the dry run -----------------------------------------------------------------------------
@dataclass
class DryRunResult:
    config: str
    task: str
    architecture: str
    scale: str
    device: str
    image_size: int
    mixed_precision: str
    paper_batch: int
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    seconds_per_search_step: float = 0.0
    seconds_per_retrain_step: float = 0.0
    max_relative_diff: float = math.inf
    peak_rss_gib: float = 0.0
    cuda_peak_gib: float | None = None
    activation_batches: tuple[int, int] = (1, 2)
    activation_bytes: tuple[int, int] = (0, 0)
    extra_state_bytes: int = 0
    optimizer_state_bytes: int = 0
    projected: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        p = self.projected
        cuda = f", CUDA peak {self.cuda_peak_gib:.2f} GiB" if self.cuda_peak_gib is not None else ""
        return "\n".join([
            f"dry run of {self.config} ({self.task}, {self.architecture}, scale {self.scale}, {self.device}, "
            f"image {self.image_size}, {self.mixed_precision})",
            f"  params {self.params_before / 1e6:.2f}M -> {self.params_after / 1e6:.2f}M, GFLOPs (batch 1) "
            f"{self.flops_before / 1e9:.2f} -> {self.flops_after / 1e9:.2f} (2 search steps: not a pruning result)",
            f"  compressed == masked: max relative |diff| {self.max_relative_diff:.2e} (<= {TOLERANCE:g})",
            f"  {self.seconds_per_search_step:.2f} s / search step, {self.seconds_per_retrain_step:.2f} s / retrain "
            f"step (batch {DRY_BATCH}); peak RSS {self.peak_rss_gib:.2f} GiB{cuda}",
            f"  activations saved for backward: {self.activation_bytes[0] / GIB:.3f} / "
            f"{self.activation_bytes[1] / GIB:.3f} GiB at batch {self.activation_batches[0]} / "
            f"{self.activation_batches[1]}",
            f"  projected GPU memory at the paper's batch {self.paper_batch}: {p.get('total_gib', 0):.1f} GiB "
            f"(states {p.get('states_gib', 0):.1f} + task state {p.get('extra_state_gib', 0):.2f} + activations "
            f"{p.get('activations_gib', 0):.1f})",
        ])


def _dry_config(cfg: RunConfig, data: dict[str, Any], section: dict[str, Any], image_size: int, out: Path,
                scale: str) -> RunConfig:
    """The paper config with its data pointing at the synthetic files and the training cut to the dry run."""
    cfg = dataclasses.replace(cfg)
    cfg.output_dir = str(out)
    cfg.data = dataclasses.replace(cfg.data, **data, image_size=image_size, num_workers=0, limit_train=None,
                                   limit_eval=None)
    cfg.train = dataclasses.replace(cfg.train, batch_size=DRY_BATCH, eval_batch_size=DRY_BATCH, dense_epochs=0,
                                    search_epochs=1, retrain_epochs=1, grad_accum=1,
                                    max_steps_per_epoch=SEARCH_STEPS)
    cfg.eval = dataclasses.replace(cfg.eval, skip_latency=True)
    if cfg.task_options is not None and section:
        cfg.task_options = dataclasses.replace(cfg.task_options, **section)
    if scale == "tiny" and cfg.task_options is not None and hasattr(cfg.task_options, "queue_size"):
        cfg.task_options = dataclasses.replace(cfg.task_options, queue_size=64)
    return validate(cfg)


def _batch(task: Any, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    from .data import drop_none

    ds = task.train_dataset()
    batch = drop_none(task.collate)([ds[i] for i in range(size)])
    return {k: v.to(device) for k, v in batch.items()}


def _activation_bytes(task: Any, model: nn.Module, trainer: Any, search: Any, device: torch.device
                      ) -> tuple[tuple[int, int], tuple[int, int]]:
    """Saved-for-backward bytes of one training forward (loss + sparsity term, under the config's
    autocast) at two batch sizes: 1 and 2, or 2 and 3 when the loss needs two examples."""
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    amp = trainer.amp_dtype

    def forward(size: int) -> int:
        batch = _batch(task, size, device)
        model.train()

        def run() -> torch.Tensor:
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                return task.loss(model, batch) + search.sparsity_loss()
        return saved_tensor_bytes(run, exclude)

    for sizes in ((1, 2), (2, 3)):
        try:
            result = sizes, (forward(sizes[0]), forward(sizes[1]))
        except (RuntimeError, ValueError, IndexError) as exc:  # e.g. in-batch negatives need two examples
            log.info("dry run: activation memory at batch %s failed (%s); trying larger", sizes,
                     str(exc).splitlines()[0][:120])
            continue
        search.masks.zero_grad()
        return result
    raise RuntimeError("the activation memory could not be measured at batch 1-3")


def dry_run(config: str | Path, overrides: list[str] = (), scale: str = "full",
            device: str | torch.device | None = None, work_dir: str | Path | None = None) -> DryRunResult:
    """Run the dry run of one paper config (see the module docstring); raises AssertionError when the
    compressed model does not compute what the masked model computed."""
    from .optim import lr_schedule
    from .search import UPopSearch
    from .tasks import TASKS, evaluating
    from .training import Dist, Trainer  # the pipeline's own training loop

    if scale not in SCALES:
        raise ConfigError(f"--dry-run-scale must be {' or '.join(SCALES)}, got {scale!r}")
    cfg = load_run_config(config, list(overrides))  # the paper config itself, validated as the real job does
    arch = architecture_for(cfg)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    image_size = arch.tiny_image_size if scale == "tiny" else cfg.data.image_size
    classes = {"classification": 1000, "segmentation": cfg.model.num_labels or 150}.get(cfg.task, 0)
    if scale == "tiny" and cfg.task == "classification":
        classes = 3
    work = Path(tempfile.mkdtemp(prefix="upop-dry-run-", dir=work_dir))
    result = DryRunResult(config=str(config), task=cfg.task, architecture=arch.description, scale=scale,
                          device=str(device), image_size=image_size, mixed_precision=cfg.train.mixed_precision,
                          paper_batch=cfg.train.batch_size)
    try:
        data, section = write_data(cfg, work / "data", image_size, classes)
        dry = _dry_config(cfg, data, section, image_size, work / "output", scale)

        class DryRunTask(TASKS[cfg.task]):  # the task's own code; only the weights come from the table
            @classmethod
            def load_model(cls, model_cfg: Any, size: int, num_labels: int | None = None) -> Any:
                return arch.build(size, num_labels, scale, work)

        torch.manual_seed(dry.seed)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        task = DryRunTask(dry)
        task.check_ready()
        model = task.model.to(device)
        env = Dist(device=device)
        trainer = Trainer(dry, task, env)
        trainer.steps_per_epoch = SEARCH_STEPS
        example = {k: v.to(device) for k, v in task.example_inputs(1).items()}
        result.params_before, result.flops_before = count_params(model), count_flops(model, example)
        log.info("dry run: %s built, %.2fM params", type(model).__name__, result.params_before / 1e6)

        search = UPopSearch(model, dry.upop_config(SEARCH_STEPS))
        result.activation_batches, result.activation_bytes = _activation_bytes(task, model, trainer, search, device)
        optimizer = trainer.optimizer(model, dry.train.search_lr)
        wrapped = trainer.wrap(model)
        start = time.perf_counter()
        trainer.epoch(wrapped, optimizer, phase="search", epoch=0, lr_at=lambda _: dry.train.search_lr, search=search)
        result.seconds_per_search_step = (time.perf_counter() - start) / SEARCH_STEPS
        if not search.finished:
            raise RuntimeError(f"the search ran {search.step_count} of {SEARCH_STEPS} steps")
        result.extra_state_bytes = sum(t.numel() * t.element_size() for t in task.extra_state().values())
        result.optimizer_state_bytes = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                                           for t in state.values() if isinstance(t, torch.Tensor))
        del optimizer

        inputs = {k: v.to(device) for k, v in task.example_inputs(DRY_BATCH).items()}
        with torch.no_grad(), evaluating(model):
            masked = [t.detach().clone() for t in _float_outputs(model(**inputs))]
        plan = search.plan()
        task.after_compress(search.compress(), plan)  # as the pipeline: e.g. the momentum copy sliced
        with torch.no_grad(), evaluating(model):
            compressed = _float_outputs(model(**inputs))
        result.max_relative_diff = relative_difference(masked, compressed)
        result.params_after, result.flops_after = count_params(model), count_flops(model, example)

        trainer.steps_per_epoch = 1
        optimizer = trainer.optimizer(model, dry.train.lr)
        start = time.perf_counter()
        trainer.epoch(trainer.wrap(model), optimizer, phase="retrain", epoch=0,
                      lr_at=lr_schedule(dry.train, dry.train.lr, 1))
        result.seconds_per_retrain_step = time.perf_counter() - start
        result.peak_rss_gib = peak_rss_bytes() / GIB
        if device.type == "cuda":
            result.cuda_peak_gib = torch.cuda.max_memory_allocated(device) / GIB
        result.projected = project_gpu_memory(result.params_before, result.extra_state_bytes,
                                              result.activation_batches, result.activation_bytes,
                                              cfg.train.batch_size, ddp=True,
                                              optimizer_bytes=result.optimizer_state_bytes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not result.max_relative_diff <= TOLERANCE:
        raise AssertionError(f"dry run of {config}: the compressed model differs from the masked one by "
                             f"{result.max_relative_diff:.2e} (relative), above {TOLERANCE:g}")
    return result


def main(config: str, overrides: list[str], scale: str = "full") -> DryRunResult:
    """The command line's `compress --dry-run`: run, print the summary and the result as one JSON line."""
    result = dry_run(config, overrides, scale=scale)
    print(result.summary())
    print("dry-run result: " + json.dumps(result.to_dict()))
    return result


__all__ = ["ARCHITECTURES", "Arch", "DryRunResult", "architecture_for", "clip_tokenizer", "dry_run", "main",
           "project_gpu_memory", "relative_difference", "saved_tensor_bytes", "write_data"]
