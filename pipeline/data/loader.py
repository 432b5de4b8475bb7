"""Shards -> per-rank super-batches, as a chain of generator stages (each testable alone).

    shard_source -> wds.tarfile_samples -> shuffle -> position/skip -> decode -> batch

Each rank gets its own slice of the shards (split by node, then by DataLoader worker); the
shard order is reshuffled every epoch from (seed, epoch), identically on all ranks. Every
epoch yields exactly ``steps`` batches per rank, so ranks never disagree on the step count:
a worker whose shards run out starts another shuffled pass over them (in resampled mode it
draws shards with replacement, the usual web-scale setting).

Resume is exact: the shuffle buffer is seeded per (seed, epoch, rank, worker), so the stream of
raw samples after the shuffle is deterministic; each batch carries how many raw samples its
worker consumed, and a resumed worker skips that many (tar reading only, no decode). Workers
are rotated so the DataLoader's round-robin restarts with the worker whose turn it was.
Random augmentation is seeded per sample from (seed, epoch, rank, worker, stream position), and
the DataLoader draws its worker seeds from its own generator: nothing here reads or advances
the process's global RNG, so a stream started mid-epoch after a crash decodes exactly what the
uninterrupted one did (with data.workers = 0 the decode runs in the training process itself).

Batch dict (N = samples in the batch):
    images [N, 3, H, W] float, tokens [N, L] int64, uid [N] int64, label [N] int64 (-1: none),
    noisy [N] bool, captions list[str], plus bookkeeping: worker (int), raw_pos (int),
    skipped (dict reason -> count since the worker's previous batch).
"""

from __future__ import annotations

import io
import json
import math
import random
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image

from pipeline.config import ConfigError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")

# Why samples are skipped: the metrics keys data/skipped/<reason>, summed over ranks every step.
# Per sample (SkipSample, from decode_sample) ...
SAMPLE_SKIP_REASONS = (
    "no_image",
    "no_json",
    "bad_json",
    "bad_uid",
    "empty_caption",
    "bad_image",
    "bad_noisy",
)
# ... and per shard (SkipCounter: a shard that cannot be read, or is cut short)
SHARD_SKIP_REASONS = ("unreadable_tar", "truncated_tar")
SKIP_REASONS = SAMPLE_SKIP_REASONS + SHARD_SKIP_REASONS
# json `noise_kind` -> batch["noise_kind"] (-1: absent or unknown); diagnostics only
NOISE_KINDS = ("clean", "swap", "unrelated", "partial")
NOISE_KIND_INDEX = {kind: i for i, kind in enumerate(NOISE_KINDS)}


