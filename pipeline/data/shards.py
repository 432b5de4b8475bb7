"""Shard listing and dataset manifests.

A shard spec is a path, a brace pattern (``data/train/{00000..00099}.tar``) or a directory
(every ``*.tar`` in it). data_prep writes ``manifest.json`` beside the shards with the sample
count and the largest uid; we read it, through the shared reader (dissect_common.manifest),
to size epochs and the score store. A manifest is optional here (tars are counted without one) and any version is read.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import braceexpand

from dissect_common.errors import DataPrepError
from dissect_common.manifest import load_manifest, shard_samples
from pipeline.config import ConfigError


def expand_shards(specs: list[str] | str) -> list[str]:
    """Every shard named by the specs, in order; a clear error for anything missing."""
    if isinstance(specs, str):
        specs = [specs]
    urls: list[str] = []
    for spec in specs:
        for item in braceexpand.braceexpand(spec):
            p = Path(item)
            if p.is_dir():
                found = sorted(str(t) for t in p.glob("*.tar"))
                if not found:
                    raise ConfigError(f"shard directory {item!r} holds no .tar shards")
                urls.extend(found)
            elif p.is_file():
                urls.append(str(p))
            elif "://" in item or item.startswith("pipe:"):
                urls.append(item)  # remote or piped shards are checked when opened
            else:
                raise ConfigError(f"shard {item!r} does not exist (from spec {spec!r})")
    if not urls:
        raise ConfigError(f"shard spec {specs!r} names no shards")
    return urls


def manifest_dirs(urls: list[str]) -> list[Path]:
    dirs: list[Path] = []
    for u in urls:
        d = Path(u).parent
        if d not in dirs:
            dirs.append(d)
    return dirs


def read_manifests(urls: list[str]) -> list[dict]:
    """The manifests of the folders holding these shards (folders without one are passed over)."""
    out = []
    for d in manifest_dirs(urls):
        try:
            m = load_manifest(d)
        except DataPrepError as err:
            raise ConfigError(str(err)) from None
        if m is not None:
            out.append(m)
    return out


def _shard_counts(manifests: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in manifests:
        counts.update(shard_samples(m))
    return counts


def count_samples(urls: list[str]) -> int:
    """Samples in these shards: from manifests when they cover every shard, else by reading tars."""
    per_shard = _shard_counts(read_manifests(urls))
    total = 0
    for u in urls:
        name = Path(u).name
        if name in per_shard:
            total += per_shard[name]
            continue
        try:
            with tarfile.open(u) as tf:
                keys = {m.name.split(".", 1)[0] for m in tf.getmembers() if m.isfile()}
        except (OSError, tarfile.TarError) as err:
            raise ConfigError(f"cannot read shard {u!r}: {err}") from None
        total += len(keys)
    return total


def max_uid(urls: list[str]) -> int | None:
    """Largest uid per the manifests, or None when no manifest gives one."""
    vals = [int(m["max_uid"]) for m in read_manifests(urls) if "max_uid" in m]
    return max(vals) if vals else None


def read_lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def zeroshot_meta(spec: str) -> tuple[list[str], list[str]] | None:
    """(classnames, templates) from beside the val shards, or None when the set has none."""
    urls = expand_shards(spec)
    d = Path(urls[0]).parent
    cn, tp = d / "classnames.txt", d / "templates.txt"
    if not cn.is_file():
        return None
    templates = read_lines(tp) if tp.is_file() else ["a photo of a {}."]
    for t in templates:
        if "{}" not in t and "{c}" not in t:
            raise ConfigError(f"template {t!r} in {tp} has no '{{}}' for the class name")
    classnames = read_lines(cn)
    # an empty file would only fail at the first evaluation, after hours of training
    for path, lines in ((cn, classnames), (tp, templates)):
        if not lines:
            raise ConfigError(f"{path} is empty: one {path.stem[:-1]} a line is needed")
    return classnames, templates
