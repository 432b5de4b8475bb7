"""`manifest.json`: what a shard folder holds, written beside the shards.

Fields every manifest has (both `kind`s):
  version        1
  kind           "download" (written by `shard`/img2dataset) or "noise" (by `noise`)
  created        UTC time, ISO 8601
  complete       true when every expected shard finished
  shards         [{"name": "00000.tar", "samples": 1000}, ...] in name order
  num_shards, total (samples), max_uid (-1 when empty)
  label_counts   {"0": 6000, ...} over written samples, or null when the list had no labels
  noisy          samples with `noisy: true` (0 for clean downloads)
  noise_rate     noisy / total
  build          free-form parameters of whoever built it (the demo stores its settings here)
kind "download" adds:
  input          {"path", "format", "rows", "kept", "fingerprint"}
  success_rate   total / input rows (rows skipped before download count as failures)
  failures       {category: count}: http_404, timeout, not_an_image, connection_error, ...,
                 plus empty_caption / missing_url / unsupported_url_scheme for rows dropped before download
  errors         the raw img2dataset error messages with counts (the 20 most frequent)
  missing_shards shard names that did not finish (re-run the same command to finish them)
  dropped_file   the file beside the shards listing each row dropped before download
                 (file, row, uid, url, reason); img2dataset's own `NNNNN.parquet` beside each
                 shard has every downloaded row's status and error_message
  params         the img2dataset settings used; duration_s
kind "noise" adds:
  source         the clean shard folder; noise: {"rate" (all kinds), "mix" and "counts" (per
                 kind: swap, unrelated, partial), "seed", "realised_rate", "tolerance"}
"""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from dissect_common.errors import DataPrepError

MANIFEST = "manifest.json"
# failure categories of rows dropped before download (urllist.py), not by img2dataset
DROPPED_REASONS = ("missing_url", "unsupported_url_scheme", "empty_caption")
VERSION = 1


def shard_paths(folder: str | Path) -> list[Path]:
    """The `.tar` shards directly inside `folder`, in name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataPrepError(f"not a folder: {folder}")
    return sorted(p for p in folder.glob("*.tar") if p.is_file())


def brace_spec(folder: str | Path) -> str:
    """A webdataset shard spec for the folder, e.g. `data/fmnist/train/{00000..00011}.tar`.

    Uses the manifest's shard list; falls back to a plain listing when the names are not
    one contiguous numbered run (then the spec is a `::`-joined list, which webdataset's
    `expand_urls` also accepts)."""
    folder = Path(folder)
    names = [s["name"] for s in read_manifest(folder)["shards"]]
    stems = [Path(n).stem for n in names]
    if stems and all(s.isdigit() and len(s) == len(stems[0]) for s in stems):
        first, last = int(stems[0]), int(stems[-1])
        if [int(s) for s in stems] == list(range(first, last + 1)):
            if first == last:
                return str(folder / names[0])
            width = len(stems[0])
            return f"{folder}/{{{first:0{width}d}..{last:0{width}d}}}.tar"
    return "::".join(str(folder / n) for n in names)


def load_manifest(folder: str | Path) -> dict | None:
    """The manifest of a shard folder as written, or None when it has none.

    The one reader of the file. `read_manifest` (data_prep: the manifest must be there, and be
    one this code wrote) and `pipeline.data.shards` (training: optional, it sizes epochs and the
    score store; `shard_samples` and `max_uid` are all it reads) both go through it.
    DataPrepError when the file is not valid JSON."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataPrepError(f"{path} is not valid JSON: {err}") from err


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a shard folder; DataPrepError when there is none."""
    path = Path(folder) / MANIFEST
    manifest = load_manifest(folder)
    if manifest is None:
        raise DataPrepError(
            f"no {MANIFEST} in {folder} (build it with dissect-prep shard/demo/noise)"
        )
    if manifest.get("version") != VERSION:
        raise DataPrepError(f"{path}: unknown manifest version {manifest.get('version')!r}")
    return manifest


def shard_samples(manifest: dict) -> dict[str, int]:
    """Shard file name -> samples in it, from the manifest's `shards` list (entries without a
    name are passed over; `count` is accepted for `samples`, as hand-written manifests have)."""
    counts: dict[str, int] = {}
    for s in manifest.get("shards", []):
        if isinstance(s, dict) and "name" in s:
            counts[Path(s["name"]).name] = int(s.get("samples", s.get("count", 0)))
    return counts


def write_manifest(folder: str | Path, manifest: dict) -> Path:
    """Write atomically (a reader never sees half a manifest)."""
    path = Path(folder) / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")  # not *.json: img2dataset globs *.json in the folder
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def new_manifest(
    kind: str,
    shards: list[dict],
    *,
    max_uid: int,
    label_counts: Counter | None,
    noisy: int,
    complete: bool = True,
    build: dict | None = None,
    **extra,
) -> dict:
    samples = sum(s["samples"] for s in shards)
    return {
        "version": VERSION,
        "kind": kind,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "complete": complete,
        "num_shards": len(shards),
        "total": samples,
        "max_uid": int(max_uid),
        "label_counts": None
        if label_counts is None
        else {str(k): int(v) for k, v in sorted(label_counts.items())},
        "noisy": int(noisy),
        "noise_rate": noisy / samples if samples else 0.0,
        "build": build or {},
        **extra,
        "shards": shards,
    }


_HTTP = re.compile(r"HTTP Error (\d+)")


def error_category(message: str) -> str:
    """Group img2dataset's free-text error messages into a few stable categories."""
    m = _HTTP.search(message)
    if m:
        return f"http_{m.group(1)}"
    low = message.lower()
    if "timed out" in low or "timeout" in low:
        return "timeout"
    if "decoding error" in low or "cannot identify image" in low:
        return "not_an_image"
    if "image too small" in low or "area too large" in low or "aspect ratio" in low:
        return "filtered_by_size"
    if "x-robots-tag" in low:
        return "disallowed_by_robots"
    if (
        "name or service not known" in low
        or "nodename nor servname" in low
        or "temporary failure in name" in low
    ):
        return "dns_error"
    if "ssl" in low or "certificate" in low:
        return "ssl_error"
    if "connection" in low or "urlopen error" in low or "remote end closed" in low:
        return "connection_error"
    if "hash mismatch" in low:
        return "hash_mismatch"
    return "other"


