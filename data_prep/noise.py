"""Noise injection with ground truth, in three kinds as on the web:

  swap       the original caption of another sample (a real caption, of the wrong image)
  unrelated  a caption about nothing in the set (generated offline from its own word lists)
  partial    the sample's own caption with one attribute wrong: for labelled samples (label >= 0)
             the class phrase, otherwise one matched item, colour, background, position or size
             word (the vocabulary of data_prep/fmnist.py and data_prep/web.py), replaced by a
             different value of the same attribute

A mix (`parse_mix`: "0.4" = swap 0.4; "swap=0.2,unrelated=0.1,partial=0.1") asks a rate per
kind; exactly `round(rate * N)` samples get each kind (realised rate within 0.5/N of the
request). Which ones: a seeded permutation of the samples sorted by uid; partial takes the
first samples in it whose caption names an attribute it can change, swap then the first of the
rest, unrelated the next. A swap donor is drawn uniformly from the samples that make it a real
correspondence error: a different sample with a different caption text and, when both are
labelled, a different label. Every sample's json gets `noisy` (a JSON boolean) and
`noise_kind` ("clean", "swap", "unrelated" or "partial"); a noisy one also `orig_caption`,
and a swapped one `noise_donor_uid`.

Images, keys, shard names and everything else are copied unchanged. Same input and seed give
byte-identical shards (sorting by uid makes the choice independent of tar member order); a
swap-only mix draws exactly as before the other kinds existed.
"""

from __future__ import annotations

import re
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep import DataPrepError, fmnist, web
from data_prep.tario import ShardTarWriter, dumps_meta, iter_samples, sample_meta
from dissect_common.manifest import new_manifest, read_manifest, shard_paths, write_manifest

SIDECARS = ("classnames.txt", "templates.txt")  # zero-shot files travel with the shards
MAX_DRAW_ROUNDS = 1000
KINDS = ("swap", "unrelated", "partial")
CLEAN = "clean"  # noise_kind of a clean sample

# Attributes partial noise can change: name -> values, each a tuple of interchangeable phrases.
# Class phrases come with their article (class captions) and without (web captions).
CLASS_GROUPS = {"item": fmnist.PHRASES, "item noun": web.NOUNS}
ATTRIBUTE_GROUPS = {
    **CLASS_GROUPS,
    "colour": tuple((c,) for c in web.COLOURS),
    "background": tuple((b,) for b in web.BACKGROUNDS),
    "position": tuple(phrases for phrases, _ in web.POSITIONS),
    "size": tuple(phrases for phrases, _ in web.SIZES),
}

# Unrelated captions: things and settings that appear nowhere in the demo sets.
UNRELATED_SUBJECTS = (
    "a bowl of ramen", "a mountain lake", "a steam locomotive", "a sleeping puppy",
    "a city skyline", "a plate of sushi", "an old lighthouse", "a vintage typewriter",
    "a field of sunflowers", "a snowy forest path", "a cup of espresso", "a sailing ship",
    "a desert canyon", "a stone bridge", "a hot air balloon", "a chess game", "a stack of pancakes",
    "a koala in a eucalyptus tree", "a football stadium", "a parked bicycle", "a violin",
    "a thunderstorm over farmland", "a basket of strawberries", "a laptop on a desk",
    "a cathedral ceiling", "a tropical island", "a herd of elephants", "a bakery window",
    "a busy market street", "a garden gnome", "a waterfall", "a pair of owls",
)  # fmt: skip
UNRELATED_SETTINGS = (
    "at sunset", "at night", "in the rain", "seen from above", "in the morning fog",
    "on a sunny afternoon", "in winter", "up close", "from far away", "on an old film camera",
)  # fmt: skip
UNRELATED_TEMPLATES = (
    "{} {}.", "photo of {} {}.", "{}, {}, taken on holiday.", "wallpaper: {} {}.",
    "stock image of {} {}.", "my favourite shot: {} {}.",
)  # fmt: skip


