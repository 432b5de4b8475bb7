"""`dissect-prep inspect`: what a shard folder actually holds, read from the shards themselves
(the manifest says what the writer believed; this checks it)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from data_prep import DataPrepError
from data_prep.tario import iter_samples, sample_meta
from dissect_common.manifest import MANIFEST, read_manifest, shard_paths

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Report:
    folder: Path
    shards: int
    samples: int = 0
    label_counts: Counter = field(default_factory=Counter)
    unlabelled: int = 0
    noisy: int = 0
    noisy_known: int = 0  # samples whose json says noisy true/false
    duplicate_uids: int = 0
    missing_uid: int = 0
    missing_image: int = 0
    min_uid: int | None = None
    max_uid: int | None = None
    examples: list[dict] = field(default_factory=list)
    manifest: dict | None = None
    scanned_shards: int = 0

    @property
    def noisy_frac(self) -> float:
        return self.noisy / self.samples if self.samples else 0.0


def find_shard_dirs(folder: str | Path) -> list[Path]:
    """`folder` itself when it holds shards, else its subfolders that do (a demo root)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataPrepError(f"not a folder: {folder}")
    if shard_paths(folder):
        return [folder]
    subdirs = sorted(
        p
        for p in folder.iterdir()
        if p.is_dir() and not p.name.startswith(("_", ".")) and shard_paths(p)
    )
    if not subdirs:
        raise DataPrepError(f"{folder} holds no .tar shards (nor do its subfolders)")
    return subdirs


def inspect_shards(
    folder: str | Path, *, max_shards: int | None = None, examples: int = 6
) -> Report:
    """Scan the shards in `folder` (the first `max_shards` when given)."""
    folder = Path(folder)
    shards = shard_paths(folder)
    if not shards:
        raise DataPrepError(f"{folder} holds no .tar shards")
    report = Report(folder=folder, shards=len(shards))
    if (folder / MANIFEST).is_file():
        report.manifest = read_manifest(folder)
    seen: set[int] = set()
    clean_examples, noisy_examples = [], []
    for shard in shards[:max_shards]:
        report.scanned_shards += 1
        for sample in iter_samples(shard):
            report.samples += 1
            meta = sample_meta(sample, shard)
            if not any(ext in sample for ext in IMAGE_EXTS):
                report.missing_image += 1
            uid = meta.get("uid")
            if uid is None:
                report.missing_uid += 1
            else:
                uid = int(uid)
                report.duplicate_uids += uid in seen
                seen.add(uid)
                report.min_uid = uid if report.min_uid is None else min(report.min_uid, uid)
                report.max_uid = uid if report.max_uid is None else max(report.max_uid, uid)
            if "label" in meta and int(meta["label"]) >= 0:
                report.label_counts[int(meta["label"])] += 1
            else:
                report.unlabelled += 1
            if "noisy" in meta:
                report.noisy_known += 1
                report.noisy += bool(meta["noisy"])
            bucket = noisy_examples if meta.get("noisy") else clean_examples
            if len(bucket) < examples:
                bucket.append(
                    {
                        "uid": uid,
                        "label": meta.get("label"),
                        "noisy": meta.get("noisy"),
                        "caption": sample.get("txt", b"").decode("utf-8", "replace"),
                        "orig_caption": meta.get("orig_caption"),
                    }
                )
    n_noisy = min(len(noisy_examples), examples // 2)
    report.examples = clean_examples[: examples - n_noisy] + noisy_examples[:n_noisy]
    return report


def report_lines(r: Report) -> list[str]:
    scanned = "" if r.scanned_shards == r.shards else f" (scanned {r.scanned_shards})"
    lines = [f"{r.folder}: {r.samples} samples in {r.shards} shards{scanned}"]
    if r.manifest is not None:
        m = r.manifest
        agree = (
            "matches" if (m["total"] == r.samples or r.scanned_shards != r.shards) else "DISAGREES"
        )
        lines.append(
            f"  manifest    {m['kind']}, {'complete' if m.get('complete') else 'INCOMPLETE'}, "
            f"{m['total']} samples ({agree})"
        )
    else:
        lines.append("  manifest    none")
    if r.missing_uid or r.duplicate_uids:
        lines.append(
            f"  uids        PROBLEM: {r.missing_uid} missing, {r.duplicate_uids} duplicated"
        )
    else:
        lines.append(f"  uids        unique, {r.min_uid}..{r.max_uid}")
    if r.missing_image:
        lines.append(f"  images      PROBLEM: {r.missing_image} samples without an image")
    if r.label_counts:
        hist = " ".join(f"{k}:{v}" for k, v in sorted(r.label_counts.items()))
        lines.append(
            f"  labels      {len(r.label_counts)} classes: {hist}"
            + (f"; {r.unlabelled} unlabelled" if r.unlabelled else "")
        )
    else:
        lines.append("  labels      none")
    if r.noisy_known:
        lines.append(f"  noisy       {r.noisy} ({r.noisy_frac:.1%}) by ground truth")
    else:
        lines.append("  noisy       unknown (no `noisy` field: not noise-injected)")
    for folder_file in ("classnames.txt", "templates.txt"):
        path = r.folder / folder_file
        if path.is_file():
            n = len([x for x in path.read_text().splitlines() if x.strip()])
            lines.append(f"  {folder_file:<11} {n} lines")
    lines.append("  captions")
    for ex in r.examples:
        tag = "noisy" if ex["noisy"] else "clean" if ex["noisy"] is not None else "     "
        label = "" if ex["label"] is None else f" label {ex['label']}"
        lines.append(f"    [{tag}] uid {ex['uid']}{label}: {ex['caption'][:100]!r}")
        if ex["orig_caption"]:
            lines.append(f"            was: {ex['orig_caption'][:100]!r}")
    return lines
