"""A real, offline semantic-segmentation dataset derived from the OpenMoji build (`build_openmoji`):
several emoji pasted at random positions and scales onto textured or noise backgrounds, with
per-pixel class masks, written in the ADE20K folder layout so that `ADE20KDataset` reads it.

Classes: background plus a fixed set of emoji categories derived from each emoji's names
(CATEGORIES, by keywords in its captions). Annotation values, in ADE20K's convention:
0 = ignored (anti-aliased rims of the pasted emoji, where the class is ambiguous),
1 = background, 2.. = the categories. After `reduce_zero_label` the model's classes are
0 = background, 1.. = the categories: background is a real class here, unlike ADE20K's "other".

An emoji's shape comes from its OpenMoji image (RGB on white, no alpha): the pixels that are not
white, plus the white regions they enclose (eyes, flags' white stripes), i.e. everything the white
border cannot reach by flood fill. Skin-tone variants are left out (they would make "person" most
of the data and repeat the same shapes). Scenes of each split use only that split's emoji
(build_openmoji's train/val/test split); everything is drawn from a seeded RNG: deterministic.
The build is cached and atomic like build_openmoji's (temp folder, marker file written last, rename).
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np

from ._cache import MARKER, cached_build
from ._common import DataError, read_json
from .openmoji import SKIN_TONES

FORMAT_VERSION = 1  # bump when the layout, the categories or the drawing changes
SPLIT_FOLDERS = {"train": "training", "val": "validation", "test": "test"}
# the label each category gets in the model (0 is the background); checked in this order
CATEGORIES = ("face", "person", "animal", "food", "flag", "other")
_WORDS = {
    "flag": "flag",
    "face": "face faces smiley grinning",
    "animal": "ant badger bat bear beaver bee beetle bird bison blowfish boar bug butterfly camel cat chicken "
              "chipmunk cockroach cow crab cricket crocodile deer dinosaur dodo dog dolphin donkey dove dragon "
              "duck eagle elephant ewe feather fish flamingo fly fox frog giraffe goat goose gorilla hamster "
              "hatching hedgehog hippopotamus horse jellyfish kangaroo koala ladybug leopard lion lizard llama "
              "lobster mammoth monkey mosquito mouse octopus orangutan otter owl ox oyster panda parrot peacock "
              "penguin pig poodle rabbit raccoon ram rat rhinoceros rooster sauropod scorpion seal shark sheep "
              "shrimp skunk sloth snail snake spider spouting squid swan t-rex tiger tropical turkey turtle "
              "unicorn whale wolf worm zebra chick bactrian dromedary paw paws moose",
    "food": "apple avocado bacon bagel baguette banana bean beans beer beverage blueberries bread broccoli burrito "
            "butter cake candy carrot cheese cherries chestnut chocolate coconut coffee cookie corn croissant "
            "cucumber cupcake curry custard dango doughnut dumpling egg eggplant falafel fondue fries garlic "
            "ginger grapes hamburger honey juice kiwi lemon lettuce lollipop mango meat melon milk "
            "mushroom noodles olive onion pancakes peach peanuts pear pepper pie pineapple pizza popcorn potato "
            "pretzel pudding rice salad sandwich sake soup spaghetti strawberry sushi taco tamale tangerine tea "
            "tomato waffle watermelon wine cocktail drink ice cream shortcake oden bento curry pea pod jar "
            "poultry steak oyster tumbler",
    "person": "person people man woman men women boy girl baby child adult older family couple kiss hand hands "
              "fingers finger thumbs fist palm raised vulcan pinched pinching writing selfie muscle leg foot ear "
              "nose eye eyes mouth tongue lips brain anatomical tooth bone prince princess king queen mage fairy "
              "vampire merperson mermaid merman elf genie zombie superhero supervillain ninja guard detective "
              "astronaut artist cook farmer firefighter judge mechanic pilot scientist singer student teacher "
              "technologist worker health police officer santa claus mx bride groom pregnant "
              "breast-feeding feeding dancing runner running walking standing kneeling surfing swimming rowing "
              "climbing juggling cartwheel gesturing bowing facepalming shrugging pouting frowning tipping "
              "getting haircut massage steamy golfing lifting bouncing biking wrestling troll "
              "skier snowboarder fencing handball holding handshake waving clapping victory love-you horns "
              "backhand pointing folded",
}
_KEYWORDS = {cat: frozenset(words.split()) for cat, words in _WORDS.items()}
_ORDER = ("flag", "face", "animal", "food", "person")  # "cat face" is a face, "man cook" a person


def category(captions: list[str]) -> str:
    """The category of an emoji from its names (e.g. ["grinning face"] -> "face")."""
    words = set(re.findall(r"[a-z][a-z-]*", " ".join(captions).lower()))
    for cat in _ORDER:
        if words & _KEYWORDS[cat]:
            return cat
    return "other"


def build_openmoji_seg(cache_dir: str | Path, source_dir: str | Path, image_size: int = 64,
                       scenes: tuple[int, int, int] = (2000, 200, 200), seed: int = 0, force: bool = False) -> Path:
    """Build (or reuse) the OpenMoji segmentation dataset in `cache_dir` and return that folder.

    source_dir: a complete `build_openmoji` output (any image size; 64 is the default). scenes: the number
    of images for train / val / test. Output: images/{training,validation,test}/<n>.png (RGB,
    image_size x image_size), annotations/<same>/<n>.png (mode L, values above), meta.json (class
    names, counts, emoji per category, license) and the marker file, written last.
    """
    if image_size < 32:
        raise DataError(f"build_openmoji_seg: image_size must be >= 32, got {image_size}")
    if len(scenes) != 3 or min(scenes) < 1:
        raise DataError(f"build_openmoji_seg: scenes must be three counts >= 1, got {scenes}")
    cache_dir, source_dir = Path(cache_dir).expanduser(), Path(source_dir).expanduser()
    source_params = read_json(source_dir / MARKER, "OpenMoji build marker (run build_openmoji first)")
    params = {"format": FORMAT_VERSION, "image_size": image_size, "scenes": list(scenes), "seed": seed,
              "categories": list(CATEGORIES), "source": source_params}
    return cached_build(cache_dir, params, "OpenMoji segmentation",
                        lambda tmp: _build(tmp, source_dir, params), force=force)


def class_names(root: str | Path) -> list[str]:
    """The model's class names of a build ("background" first), from its meta.json."""
    path = Path(root).expanduser() / "meta.json"
    names = read_json(path, "OpenMoji segmentation meta file").get("classes")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise DataError(f"{path}: 'classes' must be a non-empty list of names")
    return names