def summary_lines(manifest: dict, folder: str | Path) -> list[str]:
    """A one-screen summary of a manifest, for the terminal."""
    lines = [
        f"{folder}: {manifest['total']} samples in {manifest['num_shards']} shards"
        + ("" if manifest.get("complete", True) else "  (INCOMPLETE)")
    ]
    if manifest["kind"] == "download":
        inp = manifest["input"]
        lines.append(f"  input       {inp['path']} ({inp['format']}, {inp['rows']} rows)")
        lines.append(
            f"  success     {manifest['total']}/{inp['rows']} = {manifest['success_rate']:.1%}"
        )
        failures = manifest.get("failures", {})
        if failures:
            lines.append("  failures    " + ", ".join(f"{k}: {v}" for k, v in failures.items()))
            top = list(manifest.get("errors", {}).items())[:3]
            for msg, n in top:
                lines.append(f"    {n:>7}  {msg[:90]}")
        # where the failures are, row by row (manifests before dropped_file have no list)
        lines.append(
            f"  row status  {Path(folder) / 'NNNNN.parquet'} (img2dataset's status and "
            "error_message of each row it tried, one file per shard)"
        )
        if manifest.get("dropped_file"):
            dropped = sum(failures.get(k, 0) for k in DROPPED_REASONS)
            lines.append(
                f"  dropped     {Path(folder) / manifest['dropped_file']} ({dropped} rows dropped "
                "before download: file, row, uid, url, reason)"
            )
        if manifest.get("missing_shards"):
            lines.append(
                f"  unfinished  {len(manifest['missing_shards'])} shards: "
                + ", ".join(manifest["missing_shards"][:5])
                + (" ..." if len(manifest["missing_shards"]) > 5 else "")
            )
    if manifest["kind"] == "noise":
        nz = manifest["noise"]
        kinds = ", ".join(f"{v} {k}" for k, v in nz.get("counts", {}).items() if v) or "none"
        lines.append(
            f"  noise       {manifest['noisy']} of {manifest['total']} captions noisy ({kinds}; "
            f"rate {nz['realised_rate']:.4f}, asked {nz['rate']:g}, seed {nz['seed']}) "
            f"from {manifest['source']}"
        )
    if manifest.get("label_counts"):
        lines.append(
            f"  labels      {len(manifest['label_counts'])} classes: "
            + " ".join(f"{k}:{v}" for k, v in list(manifest["label_counts"].items())[:12])
        )
    lines.append(f"  max uid     {manifest['max_uid']}")
    return lines