class SkipSample(Exception):
    """A sample that cannot be used; ``reason`` (one of SAMPLE_SKIP_REASONS) is the metrics key."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in SAMPLE_SKIP_REASONS, reason
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail


def parse_noisy(meta: dict) -> bool:
    """The json's ground-truth flag `noisy`: true/false/0/1, absent = False. Anything else (a
    string "false", 0.5, null) is SkipSample('bad_noisy') naming the value: read by truthiness,
    "false" would count as noisy and corrupt every noise diagnostic and the oracle."""
    value = meta.get("noisy", False)
    if isinstance(value, bool) or (type(value) is int and value in (0, 1)):
        return bool(value)
    raise SkipSample("bad_noisy", f"noisy={json.dumps(value)} is not true/false/0/1")


def _rng(*parts: int) -> random.Random:
    return random.Random(hash(tuple(int(p) for p in parts)))


@contextmanager
def seeded_cpu_rng(seed: int):
    """torch's CPU generator seeded for the block, then restored: the CPU state of
    ``fork_rng(devices=[])`` + ``manual_seed`` at 2 us a sample instead of 75 (those go through
    torch.compile's wrappers and also reseed every accelerator, which no transform here uses)."""
    gen = torch.default_generator
    saved = gen.get_state()
    gen.manual_seed(seed)
    try:
        yield
    finally:
        gen.set_state(saved)


# ---------------------------------------------------------------------------------------------
# stages


def shard_source(
    urls: list[str],
    *,
    seed: int,
    epoch: int,
    rank: int,
    world: int,
    worker: int,
    nworkers: int,
    resampled: bool,
) -> Iterator[dict]:
    """Endless {"url": ...} for this (rank, worker); see the module docstring for the order."""
    if resampled:
        rng = _rng(seed, epoch, rank, worker, 7)
        while True:
            yield {"url": rng.choice(urls)}
    for rep in range(1 << 30):
        order = list(urls)
        _rng(seed, epoch, rep).shuffle(order)
        mine = order[rank::world][worker::nworkers]
        if not mine:
            raise ConfigError(
                f"{len(urls)} shards cannot feed {world} ranks x {nworkers} workers: rank {rank} "
                f"worker {worker} gets none; use more shards, fewer data.workers, or data.resampled=true"
            )
        for u in mine:
            yield {"url": u, "pass": rep}


def shuffle_within_passes(
    samples: Iterable[dict], bufsize: int, seed_parts: tuple
) -> Iterator[dict]:
    """A seeded shuffle buffer that drains at every pass boundary (sample["__pass__"] changes).

    A worker's shards are read in passes; draining keeps one pass's samples from mixing with the
    next, so no sample is seen twice before its pass is over. Deterministic for given seeds.
    """
    buf: list[dict] = []
    current, rng = None, None

    def pop() -> dict:
        i = rng.randrange(len(buf))
        buf[i], buf[-1] = buf[-1], buf[i]
        return buf.pop()

    for sample in samples:
        p = sample.get("__pass__", 0)
        if p != current:
            while buf:
                yield pop()
            current, rng = p, _rng(*seed_parts, p)
        buf.append(sample)
        if len(buf) >= bufsize:
            yield pop()
    while buf:
        yield pop()


def tar_cut_short(url: str) -> bool:
    """A local shard that does not end with tar's end-of-archive blocks (1024 zero bytes).

    tarfile reads a shard cut at a member boundary as a shorter valid archive, silently; this
    catches that (and a cut anywhere else) with one 1 KiB read. Remote shards are not checked.
    """
    if "://" in url or url.startswith("pipe:"):
        return False
    try:
        size = Path(url).stat().st_size
        if size < 1024 or size % 512:
            return True
        with open(url, "rb") as f:
            f.seek(size - 1024)
            return f.read(1024) != bytes(1024)
    except OSError:
        return False  # cannot be opened at all: the tar reader reports that


class SkipCounter:
    """Counts skipped samples by reason and names the shards they came from (per worker process).

    ``track`` sits between the shard source and the tar reader, so the counter knows which shard
    is being read when webdataset calls ``tar_handler`` (the exception's args do not reliably
    name it). A broken shard counts once each time it is opened, and is named on stderr the
    first time. ``track`` also stops a stream whose shards yield no sample at all, which would
    otherwise loop over them forever.
    """

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.by_shard: Counter = Counter()  # url -> samples (or shard errors) skipped
        self.url = "?"  # the shard being read
        self.read = 0  # raw samples read from tars
        self.pass_id = 0  # the pass over the shards that the current one belongs to
        self._shard_failed = False
        self.named: set[str] = set()  # skip reasons whose first value was printed

    def track(self, src: Iterable[dict], stall_after: int, where: str) -> Iterator[dict]:
        """Pass shards through, noting the current one; ConfigError after ``stall_after`` barren ones."""
        read_at, barren = self.read, -1
        for item in src:
            barren = (
                barren + 1 if self.read == read_at else 0
            )  # did the previous shard give samples?
            read_at = self.read
            if stall_after and barren >= stall_after:
                names = ", ".join(list(self.by_shard)[:5]) or self.url
                raise ConfigError(
                    f"data.train: {barren} shards in a row gave no sample ({where}); unreadable: {names}"
                )
            self.url, self._shard_failed = item["url"], False
            self.pass_id = item.get("pass", 0)
            if tar_cut_short(self.url):
                self._shard_error(
                    "truncated_tar", "no tar end-of-archive marker: cut short, or not a tar"
                )
            yield item

    def count_read(self, samples: Iterable[dict]) -> Iterator[dict]:
        """Count samples read, tagging each with the pass its shard belongs to."""
        for s in samples:
            self.read += 1
            s["__pass__"] = self.pass_id
            yield s

    def _shard_error(self, reason: str, detail: str) -> None:
        assert reason in SHARD_SKIP_REASONS, reason
        if self._shard_failed:  # one broken shard raises in several webdataset stages
            return
        self._shard_failed = True
        self.counts[reason] += 1
        if self.url not in self.by_shard:
            print(
                f"dissect-train: warning: shard {self.url}: {detail}; reading what it can",
                file=sys.stderr,
                flush=True,
            )
        self.by_shard[self.url] += 1

    def tar_handler(self, exn: Exception) -> bool:
        first = str(exn.args[0]).split(" @ ")[0] if exn.args else ""
        self._shard_error("unreadable_tar", f"{type(exn).__name__}: {first[:200]}")
        return True  # keep going with the next member / shard

    def skip(self, reason: str, url: str, detail: str = "") -> None:
        if detail and reason not in self.named:  # once per reason and worker: what the value was
            self.named.add(reason)
            print(
                f"dissect-train: warning: shard {url}: sample skipped ({reason}): {detail}",
                file=sys.stderr,
                flush=True,
            )
        self.counts[reason] += 1
        self.by_shard[url] += 1

    def take(self) -> dict:
        out = dict(self.counts)
        self.counts.clear()
        return out

    def worst_shards(self, n: int = 10) -> list[str]:
        """The shards with the most skips, as 'url (k skipped)', for the stop message."""
        return [f"{u} ({k} skipped)" for u, k in self.by_shard.most_common(n)]


def skip_raw(samples: Iterable[dict], n: int, position: list[int]) -> Iterator[dict]:
    """Drop the first ``n`` raw samples; ``position[0]`` counts raw samples consumed."""
    for s in samples:
        position[0] += 1
        if position[0] <= n:
            continue
        yield s


# RandomResizedCrop(scale >= 0.9, ratio >= 3/4) crops at least 0.82 of a side: a source side
# of 1.25 x the model's input is never upsampled by the crop
DRAFT_MARGIN = 1.25


def draft_size(preprocess: Callable) -> int:
    """The smallest source side worth decoding for this preprocess (0: no draft decoding).

    The model's input side is the first ``size`` in the transform chain (open_clip: the crop
    or resize), times DRAFT_MARGIN.
    """
    for t in getattr(preprocess, "transforms", [preprocess]):
        size = getattr(t, "size", None)
        if isinstance(size, int) or (isinstance(size, (tuple, list)) and size):
            side = size if isinstance(size, int) else max(size)
            return int(math.ceil(side * DRAFT_MARGIN))
    return 0


def open_image(data: bytes, draft: int = 0) -> Image.Image:
    """Decoded RGB image; a JPEG at least 2x ``draft`` on its shorter side is decoded at 1/2,
    1/4 or 1/8 scale (PIL's draft mode: the DCT skips the detail the resize would discard),
    never below ``draft`` pixels."""
    with Image.open(io.BytesIO(data)) as im:
        if draft and im.format == "JPEG" and min(im.size) >= 2 * draft:
            im.draft("RGB", (draft, draft))
        return im.convert("RGB")


def decode_sample(sample: dict, preprocess: Callable, draft: int = 0) -> dict:
    """Raw webdataset sample -> {image tensor, caption, uid, label, noisy}; SkipSample if unusable.

    ``draft``: see open_image (0 decodes every image at full size)."""
    img_key = next((k for k in IMAGE_KEYS if k in sample), None)
    if img_key is None:
        raise SkipSample("no_image")
    if "json" not in sample:
        raise SkipSample("no_json")
    try:
        meta = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: [[[[...]]]]
        raise SkipSample("bad_json") from None
    uid = meta.get("uid") if isinstance(meta, dict) else None
    if not isinstance(uid, int) or isinstance(uid, bool) or uid < 0:
        raise SkipSample("bad_uid")
    caption = sample.get("txt", b"")
    caption = caption.decode("utf-8", "replace") if isinstance(caption, bytes) else str(caption)
    if not caption.strip():
        raise SkipSample("empty_caption")
    try:
        image = preprocess(open_image(sample[img_key], draft))
    except Exception:  # PIL raises many types for bad bytes
        raise SkipSample("bad_image") from None
    label = meta.get("label", -1)
    # Python's json accepts NaN and 1e999; int() of those would end the whole run
    ok_label = (
        isinstance(label, (int, float)) and not isinstance(label, bool) and math.isfinite(label)
    )
    return {
        "image": image,
        "caption": caption.strip(),
        "noise_kind": NOISE_KIND_INDEX.get(str(meta.get("noise_kind")), -1),
        "uid": meta["uid"],
        "label": int(label) if ok_label else -1,
        "noisy": parse_noisy(meta),
    }


def collate(items: list[dict], tokenizer: Callable) -> dict:
    captions = [it["caption"] for it in items]
    return {
        "images": torch.stack([it["image"] for it in items]),
        "tokens": tokenizer(captions),
        "uid": torch.tensor([it["uid"] for it in items], dtype=torch.int64),
        "label": torch.tensor([it["label"] for it in items], dtype=torch.int64),
        "noisy": torch.tensor([it["noisy"] for it in items], dtype=torch.bool),
        "noise_kind": torch.tensor([it["noise_kind"] for it in items], dtype=torch.int64),
        "captions": captions,
    }


# ---------------------------------------------------------------------------------------------
# the per-rank stream


@dataclass
class StreamSpec:
    urls: list[str]
    batch_size: int  # samples per batch on this rank (the super-batch with selection)
    preprocess: Callable
    tokenizer: Callable
    seed: int = 0
    rank: int = 0
    world: int = 1
    nworkers: int = 0  # DataLoader workers (0: in the main process)
    resampled: bool = False
    shuffle_buffer: int = 2000
    shuffle: bool = True  # False for evaluation: shards in order, no buffer
    jpeg_draft: bool = True  # JPEGs >= 2x the model's input decode at reduced scale (draft_size)


@dataclass
class EpochPlan:
    """What one epoch's stream must produce, and where a resumed stream starts."""

    epoch: int
    steps: int  # batches this rank yields in the epoch
    start_step: int = 0  # batches already consumed (resume)
    raw_pos: dict[int, int] = field(default_factory=dict)  # logical worker -> raw samples consumed


class ShardStream(torch.utils.data.IterableDataset):
    def __init__(self, spec: StreamSpec, plan: EpochPlan):
        super().__init__()
        self.spec, self.plan = spec, plan

    def _batches_for(self, logical: int, nw: int) -> int:
        # round-robin over logical workers, starting at step start_step
        remaining = self.plan.steps - self.plan.start_step
        first = self.plan.start_step % nw
        k = (logical - first) % nw
        return 0 if k >= remaining else (remaining - k + nw - 1) // nw

    def __iter__(self) -> Iterator[dict]:
        sp, plan = self.spec, self.plan
        info = torch.utils.data.get_worker_info()
        worker_id, nw = (info.id, info.num_workers) if info else (0, 1)
        logical = (worker_id + plan.start_step) % nw  # rotation: see module docstring
        n_batches = self._batches_for(logical, nw)
        if n_batches == 0:
            return
        counter = SkipCounter()
        src = shard_source(
            sp.urls,
            seed=sp.seed,
            epoch=plan.epoch,
            rank=sp.rank,
            world=sp.world,
            worker=logical,
            nworkers=nw,
            resampled=sp.resampled,
        )
        if not sp.shuffle:  # evaluation: every shard once, in order
            src = ({"url": u} for u in sp.urls)
        # endless sources: after this many barren shards in a row none of ours can be read
        # (resampled draws with replacement: 10x makes a missed readable shard ~e^-10 unlikely)
        stall = 0 if not sp.shuffle else len(sp.urls) * (10 if sp.resampled else 1) + 1
        where = f"rank {sp.rank} worker {logical}, {len(sp.urls)} shards in all"
        samples = wds.tarfile_samples(counter.track(src, stall, where), handler=counter.tar_handler)
        samples = counter.count_read(samples)
        if sp.shuffle and sp.shuffle_buffer > 1:
            samples = shuffle_within_passes(
                samples, sp.shuffle_buffer, (sp.seed, plan.epoch, sp.rank, logical, 11)
            )
        position = [0]
        samples = skip_raw(samples, plan.raw_pos.get(logical, 0), position)

        def batch_of(items: list[dict]) -> dict:
            batch = collate(items, sp.tokenizer)
            batch.update(
                worker=logical,
                raw_pos=position[0],
                skipped=counter.take(),
                bad_shards=counter.worst_shards(),
            )
            return batch

        draft = draft_size(sp.preprocess) if sp.jpeg_draft else 0
        items: list[dict] = []
        produced = 0
        for raw in samples:
            try:
                if sp.shuffle:  # training: random augmentation, seeded by the sample's place
                    seed = _rng(sp.seed, plan.epoch, sp.rank, logical, position[0], 13)
                    with seeded_cpu_rng(seed.getrandbits(63)):
                        items.append(decode_sample(raw, sp.preprocess, draft))
                else:
                    items.append(decode_sample(raw, sp.preprocess, draft))
            except SkipSample as s:
                counter.skip(s.reason, raw.get("__url__", "?"), s.detail)
                continue
            if len(items) == sp.batch_size:
                yield batch_of(items)
                items = []
                produced += 1
                if produced == n_batches:
                    return
        if items and not sp.shuffle:  # evaluation keeps the last partial batch
            yield batch_of(items)


def _identity(batch_list):
    return batch_list[0]


def make_loader(spec: StreamSpec, plan: EpochPlan) -> torch.utils.data.DataLoader:
    # its own generator: otherwise every new iterator draws its worker seed from the global RNG,
    # and a loader started mid-epoch on resume would shift every later random draw of training
    gen = torch.Generator().manual_seed(_rng(spec.seed, plan.epoch, spec.rank, 17).getrandbits(63))
    return torch.utils.data.DataLoader(
        ShardStream(spec, plan),
        batch_size=1,
        collate_fn=_identity,
        num_workers=spec.nworkers,
        persistent_workers=False,
        prefetch_factor=4 if spec.nworkers > 0 else None,
        generator=gen,
        # page-locked batches on a GPU host: the engine's non_blocking copies then overlap compute
        pin_memory=torch.cuda.is_available(),
    )


def make_eval_loader(urls: list[str], preprocess, tokenizer, batch_size: int, max_samples: int = 0):
    """Every sample of the val shards once, in order, same on every rank (at most max_samples)."""
    spec = StreamSpec(
        urls=urls,
        batch_size=batch_size,
        preprocess=preprocess,
        tokenizer=tokenizer,
        shuffle=False,
        nworkers=0,
    )
    stream = ShardStream(spec, EpochPlan(epoch=0, steps=1 << 40))
    if not max_samples:
        return stream
    return _truncate(stream, max_samples)


def _truncate(batches: Iterable[dict], n: int) -> Iterator[dict]:
    seen = 0
    for batch in batches:
        take = min(len(batch["uid"]), n - seen)
        if take < len(batch["uid"]):
            batch = {
                k: (v[:take] if isinstance(v, (torch.Tensor, list)) else v)
                for k, v in batch.items()
            }
        yield batch
        seen += take
        if seen >= n:
            return
