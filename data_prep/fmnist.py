"""Fashion-MNIST (Debian's `dataset-fashion-mnist`): the real photos behind the demo and the
benchmarks, their class names, caption templates and 2x2 mosaics.

Shapes: images_NHW uint8 (28x28 grayscale), labels_N int64 in [0, 10), mosaics_M56x56,
items_M4 (the four item labels of each mosaic in reading order: TL, TR, BL, BR).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from data_prep import DataPrepError

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SPLIT_SIZES = {"train": 60000, "test": 10000}

# Zero-shot class names, in label order (classnames.txt). The dataset's own names are
# T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot.
CLASSNAMES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

# Noun phrases captions use for each class; the first is "a <classname>" so the zero-shot
# prompts are phrases the model has seen.
PHRASES = (
    ("a t-shirt", "a top", "a tee"),
    ("a trouser", "a pair of trousers", "a pair of pants"),
    ("a pullover", "a sweater", "a jumper"),
    ("a dress", "a summer dress", "a frock"),
    ("a coat", "a jacket", "an overcoat"),
    ("a sandal", "a strappy sandal", "an open-toe sandal"),
    ("a shirt", "a button-up shirt", "a blouse"),
    ("a sneaker", "a trainer", "a running shoe"),
    ("a bag", "a handbag", "a purse"),
    ("an ankle boot", "a boot", "a short boot"),
)

# Training captions for single items: "{}" takes a phrase with its article.
SINGLE_TEMPLATES = (
    "a photo of {}.",
    "{} on a plain background.",
    "a grayscale photo of {}.",
    "a product photo of {}.",
    "a small picture of {}.",
    "a black and white image of {}.",
    "{}, photographed from the front.",
    "an online shop picture of {}.",
)

# Zero-shot prompts (templates.txt): "{}" takes a class name.
ZEROSHOT_TEMPLATES = (
    "a photo of a {}.",
    "a grayscale photo of a {}.",
    "a product photo of a {}.",
    "a {} on a plain background.",
    "a black and white image of a {}.",
)

# Mosaic captions: the four items in reading order (top left, top right, bottom left, bottom right).
MOSAIC_TEMPLATES = (
    "{}, {}, {} and {}.",
    "a grid of four photos: {}, {}, {} and {}.",
    "top left {}, top right {}, bottom left {}, bottom right {}.",
    "{} and {} on top, {} and {} below.",
    "a collage of {}, {}, {} and {}, left to right, top to bottom.",
    "first row: {} and {}; second row: {} and {}.",
    "four product shots: {}, then {}, then {}, then {}.",
    "a 2x2 grid showing {}, {}, {} and {}.",
)

INSTALL_HINT = "install it with: sudo apt-get install dataset-fashion-mnist"


def check_source(source_dir: str | Path = FMNIST_DIR) -> Path:
    source_dir = Path(source_dir)
    missing = [f for pair in FILES.values() for f in pair if not (source_dir / f).is_file()]
    if missing:
        raise DataPrepError(
            f"Fashion-MNIST not found in {source_dir} (missing {', '.join(missing)}); {INSTALL_HINT}"
        )
    return source_dir


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x0800 + ndim:  # unsigned byte data, ndim dimensions
        raise DataPrepError(f"{path} is not an idx{ndim} ubyte file (magic {magic:#x})")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(split: str, source_dir: str | Path = FMNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images_NHW uint8, labels_N int64) of `train` or `test`."""
    source_dir = check_source(source_dir)
    images_name, labels_name = FILES[split]
    images = _read_idx(source_dir / images_name, 3)
    labels = _read_idx(source_dir / labels_name, 1).astype(np.int64)
    assert images.shape[0] == labels.shape[0] and images.shape[1:] == (28, 28), images.shape
    return images, labels


def single_captions(labels_N: np.ndarray, rng: np.random.Generator) -> list[str]:
    """One caption per item: a random template filled with a random phrase of its class."""
    templates = rng.integers(0, len(SINGLE_TEMPLATES), size=len(labels_N))
    phrases = rng.integers(0, len(PHRASES[0]), size=len(labels_N))
    return [
        SINGLE_TEMPLATES[t].format(PHRASES[c][p])
        for c, t, p in zip(labels_N.tolist(), templates, phrases)
    ]


def make_mosaics(
    images_NHW: np.ndarray, labels_N: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """`count` 2x2 mosaics of four distinct random items: (mosaics_M56x56, items_M4 labels)."""
    n = len(labels_N)
    idx_M4 = rng.integers(0, n, size=(count, 4))
    while True:  # redraw the rare mosaics that repeat an item
        s = np.sort(idx_M4, axis=1)
        dup = (s[:, 1:] == s[:, :-1]).any(axis=1)
        if not dup.any():
            break
        idx_M4[dup] = rng.integers(0, n, size=(int(dup.sum()), 4))
    tiles = images_NHW[idx_M4]  # M, 4, 28, 28
    top = np.concatenate([tiles[:, 0], tiles[:, 1]], axis=2)
    bottom = np.concatenate([tiles[:, 2], tiles[:, 3]], axis=2)
    return np.concatenate([top, bottom], axis=1), labels_N[idx_M4]


def mosaic_captions(items_M4: np.ndarray, rng: np.random.Generator) -> list[str]:
    """Name the four items in reading order, with a random phrasing and random synonyms."""
    templates = rng.integers(0, len(MOSAIC_TEMPLATES), size=len(items_M4))
    phrases = rng.integers(0, len(PHRASES[0]), size=items_M4.shape)
    return [
        MOSAIC_TEMPLATES[t].format(*(PHRASES[c][p] for c, p in zip(items, ph)))
        for items, t, ph in zip(items_M4.tolist(), templates, phrases.tolist())
    ]