def parse_mix(spec: str | float) -> dict[str, float]:
    """'0.4' (swap, the old meaning) or 'swap=0.2,unrelated=0.1,partial=0.1' -> {kind: rate};
    a DataPrepError naming what is wrong otherwise."""
    text = str(spec).strip()
    try:
        mix = {"swap": float(text)}
    except ValueError:
        mix = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            kind, eq, rate = (x.strip() for x in part.partition("="))
            if kind not in KINDS or not eq:
                raise DataPrepError(
                    f"noise {text!r}: {part!r} is not KIND=RATE with KIND one of {', '.join(KINDS)}"
                ) from None
            if kind in mix:
                raise DataPrepError(f"noise {text!r}: {kind} is given twice") from None
            try:
                mix[kind] = float(rate)
            except ValueError:
                raise DataPrepError(f"noise {text!r}: rate {rate!r} is not a number") from None
    check_mix(mix, text)
    return mix


def check_mix(mix: dict[str, float], what: str = "") -> None:
    what = f"noise {what!r}" if what else "noise"
    for kind, rate in mix.items():
        if kind not in KINDS:
            raise DataPrepError(f"{what}: unknown kind {kind!r} (one of {', '.join(KINDS)})")
        if not 0.0 <= rate <= 1.0:
            raise DataPrepError(f"{what}: the {kind} rate must be in [0, 1], got {rate}")
    if sum(mix.values()) > 1.0 + 1e-9:
        raise DataPrepError(f"{what}: the rates add up to {sum(mix.values()):g}, more than 1")


def mix_label(mix: dict[str, float]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in mix.items() if v)


_PHRASE_OF: dict[str, tuple[str, int]] = {}  # phrase -> (group, value index)
for _group, _values in ATTRIBUTE_GROUPS.items():
    for _v, _phrases in enumerate(_values):
        for _p in _phrases:
            _PHRASE_OF.setdefault(_p, (_group, _v))


def _matcher(groups) -> re.Pattern:
    phrases = sorted((p for p, (g, _) in _PHRASE_OF.items() if g in groups), key=len, reverse=True)
    return re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, phrases)) + r")(?![\w-])")


_ALL_ATTRIBUTES, _CLASS_ONLY = _matcher(ATTRIBUTE_GROUPS), _matcher(CLASS_GROUPS)


def attribute_matches(caption: str, labelled: bool) -> list[re.Match]:
    """The attribute phrases partial noise may change in `caption` (only the class phrase when
    the sample is labelled: its caption is a class caption)."""
    return list((_CLASS_ONLY if labelled else _ALL_ATTRIBUTES).finditer(caption))


def partial_caption(caption: str, labelled: bool, rng: np.random.Generator) -> str:
    """`caption` with one matched attribute phrase replaced by a phrase of another value."""
    matches = attribute_matches(caption, labelled)
    m = matches[rng.integers(len(matches))]
    group, value = _PHRASE_OF[m.group(1)]
    values = ATTRIBUTE_GROUPS[group]
    other = [v for v in range(len(values)) if v != value][rng.integers(len(values) - 1)]
    phrase = values[other][rng.integers(len(values[other]))]
    return web.fix_articles(m.string[: m.start()] + phrase + m.string[m.end() :])


def unrelated_captions(k: int, rng: np.random.Generator) -> list[str]:
    subj = rng.integers(len(UNRELATED_SUBJECTS), size=k)
    sett = rng.integers(len(UNRELATED_SETTINGS), size=k)
    tmpl = rng.integers(len(UNRELATED_TEMPLATES), size=k)
    return [
        UNRELATED_TEMPLATES[t].format(UNRELATED_SUBJECTS[a], UNRELATED_SETTINGS[b])
        for a, b, t in zip(subj, sett, tmpl)
    ]


