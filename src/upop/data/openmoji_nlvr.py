"""An offline NLVR2-style dataset derived from the OpenMoji build (`build_openmoji`).

Each example is a pair of emoji images and a statement whose truth follows from real properties:

- categories, from the emoji's CLDR English name (package `emoji`) and its code points:
  flag (regional-indicator pairs, U+1F3F4 tag sequences, names with "flag"), face, heart, hand,
  person (keywords). Statements: "Both images show a face.", "The left image shows a flag.",
  "The right image shows a heart.", "Exactly one image shows a hand."
- skin tone, from the Fitzpatrick modifiers U+1F3FB..U+1F3FF in the file name (light .. dark):
  "Both have the same skin tone.", "The right one has a darker skin tone.",
  "The left one has a darker skin tone." (only emoji with exactly one distinct tone take part)
- identity: "Both images show the same emoji." (the same emoji up to skin tone)

Keyword categories are not perfect (a "police officer" shows a person without saying so). So
that no label is wrong because of it, the negative pool of a category leaves out emoji that
might still show it: every emoji that has skin-tone variants (people and body parts) for person,
hand and face, and face-like names (alien, ghost, robot, ...) for face.

Labels are balanced (alternating true/false per split, then shuffled); pairs never repeat an
image and (left, right, statement) never repeats within a split. Pairs are formed inside each of
build_openmoji's image splits: train -> train, val -> dev, test -> test1.

Output, in the official NLVR2 layout so that `upop.data.nlvr2` reads it unchanged:
train.json / dev.json / test1.json (JSON lines: identifier, sentence, label "True"/"False",
left_url/right_url naming the source emoji images, and "directory" for train) and
images/train/<directory>/train-<set>-<pair>-img0.png (-img1.png), images/dev/dev-..., images/test1/test1-...
Image files are hard links to the OpenMoji images where the file system allows, copies otherwise.
Deterministic in (seed, pair counts, the OpenMoji build), cached and built atomically like build_openmoji.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._cache import MARKER, cached_build
from ._common import DataError, read_json

FORMAT_VERSION = 1
SPLITS = {"train": "train", "val": "dev", "test": "test1"}  # OpenMoji split -> NLVR2 split name
TONES = range(0x1F3FB, 0x1F400)  # light, medium-light, medium, medium-dark, dark
CATEGORIES = ("face", "flag", "heart", "hand", "person")
_PERSON = {"person", "people", "man", "men", "woman", "women", "boy", "girl", "baby", "child", "adult", "family"}
_FACE_LIKE = {"alien", "ghost", "robot", "clown", "ogre", "goblin", "skull", "monkey", "poo", "devil", "imp",
              "angel", "cat", "dog", "head", "mask", "moon", "sun", "lantern", "smiling", "grinning"}
# statement kind -> text; the category kinds take the category's noun
_CATEGORY_TEMPLATES = {
    "both": "Both images show a {}.",
    "left": "The left image shows a {}.",
    "right": "The right image shows a {}.",
    "one": "Exactly one image shows a {}.",
}
_TONE_TEMPLATES = {
    "same_tone": "Both have the same skin tone.",
    "right_darker": "The right one has a darker skin tone.",
    "left_darker": "The left one has a darker skin tone.",
}
_SAME_TEMPLATE = "Both images show the same emoji."
_MAX_TRIES = 2000  # rejection sampling of one example; far above what any kind needs here


@dataclass(frozen=True)
class EmojiInfo:
    stem: str  # the OpenMoji file name without .png: code points joined by "-"
    name: str
    base: str  # code points without skin-tone modifiers
    tone: int | None  # 0 (light) .. 4 (dark) when the emoji has exactly one distinct tone
    toned: bool
    categories: frozenset[str]
    maybe: frozenset[str]  # categories it might show without its name saying so


def emoji_info(stem: str, name: str, toneable_bases: set[str] | frozenset[str] = frozenset()) -> EmojiInfo:
    """Properties of one emoji from its file stem (code points) and its English name."""
    points = [int(p, 16) for p in stem.split("-")]
    tones = {p for p in points if p in TONES}
    base = "-".join(f"{p:04X}" for p in points if p not in TONES)
    text = name.strip(":").replace("_", " ").lower().replace("\u2019", "'")
    words = {w for w in re.findall(r"[a-z]+(?:'s)?", text) if not w.endswith("'s")}  # "woman's hat" is no person
    cats = set()
    if (all(0x1F1E6 <= p <= 0x1F1FF for p in points) or points[0] == 0x1F3F4 or words & {"flag", "flags"}):
        cats.add("flag")
    if "face" in words:
        cats.add("face")
    if words & {"heart", "hearts"}:
        cats.add("heart")
    if words & {"hand", "hands"}:
        cats.add("hand")
    if words & _PERSON:
        cats.add("person")
    body = bool(tones) or base in toneable_bases  # people and body parts come in skin tones
    maybe = set()
    if body:
        maybe |= {"person", "hand", "face"}
    if words & (_FACE_LIKE | _PERSON):
        maybe.add("face")
    return EmojiInfo(stem, text, base, min(tones) - TONES[0] if len(tones) == 1 else None, bool(tones),
                     frozenset(cats), frozenset(maybe - cats))


def _truth(kind: str, category: str | None, left: EmojiInfo, right: EmojiInfo) -> bool | None:
    """The statement's truth for a pair, or None when the pair cannot be judged (left out)."""
    if category is not None:
        if category in left.maybe or category in right.maybe:
            return None
        a, b = category in left.categories, category in right.categories
        return {"both": a and b, "left": a, "right": b, "one": a != b}[kind]
    if kind == "same":
        return left.base == right.base
    if left.tone is None or right.tone is None:
        return None
    return {"same_tone": left.tone == right.tone, "right_darker": right.tone > left.tone,
            "left_darker": left.tone > right.tone}[kind]


