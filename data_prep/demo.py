"""The demo datasets, built from real Fashion-MNIST photos through the same img2dataset path
as web data: write the images as PNG files, serve them on 127.0.0.1, shard the url list with
`shard_urls`, then inject caption noise.

Layout of `out/` (`kind="single"`):
  train_clean/  the shards img2dataset wrote (0% noise; a clean baseline for free)
  train/        train_clean with `noise` of the captions noisy (json `noisy` and `noise_kind` on
                every sample; a rate swaps captions, a mix {kind: rate} also makes unrelated
                and partial ones, see data_prep/noise.py)
  val/          clean test-split items, with classnames.txt and templates.txt (zero-shot)
  demo.json     the settings and, per split, sample count and a webdataset shard spec
`kind="mosaic"`: train_clean/ and train/ hold 2x2 mosaics (label -1, json `items` = the four
labels in reading order), val/ clean test-split mosaics for retrieval, val_single/ single
test items with classnames.txt and templates.txt for zero-shot.
`kind="web"` (data_prep/web.py): the same three folders, with one tinted, sized, placed item
per image and a caption unique in its split (json `item`, `colour`, `background`, `position`,
`size`); val_single/ holds items in the plain look (large, white, centred, on black).

Every split folder has its own manifest.json whose `build` records what made it; a re-run
keeps any split whose manifest is complete with the same `build`, so changing only the noise
rate re-does only train/.
"""

from __future__ import annotations

import functools
import http.server
import json
import math
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from data_prep import DataPrepError, fmnist, web
from data_prep.noise import check_mix, inject_noise, mix_label
from data_prep.shard import shard_urls
from dissect_common.manifest import brace_spec, read_manifest

KINDS = ("single", "mosaic", "web")
MOSAIC_VAL_MAX = 5000  # retrieval over more candidates costs eval time and adds little signal
WEB_VAL_MAX = 2000  # retrieval candidates of the web kind
MIN_SUCCESS = 0.99  # a local server should deliver everything; below this something is broken


@dataclass(frozen=True)
class Split:
    """One clean split to shard: which source split, how many images, single or mosaic."""

    folder: str  # output subfolder
    source: str  # fmnist split: train | test
    kind: str  # single | mosaic | web | web_single
    count: int
    stream: int  # rng stream id, so splits draw independently of each other
    zeroshot: bool = False  # write classnames.txt / templates.txt beside it


