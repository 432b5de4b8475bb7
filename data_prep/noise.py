"""Noise injection with ground truth: swap captions between samples.

Exactly `round(rate * N)` samples become noisy (realised rate within 0.5/N of the request).
Which ones: the first k of a seeded permutation of the samples sorted by uid. Each takes the
original caption of a donor drawn uniformly from the samples that make it a real
correspondence error: a different sample with a different caption text and, when both are
labelled (label >= 0), a different label. A noisy sample's json gets `noisy: true`,
`orig_caption` and `noise_donor_uid`; every other sample gets `noisy: false`.

Images, keys, shard names and everything else are copied unchanged. Same input and seed give
byte-identical shards (sorting by uid makes the choice independent of tar member order).
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep import DataPrepError
from data_prep.tario import ShardTarWriter, dumps_meta, iter_samples, sample_meta
from dissect_common.manifest import new_manifest, read_manifest, shard_paths, write_manifest

SIDECARS = ("classnames.txt", "templates.txt")  # zero-shot files travel with the shards
MAX_DRAW_ROUNDS = 1000


def inject_noise(
    src: str | Path, out: str | Path, rate: float, seed: int = 0, *, build: dict | None = None
) -> dict:
    """Copy the shards in `src` to `out` with a `rate` fraction of captions swapped.

    Returns the manifest written to `out/manifest.json`. `out` must differ from `src`;
    shards already in `out` are replaced.
    """
    src, out = Path(src).absolute(), Path(out).absolute()
    if not 0.0 <= rate <= 1.0:
        raise DataPrepError(f"noise rate must be in [0, 1], got {rate}")
    shards = shard_paths(src) if src.is_dir() else []
    if not shards:
        raise DataPrepError(f"{src} holds no .tar shards")
    if out == src:
        raise DataPrepError(
            "--out must be a different folder from --in (noise is never written in place)"
        )
    started = time.time()

    uids, captions, labels = _read_pairs(shards)
    n = len(uids)
    if n == 0:
        raise DataPrepError(f"{src}: the shards hold no samples")
    k = int(round(rate * n))
    rng = np.random.default_rng(seed)
    order = np.argsort(uids, kind="stable")  # positions sorted by uid
    noisy_pos = order[rng.permutation(n)[:k]]
    donor_pos = _draw_donors(noisy_pos, captions, labels, rng)
    swap = {int(uids[i]): (captions[j], int(uids[j])) for i, j in zip(noisy_pos, donor_pos)}

    out.mkdir(parents=True, exist_ok=True)
    names = {shard.name for shard in shards}
    for stale in out.glob("*.tar"):  # from an earlier run with other shards; the rest are replaced
        if stale.name not in names:  # atomically below, so a reader never sees a half-written tar
            stale.unlink()
    written, label_counts, noisy, has_label = [], Counter(), 0, False
    for shard in tqdm(shards, desc="noise: writing", unit="shard", disable=None):
        with ShardTarWriter(out / shard.name) as writer:
            for sample in iter_samples(shard):
                meta = sample_meta(sample, shard)
                uid = int(meta["uid"])
                if uid in swap:
                    caption, donor_uid = swap[uid]
                    meta.update(
                        noisy=True,
                        orig_caption=sample["txt"].decode("utf-8"),
                        noise_donor_uid=donor_uid,
                    )
                    if "caption" in meta:  # img2dataset keeps a copy of the caption in the json
                        meta["caption"] = caption
                    sample["txt"] = caption.encode("utf-8")
                    noisy += 1
                else:
                    meta["noisy"] = False
                sample["json"] = dumps_meta(meta)
                writer.write(sample)
                if "label" in meta:
                    has_label = True
                    label_counts[int(meta["label"])] += 1
        written.append({"name": shard.name, "samples": writer.count})
    assert noisy == k, (noisy, k)
    for name in SIDECARS:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)

    try:
        source_build = read_manifest(src).get("build", {})
    except DataPrepError:
        source_build = {}
    manifest = new_manifest(
        "noise",
        written,
        max_uid=int(uids.max()),
        label_counts=label_counts if has_label else None,
        noisy=noisy,
        build=build if build is not None else source_build,
        source=str(src),
        noise={"rate": rate, "seed": seed, "realised_rate": k / n, "tolerance": 0.5 / n},
        duration_s=round(time.time() - started, 2),
    )
    write_manifest(out, manifest)
    return manifest


def _read_pairs(shards: list[Path]) -> tuple[np.ndarray, list[str], np.ndarray]:
    """uid, caption and label (-1 when absent) of every sample, in shard order."""
    uids, captions, labels = [], [], []
    for shard in tqdm(shards, desc="noise: reading", unit="shard", disable=None):
        for sample in iter_samples(shard):
            meta = sample_meta(sample, shard)
            if "uid" not in meta or "txt" not in sample:
                raise DataPrepError(f"{shard}: sample {sample['__key__']} lacks a uid or a caption")
            uids.append(int(meta["uid"]))
            captions.append(sample["txt"].decode("utf-8"))
            labels.append(int(meta.get("label", -1)))
    uids_N = np.asarray(uids, dtype=np.int64)
    if len(np.unique(uids_N)) != len(uids_N):
        raise DataPrepError(
            "shards hold duplicate uids; noise ground truth needs one uid per sample"
        )
    return uids_N, captions, np.asarray(labels, dtype=np.int64)


def _draw_donors(
    noisy_pos: np.ndarray, captions: list[str], labels: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """For each noisy position a donor position, uniform over the eligible ones (rejection
    sampling: redraw only the ineligible draws, so the result is fixed by the rng state)."""
    n = len(captions)
    donors = np.full(len(noisy_pos), -1, dtype=np.int64)
    pending = np.arange(len(noisy_pos))
    for _ in range(MAX_DRAW_ROUNDS):
        if len(pending) == 0:
            return donors
        draw = rng.integers(0, n, size=len(pending))
        mine = noisy_pos[pending]
        ok = draw != mine
        ok &= np.array([captions[d] != captions[m] for d, m in zip(draw, mine)], dtype=bool)
        labelled = labels[mine] >= 0
        ok &= ~labelled | (labels[draw] != labels[mine])
        donors[pending[ok]] = draw[ok]
        pending = pending[~ok]
    stuck = int(noisy_pos[pending[0]])
    raise DataPrepError(
        f"no donor caption found for {len(pending)} samples (e.g. caption {captions[stuck]!r}): "
        "every other sample has the same label or caption"
    )
