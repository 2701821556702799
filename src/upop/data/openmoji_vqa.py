"""A real, offline VQA dataset derived from the OpenMoji build (`build_openmoji`), in the official VQAv2 format.

Every answer is read off the emoji itself (its code points or its CLDR English name from the
`emoji` package), never invented:

- "what skin tone is shown?" -- asked of every emoji that has skin-tone variants: the Fitzpatrick
  modifier code points (U+1F3FB..U+1F3FF) give light / medium light / medium / medium dark / dark;
  the variant without modifier shows OpenMoji's default "yellow"; a sequence with two different
  tones (e.g. a handshake) splits the ten answers between them.
- "is this a flag?" -- yes for regional-indicator pairs, tag sequences and the flag code points
  (white, black, triangular, chequered flags and their ZWJ sequences); asked of every flag and of
  as many non-flags (chosen by a hash), so that "no" is not a free 90%.
- "is there a person?" -- yes when the name holds a person word (man, woman, person, people, boy,
  girl, baby, couple, family, ...); positives and negatives balanced the same way.
- "what is this?" -- the first word of a fixed vocabulary (flag, kiss, couple, woman, man, person,
  cat, dog, face, hand, heart, ...) found in the name; 7 of the 10 annotators give it and 3 give the
  next vocabulary word of the name when there is one (so the answers have real disagreement).
- "what color is it?" -- the colour word of names without a person or hand ("red heart", "blue
  book"); two colours split the answers.

Each question has ten answers, as in VQAv2. The split is build_openmoji's (by emoji, so all tone
variants of one emoji share a split). Output in `cache_dir`: images/<image_id:012d>.png (hard links
to, or copies of, the OpenMoji images), v2_OpenEnded_openmoji_<split>_questions.json and
v2_openmoji_<split>_annotations.json for train/val/test, answer_list.json, images.json (image_id ->
OpenMoji file) and meta.json. Deterministic, cached and written atomically like build_openmoji.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from ._cache import MARKER, cached_build, write_json
from ._common import DataError, read_json
from .openmoji import SKIN_TONES, SPLITS
from .openmoji import build_openmoji as _build_openmoji

FORMAT_VERSION = 1  # bump when questions, answers or layout change
TONE_NAMES = {0x1F3FB: "light", 0x1F3FC: "medium light", 0x1F3FD: "medium", 0x1F3FE: "medium dark",
              0x1F3FF: "dark"}
DEFAULT_TONE = "yellow"  # OpenMoji draws emoji without a modifier in yellow
FLAG_CODEPOINTS = frozenset({0x1F3F3, 0x1F3F4, 0x1F6A9, 0x1F3C1})  # white, black, triangular, chequered
PERSON_WORDS = frozenset({
    "person", "man", "woman", "men", "women", "people", "boy", "girl", "baby", "child", "adult", "couple",
    "family", "prince", "princess", "santa", "claus", "ninja", "mage", "elf", "vampire", "zombie", "genie",
    "merman", "mermaid", "merperson", "fairy", "superhero", "supervillain", "detective", "guard", "officer",
    "worker", "astronaut", "pilot", "bride", "groom",
})
# "what is this?": the first of these found in the name is the answer (order = priority)
VOCABULARY = (
    "flag", "kiss", "couple", "family", "people", "woman", "man", "person", "baby", "boy", "girl",
    "cat", "dog", "monkey", "horse", "cow", "pig", "mouse", "rabbit", "bear", "tiger", "bird", "fish",
    "face", "hand", "heart", "clock", "arrow", "button", "square", "circle", "diamond", "ball", "book",
    "tree", "flower", "car", "house", "moon", "sun", "star", "cloud", "mark", "sign", "keycap",
)
PLURALS = {"hands": "hand", "hearts": "heart", "men": "people", "women": "people", "cats": "cat",
           "dogs": "dog", "faces": "face", "books": "book", "stars": "star", "flowers": "flower"}
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "brown", "black", "white", "pink", "grey")
QUESTIONS = (  # (question, question_type, answer_type); the index is the last digit of question_id
    ("what skin tone is shown?", "what skin tone is", "other"),
    ("is this a flag?", "is this a", "yes/no"),
    ("is there a person?", "is there a", "yes/no"),
    ("what is this?", "what is this", "other"),
    ("what color is it?", "what color is", "other"),
)


def questions_file(root: Path, split: str) -> Path:
    return root / f"v2_OpenEnded_openmoji_{split}_questions.json"


def annotations_file(root: Path, split: str) -> Path:
    return root / f"v2_openmoji_{split}_annotations.json"


IMAGE_PATTERN = "images/{image_id:012d}.png"  # relative to the build folder


def build_openmoji_vqa(cache_dir: str | Path, openmoji_dir: str | Path, image_size: int = 64, seed: int = 0,
                       force: bool = False, limit: int | None = None) -> Path:
    """Build (or reuse) the OpenMoji VQA dataset in `cache_dir` from the OpenMoji build in
    `openmoji_dir` (built first when missing; `limit` is passed on for quick tests); returns cache_dir."""
    cache_dir = Path(cache_dir).expanduser()
    source = _build_openmoji(openmoji_dir, image_size=image_size, seed=seed, limit=limit, progress=False)
    source_params = read_json(source / MARKER, "OpenMoji build marker")
    params = {"format": FORMAT_VERSION, "seed": seed, "openmoji": source_params}
    return cached_build(cache_dir, params, "OpenMoji VQA",
                        lambda tmp: {**_build(tmp, source, seed), "params": params}, force=force)


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # no copy of the pixels when both live on one file system
    except OSError:
        shutil.copyfile(src, dst)


def _hash(seed: int, key: str) -> float:
    return int(hashlib.sha1(f"vqa:{seed}:{key}".encode()).hexdigest()[:13], 16) / 16**13


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[^a-z']+", name.lower()) if w]


def _codepoints(stem: str) -> list[int]:
    return [int(part, 16) for part in stem.split("-")]


def _ten(counts: list[tuple[str, int]]) -> list[str]:
    """Ten annotators' answers from (answer, count) pairs summing to 10."""
    answers = [a for a, n in counts for _ in range(n)]
    assert len(answers) == 10
    return answers


