"""The web-like demo kind: one Fashion-MNIST item per image, tinted, sized and placed on a
coloured canvas, with a caption that names all five attributes in one of several phrasings.

Every image in a split has its own attribute combination (drawn without replacement from the
10 x 9 x 8 x 5 x 2 = 7200 combinations), so every caption describes exactly one image of its
split: a swapped caption belongs to one other image, as on the web, and can only be learnt by
memorising that pair. The attributes are what a 32-pixel model can see (colours, a corner,
a size) plus the item class.

Shapes: images_NHW3 uint8 canvases, combos_N5 int64 (item, colour, background, position, size).
"""

from __future__ import annotations

import re

import numpy as np
from PIL import Image

from data_prep import DataPrepError
from data_prep.fmnist import CLASSNAMES

# Nouns per class; the first is the class name (classnames.txt). No "top": it clashes with the
# positions, and partial noise swaps words by matching them.
NOUNS = (
    ("t-shirt", "tee"),
    ("trouser", "pair of trousers"),
    ("pullover", "sweater", "jumper"),
    ("dress", "frock"),
    ("coat", "jacket"),
    ("sandal", "strappy sandal"),
    ("shirt", "blouse"),
    ("sneaker", "trainer"),
    ("bag", "handbag", "purse"),
    ("ankle boot", "short boot"),
)
COLOURS = {  # the item's tint
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 230, 40),
    "orange": (250, 140, 20),
    "purple": (150, 50, 200),
    "pink": (250, 130, 190),
    "white": (255, 255, 255),
    "cyan": (40, 230, 230),
}
BACKGROUNDS = {  # different words from the tints, so "one attribute wrong" names which one
    "black": (0, 0, 0),
    "grey": (110, 110, 110),
    "navy": (15, 25, 100),
    "brown": (100, 55, 20),
    "maroon": (110, 10, 40),
    "teal": (0, 100, 100),
    "olive": (95, 95, 0),
    "beige": (200, 180, 140),
}
POSITIONS = (  # (phrasings, where the item's top-left corner goes as a fraction of the free room)
    (("top left", "upper left"), (0.0, 0.0)),
    (("top right", "upper right"), (1.0, 0.0)),
    (("bottom left", "lower left"), (0.0, 1.0)),
    (("bottom right", "lower right"), (1.0, 1.0)),
    (("centre", "middle"), (0.5, 0.5)),
)
SIZES = ((("small", "little", "tiny"), 0.36), (("large", "big"), 0.66))  # item side / canvas
CANVAS = 64

# Every template names all five attributes; articles are fixed after filling (fix_articles).
TEMPLATES = (
    "a {size} {colour} {noun} in the {pos} on a {bg} background.",
    "a {colour} {noun}, {size}, at the {pos} of a {bg} frame.",
    "{bg} background with a {size} {colour} {noun} in the {pos}.",
    "photo: a {size} {colour} {noun}, {pos}, against {bg}.",
    "a {colour} {noun} ({size}) sits in the {pos}; the background is {bg}.",
    "in the {pos}: a {size} {colour} {noun} on {bg}.",
    "{size} {colour} {noun}, {pos}, {bg} backdrop.",
    "a {bg} picture showing a {size} {colour} {noun} in the {pos}.",
)

# The single-item zero-shot set: the plain Fashion-MNIST look (large, white, centred, black).
SINGLE_COMBO = (
    list(COLOURS).index("white"),
    list(BACKGROUNDS).index("black"),
    4,
    1,
)  # centre, large
ZEROSHOT_TEMPLATES = (
    "a large white {} in the centre on a black background.",
    "black background with a big white {} in the middle.",
    "a white {}, large, at the centre of a black frame.",
    "in the middle: a large white {} on black.",
)

SHAPE = (len(NOUNS), len(COLOURS), len(BACKGROUNDS), len(POSITIONS), len(SIZES))
COMBOS = int(np.prod(SHAPE))


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def fix_articles(text: str) -> str:
    """Each "a"/"an" agreeing with the word after it (templates say "a {colour}": "an orange")."""
    return re.sub(r"\b(?:an?) (\w)", lambda m: f"{article(m.group(1))} {m.group(1)}", text)


