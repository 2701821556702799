"""VQA task: the official VQAv2 format (reading and rejecting), the VQA accuracy, BLIP's weighted
answer loss and rank inference, compressed == masked through the task's own computations, the
OpenMoji-derived VQA build, and compress -> evaluate end to end."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, ImageDraw

import upop
from upop import cli
from upop.data import DataError
from upop.data.openmoji_vqa import annotations_file, build_openmoji_vqa, questions_file
from upop.data.vqav2 import VQAv2Dataset, answer_weights, image_pattern, split_files
from upop.evaluate import run_evaluate
from upop.metrics import normalize_answer, vqa_accuracy
from upop.runconfig import load_run_config
from upop.tasks.vqa import VQATask

COLORS = ["red", "green", "blue", "orange"]
SHAPES = ["circle", "square"]


def _image(path: Path, color: str, shape: str) -> None:
    img = Image.new("RGB", (40, 40), "white")
    draw = ImageDraw.Draw(img)
    (draw.ellipse if shape == "circle" else draw.rectangle)((8, 8, 32, 32), fill=color)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=95)


def _split(root: Path, subtype: str, first_id: int, n: int, annotate: bool = True) -> tuple[Path, Path]:
    """Official VQAv2 files for n images, two questions each; ten answers with real disagreement."""
    questions, annotations = [], []
    for image_id in range(first_id, first_id + n):
        color, shape = COLORS[image_id % 4], SHAPES[(image_id // 4) % 2]
        _image(root / subtype / f"COCO_{subtype}_{image_id:012d}.jpg", color, shape)
        for k, (question, answers, kind) in enumerate([
            ("What color is the shape?", [color] * 8 + ["dark " + color] * 2, "other"),
            ("Is it a circle?", ["yes" if shape == "circle" else "no"] * 9 + ["maybe"], "yes/no"),
        ]):
            qid = image_id * 1000 + k
            questions.append({"image_id": image_id, "question": question, "question_id": qid})
            annotations.append({"question_id": qid, "image_id": image_id, "answer_type": kind,
                                "question_type": question.lower().split()[0],
                                "multiple_choice_answer": answers[0],
                                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                            for j, a in enumerate(answers)]})
    qfile = root / f"v2_OpenEnded_mscoco_{subtype}_questions.json"
    afile = root / f"v2_mscoco_{subtype}_annotations.json"
    common = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": subtype}
    qfile.write_text(json.dumps({**common, "questions": questions}))
    if annotate:
        afile.write_text(json.dumps({**common, "annotations": annotations}))
    return qfile, afile


@pytest.fixture(scope="module")
def vqav2(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vqav2")
    _split(root, "train2014", 0, 16)
    val_q, val_a = _split(root, "val2014", 100, 6)
    # the val annotations under a non-official name: given explicitly as "questions:annotations"
    val_a.rename(root / "val_answers.json")
    _split(root, "test2015", 200, 6, annotate=False)
    return root


def _config(root: Path, out: Path, **train) -> dict:
    return {
        "task": "vqa", "output_dir": str(out), "model": {"preset": "tiny-blip-vqa"},
        "data": {"format": "vqav2", "root": str(root),
                 "train": str(root / "v2_OpenEnded_mscoco_train2014_questions.json"),
                 "val": f"{root / 'v2_OpenEnded_mscoco_val2014_questions.json'}:{root / 'val_answers.json'}",
                 "test": str(root / "v2_OpenEnded_mscoco_test2015_questions.json"),
                 "image_size": 32, "max_tokens": 12},
        "upop": {"target": 0.5, "interval": 2},
        "train": {"batch_size": 8, "eval_batch_size": 8, "dense_epochs": 1, "search_epochs": 2,
                  "retrain_epochs": 1, "max_steps_per_epoch": 3, "dense_lr": 1e-3, **train},
        "eval": {"latency_batches": [1], "latency_repeats": 1},
        "vqa": {"k_answers": 4},
    }


def _write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


# ---- answers and accuracy -----------------------------------------------------------------------
@pytest.mark.parametrize("raw, expected", [
    ("Two dogs.", "2 dogs"), ("the cat's", "cat's"), ("dont know", "don't know"), ("2.5", "2.5"),
    ("1,000", "1000"), ("Yes!", "yes"), ("a red-white flag", "red white flag"), ("  An\tapple ", "apple"),
    ("isnt it", "isn't it"), ("ten", "10"), ("yes, sir", "yes sir"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_accuracy_and_weights():
    humans = ["two"] * 3 + ["2 "] * 1 + ["three"] * 6  # "two" and "2" are the same answer
    assert vqa_accuracy("2", humans) == 1.0
    assert vqa_accuracy("Three.", humans) == 1.0
    assert vqa_accuracy("four", humans) == 0.0
    # 1, 2, 3 matching humans of 10: averaged leave-one-out min(n/3, 1)
    for n, acc in ((1, 0.3), (2, 0.6), (3, 0.9)):
        assert vqa_accuracy("a", ["a"] * n + ["b"] * (10 - n)) == pytest.approx(acc)
    answers, weights = answer_weights(["yes"] * 7 + ["Yes."] * 1 + ["no"] * 2)
    assert answers == ["yes", "no"] and weights == pytest.approx([0.8, 0.2])


# ---- the official format ------------------------------------------------------------------------
def test_reads_official_format(vqav2):
    q, a = split_files(vqav2 / "v2_OpenEnded_mscoco_train2014_questions.json")
    assert a == vqav2 / "v2_mscoco_train2014_annotations.json"  # found by the official naming
    ds = VQAv2Dataset(q, image_pattern(vqav2), a, train=True)
    assert len(ds) == 32
    image, question, answers, weights = ds[1]
    assert question == "is it a circle"
    assert answers == ["yes", "maybe"] and weights == pytest.approx([0.9, 0.1])
    assert image.size == (40, 40)
    assert ds.items[0].image.name == "COCO_train2014_000000000000.jpg"
    assert ds.training_answers()[:2] == ["no", "yes"]  # 8 of each, weight 0.9: ties alphabetical
    # a test split without annotations: questions only
    tq, ta = split_files(vqav2 / "v2_OpenEnded_mscoco_test2015_questions.json")
    assert ta is None
    test = VQAv2Dataset(tq, image_pattern(vqav2), None, train=False, require_answers=False)
    assert not test.has_answers and test.items[0].answers is None
    # data.root as a pattern
    pattern = str(vqav2 / "{subtype}" / "COCO_{subtype}_{image_id:012d}.jpg")
    assert image_pattern(pattern) == pattern


def _malformed(tmp_path: Path, vqav2: Path, what: str) -> tuple[Path, Path]:
    q = json.loads((vqav2 / "v2_OpenEnded_mscoco_train2014_questions.json").read_text())
    a = json.loads((vqav2 / "v2_mscoco_train2014_annotations.json").read_text())
    if what == "no_questions_key":
        q = {"data_subtype": "train2014", "qs": q["questions"]}
    elif what == "question_without_annotation":
        a["annotations"].pop(3)
    elif what == "bad_question_id":
        q["questions"][2]["question_id"] = "7"
    elif what == "missing_answer_text":
        a["annotations"][5]["answers"][0] = {"answer_id": 1}
    elif what == "image_id_mismatch":
        a["annotations"][4]["image_id"] = 999
    elif what == "duplicate_question":
        q["questions"].append(q["questions"][0])
    elif what == "missing_image":
        q["questions"][6]["image_id"] = a["annotations"][6]["image_id"] = 4242
    qf, af = tmp_path / "q_questions.json", tmp_path / "q_annotations.json"
    qf.write_text(json.dumps(q))
    af.write_text(json.dumps(a) if what != "not_json" else "{oops")
    return qf, af


@pytest.mark.parametrize("what, needle", [
    ("no_questions_key", "missing key 'questions'"), ("question_without_annotation", "no annotation"),
    ("bad_question_id", "'question_id' must be an integer"), ("missing_answer_text", "string 'answer'"),
    ("image_id_mismatch", "its annotation says 999"), ("duplicate_question", "appears twice"),
    ("missing_image", "image file not found"), ("not_json", "invalid JSON"),
])
def test_rejects_malformed_files(tmp_path, vqav2, what, needle):
    qf, af = _malformed(tmp_path, vqav2, what)
    with pytest.raises(DataError) as err:
        VQAv2Dataset(qf, image_pattern(vqav2), af)
    message = str(err.value)
    assert needle in message and "\n" not in message
    assert str(qf) in message or str(af) in message


def test_questions_subset_with_full_annotations(tmp_path, vqav2):
    q = json.loads((vqav2 / "v2_OpenEnded_mscoco_train2014_questions.json").read_text())
    q["questions"] = q["questions"][5:9]
    (tmp_path / "subset_questions.json").write_text(json.dumps(q))
    spec = f"{tmp_path / 'subset_questions.json'}:{vqav2 / 'v2_mscoco_train2014_annotations.json'}"
    ds = VQAv2Dataset(*split_files(spec)[:1], image_pattern(vqav2), split_files(spec)[1])
    assert [it.question_id for it in ds.items] == [x["question_id"] for x in q["questions"]]


def test_missing_image_skip_and_task_errors(tmp_path, vqav2):
    qf, af = _malformed(tmp_path, vqav2, "missing_image")
    ds = VQAv2Dataset(qf, image_pattern(vqav2), af, on_bad_input="skip")
    assert len(ds) == 31 and "4242" in ds.skipped[0]
    # a train split without annotations, a wrong data.format: one-line errors before any model is built
    config = _config(vqav2, tmp_path / "run")
    config["data"]["train"] = config["data"]["test"]
    with pytest.raises(DataError, match="no annotations file"):
        VQATask(load_run_config(_write(tmp_path / "a.yaml", config)))
    config = _config(vqav2, tmp_path / "run")
    config["data"]["format"] = "karpathy"
    with pytest.raises(DataError, match="openmoji or vqav2"):
        VQATask(load_run_config(_write(tmp_path / "b.yaml", config)))


# ---- loss and inference -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def task(vqav2, tmp_path_factory) -> VQATask:
    out = tmp_path_factory.mktemp("vqa_task")
    return VQATask(load_run_config(_write(out / "c.yaml", _config(vqav2, out / "run", label_smoothing=0.0))))


def test_weighted_loss_matches_hf_and_weights(task):
    model = task.model.eval()
    items = [task.train_dataset()[i] for i in (0, 1, 3)]
    batch = task.collate(items)
    # every fixture question has two unique answers: each question is repeated once per answer
    assert batch["answer_question"].tolist() == [0, 0, 1, 1, 2, 2]
    assert batch["answer_weights"].tolist() == pytest.approx([*items[0][3], *items[1][3], *items[2][3]])
    assert (batch["input_ids"][:, 0] == task.built.tokenizer.enc_token_id).all()
    assert (batch["answer_ids"][:, 0] == task.built.tokenizer.bos_token_id).all()
    with torch.no_grad():
        loss = task.loss(model, batch)
        # one question, one answer, weight 1: HF's forward gives the mean over the answer's tokens
        single = task.collate([(items[2][0], items[2][1], items[2][2][:1], [1.0])])
        ours = task.loss(model, single)
        hf = model(input_ids=single["input_ids"], attention_mask=single["attention_mask"],
                   pixel_values=single["pixel_values"], labels=single["answer_ids"]).loss
        tokens = single["answer_ids"].shape[1] - 1
        assert ours == pytest.approx(float(hf) * tokens, rel=1e-5)
        # the weighted sum over answers / questions, from per-answer losses
        per_answer = []
        for k, owner in enumerate(batch["answer_question"].tolist()):
            one = task.collate([(items[owner][0], items[owner][1], [items[owner][2][0]], [1.0])])
            one["answer_ids"], one["answer_mask"] = batch["answer_ids"][k:k + 1], batch["answer_mask"][k:k + 1]
            per_answer.append(task.loss(model, one))
        expected = sum(w * a for w, a in zip(batch["answer_weights"].tolist(), per_answer, strict=True)) / 3
        assert loss == pytest.approx(float(expected), rel=1e-5)


def test_rank_answers_is_top_k_then_likelihood(task):
    model = task.model.eval()
    ds = task._eval["val"]
    images = torch.stack([ds[i][0] for i in range(4)])
    q = task._tokens([ds.items[i].question for i in range(4)], task.built.tokenizer.enc_token_id)
    n = len(task.answer_list)
    with torch.no_grad():
        full = task.rank_answers(model, images, q["input_ids"], q["attention_mask"], k=n)
        # brute force: the log-likelihood of every answer of the list, for each question
        states = task._question_states(model, images, q["input_ids"], q["attention_mask"])
        best = []
        for b in range(4):
            ids, mask = task._answer_ids, task._answer_mask
            logits = task._answer_logits(model, ids, mask, states[b:b + 1].expand(n, -1, -1),
                                         q["attention_mask"][b:b + 1].expand(n, -1))
            logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            best.append(int((logp * mask[:, 1:]).sum(1).argmax()))
        first = task.rank_answers(model, images, q["input_ids"], q["attention_mask"], k=1)
        start = task._answer_ids[:1, :1].expand(4, 1)
        first_logits = model.text_decoder(input_ids=start, encoder_hidden_states=states,
                                          encoder_attention_mask=q["attention_mask"]).logits[:, 0]
    assert full.tolist() == best
    assert first.tolist() == first_logits[:, task._answer_ids[:, 1]].argmax(1).tolist()


def test_compressed_equals_masked_through_the_task(task):
    torch.manual_seed(0)
    model = task.build_fresh_model().eval()
    batch = task.collate([task.train_dataset()[i] for i in range(6)])
    config = upop.UPopConfig(target=0.5, total_steps=12, interval=3)
    search = upop.UPopSearch(model, config)
    for _ in range(config.total_steps):
        (task.loss(model, batch) + search.sparsity_loss()).backward()
        search.step()
    assert search.finished
    names = {s["name"].split(".")[0] for s in upop.structures(model)}
    assert names == {"vision_model", "text_encoder", "text_decoder"}
    with torch.no_grad():
        masked = task.loss(model, batch)
        states_masked = task._question_states(model, batch["pixel_values"], batch["input_ids"],
                                              batch["attention_mask"])
        search.compress()
        compressed = task.loss(model, batch)
        states = task._question_states(model, batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    assert abs(float(compressed - masked)) <= 1e-5
    assert (states - states_masked).abs().max() <= 1e-5


# ---- end to end ---------------------------------------------------------------------------------
def test_compress_then_evaluate(vqav2, tmp_path, capsys):
    out = tmp_path / "run"
    config = _config(vqav2, out)
    config["data"]["test"] = f"{config['data']['val'].split(':')[0]}:{vqav2 / 'val_answers.json'}"
    path = _write(tmp_path / "run.yaml", config)
    assert cli.main(["compress", "--config", str(path)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "vqa" and metrics["metric"] == "accuracy"
    assert metrics["compressed"]["params"] < metrics["dense"]["params"]
    assert abs(metrics["achieved"] - 0.5) <= 0.02
    final = metrics["compressed"]["metrics"]
    assert 0 <= final["accuracy"] <= 100 and final["questions"] == 12
    assert {"accuracy_yes_no", "accuracy_other"} <= set(final)
    results = json.loads((out / "vqa_result_test.json").read_text())
    val_q = json.loads((vqav2 / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    assert [r["question_id"] for r in results] == [q["question_id"] for q in val_q]
    assert all(isinstance(r["answer"], str) and r["answer"] for r in results)
    # the result file scores to the reported accuracy
    answers = {a["question_id"]: [x["answer"] for x in a["answers"]]
               for a in json.loads((vqav2 / "val_answers.json").read_text())["annotations"]}
    rescored = 100 * sum(vqa_accuracy(r["answer"], answers[r["question_id"]]) for r in results) / len(results)
    assert rescored == pytest.approx(final["accuracy"])
    again = run_evaluate(load_run_config(path), out / "model")
    assert again["metrics"]["accuracy"] == pytest.approx(final["accuracy"])
    assert again["params"] == metrics["compressed"]["params"]


def test_test_split_without_annotations_writes_results_only(task, vqav2):
    result = task.evaluate(task.model, "test", torch.device("cpu"))
    assert math.isnan(result["accuracy"]) and result["questions"] == 12
    written = json.loads((Path(task.cfg.output_dir) / "vqa_result_test.json").read_text())
    assert len(written) == 12 and {r["answer"] for r in written} <= set(task.answer_list)


# ---- OpenMoji-derived VQA -----------------------------------------------------------------------
def test_openmoji_vqa_build(tmp_path):
    root = build_openmoji_vqa(tmp_path / "vqa", tmp_path / "openmoji", limit=150)
    assert build_openmoji_vqa(tmp_path / "vqa", tmp_path / "openmoji", limit=150) == root  # cached
    first = {p.name: p.read_bytes() for p in root.glob("*.json")}
    again = build_openmoji_vqa(tmp_path / "vqa2", tmp_path / "openmoji", limit=150, force=True)
    assert {p.name: p.read_bytes() for p in again.glob("*.json")} == first  # deterministic
    images = json.loads((root / "images.json").read_text())
    openmoji_split = {e["image"]: s for s in ("train", "val", "test")
                      for e in json.loads((tmp_path / "openmoji" / f"{s}.json").read_text())}
    seen = 0
    for split in ("train", "val", "test"):
        ds = VQAv2Dataset(questions_file(root, split), str(root / "images" / "{image_id:012d}.png"),
                          annotations_file(root, split), train=False)
        for item in ds.items:
            rel = images[str(item.image_id)]
            assert openmoji_split[rel] == split  # build_openmoji's split, by image
            cps = [int(c, 16) for c in Path(rel).stem.split("-")]
            if item.question == "what skin tone is shown":
                tones = {0x1F3FB: "light", 0x1F3FC: "medium light", 0x1F3FD: "medium",
                         0x1F3FE: "medium dark", 0x1F3FF: "dark"}
                expected = {tones[c] for c in cps if c in tones} or {"yellow"}
                assert set(item.answers) == expected
                seen += 1
            if item.question == "is this a flag":
                regional = any(0x1F1E6 <= c <= 0x1F1FF for c in cps)
                assert not regional or item.answers[0] == "yes"
            assert len(item.answers) == 10
    assert seen > 0, "the first 150 emoji include skin-tone variants"


def test_loss_under_ddp_matches_plain(task, tmp_path):
    """Under DistributedDataParallel the loss runs inside the wrapper's forward: same value and gradients."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    batch = task.collate([task.train_dataset()[i] for i in range(4)])
    torch.manual_seed(0)
    plain = task.build_fresh_model().eval()
    torch.manual_seed(0)
    wrapped_model = task.build_fresh_model().eval()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(wrapped_model)
        loss_ddp = task.loss(ddp, batch)
        loss_ddp.backward()
        assert "forward" not in wrapped_model.__dict__  # the swap is undone
    finally:
        dist.destroy_process_group()
    loss = task.loss(plain, batch)
    loss.backward()
    assert float(loss_ddp.detach()) == pytest.approx(float(loss.detach()), rel=1e-6)
    grads = dict(plain.named_parameters())
    for name, p in wrapped_model.named_parameters():
        if p.grad is not None or grads[name].grad is not None:
            assert torch.allclose(p.grad, grads[name].grad, atol=1e-6), name