def _split_ten(values: list[str]) -> list[str]:
    """Ten answers shared as evenly as possible between distinct values (first ones get the rest)."""
    n = len(values)
    return _ten([(v, 10 // n + (1 if i < 10 % n else 0)) for i, v in enumerate(values)])


def _questions_for(stem: str, name: str, has_tones: bool) -> dict[int, list[str]]:
    """template index -> ten answers, for the templates that apply to this emoji (flag and person
    questions are all returned here and balanced later)."""
    cps = _codepoints(stem)
    words = _words(name)
    out: dict[int, list[str]] = {}
    if has_tones:
        tones = list(dict.fromkeys(TONE_NAMES[c] for c in cps if c in TONE_NAMES))
        out[0] = _split_ten(tones or [DEFAULT_TONE])
    flag = any(0x1F1E6 <= c <= 0x1F1FF or 0xE0020 <= c <= 0xE007F or c in FLAG_CODEPOINTS for c in cps)
    out[1] = _split_ten(["yes" if flag else "no"])
    person = any(w in PERSON_WORDS for w in words)
    out[2] = _split_ten(["yes" if person else "no"])
    found = {PLURALS.get(w, w) for w in words} | ({"flag"} if flag else set())
    keywords = [v for v in VOCABULARY if v in found]
    if keywords:
        out[3] = _ten([(keywords[0], 7), (keywords[1], 3)]) if len(keywords) > 1 else _split_ten(keywords[:1])
    colors = list(dict.fromkeys(w for w in words if w in COLORS))
    if colors and not person and "hand" not in found and "skin" not in words:
        out[4] = _split_ten(colors)
    return out


def _balance(candidates: list[tuple[int, list[str]]], seed: int, key: str) -> set[int]:
    """Image ids whose yes/no question is kept: all of the rarer answer, as many of the other by hash."""
    by_answer: dict[str, list[int]] = {"yes": [], "no": []}
    for image_id, answers in candidates:
        by_answer[answers[0]].append(image_id)
    n = min(len(v) for v in by_answer.values())
    kept: set[int] = set()
    for ids in by_answer.values():
        kept.update(sorted(ids, key=lambda i: _hash(seed, f"{key}:{i}"))[:n])
    return kept


def _build(out: Path, source: Path, seed: int) -> dict[str, Any]:
    import emoji

    split_of: dict[str, str] = {}
    for split in SPLITS:
        entries = read_json(source / f"{split}.json")
        for entry in entries:
            split_of[entry["image"]] = split
    images = sorted(split_of)  # "images/<CODEPOINTS>.png", a fixed order -> image ids
    stems = [Path(rel).stem for rel in images]
    groups = Counter("-".join(f"{c:X}" for c in _codepoints(s) if chr(c) not in SKIN_TONES) for s in stems)
    toned_groups = {"-".join(f"{c:X}" for c in _codepoints(s) if chr(c) not in SKIN_TONES)
                    for s in stems if any(chr(c) in SKIN_TONES for c in _codepoints(s))}
    (out / "images").mkdir()
    per_image: dict[int, dict[int, list[str]]] = {}
    for image_id, (rel, stem) in enumerate(zip(images, stems, strict=True)):
        text = "".join(chr(c) for c in _codepoints(stem))
        info = emoji.EMOJI_DATA.get(text)
        if info is None:
            raise DataError(f"{source / rel}: not an emoji known to the installed `emoji` package")
        name = info["en"].strip(":").replace("_", " ")
        group = "-".join(f"{c:X}" for c in _codepoints(stem) if chr(c) not in SKIN_TONES)
        per_image[image_id] = _questions_for(stem, name, group in toned_groups)
        src = source / rel
        if not src.is_file():
            raise DataError(f"{src}: image of the OpenMoji build is missing; rebuild it with force=True")
        _link(src, out / IMAGE_PATTERN.format(image_id=image_id))
    for template in (1, 2):  # yes/no questions: balanced
        kept = _balance([(i, q[template]) for i, q in per_image.items()], seed, str(template))
        for i, q in per_image.items():
            if i not in kept:
                q.pop(template)
    rng = random.Random(seed)
    stats: dict[str, Any] = {"questions": {}, "answers": {}}
    answer_counts: Counter[str] = Counter()
    for split in SPLITS:
        questions, annotations = [], []
        for image_id, rel in enumerate(images):
            if split_of[rel] != split:
                continue
            for template, answers in sorted(per_image[image_id].items()):
                question, question_type, answer_type = QUESTIONS[template]
                qid = image_id * 10 + template
                questions.append({"image_id": image_id, "question": question, "question_id": qid})
                annotations.append({
                    "question_id": qid, "image_id": image_id, "question_type": question_type,
                    "answer_type": answer_type, "multiple_choice_answer": Counter(answers).most_common(1)[0][0],
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                for k, a in enumerate(answers)],
                })
                if split == "train":
                    answer_counts.update(set(answers))
        order = list(range(len(questions)))
        rng.shuffle(order)  # "first N" subsets (limit_train / limit_eval) mix the question types
        info = {"description": "OpenMoji VQA, derived from OpenMoji (CC BY-SA 4.0) and CLDR names",
                "version": str(FORMAT_VERSION)}
        common = {"info": info, "task_type": "Open-Ended", "data_type": "openmoji",
                  "license": {"name": "CC BY-SA 4.0", "url": "https://creativecommons.org/licenses/by-sa/4.0/"},
                  "data_subtype": f"openmoji_{split}"}
        write_json(questions_file(out, split), {**common, "questions": [questions[k] for k in order]})
        write_json(annotations_file(out, split), {**common, "annotations": [annotations[k] for k in order]})
        stats["questions"][split] = len(questions)
        stats["answers"][split] = dict(Counter(a["multiple_choice_answer"] for a in annotations).most_common())
    write_json(out / "answer_list.json", sorted(answer_counts, key=lambda a: (-answer_counts[a], a)))
    write_json(out / "images.json", {str(i): rel for i, rel in enumerate(images)})
    if not stats["questions"]["train"]:
        raise DataError(f"{source}: the OpenMoji build gives no training question")
    stats["images"] = {s: sum(1 for r in images if split_of[r] == s) for s in SPLITS}
    stats["emoji_groups"] = len(groups)
    return {"name": "openmoji_vqa", "license": "OpenMoji, CC BY-SA 4.0",
            "attribution": "All emojis designed by OpenMoji - the open-source emoji and icon project. "
                           "License: CC BY-SA 4.0. Names from the `emoji` package.", **stats}


__all__ = ["IMAGE_PATTERN", "annotations_file", "build_openmoji_vqa", "questions_file"]
