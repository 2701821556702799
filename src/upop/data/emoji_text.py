"""A real, offline text-to-text retrieval dataset: emoji aliases (queries) -> emoji names (documents).

Built from the PyPI package `emoji` (`emoji.EMOJI_DATA`): for every fully-qualified emoji, each
GitHub/Slack-style alias whose normalised text differs from the normalised English CLDR name gives
one pair (query = alias, document = name), e.g. "thumbsup" -> "thumbs up", "flag for andorra" ->
"andorra", "satisfied" -> "grinning squinting face". Normalisation is OpenMoji's (`pre_caption` of
the text with ':' stripped and '_' as spaces); aliases without a letter (':+1:') are dropped.

Skin-tone variants are left out: `emoji` gives them no aliases (so no pairs), and their names
("waving hand medium skin tone") would be near-copies of their base emoji's document. Minimally- and
unqualified sequences are left out as duplicates of their fully-qualified emoji.

The split is by document (the normalised name), fixed by sha1(seed, document) -> 80/10/10 as in
openmoji.py, so one document never appears in two splits. val.jsonl and test.jsonl also hold, as
distractors ({"document": name}), every other name of the same emoji (fully-qualified, no skin
tone, normalised alike) that is not a document of that split: a query is ranked against ~all emoji
names, as when one searches for an emoji by its alias (with only the split's ~100 documents the
task is nearly solved by word overlap). The output is the `text_pairs` format: train.jsonl /
val.jsonl / test.jsonl, plus meta.json (counts, package version) and the marker file; it is built
once into the cache folder (data.root, default ~/.cache/upop/emoji_text) and reused.
"""

from __future__ import annotations

import json
import random
from importlib import metadata
from pathlib import Path
from typing import Any

from ._cache import cached_build
from ._common import DataError
from .formats import add_format
from .karpathy import pre_caption
from .openmoji import SKIN_TONES, SPLITS, _assign_splits

FORMAT_VERSION = 2  # bump when the pairs or the layout change
DEFAULT_EMOJI_TEXT_CACHE = Path("~/.cache/upop/emoji_text").expanduser()


def normalise(text: str) -> str:
    """':thumbs_up:' -> 'thumbs up' (OpenMoji's caption normalisation)."""
    return pre_caption(text.strip(":").replace("_", " "))


def _named(emoji_data: dict[str, dict[str, Any]], fully_qualified: int | None) -> list[tuple[str, dict[str, Any]]]:
    """(normalised English name, entry) of the emoji kept, in code point order: entries of another
    status than `fully_qualified` (when given), skin-tone variants and empty names skipped."""
    out = []
    for e in sorted(emoji_data):
        info = emoji_data[e]
        if fully_qualified is not None and info.get("status") != fully_qualified:
            continue
        if SKIN_TONES.intersection(e):
            continue
        name = normalise(info.get("en", ""))
        if name:
            out.append((name, info))
    return out


def emoji_pairs(emoji_data: dict[str, dict[str, Any]], fully_qualified: int | None = None) -> list[tuple[str, str]]:
    """(alias, name) pairs of `emoji_data` (emoji.EMOJI_DATA's layout), normalised and deduplicated,
    in code point order, of the emoji `_named` keeps."""
    pairs: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for name, info in _named(emoji_data, fully_qualified):
        for alias in info.get("alias") or []:
            query = normalise(alias)
            if query and query != name and any(ch.isalpha() for ch in query) and (query, name) not in seen:
                seen.add((query, name))
                pairs.append((query, name))
    return pairs


def emoji_names(emoji_data: dict[str, dict[str, Any]], fully_qualified: int | None = None) -> list[str]:
    """Every distinct normalised name of the emoji `_named` keeps (with or without aliases), in code
    point order: the candidates an alias search ranks."""
    return list(dict.fromkeys(name for name, _ in _named(emoji_data, fully_qualified)))


def split_pairs(pairs: list[tuple[str, str]], seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """Pairs per split, assigned by document hash (80/10/10; no split left empty), order shuffled
    with `seed` so that "first N" subsets (data.limit_*) stay representative."""
    split_of = _assign_splits(sorted({doc for _, doc in pairs}), seed)
    out: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for pair in pairs:
        out[split_of[pair[1]]].append(pair)
    rng = random.Random(seed)
    for split in SPLITS:
        rng.shuffle(out[split])
    return out


def build_emoji_text(cache_dir: str | Path | None = None, seed: int = 0, force: bool = False) -> Path:
    """Build (or reuse) the emoji alias -> name pairs in `cache_dir` and return that folder."""
    try:
        import emoji
    except ImportError:
        raise DataError("data.format emoji_text needs the PyPI package emoji: pip install emoji") from None
    folder = Path(cache_dir).expanduser() if cache_dir else DEFAULT_EMOJI_TEXT_CACHE
    params = {"format": FORMAT_VERSION, "seed": seed, "emoji": metadata.version("emoji")}
    data = emoji.EMOJI_DATA
    status = emoji.STATUS["fully_qualified"]
    return cached_build(folder, params, "emoji text", lambda tmp: _build(tmp, data, status, params), force=force)


def _build(out: Path, data: dict[str, dict[str, Any]], status: int, params: dict[str, Any]) -> dict[str, Any]:
    pairs = emoji_pairs(data, status)
    if not pairs:
        raise DataError("emoji_text: the emoji package gave no alias-name pairs")
    names = emoji_names(data, status)
    splits = split_pairs(pairs, params["seed"])
    distractors: dict[str, list[str]] = {}
    for split, items in splits.items():
        docs = {d for _, d in items}
        # train: none (text_pairs refuses them there); val/test: every other name
        distractors[split] = [] if split == "train" else [n for n in names if n not in docs]
        lines = [json.dumps({"query": q, "document": d}, ensure_ascii=False) for q, d in items]
        lines += [json.dumps({"document": n}, ensure_ascii=False) for n in distractors[split]]
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"name": "emoji_text", "source": "emoji.EMOJI_DATA (aliases -> English CLDR names)", "params": params,
            "pairs": {s: len(splits[s]) for s in SPLITS},
            "documents": {s: len({d for _, d in splits[s]}) for s in SPLITS},
            "distractors": {s: len(distractors[s]) for s in SPLITS}}


add_format("emoji_text", (), "emoji alias -> name pairs from the emoji package, built on first use "
           "(data.root: the cache)")