def inject_noise(
    src: str | Path,
    out: str | Path,
    rate: float | None = None,
    seed: int = 0,
    *,
    mix: dict[str, float] | None = None,
    build: dict | None = None,
) -> dict:
    """Copy the shards in `src` to `out` with noisy captions: `rate` of them swapped, or the
    `mix` of kinds ({"swap": 0.2, "unrelated": 0.1, "partial": 0.1}).

    Returns the manifest written to `out/manifest.json`. `out` must differ from `src`;
    shards already in `out` are replaced.
    """
    src, out = Path(src).absolute(), Path(out).absolute()
    if (rate is None) == (mix is None):
        raise DataPrepError("inject_noise takes a swap rate or a mix of kinds, one of the two")
    if mix is None and not 0.0 <= rate <= 1.0:
        raise DataPrepError(f"noise rate must be in [0, 1], got {rate}")
    mix = {"swap": rate} if mix is None else dict(mix)
    check_mix(mix)
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
    counts = {kind: int(round(mix.get(kind, 0.0) * n)) for kind in KINDS}
    k = sum(counts.values())
    if k > n:  # rounding up each kind can pass n by one or two
        raise DataPrepError(f"noise mix {mix_label(mix)} asks for {k} noisy samples of {n}")
    rng = np.random.default_rng(seed)
    order = np.argsort(uids, kind="stable")  # positions sorted by uid
    ranked = order[rng.permutation(n)[:k]] if not counts["partial"] else order[rng.permutation(n)]
    partial_pos = np.zeros(0, dtype=np.int64)
    if counts["partial"]:
        can = np.array([bool(attribute_matches(captions[i], labels[i] >= 0)) for i in ranked])
        if can.sum() < counts["partial"]:
            raise DataPrepError(
                f"partial noise: only {int(can.sum())} of {n} captions name an item or attribute "
                f"it can change (the demo vocabulary); asked for {counts['partial']}"
            )
        partial_pos = ranked[can][: counts["partial"]]
        ranked = ranked[~np.isin(ranked, partial_pos)]
    swap_pos = ranked[: counts["swap"]]
    unrelated_pos = ranked[counts["swap"] : counts["swap"] + counts["unrelated"]]
    donor_pos = _draw_donors(swap_pos, captions, labels, rng)
    new: dict[int, tuple[str, str, dict]] = {}  # uid -> (kind, caption, extra json)
    for i, j in zip(swap_pos, donor_pos):
        new[int(uids[i])] = ("swap", captions[j], {"noise_donor_uid": int(uids[j])})
    for i, text in zip(unrelated_pos, unrelated_captions(len(unrelated_pos), rng)):
        new[int(uids[i])] = ("unrelated", text, {})
    for i in partial_pos:
        new[int(uids[i])] = ("partial", partial_caption(captions[i], labels[i] >= 0, rng), {})

    out.mkdir(parents=True, exist_ok=True)
    names = {shard.name for shard in shards}
    for stale in out.glob("*.tar"):  # from an earlier run with other shards; the rest are replaced
        if stale.name not in names:  # atomically below, so a reader never sees a half-written tar
            stale.unlink()
    written, label_counts, noisy, has_label = [], Counter(), Counter(), False
    for shard in tqdm(shards, desc="noise: writing", unit="shard", disable=None):
        with ShardTarWriter(out / shard.name) as writer:
            for sample in iter_samples(shard):
                meta = sample_meta(sample, shard)
                uid = int(meta["uid"])
                if uid in new:
                    kind, caption, extra = new[uid]
                    meta.update(
                        noisy=True,
                        noise_kind=kind,
                        orig_caption=sample["txt"].decode("utf-8"),
                        **extra,
                    )
                    if "caption" in meta:  # img2dataset keeps a copy of the caption in the json
                        meta["caption"] = caption
                    sample["txt"] = caption.encode("utf-8")
                    noisy[kind] += 1
                else:
                    meta.update(noisy=False, noise_kind=CLEAN)
                sample["json"] = dumps_meta(meta)
                writer.write(sample)
                if "label" in meta:
                    has_label = True
                    label_counts[int(meta["label"])] += 1
        written.append({"name": shard.name, "samples": writer.count})
    assert all(noisy[kind] == counts[kind] for kind in KINDS), (noisy, counts)
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
        noisy=k,
        build=build if build is not None else source_build,
        source=str(src),
        noise={
            "rate": sum(mix.values()),
            "mix": {kind: mix.get(kind, 0.0) for kind in KINDS},
            "counts": counts,
            "seed": seed,
            "realised_rate": k / n,
            "tolerance": 0.5 * max(1, sum(1 for v in mix.values() if v)) / n,
        },
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