def draw_combos(count: int, labels_N: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`count` distinct attribute combinations, each with a source item of its class:
    (combos_N5, item index into labels_N per row)."""
    if count > COMBOS:
        raise DataPrepError(
            f"the web kind has {COMBOS} distinct captions per split; asked for {count} images"
        )
    flat = rng.choice(COMBOS, size=count, replace=False)
    combos = np.stack(np.unravel_index(flat, SHAPE), axis=1).astype(np.int64)
    by_class = [np.flatnonzero(labels_N == c) for c in range(len(NOUNS))]
    source = np.array([rng.choice(by_class[c]) for c in combos[:, 0]], dtype=np.int64)
    return combos, source


def render(items_NHW: np.ndarray, combos_N5: np.ndarray) -> np.ndarray:
    """Canvases (N, 64, 64, 3) uint8: each grayscale item tinted (its brightness as alpha over
    the background), scaled and placed as its combination says."""
    tints = np.array(list(COLOURS.values()), dtype=np.float32)
    grounds = np.array(list(BACKGROUNDS.values()), dtype=np.float32)
    out = np.empty((len(items_NHW), CANVAS, CANVAS, 3), dtype=np.uint8)
    for i, (item, (_, colour, bg, pos, size)) in enumerate(zip(items_NHW, combos_N5.tolist())):
        side = round(SIZES[size][1] * CANVAS)
        alpha = np.asarray(Image.fromarray(item).resize((side, side), Image.BILINEAR))
        alpha = alpha.astype(np.float32)[..., None] / 255.0
        fx, fy = POSITIONS[pos][1]
        x, y = round(fx * (CANVAS - side)), round(fy * (CANVAS - side))
        canvas = np.broadcast_to(grounds[bg], (CANVAS, CANVAS, 3)).copy()
        patch = canvas[y : y + side, x : x + side]
        canvas[y : y + side, x : x + side] = patch * (1 - alpha) + tints[colour] * alpha
        out[i] = canvas.round().astype(np.uint8)
    return out


def captions(combos_N5: np.ndarray, rng: np.random.Generator) -> list[str]:
    """A caption per combination: a random template, random synonyms of noun, size, position."""
    colours, grounds = list(COLOURS), list(BACKGROUNDS)
    out = []
    for noun, colour, bg, pos, size in combos_N5.tolist():
        words = {
            "noun": NOUNS[noun][rng.integers(len(NOUNS[noun]))],
            "colour": colours[colour],
            "bg": grounds[bg],
            "pos": POSITIONS[pos][0][rng.integers(len(POSITIONS[pos][0]))],
            "size": SIZES[size][0][rng.integers(len(SIZES[size][0]))],
        }
        out.append(fix_articles(TEMPLATES[rng.integers(len(TEMPLATES))].format(**words)))
    return out


def make_web(
    images_NHW: np.ndarray, labels_N: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """`count` web-like pairs: (canvases, captions, combos_N5), every combination distinct."""
    combos, source = draw_combos(count, labels_N, rng)
    return render(images_NHW[source], combos), captions(combos, rng), combos


def make_single(
    images_NHW: np.ndarray, labels_N: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """`count` items in the plain look (zero-shot set): (canvases, labels)."""
    pick = rng.permutation(len(labels_N))[:count]
    combos = np.array([(c, *SINGLE_COMBO) for c in labels_N[pick].tolist()], dtype=np.int64)
    return render(images_NHW[pick], combos), labels_N[pick]


def attribute_columns(combos_N5: np.ndarray) -> dict[str, list[str]]:
    """The attributes as words, for each sample's json (what partial noise and readers use)."""
    return {
        "item": [CLASSNAMES[c] for c in combos_N5[:, 0].tolist()],
        "colour": [list(COLOURS)[c] for c in combos_N5[:, 1].tolist()],
        "background": [list(BACKGROUNDS)[c] for c in combos_N5[:, 2].tolist()],
        "position": [POSITIONS[c][0][0] for c in combos_N5[:, 3].tolist()],
        "size": [SIZES[c][0][0] for c in combos_N5[:, 4].tolist()],
    }