class _Sampler:
    """Draws (left, right, sentence, label) of a wanted label from one split's emoji."""

    def __init__(self, infos: list[EmojiInfo], rng: random.Random) -> None:
        self.rng = rng
        self.all = infos
        self.has = {c: [i for i in infos if c in i.categories] for c in CATEGORIES}
        self.toned = [i for i in infos if i.tone is not None]
        by_base: dict[str, list[EmojiInfo]] = {}
        for i in infos:
            by_base.setdefault(i.base, []).append(i)
        self.variants = {b: v for b, v in by_base.items() if len(v) > 1}
        self.with_variants = [i for v in self.variants.values() for i in v]
        # every kind this split can produce both labels of (a tiny split may lack some)
        kinds: list[tuple[str, str | None]] = []
        for c in CATEGORIES:
            if self.has[c] and len(self.has[c]) < len(infos):
                kinds += [(k, c) for k in _CATEGORY_TEMPLATES]
        if len({i.tone for i in self.toned}) > 1:
            kinds += [(k, None) for k in _TONE_TEMPLATES]
        if self.variants:
            kinds.append(("same", None))
        self.kinds = kinds

    def _candidate(self, kind: str, category: str | None) -> tuple[EmojiInfo, EmojiInfo]:
        pick = self.rng.choice
        if category is not None:  # half the time from the category, so both labels are common
            return tuple(pick(self.has[category]) if self.rng.random() < 0.5 else pick(self.all) for _ in range(2))
        if kind == "same":
            left = pick(self.with_variants)
            if self.rng.random() < 0.5:
                return left, pick(self.variants[left.base])
            return left, pick(self.with_variants)
        return pick(self.toned), pick(self.toned)

    def draw(self, label: bool) -> tuple[EmojiInfo, EmojiInfo, str] | None:
        kind, category = self.rng.choice(self.kinds)
        for _ in range(_MAX_TRIES):
            left, right = self._candidate(kind, category)
            if left.stem != right.stem and _truth(kind, category, left, right) is label:
                break
        else:
            return None
        if category is not None:
            sentence = _CATEGORY_TEMPLATES[kind].format(category)
        else:
            sentence = _SAME_TEMPLATE if kind == "same" else _TONE_TEMPLATES[kind]
        return left, right, sentence


def _openmoji_images(openmoji_dir: Path) -> dict[str, list[str]]:
    """split -> image stems, read from build_openmoji's Karpathy files."""
    out: dict[str, list[str]] = {}
    for split in SPLITS:
        entries = read_json(openmoji_dir / f"{split}.json")
        if not isinstance(entries, list):
            raise DataError(f"{openmoji_dir / f'{split}.json'}: expected a JSON list of entries")
        stems = []
        for k, entry in enumerate(entries):
            rel = entry.get("image") if isinstance(entry, dict) else None
            if not isinstance(rel, str) or not re.fullmatch(r"images/[0-9A-F]{4,6}(-[0-9A-F]{4,6})*\.png", rel):
                raise DataError(f"{openmoji_dir / f'{split}.json'}: entry {k}: not an OpenMoji image entry")
            stems.append(Path(rel).stem)
        out[split] = sorted(set(stems))
    return out


