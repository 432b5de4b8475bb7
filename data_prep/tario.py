"""Reading webdataset shards sample by sample, and writing them reproducibly.

Reading is plain `tarfile` in streaming mode, grouped by key the way webdataset does it
(key = member path up to the first dot of its basename), so this package does not depend on
webdataset's pipeline internals. Writing goes through webdataset's `TarWriter` with a fixed
mtime, so the same samples give byte-identical tars.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import webdataset as wds

from data_prep import DataPrepError

# Tar member mtime, fixed for reproducible shards. An int: tarfile writes a PAX header (1 KiB)
# for every member whose mtime is a float.
FIXED_MTIME = 0


def split_member(name: str) -> tuple[str, str]:
    """`dir/00001.jpg` -> (`dir/00001`, `jpg`); `00001.seg.png` -> (`00001`, `seg.png`)."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext


def iter_samples(path: str | Path) -> Iterator[dict]:
    """Samples of one shard in file order: dicts of `__key__` and extension -> bytes."""
    try:
        with tarfile.open(path, mode="r|*") as tar:
            sample: dict = {}
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member(member.name)
                if sample and key != sample["__key__"]:
                    yield sample
                    sample = {}
                sample["__key__"] = key
                sample[ext] = tar.extractfile(member).read()
            if sample:
                yield sample
    except tarfile.TarError as err:
        raise DataPrepError(f"{path} is not a readable tar shard: {err}") from err


def sample_meta(sample: dict, shard: Path) -> dict:
    """The sample's json as a dict (DataPrepError naming the shard and key when absent)."""
    if "json" not in sample:
        raise DataPrepError(f"{shard}: sample {sample['__key__']} has no .json member")
    return json.loads(sample["json"])


def dumps_meta(meta: dict) -> bytes:
    return json.dumps(meta, ensure_ascii=False).encode("utf-8")


class ShardTarWriter:
    """webdataset TarWriter into `path` via a temporary name, renamed on close: a crash
    never leaves a half-written shard under its final name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self.writer = wds.TarWriter(str(self.tmp), encoder=False, mtime=FIXED_MTIME)
        self.count = 0

    def write(self, sample: dict) -> None:
        self.writer.write(sample)
        self.count += 1

    def close(self) -> None:
        self.writer.close()
        self.tmp.replace(self.path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.writer.close()
            self.tmp.unlink(missing_ok=True)
