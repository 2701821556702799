"""Visual question answering data in the official VQAv2 JSON format (the accuracy: upop.metrics.vqa).

Questions file (``v2_OpenEnded_mscoco_<subtype>_questions.json``)::

    {"data_subtype": "val2014", "questions": [{"image_id": 42, "question": "...", "question_id": 42000}, ...]}

Annotations file (``v2_mscoco_<subtype>_annotations.json``; absent for test splits)::

    {"annotations": [{"question_id": 42000, "image_id": 42, "multiple_choice_answer": "yes",
                      "answers": [{"answer": "yes", "answer_confidence": "yes", "answer_id": 1}, ...],
                      "answer_type": "yes/no", "question_type": "is the"}, ...]}

A split is named by its questions file; its annotations file is found by the official naming
(``OpenEnded_`` dropped, ``questions`` -> ``annotations``, same folder) or given explicitly as
``questions.json:annotations.json``. Images are found with a pattern of ``{subtype}`` (the questions
file's ``data_subtype``) and ``{image_id}``: by default ``<root>/{subtype}/COCO_{subtype}_{image_id:012d}.jpg``
(the layout of the official COCO zips; test-dev questions read the test2015 images).

A training split may also be a list of files read as one set (the paper trains on VQAv2 train + val
+ Visual Genome QA): VQAv2 questions files (annotations found as above, or ``q.json:a.json``) and
BLIP-style JSON lists (salesforce/BLIP ``vqa_train.json`` / ``vqa_val.json`` / ``vg_qa.json``)::

    [{"dataset": "vg", "image": "VG_100K/1.jpg", "question": "...", "answer": "blue"},
     {"dataset": "vqa", "image": "train2014/COCO_train2014_000000000009.jpg", "question": "...",
      "question_id": 9000, "answer": ["yes", "yes", ...]}, ...]

``vqa`` images are relative to the VQAv2 image root, ``vg`` images to the Visual Genome root. Weights
as BLIP's VQA dataset: a VQAv2 answer weighs the fraction of annotators who gave it, a Visual Genome
answer 0.2.

Everything is checked when the dataset is built (structure, types, one annotation per question,
the image of every question); images are decoded lazily.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..metrics.vqa import normalize_answer
from ._common import DataError, check_mode, is_file, load_image, load_image_or_none, log_skipped, read_json
from .formats import add_format

COCO_PATTERN = "{subtype}/COCO_{subtype}_{image_id:012d}.jpg"
ANSWER_TYPES = ("yes/no", "number", "other")
VG_WEIGHT = 0.2  # the weight of a Visual Genome answer (BLIP's vqa_dataset.py, the paper's training set)


def answer_weights(answers: Sequence[str]) -> tuple[list[str], list[float]]:
    """Unique normalised answers and the fraction of annotators who gave each (BLIP's VQA weights)."""
    counts = Counter(normalize_answer(a) for a in answers)
    counts.pop("", None)
    total = sum(counts.values())
    unique = sorted(counts, key=lambda a: (-counts[a], a))
    return unique, [counts[a] / total for a in unique]


def pre_question(text: str, max_words: int = 50) -> str:
    """Lowercase, drop sentence punctuation, collapse whitespace (BLIP's question preprocessing)."""
    text = re.sub(r"[.!\"()*#:;~?]", " ", text.lower())
    return " ".join(text.replace("-", " ").replace("/", " ").split()[:max_words])


# ---- files ---------------------------------------------------------------------------------------
def split_files(spec: str | Path) -> tuple[Path, Path | None]:
    """'questions.json' or 'questions.json:annotations.json' -> (questions, annotations or None).

    Without an explicit annotations file, the official name is tried (v2_OpenEnded_mscoco_X_questions.json
    -> v2_mscoco_X_annotations.json in the same folder), then any name with "questions" -> "annotations";
    None when neither exists (a test split)."""
    text = str(spec)
    head, sep, tail = text.rpartition(":")
    if sep and tail.endswith(".json") and head.endswith(".json"):
        return Path(head).expanduser(), Path(tail).expanduser()
    questions = Path(text).expanduser()
    name = questions.name
    for candidate in (name.replace("OpenEnded_", "").replace("_questions", "_annotations"),
                      name.replace("questions", "annotations")):
        if candidate != name and is_file(questions.with_name(candidate)):
            return questions, questions.with_name(candidate)
    return questions, None


def image_pattern(root: str | Path) -> str:
    """data.root as an image path pattern: a folder gets the COCO layout appended; a string holding
    "{image_id" is a pattern already (fields {subtype} and {image_id}, e.g. "/imgs/{image_id:012d}.jpg")."""
    text = str(root)
    if "{image_id" in text:
        return str(Path(text).expanduser())
    return str(Path(text).expanduser() / COCO_PATTERN)


@dataclass
class VQAItem:
    question_id: int
    image_id: int
    question: str
    image: Path
    answers: list[str] | None  # the human answers as written (10 in VQAv2); None without annotations
    answer_type: str | None = None
    dataset: str = "vqa"  # "vg": a Visual Genome QA pair, its answers weighted VG_WEIGHT each


def _int_field(path: Path, where: str, entry: dict, key: str) -> int:
    if key not in entry:
        raise DataError(f"{path}: {where}: missing key {key!r}")
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{path}: {where}: {key!r} must be an integer, got {type(value).__name__}")
    return value


def _list_field(path: Path, data: Any, key: str) -> list:
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with a {key!r} list, got {type(data).__name__}")
    if key not in data:
        raise DataError(f"{path}: missing key {key!r} (is this a VQAv2 {key} file?)")
    if not isinstance(data[key], list):
        raise DataError(f"{path}: {key!r} must be a list, got {type(data[key]).__name__}")
    if not data[key]:
        raise DataError(f"{path}: {key!r} is empty")
    return data[key]


def read_annotations(path: Path) -> dict[int, tuple[int, list[str], str | None]]:
    """question_id -> (image_id, human answers, answer_type), every entry checked."""
    out: dict[int, tuple[int, list[str], str | None]] = {}
    for i, entry in enumerate(_list_field(path, read_json(path), "annotations")):
        where = f"annotation {i}"
        if not isinstance(entry, dict):
            raise DataError(f"{path}: {where}: expected an object, got {type(entry).__name__}")
        qid = _int_field(path, where, entry, "question_id")
        image_id = _int_field(path, where, entry, "image_id")
        where = f"annotation {i} (question_id {qid})"
        raw = entry.get("answers")
        if not isinstance(raw, list) or not raw:
            raise DataError(f"{path}: {where}: 'answers' must be a non-empty list of objects")
        answers = []
        for j, a in enumerate(raw):
            if not isinstance(a, dict) or not isinstance(a.get("answer"), str):
                raise DataError(f"{path}: {where}: answer {j} must be an object with a string 'answer'")
            answers.append(a["answer"])
        if not any(normalize_answer(a) for a in answers):
            raise DataError(f"{path}: {where}: every answer is empty after normalisation")
        answer_type = entry.get("answer_type")
        if answer_type is not None and not isinstance(answer_type, str):
            raise DataError(f"{path}: {where}: 'answer_type' must be a string")
        if qid in out:
            raise DataError(f"{path}: {where}: question_id {qid} is annotated twice")
        out[qid] = (image_id, answers, answer_type)
    return out


def read_vqav2(questions_file: str | Path, annotations_file: str | Path | None, pattern: str,
               on_bad_input: str = "stop", require_answers: bool = True,
               max_words: int = 50, data: Any = None) -> tuple[list[VQAItem], list[str]]:
    """Parse and check one split; returns its items and the problems skipped under on_bad_input "skip".

    Malformed files, a question without an annotation and disagreeing image ids raise DataError in
    both modes (annotations of questions not in the file are ignored: a questions file may be a
    subset of the official one); a missing image file raises under "stop" and drops the question
    under "skip"."""
    check_mode(on_bad_input)
    qpath = Path(questions_file)
    if data is None:  # `data`: the questions file already parsed
        data = read_json(qpath, "questions file")
    questions = _list_field(qpath, data, "questions")
    subtype = data.get("data_subtype", "")
    if not isinstance(subtype, str):
        raise DataError(f"{qpath}: 'data_subtype' must be a string, got {type(subtype).__name__}")
    if "{subtype" in pattern and not subtype:
        raise DataError(f"{qpath}: no 'data_subtype' for the image pattern {pattern!r}; "
                        "give data.root as a pattern with {image_id}")
    annotations = None
    if annotations_file is not None:
        annotations = read_annotations(Path(annotations_file))
    elif require_answers:
        raise DataError(f"{qpath}: no annotations file found next to it (official name "
                        f"{qpath.name.replace('OpenEnded_', '').replace('_questions', '_annotations')}); "
                        "give the split as 'questions.json:annotations.json'")
    items: list[VQAItem] = []
    skipped: list[str] = []
    seen: set[int] = set()
    exists: dict[Path, bool] = {}
    for i, entry in enumerate(questions):
        where = f"question {i}"
        if not isinstance(entry, dict):
            raise DataError(f"{qpath}: {where}: expected an object, got {type(entry).__name__}")
        qid = _int_field(qpath, where, entry, "question_id")
        image_id = _int_field(qpath, where, entry, "image_id")
        where = f"question {i} (question_id {qid})"
        if qid in seen:
            raise DataError(f"{qpath}: {where}: question_id {qid} appears twice")
        seen.add(qid)
        raw = entry.get("question")
        if not isinstance(raw, str):
            raise DataError(f"{qpath}: {where}: 'question' must be a string")
        question = pre_question(raw, max_words)
        if not question:
            raise DataError(f"{qpath}: {where}: the question is empty")
        answers, answer_type = None, None
        if annotations is not None:
            if qid not in annotations:
                raise DataError(f"{qpath}: {where}: no annotation in {annotations_file}")
            ann_image, answers, answer_type = annotations[qid]
            if ann_image != image_id:
                raise DataError(f"{qpath}: {where}: image_id {image_id}, but its annotation says {ann_image}")
        try:  # test-dev questions use test images: "test-dev2015" -> test2015/COCO_test2015_*
            image = Path(pattern.format(subtype=subtype.replace("test-dev", "test"), image_id=image_id))
        except (KeyError, IndexError, ValueError) as exc:
            raise DataError(f"image pattern {pattern!r}: cannot format it ({exc}); fields are "
                            "{subtype} and {image_id}") from None
        if image not in exists:
            exists[image] = is_file(image)
        if not exists[image]:
            problem = f"{qpath}: {where}: image file not found: {image}"
            if on_bad_input == "stop":
                raise DataError(problem)
            skipped.append(problem)
            continue
        items.append(VQAItem(qid, image_id, question, image, answers, answer_type))
    if not items:
        raise DataError(f"{qpath}: no usable questions left: all were skipped as bad input "
                        f"(first: {skipped[0] if skipped else '-'})")
    log_skipped(qpath, skipped, "questions")
    return items, skipped


def read_blip_qa(path: Path, data: Any, vqa_root: Path | None, vg_root: Path | None,
                 on_bad_input: str = "stop", max_words: int = 50) -> tuple[list[VQAItem], list[str]]:
    """A BLIP-style JSON list (see the module docstring) as training items; images checked to exist."""
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: expected a non-empty JSON list of question entries (BLIP's format)")
    roots = {"vqa": (vqa_root, "data.root (the VQAv2 image folder)"), "vg": (vg_root, "vqa.vg_root")}
    items: list[VQAItem] = []
    skipped: list[str] = []
    for i, entry in enumerate(data):
        where = f"entry {i}"
        if not isinstance(entry, dict):
            raise DataError(f"{path}: {where}: expected an object, got {type(entry).__name__}")
        kind = entry.get("dataset", "vqa")
        if kind not in roots:
            raise DataError(f"{path}: {where}: 'dataset' must be 'vqa' or 'vg', got {kind!r}")
        question, image, answer = entry.get("question"), entry.get("image"), entry.get("answer")
        if not isinstance(question, str) or not pre_question(question, max_words):
            raise DataError(f"{path}: {where}: 'question' must be a non-empty string")
        if not isinstance(image, str) or not image:
            raise DataError(f"{path}: {where}: 'image' must be a path string")
        answers = [answer] if isinstance(answer, str) else answer
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{path}: {where}: 'answer' must be a string or a non-empty list of strings")
        if not any(normalize_answer(a) for a in answers):
            raise DataError(f"{path}: {where}: every answer is empty after normalisation")
        qid = entry.get("question_id", -(i + 1))
        if isinstance(qid, bool) or not isinstance(qid, int):
            raise DataError(f"{path}: {where}: 'question_id' must be an integer")
        root, key = roots[kind]
        if root is None:
            raise DataError(f"{path}: {where}: {kind!r} images need {key}")
        file = root / image
        if not is_file(file):
            problem = f"{path}: {where}: image file not found: {file}"
            if on_bad_input == "stop":
                raise DataError(problem)
            skipped.append(problem)
            continue
        items.append(VQAItem(qid, -1, pre_question(question, max_words), file, answers, None, kind))
    if not items:
        raise DataError(f"{path}: no usable questions left: all were skipped as bad input (first: {skipped[0]})")
    log_skipped(path, skipped, "questions")
    return items, skipped


def read_train_files(specs: Sequence[str | Path], pattern: str, vqa_root: Path | None, vg_root: Path | None,
                     on_bad_input: str = "stop") -> tuple[list[VQAItem], list[str]]:
    """Several training files as one list of items: VQAv2 questions files (with their annotations)
    and BLIP-style JSON lists, told apart by their content."""
    check_mode(on_bad_input)
    items: list[VQAItem] = []
    skipped: list[str] = []
    for spec in specs:
        questions, annotations = split_files(spec)
        data = read_json(questions, "training file")
        if isinstance(data, list):
            got, bad = read_blip_qa(questions, data, vqa_root, vg_root, on_bad_input)
        else:
            got, bad = read_vqav2(questions, annotations, pattern, on_bad_input, require_answers=True, data=data)
        items += got
        skipped += bad
    return items, skipped


def weighted_answers(item: VQAItem) -> tuple[list[str], list[float]]:
    """A training item's unique normalised answers and their loss weights."""
    if item.dataset == "vg":
        answers = list(dict.fromkeys(a for a in map(normalize_answer, item.answers or []) if a))
        return answers, [VG_WEIGHT] * len(answers)
    return answer_weights(item.answers or [])


class VQAv2Dataset(Dataset):
    """One split. Train items: (image, question, unique answers, weights) with weights the fraction
    of annotators per normalised answer; eval items: (image, index) (`train=False`).

    Images decode lazily; under on_bad_input "skip" a train item whose image fails to decode is None
    (wrap the collate function with `drop_none`), an eval split is decoded up front instead so that
    indices stay fixed."""

    def __init__(self, questions_file: str | Path | list[str], pattern: str,
                 annotations_file: str | Path | None = None, transform: Callable | None = None,
                 on_bad_input: str = "stop", train: bool = True, require_answers: bool = True,
                 vqa_root: Path | None = None, vg_root: Path | None = None) -> None:
        self.on_bad_input = check_mode(on_bad_input)
        self.transform, self.train = transform, train
        if isinstance(questions_file, (list, tuple)):  # several training files (see read_train_files)
            self.questions_file = Path(questions_file[0])
            self.items, self.skipped = read_train_files(questions_file, pattern, vqa_root, vg_root, on_bad_input)
        else:
            self.questions_file = Path(questions_file)
            self.items, self.skipped = read_vqav2(questions_file, annotations_file, pattern, on_bad_input,
                                                  require_answers=require_answers or train)
        self.has_answers = self.items[0].answers is not None
        if not train and on_bad_input == "skip":
            from ._common import undecodable

            failed = undecodable(sorted({it.image for it in self.items}))
            self.skipped += [f"{self.questions_file}: question_id {it.question_id}: {failed[it.image]}"
                             for it in self.items if it.image in failed]
            self.items = [it for it in self.items if it.image not in failed]
            if not self.items:
                raise DataError(f"{self.questions_file}: no question has a decodable image")
        self.weighted = [weighted_answers(it) for it in self.items] if self.has_answers else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        item = self.items[i]
        if self.train:
            image = load_image_or_none(item.image, self.on_bad_input, self.skipped)
            if image is None:
                return None
            answers, weights = self.weighted[i]
            return (self.transform(image) if self.transform else image), item.question, answers, weights
        image = load_image(item.image)
        return (self.transform(image) if self.transform else image), i

    def training_answers(self) -> list[str]:
        """Every normalised answer of the split, most frequent first (the default answer list)."""
        counts: Counter[str] = Counter()
        for answers, weights in self.weighted or []:
            for a, w in zip(answers, weights, strict=True):
                counts[a] += w
        return sorted(counts, key=lambda a: (-counts[a], a))


def read_answer_list(path: str | Path) -> list[str]:
    """A JSON list of candidate answers (BLIP's answer_list.json), normalised and deduplicated."""
    path = Path(path).expanduser()
    data = read_json(path, "answer list")
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: expected a non-empty JSON list of answer strings")
    out: dict[str, None] = {}
    for i, a in enumerate(data):
        if not isinstance(a, str):
            raise DataError(f"{path}: entry {i}: answers must be strings, got {type(a).__name__}")
        if normalize_answer(a):
            out[normalize_answer(a)] = None
    if not out:
        raise DataError(f"{path}: every answer is empty after normalisation")
    return list(out)


add_format("vqav2", ("root", "train", "val", "test"), "official VQAv2 questions / annotations JSON",
           lists=("train",))
