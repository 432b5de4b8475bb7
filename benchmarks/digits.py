"""A second, unrelated dataset for the selection benchmarks: scikit-learn's handwritten digits.

    python -m benchmarks.digits --out data/digits --noise 0.4

scikit-learn ships the 1,797 8x8 digit scans (no download). They are upscaled to 32x32 PNGs and
split by image into train (1,497) and val (300, never trained on); captions name the digit in
one of several phrasings. Noise is injected into a copy of the train shards by
`dissect-prep noise` (the same code a user runs on their own shards), so the bench configs under
configs/bench/digits-*.yaml measure a rule on data whose images, captions and classes have
nothing to do with Fashion-MNIST, where the rules were designed.

Writes <out>/train_clean, <out>/train (noise injected; = train_clean at --noise 0) and <out>/val
(with classnames.txt and templates.txt for zero-shot evaluation), each with a manifest.json.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PHRASES = [
    "a photo of the digit {}.",
    "the number {}",
    "a handwritten {}",
    "a scan of a handwritten {}.",
]
TEMPLATES = ["a photo of the digit {}.", "a handwritten {}"]
N_VAL = 300
PER_SHARD = 256


def _png(arr8x8: np.ndarray) -> bytes:
    from PIL import Image

    img = Image.fromarray((arr8x8 * (255 / 16)).astype(np.uint8)).resize((32, 32), Image.BICUBIC)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def write_split(out: Path, images, labels, uid0: int, rng: np.random.Generator) -> None:
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for s, start in enumerate(range(0, len(images), PER_SHARD)):
        path = out / f"{s:05d}.tar"
        rows = range(start, min(start + PER_SHARD, len(images)))
        with wds.TarWriter(str(path)) as tw:
            for i in rows:
                lab = int(labels[i])
                caption = PHRASES[int(rng.integers(len(PHRASES)))].format(NAMES[lab])
                meta = {"uid": uid0 + i, "label": lab, "noisy": False}
                tw.write(
                    {
                        "__key__": f"{uid0 + i:09d}",
                        "png": _png(images[i]),
                        "txt": caption,
                        "json": json.dumps(meta),
                    }
                )
        shards.append({"name": path.name, "samples": len(rows)})
    manifest = {"shards": shards, "total": len(images), "max_uid": uid0 + len(images) - 1}
    (out / "manifest.json").write_text(json.dumps(manifest))


def build(out: Path, noise: float, seed: int = 0) -> None:
    from sklearn.datasets import load_digits

    from data_prep.noise import inject_noise

    d = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(d.target))
    val, train = order[:N_VAL], order[N_VAL:]
    for name in ("train_clean", "train", "val"):
        shutil.rmtree(out / name, ignore_errors=True)
    write_split(out / "train_clean", d.images[train], d.target[train], 0, rng)
    write_split(out / "val", d.images[val], d.target[val], 100_000, rng)
    (out / "val" / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    (out / "val" / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    inject_noise(out / "train_clean", out / "train", noise, seed=seed)
    print(
        f"digits: {len(train)} train pairs ({noise:.0%} captions swapped) in {out / 'train'}, "
        f"{len(val)} val in {out / 'val'}",
        file=sys.stderr,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--noise", type=float, default=0.4, help="fraction of captions swapped")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    build(args.out, args.noise, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