def val_count(limit: int | None) -> int:
    """Val items: the whole test split, or proportionate to --limit (min(N, 10000)//5, >= 200)."""
    if limit is None:
        return fmnist.SPLIT_SIZES["test"]
    return min(fmnist.SPLIT_SIZES["test"], max(200, min(limit, 10000) // 5))


def plan_splits(kind: str, limit: int | None) -> list[Split]:
    n_train = (
        fmnist.SPLIT_SIZES["train"] if limit is None else min(limit, fmnist.SPLIT_SIZES["train"])
    )
    n_val = val_count(limit)
    if kind == "web":  # one caption per attribute combination: at most web.COMBOS per split
        n_train = web.COMBOS if limit is None else limit
        return [
            Split("train_clean", "train", "web", n_train, 0),
            Split("val", "test", "web", min(n_val, WEB_VAL_MAX), 1),
            Split("val_single", "test", "web_single", n_val, 2, zeroshot=True),
        ]
    if kind == "single":
        return [
            Split("train_clean", "train", "single", n_train, 0),
            Split("val", "test", "single", n_val, 1, zeroshot=True),
        ]
    return [
        Split("train_clean", "train", "mosaic", n_train, 0),
        Split("val", "test", "mosaic", min(n_val, MOSAIC_VAL_MAX), 1),
        Split("val_single", "test", "single", n_val, 2, zeroshot=True),
    ]


def samples_per_shard(count: int) -> int:
    """About 8 shards for small sets (so loader workers and ranks each get some), 5000 max."""
    return min(5000, max(100, math.ceil(count / 8)))


def build_demo(
    out: str | Path,
    *,
    noise: float | dict[str, float] = 0.0,
    limit: int | None = None,
    seed: int = 0,
    kind: str = "single",
    image_size: int = 64,
    processes: int | None = None,
    source_dir: str | Path = fmnist.FMNIST_DIR,
    force: bool = False,
) -> dict:
    """Build (or reuse) the demo in `out`; returns the contents of `out/demo.json`."""
    if kind not in KINDS:
        raise DataPrepError(f"kind must be one of {KINDS}, got {kind!r}")
    if limit is not None and limit < 1:
        raise DataPrepError(f"limit must be >= 1, got {limit}")
    mix = dict(noise) if isinstance(noise, dict) else {"swap": noise}
    check_mix(mix)
    if sum(mix.values()) >= 1.0:
        raise DataPrepError(f"noise must be in [0, 1), got {sum(mix.values()):g} in all")
    # a swap-only build records the bare rate, as before the other kinds: old outputs stay reusable
    noise_key = mix["swap"] if set(mix) == {"swap"} else {k: v for k, v in mix.items() if v}
    fmnist.check_source(source_dir)
    given, out = Path(out), Path(out).absolute()  # specs in demo.json keep the path as given
    started = time.time()
    settings = {
        "dataset": "fashion-mnist",
        "kind": kind,
        "seed": seed,
        "limit": limit,
        "image_size": image_size,
    }

    splits = plan_splits(kind, limit)
    builds = {
        s.folder: {**settings, "split": s.folder, "source": s.source, "count": s.count}
        for s in splits
    }
    noise_build = {**builds["train_clean"], "split": "train", "noise": noise_key}
    todo = [s for s in splits if force or not _is_built(out / s.folder, builds[s.folder])]
    for s in splits:
        if s not in todo:
            print(
                f"dissect-prep demo: reusing {out / s.folder} (complete, same settings)", flush=True
            )
    if todo:
        work = out / "_work"
        shutil.rmtree(work, ignore_errors=True)
        with _serve(work) as base_url:
            for s in todo:
                _build_split(
                    s,
                    out,
                    work,
                    base_url,
                    builds[s.folder],
                    seed,
                    image_size,
                    processes,
                    source_dir,
                )
        shutil.rmtree(work, ignore_errors=True)

    renoise = (
        force
        or "train_clean" in {s.folder for s in todo}
        or not _is_built(out / "train", noise_build)
    )
    if renoise:
        print(
            f"dissect-prep demo: injecting caption noise ({mix_label(mix) or 'none'}) "
            f"into {out / 'train'}",
            flush=True,
        )
        inject_noise(out / "train_clean", out / "train", mix=mix, seed=seed, build=noise_build)
    else:
        print(f"dissect-prep demo: reusing {out / 'train'} (complete, same settings)", flush=True)

    summary = {
        **settings,
        "noise": sum(mix.values()),
        "noise_mix": mix,
        "noise_spec": mix_label(mix) or "0",
        "classnames": list(fmnist.CLASSNAMES),
        "splits": {},
    }
    for folder in ["train"] + [s.folder for s in splits]:
        m = read_manifest(out / folder)
        summary["splits"][folder] = {
            "samples": m["total"],
            "shards": m["num_shards"],
            "noisy": m["noisy"],
            "spec": brace_spec(given / folder),
        }
    summary["zeroshot"] = next(s.folder for s in splits if s.zeroshot)
    summary["retrieval"] = "val"
    summary["built_s"] = round(time.time() - started, 1)
    summary["reused"] = not renoise
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _is_built(folder: Path, build: dict) -> bool:
    try:
        m = read_manifest(folder)
    except DataPrepError:
        return False
    return bool(m.get("complete")) and m.get("build") == build


def _build_split(
    s: Split,
    out: Path,
    work: Path,
    base_url: str,
    build: dict,
    seed: int,
    image_size: int,
    processes: int | None,
    source_dir,
) -> None:
    print(
        f"dissect-prep demo: building {out / s.folder} ({s.count} {s.kind} images from the "
        f"Fashion-MNIST {s.source} split)",
        flush=True,
    )
    rng = np.random.default_rng([seed, s.stream])
    images, labels = fmnist.load_split(s.source, source_dir)
    table = {}
    extra_cols: tuple[str, ...] = ()
    zeroshot_templates = fmnist.ZEROSHOT_TEMPLATES
    if s.kind == "web":
        images, table["caption"], combos = web.make_web(images, labels, s.count, rng)
        table["label"] = np.full(s.count, -1, dtype=np.int64)  # the caption is the target
        attrs = web.attribute_columns(combos)
        table.update(attrs)
        extra_cols = tuple(attrs)
    elif s.kind == "web_single":
        images, labels = web.make_single(images, labels, s.count, rng)
        table["caption"] = [web.ZEROSHOT_TEMPLATES[0].format(fmnist.CLASSNAMES[c]) for c in labels]
        table["label"] = labels
        zeroshot_templates = web.ZEROSHOT_TEMPLATES
    elif s.kind == "single":
        pick = rng.permutation(len(labels))[: s.count]
        images, labels = images[pick], labels[pick]
        table["caption"] = fmnist.single_captions(labels, rng)
        table["label"] = labels
    else:
        images, items = fmnist.make_mosaics(images, labels, s.count, rng)
        table["caption"] = fmnist.mosaic_captions(items, rng)
        table["label"] = np.full(s.count, -1, dtype=np.int64)  # a mosaic has no single class
        table["items"] = items.tolist()
        extra_cols = ("items",)

    img_dir = work / s.folder
    img_dir.mkdir(parents=True)
    for i, img in enumerate(images):
        # RGB like web photos (the trainer sees 3-channel JPEGs either way)
        Image.fromarray(img).convert("RGB").save(img_dir / f"{i}.png", compress_level=1)
    table["url"] = [f"{base_url}/{s.folder}/{i}.png" for i in range(s.count)]
    url_list = work / f"{s.folder}.parquet"
    pd.DataFrame(table).to_parquet(url_list, index=False)

    manifest = shard_urls(
        url_list,
        out / s.folder,
        extra_cols=extra_cols,
        image_size=image_size,
        resize_mode="border",
        samples_per_shard=samples_per_shard(s.count),
        threads=16,
        timeout=60,
        retries=2,
        mode="overwrite",
        build=build,
        # one worker for small splits: each worker start imports img2dataset (~3 s of CPU)
        processes=processes or (1 if s.count < 5000 else os.cpu_count() or 1),
    )
    if manifest["success_rate"] < MIN_SUCCESS or not manifest["complete"]:
        raise DataPrepError(
            f"demo split {s.folder}: only {manifest['total']}/{s.count} images came back from the "
            f"local server (failures: {manifest['failures']})"
        )
    if s.zeroshot:
        (out / s.folder / "classnames.txt").write_text("\n".join(fmnist.CLASSNAMES) + "\n")
        (out / s.folder / "templates.txt").write_text("\n".join(zeroshot_templates) + "\n")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (signature from the base class)
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # processes x threads connect at once; the default backlog is 5


@contextmanager
def _serve(directory: Path) -> Iterator[str]:
    """Serve `directory` on an ephemeral 127.0.0.1 port; yields the base url."""
    directory.mkdir(parents=True, exist_ok=True)
    server = _Server(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, name="demo-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