def _names(stems: list[str]) -> dict[str, str]:
    try:
        import emoji
    except ImportError as exc:
        raise DataError("OpenMoji NLVR data needs the PyPI package emoji: pip install emoji") from exc
    names = {}
    for stem in stems:
        text = "".join(chr(int(p, 16)) for p in stem.split("-"))
        info = emoji.EMOJI_DATA.get(text)
        if info is None:
            raise DataError(f"OpenMoji image {stem}.png: no emoji with these code points in the emoji package")
        names[stem] = info["en"]
    return names


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, dst)


def build_openmoji_nlvr(cache_dir: str | Path, openmoji_dir: str | Path, pairs: dict[str, int] | None = None,
                        seed: int = 0, force: bool = False) -> Path:
    """Build (or reuse) the OpenMoji NLVR2-format dataset in `cache_dir` from a finished
    `build_openmoji` folder; returns `cache_dir`. `pairs`: examples per split
    (default train 8000, val 1000, test 1000)."""
    counts = {"train": 8000, "val": 1000, "test": 1000, **(pairs or {})}
    if set(counts) != set(SPLITS) or any(not isinstance(n, int) or n < 2 for n in counts.values()):
        raise DataError(f"build_openmoji_nlvr: pairs must give train, val and test counts >= 2, got {counts}")
    cache_dir, openmoji_dir = Path(cache_dir).expanduser(), Path(openmoji_dir).expanduser()
    source = read_json(openmoji_dir / MARKER, "OpenMoji build marker")  # a finished build_openmoji folder
    params = {"format": FORMAT_VERSION, "seed": seed, "pairs": counts, "openmoji": source}
    return cached_build(cache_dir, params, "OpenMoji NLVR",
                        lambda tmp: {**_build(tmp, openmoji_dir, counts, seed), "params": params}, force=force)


def _build(out: Path, openmoji_dir: Path, counts: dict[str, int], seed: int) -> dict[str, Any]:
    stems = _openmoji_images(openmoji_dir)
    names = _names([s for split in stems.values() for s in split])
    infos = {s: emoji_info(s, names[s]) for s in names}
    toneable = {i.base for i in infos.values() if i.toned}
    infos = {s: emoji_info(s, names[s], toneable) for s in names}
    stats: dict[str, Any] = {"examples": {}, "true": {}, "sentences": {}}
    for split, nlvr_split in SPLITS.items():
        rng = random.Random(f"{seed}:{split}")  # str seeds are hashed deterministically (sha512)
        sampler = _Sampler([infos[s] for s in stems[split]], rng)
        if not sampler.kinds:
            raise DataError(f"{openmoji_dir}: the {split} split has too few emoji to form NLVR statements")
        examples, seen = [], set()
        labels = [k % 2 == 0 for k in range(counts[split])]
        rng.shuffle(labels)
        for label in labels:
            for _ in range(50):  # a repeat of an earlier example: draw again
                drawn = sampler.draw(label)
                if drawn is not None and (drawn[0].stem, drawn[1].stem, drawn[2]) not in seen:
                    break
            else:
                raise DataError(f"{openmoji_dir}: cannot draw {counts[split]} distinct {split} examples; "
                                "ask for fewer pairs")
            seen.add((drawn[0].stem, drawn[1].stem, drawn[2]))
            examples.append((*drawn, label))
        folder = out / "images" / nlvr_split
        lines = []
        for k, (left, right, sentence, label) in enumerate(examples):
            set_id, pair = divmod(k, 4)  # NLVR2 groups pairs in sets; one sentence per pair here
            prefix = f"{nlvr_split}-{set_id}-{pair}"
            entry: dict[str, Any] = {"identifier": f"{prefix}-0", "sentence": sentence,
                                     "label": "True" if label else "False",
                                     "left_url": f"openmoji/{left.stem}.png", "right_url": f"openmoji/{right.stem}.png",
                                     "synset": "openmoji", "query": f"{left.name} / {right.name}"}
            target = folder
            if split == "train":
                entry["directory"] = set_id % 100
                target = folder / str(entry["directory"])
            target.mkdir(parents=True, exist_ok=True)
            for which, info in (("img0", left), ("img1", right)):
                _link(openmoji_dir / "images" / f"{info.stem}.png", target / f"{prefix}-{which}.png")
            lines.append(json.dumps(entry, ensure_ascii=False))
        (out / f"{nlvr_split}.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
        stats["examples"][nlvr_split] = len(examples)
        stats["true"][nlvr_split] = sum(1 for e in examples if e[3])
        per_sentence: dict[str, int] = {}
        for e in examples:
            per_sentence[e[2]] = per_sentence.get(e[2], 0) + 1
        stats["sentences"][nlvr_split] = dict(sorted(per_sentence.items()))
    return {"name": "openmoji-nlvr", "license": "OpenMoji, CC BY-SA 4.0 (images); statements generated",
            "source": str(openmoji_dir), **stats}