# ---- drawing -----------------------------------------------------------------------------------------
def _sources(source_dir: Path) -> dict[str, list[tuple[str, list[str]]]]:
    """split -> [(image path relative to source_dir, captions)], skin-tone variants left out."""
    out: dict[str, list[tuple[str, list[str]]]] = {}
    for split in SPLIT_FOLDERS:
        captions: dict[str, list[str]] = {}
        path = source_dir / f"{split}.json"
        entries = read_json(path)
        for k, entry in enumerate(entries if isinstance(entries, list) else [None]):
            if not (isinstance(entry, dict) and isinstance(entry.get("image"), str) and "caption" in entry):
                raise DataError(f"{path}: entry {k} is not an OpenMoji entry with 'image' and 'caption'")
            caps = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
            captions.setdefault(entry["image"], []).extend(caps)
        tones = {f"{ord(t):04X}" for t in SKIN_TONES}
        out[split] = sorted((rel, caps) for rel, caps in captions.items()
                            if not tones.intersection(Path(rel).stem.split("-")))
        if not out[split]:
            raise DataError(f"{path}: no emoji to draw scenes from")
    return out


def _shape(path: Path) -> tuple[Any, Any]:
    """(RGB crop, alpha crop) of one OpenMoji image: its non-white pixels plus the white regions
    they enclose (OpenMoji draws a dark outline around every emoji)."""
    from PIL import Image, ImageDraw

    rgb = Image.open(path).convert("RGB")
    arr = np.asarray(rgb, dtype=np.float32)
    ink = 1.0 - arr.min(axis=2) / 255.0  # 0 on pure white, 1 on any saturated or dark colour
    white = Image.fromarray(np.where(ink < 0.04, 255, 0).astype(np.uint8), "L")
    padded = Image.new("L", (white.width + 2, white.height + 2), 255)
    padded.paste(white, (1, 1))
    ImageDraw.floodfill(padded, (0, 0), 128)  # the white the border reaches is outside the emoji
    outside = np.asarray(padded)[1:-1, 1:-1] == 128
    alpha = np.where(outside, 0.0, 1.0).astype(np.float32)  # soft edges come from resizing when pasted
    ys, xs = np.nonzero(alpha > 0)
    if len(ys) == 0:
        raise DataError(f"{path}: the emoji image is blank")
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return rgb.crop(box), Image.fromarray((alpha * 255).astype(np.uint8), "L").crop(box)


