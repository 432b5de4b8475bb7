"""Tiny real-image shards for tests: scikit-learn's 8x8 handwritten digits (1797 photos).

Captions name the digit with a few phrasings, so a CLIP model has real signal to learn;
`noise` swaps a fraction of captions with another digit's (ground truth in json["noisy"]).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PHRASES = ["a photo of the digit {}.", "the number {}", "a handwritten {}", "digit {}"]


def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def png_bytes(arr8x8: np.ndarray) -> bytes:
    img = Image.fromarray((arr8x8 * (255 / 16)).astype(np.uint8)).resize((32, 32))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_digit_shards(
    out: Path,
    n_shards: int = 4,
    per_shard: int = 64,
    noise: float = 0.0,
    seed: int = 0,
    uid_offset: int = 0,
    with_val_meta: bool = False,
) -> list[str]:
    images, labels = digits()
    rng = np.random.default_rng(seed)
    n = n_shards * per_shard
    idx = rng.choice(len(images), size=n, replace=n > len(images))
    noisy = np.zeros(n, dtype=bool)
    noisy[rng.permutation(n)[: int(round(noise * n))]] = True
    out.mkdir(parents=True, exist_ok=True)
    urls, shards = [], []
    for s in range(n_shards):
        path = out / f"{s:05d}.tar"
        with wds.TarWriter(str(path)) as tw:
            for j in range(per_shard):
                i = s * per_shard + j
                lab = int(labels[idx[i]])
                cap_lab = (lab + 1 + rng.integers(9)) % 10 if noisy[i] else lab
                caption = PHRASES[i % len(PHRASES)].format(NAMES[cap_lab])
                meta = {"uid": uid_offset + i, "label": lab, "noisy": bool(noisy[i])}
                tw.write(
                    {
                        "__key__": f"{s:05d}{j:04d}",
                        "png": png_bytes(images[idx[i]]),
                        "txt": caption,
                        "json": json.dumps(meta),
                    }
                )
        urls.append(str(path))
        shards.append({"name": path.name, "samples": per_shard})
    manifest = {"shards": shards, "total": n, "max_uid": uid_offset + n - 1}
    (out / "manifest.json").write_text(json.dumps(manifest))
    if with_val_meta:
        (out / "classnames.txt").write_text("\n".join(NAMES) + "\n")
        (out / "templates.txt").write_text("a photo of the digit {}.\nthe number {}\n")
    return urls
