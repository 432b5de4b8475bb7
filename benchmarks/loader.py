"""Loader throughput per worker: decode + transform of real shards, each stage measured.

    python -m benchmarks.loader --out results/loader                       # 256-px JPEG photos
    python -m benchmarks.loader --shards fmnist=data/fmnist-q/train --models tiny-vit,ViT-B-32 ...

One process, one torch thread: what one DataLoader worker does (PyTorch sets one thread in each
worker). Every row is samples per second over ``--n`` samples (median of ``--reps`` passes).

Stages, per shard set and model (the model fixes the input size of the transform):
    read            tar + json only (wds.tarfile_samples)
    decode          PIL decode to RGB at full size
    decode_draft    the same with JPEG draft mode (pipeline.data.loader.open_image)
    sample_train    decode_sample with the train transform (random crop), no draft: the old path
    sample_train_draft   the same with draft: what the loader does now
    sample_val_draft     the deterministic transform instead (what scoring alone would need)
    stream          the whole per-worker stream (ShardStream, workers=0): tar, shuffle buffer,
                    per-sample seeded augmentation, decode, collate, tokenize; with draft;
                    steady state (timed from the first batch, which also fills the buffer)
    stream_nodraft  the same without draft

Photo shards (``photo``, written by this script when not given): 256x256 crops of
scikit-learn's two sample photographs (china.jpg, flower.jpg) at random scales and offsets,
JPEG quality 95, img2dataset's default encoding; captions are short sentences.

``--rates`` gives loaded samples/s per GPU to feed (trained samples/s / r, from the README's
H200 table); the report divides them by the stream rate: loader workers needed per GPU.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

import pipeline  # noqa: F401
from benchmarks import markdown_table
from pipeline.data import expand_shards
from pipeline.data.loader import (
    EpochPlan,
    ShardStream,
    StreamSpec,
    decode_sample,
    draft_size,
    open_image,
)
from pipeline.model import build_model

# README, one H200, ViT-B/32 bf16, dissect:memory: trained samples/s and r
DEFAULT_RATES = "b256_r0.2=1087/0.2,b256_r0.5=1280/0.5,b512_r0.2=1394/0.2"


def write_photo_shards(out: Path, n: int, per_shard: int = 500, size: int = 256) -> Path:
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    words = ["a temple in china", "a flower in bloom", "a photo of a building", "petals"]
    for s in range(math.ceil(n / per_shard)):
        with wds.TarWriter(str(out / f"{s:05d}.tar")) as w:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                p = photos[i % len(photos)]
                side = int(rng.integers(160, min(p.size)))
                x = int(rng.integers(0, p.size[0] - side))
                y = int(rng.integers(0, p.size[1] - side))
                img = p.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=95)
                w.write(
                    {
                        "__key__": f"{i:09d}",
                        "jpg": buf.getvalue(),
                        "txt": words[i % len(words)],
                        "json": json.dumps({"uid": i}).encode(),
                    }
                )
    return out


def raw_samples(urls: list[str], n: int) -> list[dict]:
    out = []
    for s in wds.tarfile_samples([{"url": u} for u in urls]):
        out.append(s)
        if len(out) == n:
            break
    return out


def rate(fn, items, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for it in items:
            fn(it)
        times.append(time.perf_counter() - t0)
    return len(items) / statistics.median(times)


def image_bytes(sample: dict) -> bytes:
    return next(sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample)


def decode_full(sample: dict):
    with Image.open(io.BytesIO(image_bytes(sample))) as im:
        return im.convert("RGB")


def stream_rate(urls, bundle, n: int, batch: int, draft: bool) -> float:
    spec = StreamSpec(
        urls, batch, bundle.preprocess_train, bundle.tokenizer, seed=0, jpeg_draft=draft
    )
    steps = max(2, n // batch)
    got, t0 = 0, None
    for b in ShardStream(spec, EpochPlan(epoch=0, steps=steps)):
        if t0 is None:  # steady state: the first batch also fills the shuffle buffer
            t0 = time.perf_counter()
            continue
        got += len(b["uid"])
    return got / (time.perf_counter() - t0)


def bench(name: str, urls: list[str], model: str, args) -> dict:
    bundle = build_model(model, seed=0)
    raws = raw_samples(urls, args.n)
    sizes = {open_image(image_bytes(s)).size for s in raws[:20]}
    draft = draft_size(bundle.preprocess_train)
    tr, va = bundle.preprocess_train, bundle.preprocess_val
    torch.manual_seed(0)
    row = {
        "shards": name,
        "source_px": "/".join(sorted({f"{w}x{h}" for w, h in sizes})[:2]),
        "format": next(k for k in ("jpg", "png", "webp") if k in raws[0]),
        "model": model,
        "input_px": bundle.model.visual.image_size[0],
        "read": stream_read_rate(urls, args.n),
        "decode": rate(decode_full, raws, args.reps),
        "decode_draft": rate(lambda s: open_image(image_bytes(s), draft), raws, args.reps),
        "sample_train": rate(lambda s: decode_sample(s, tr, 0), raws, args.reps),
        "sample_train_draft": rate(lambda s: decode_sample(s, tr, draft), raws, args.reps),
        "sample_val_draft": rate(lambda s: decode_sample(s, va, draft), raws, args.reps),
        "stream_nodraft": stream_rate(urls, bundle, args.n, args.batch, False),
        "stream": stream_rate(urls, bundle, args.n, args.batch, True),
    }
    print(f"[loader] {row}", file=sys.stderr, flush=True)
    return row


def stream_read_rate(urls: list[str], n: int) -> float:
    t0 = time.perf_counter()
    k = 0
    for s in wds.tarfile_samples([{"url": u} for u in urls]):
        json.loads(s["json"])
        k += 1
        if k == n:
            break
    return k / (time.perf_counter() - t0)


def parse_rates(spec: str) -> list[tuple[str, float, float]]:
    """'name=trained/r,...' -> [(name, trained samples/s, r)]."""
    out = []
    for part in spec.split(","):
        name, _, v = part.partition("=")
        trained, _, r = v.partition("/")
        out.append((name, float(trained), float(r)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--shards",
        action="append",
        default=[],
        help="name=spec (repeat); 'photo' 256-px JPEG shards are written under --out when absent",
    )
    ap.add_argument("--models", default="ViT-B-32,tiny-vit")
    ap.add_argument("--n", type=int, default=1000, help="samples per measurement")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=100, help="batch of the stream measurement")
    ap.add_argument("--rates", default=DEFAULT_RATES)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # as in a DataLoader worker
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shards = dict(s.split("=", 1) for s in args.shards)
    if "photo" not in shards:
        photo_dir = out / "photo-shards"
        if not photo_dir.exists():
            write_photo_shards(photo_dir, max(args.n, 1000))
        shards = {"photo": str(photo_dir), **shards}
    cmd = "python -m benchmarks.loader " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.strftime("%Y-%m-%d %H:%M")
    rows = [
        bench(name, expand_shards(spec), model, args)
        for name, spec in shards.items()
        for model in args.models.split(",")
    ]
    cols = ["shards", "format", "source_px", "model", "input_px", "read", "decode"]
    cols += ["decode_draft", "sample_train", "sample_train_draft", "sample_val_draft"]
    cols += ["stream_nodraft", "stream"]
    text = [
        f"`{cmd}` — started {started}, one process, one torch thread, samples/s per worker",
        "",
        markdown_table(rows, cols, float_fmt=".0f"),
    ]
    need = []
    for row in rows:
        for name, trained, r in parse_rates(args.rates):
            loaded = trained / r
            need.append(
                {
                    "shards": row["shards"],
                    "model": row["model"],
                    "setting": name,
                    "loaded_per_s": loaded,
                    "per_worker": row["stream"],
                    "workers": float(math.ceil(loaded / row["stream"])),
                }
            )
    text += ["", "Loader workers per GPU (ceil(loaded samples/s / stream rate per worker)):", ""]
    text += [
        markdown_table(
            need,
            ["shards", "model", "setting", "loaded_per_s", "per_worker", "workers"],
            float_fmt=".0f",
        )
    ]
    (out / "loader.json").write_text(
        json.dumps({"cmd": cmd, "started": started, "rows": rows, "workers": need}, indent=2)
    )
    (out / "loader.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