def _background(rng: random.Random, size: int) -> np.ndarray:
    """(size, size, 3) float in [0, 255]: smooth noise, stripes, a checkerboard or a gradient, plus grain."""
    nprng = np.random.default_rng(rng.getrandbits(32))
    kind = rng.choice(("noise", "stripes", "checker", "gradient"))
    c1, c2 = nprng.uniform(0, 255, 3), nprng.uniform(0, 255, 3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "noise":  # low-frequency noise: a coarse random grid upsampled
        from PIL import Image

        cells = rng.randint(2, 8)
        coarse = nprng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), np.float32)
    else:
        if kind == "stripes":
            angle, period = rng.uniform(0, np.pi), rng.uniform(0.1, 0.4)
            t = (np.cos(angle) * xx + np.sin(angle) * yy) / period
            w = (np.floor(t) % 2)[..., None]
        elif kind == "checker":
            n = rng.randint(2, 8)
            w = ((np.floor(xx * n) + np.floor(yy * n)) % 2)[..., None]
        else:
            angle = rng.uniform(0, 2 * np.pi)
            w = np.clip(0.5 + (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)), 0, 1)[..., None]
        img = c1 * (1 - w) + c2 * w
    return np.clip(img + nprng.normal(0, rng.uniform(2, 20), img.shape), 0, 255)


def _scene(rng: random.Random, size: int, pool: list[tuple[Any, Any, int]]) -> tuple[np.ndarray, np.ndarray]:
    """One image and its annotation: 2-4 emoji, later ones over earlier ones."""
    from PIL import Image

    img = _background(rng, size)
    ann = np.ones((size, size), np.uint8)  # 1: background
    for _ in range(rng.randint(2, 4)):
        rgb, alpha, label = pool[rng.randrange(len(pool))]
        side = rng.uniform(0.3, 0.65) * size  # the longer side of the pasted emoji
        scale = side / max(rgb.size)
        w, h = max(4, round(rgb.width * scale)), max(4, round(rgb.height * scale))
        if rng.random() < 0.5:
            flip = Image.Transpose.FLIP_LEFT_RIGHT
            rgb, alpha = rgb.transpose(flip), alpha.transpose(flip)
        patch = np.asarray(rgb.resize((w, h), Image.Resampling.BILINEAR), np.float32)
        a = np.asarray(alpha.resize((w, h), Image.Resampling.BILINEAR), np.float32) / 255.0
        x0, y0 = rng.randint(-w // 4, size - 3 * w // 4), rng.randint(-h // 4, size - 3 * h // 4)
        # clip the patch to the canvas (emoji may leave the frame by a quarter)
        sx, sy = max(0, -x0), max(0, -y0)
        ex, ey = min(w, size - x0), min(h, size - y0)
        region = (slice(y0 + sy, y0 + ey), slice(x0 + sx, x0 + ex))
        pa, pp = a[sy:ey, sx:ex], patch[sy:ey, sx:ex]
        img[region] = pa[..., None] * pp + (1 - pa[..., None]) * img[region]
        target = ann[region]
        target[pa >= 0.75] = label
        target[(pa > 0.25) & (pa < 0.75)] = 0  # ambiguous rim: ignored
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), ann


def _build(out: Path, source_dir: Path, params: dict[str, Any]) -> dict[str, Any]:
    from PIL import Image

    size, seed = params["image_size"], params["seed"]
    label_of = {cat: 2 + i for i, cat in enumerate(CATEGORIES)}
    sources = _sources(source_dir)
    counts: dict[str, dict[str, int]] = {}
    for (split, folder), n in zip(SPLIT_FOLDERS.items(), params["scenes"], strict=True):
        pool = []
        counts[split] = {cat: 0 for cat in CATEGORIES}
        for rel, caps in sources[split]:
            cat = category(caps)
            counts[split][cat] += 1
            pool.append((*_shape(source_dir / rel), label_of[cat]))
        (out / "images" / folder).mkdir(parents=True)
        (out / "annotations" / folder).mkdir(parents=True)
        rng = random.Random(f"{seed}:{split}")
        for i in range(n):
            image, ann = _scene(rng, size, pool)
            Image.fromarray(image, "RGB").save(out / "images" / folder / f"{i:06d}.png")
            Image.fromarray(ann, "L").save(out / "annotations" / folder / f"{i:06d}.png")
    return {
        "name": "openmoji_seg",
        "license": "OpenMoji, CC BY-SA 4.0",
        "attribution": "All emojis designed by OpenMoji - the open-source emoji and icon project. "
                       "License: CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/).",
        "classes": ["background", *CATEGORIES],
        "annotation_values": "0 ignored (anti-aliased rims), 1 background, 2.. categories in 'classes' order",
        "params": params,
        "scenes": dict(zip(SPLIT_FOLDERS, params["scenes"], strict=True)),
        "emoji_per_category": counts,
    }
