"""url list -> webdataset shards with img2dataset, then `manifest.json` beside them.

img2dataset does the downloading, resizing and tar writing; this module decides what it is
given (a validated url list with a `uid` per row) and reads back what it did (its per-shard
`NNNNN_stats.json` and `NNNNN.parquet`) into one manifest.

Each written sample is `NNNNN.tar` members `<key>.jpg` (or .png/.webp: the encode format),
`<key>.txt` (caption), `<key>.json` (img2dataset's metadata plus `uid`, `label` when the list
has one, and any extra columns).

Beside the shards: `NNNNN.parquet` (img2dataset's status and error message for every row it
tried), `dropped.parquet` (the rows dropped before download, with the reason),
`img2dataset.log` (everything img2dataset printed; the terminal only gets its errors, see
chatter.py) and `manifest.json`.

Incremental mode is img2dataset's: a shard whose `_stats.json` exists is finished and is not
downloaded again; an interrupted shard has no stats file and is redone from scratch. Shard
boundaries depend on the list and on samples-per-shard, so both are recorded in
`.input-fingerprint` and a resume with a different list or shard size is refused.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from data_prep import DataPrepError
from data_prep.chatter import LOG, ShardProgress, folded_output
from data_prep.urllist import INPUT_FORMATS, PreparedList, prepare_url_list
from dissect_common.manifest import MANIFEST, error_category, new_manifest, write_manifest

# No .json suffix: img2dataset treats every *.json in the output folder as a shard's stats.
FINGERPRINT = ".input-fingerprint"
DROPPED = "dropped.parquet"  # rows dropped before download: file, row, uid, url, reason
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
MODES = ("incremental", "overwrite")
OOM_SHARD_COUNT = 5  # shard names 00000.tar ... 99999.tar
# encode format -> (lowest, highest, default) encode quality. jpg and webp: OpenCV's quality
# scales; png: the zlib compression level (lossless at any level; 9 costs little more CPU than
# 6 on photos). img2dataset's single default, 95, is out of range for png.
ENCODE_QUALITY = {"jpg": (0, 100, 95), "png": (0, 9, 9), "webp": (1, 100, 95)}
# what img2dataset writes per shard
_SHARD_FILE = re.compile(r"^\d+(\.tar|\.parquet|_stats\.json)$")


@dataclass
class ShardConfig:
    """The img2dataset settings users tune. Defaults suit web lists on a small machine."""

    input_format: str | None = None  # parquet | csv | tsv; None: from the file extension
    url_col: str = "url"
    caption_col: str = "caption"
    extra_cols: tuple[str, ...] = ()  # carried into each sample's json (uid, label always are)
    image_size: int = 256
    resize_mode: str = "border"  # one of RESIZE_MODES (img2dataset's)
    encode_format: str = "jpg"  # jpg | png | webp
    encode_quality: int | None = None  # None: the format's default (ENCODE_QUALITY)
    samples_per_shard: int = 10000
    processes: int = field(default_factory=lambda: os.cpu_count() or 1)
    threads: int = 64  # per process; web latency bound, not CPU bound
    timeout: float = 10.0  # seconds per request
    retries: int = 0  # extra attempts per url
    mode: str = "incremental"  # incremental: keep finished shards; overwrite: start over
    min_image_size: int = 0  # drop images whose smaller side is below this (pixels)
    exif: bool = False  # img2dataset's EXIF extraction (large json, rarely useful)

    def __post_init__(self):
        self.extra_cols = tuple(self.extra_cols)
        if self.input_format is not None and self.input_format not in INPUT_FORMATS:
            raise DataPrepError(
                f"input_format must be one of {INPUT_FORMATS}, got {self.input_format!r}"
            )
        if self.resize_mode not in RESIZE_MODES:
            raise DataPrepError(
                f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}"
            )
        if self.mode not in MODES:
            raise DataPrepError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.encode_format not in ENCODE_QUALITY:
            raise DataPrepError(
                f"encode_format must be jpg, png or webp, got {self.encode_format!r}"
            )
        # checked here: img2dataset checks png only, and only inside its run, where the
        # ValueError arrives as a traceback followed by its logger process's own
        lo, hi, _ = ENCODE_QUALITY[self.encode_format]
        if self.encode_quality is not None and not lo <= self.encode_quality <= hi:
            what = "compression level" if self.encode_format == "png" else "quality"
            raise DataPrepError(
                f"encode quality for {self.encode_format} is its {what} and must be "
                f"{lo}..{hi}, got {self.encode_quality}"
            )
        for name in ("image_size", "samples_per_shard", "processes", "threads"):
            if getattr(self, name) < 1:
                raise DataPrepError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.samples_per_shard > 10**6:
            raise DataPrepError("samples_per_shard must be <= 1000000 (img2dataset key width)")
        if self.timeout <= 0:
            raise DataPrepError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.retries < 0:
            raise DataPrepError(f"retries must be >= 0, got {self.retries}")

    @property
    def quality(self) -> int:
        """The encode quality used: the one asked for, or the encode format's default."""
        if self.encode_quality is not None:
            return self.encode_quality
        return ENCODE_QUALITY[self.encode_format][2]


def shard_urls(
    urls: str | Path,
    out: str | Path,
    config: ShardConfig | None = None,
    *,
    build: dict | None = None,
    **overrides,
) -> dict:
    """Download the url list `urls` (file or folder) into webdataset shards in `out`.

    `config` fields can also be given as keyword overrides (`shard_urls(u, o, image_size=64)`).
    `build` is stored verbatim in the manifest (callers record what produced the shards).
    Returns the manifest (also written to `out/manifest.json`). Raises DataPrepError on bad
    input; failed downloads are not errors, they are counted in the manifest.
    """
    config = ShardConfig(**{**(asdict(config) if config else {}), **overrides})
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise DataPrepError(f"--out {out} exists and is not a folder")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="dissect-prep-") as tmp:
        prepared = prepare_url_list(
            urls,
            Path(tmp) / "parts",
            input_format=config.input_format,
            url_col=config.url_col,
            caption_col=config.caption_col,
            extra_cols=config.extra_cols,
        )
        expected = _expected_shards(prepared, config.samples_per_shard)
        if config.mode == "overwrite":
            _clear_shards(out)
        _check_resume(out, prepared, config)
        (out / MANIFEST).unlink(missing_ok=True)  # img2dataset would read it as shard stats
        out.mkdir(parents=True, exist_ok=True)
        foreign = [p.name for p in out.glob("*.json") if not _SHARD_FILE.match(p.name)]
        if foreign:
            raise DataPrepError(
                f"{out} holds {foreign[:3]}: img2dataset reads every *.json in its "
                "output folder as shard stats; move them or pick another --out"
            )
        (out / FINGERPRINT).write_text(json.dumps(_fingerprint(prepared, config)) + "\n")
        prepared.dropped.to_parquet(out / f"{DROPPED}.tmp", index=False)
        (out / f"{DROPPED}.tmp").replace(out / DROPPED)
        todo = len(expected) - sum((out / f"{n}_stats.json").exists() for n in expected)
        print(
            f"dissect-prep: downloading {prepared.kept} urls into {todo} shards "
            f"({config.processes} process{'es' if config.processes > 1 else ''} x "
            f"{config.threads} threads); "
            f"img2dataset's output goes to {out / LOG}",
            flush=True,
        )
        with folded_output(out, ShardProgress(out, expected)):
            _run_img2dataset(prepared, out, config)
    _drop_unfinished(out, expected)
    manifest = _download_manifest(out, prepared, config, expected, started, build)
    write_manifest(out, manifest)
    return manifest


def _clear_shards(out: Path) -> None:
    """Delete what a previous run wrote, and nothing else (img2dataset's own overwrite mode
    deletes the whole folder, which is a bad surprise when --out is a folder with other files)."""
    if not out.is_dir():
        return
    for path in out.iterdir():
        if path.is_file() and (
            _SHARD_FILE.match(path.name) or path.name in (MANIFEST, FINGERPRINT, DROPPED, LOG)
        ):
            path.unlink()
    shutil.rmtree(out / "_tmp", ignore_errors=True)


def _expected_shards(prepared: PreparedList, samples_per_shard: int) -> list[str]:
    # img2dataset numbers shards consecutively over the input files, each file starting a new shard
    n = sum(math.ceil(rows / samples_per_shard) for rows in prepared.rows_per_part)
    return [f"{i:0{OOM_SHARD_COUNT}d}" for i in range(n)]


def _fingerprint(prepared: PreparedList, config: ShardConfig) -> dict:
    return {
        "fingerprint": prepared.fingerprint,
        "samples_per_shard": config.samples_per_shard,
        "carried": prepared.carried,
    }


def _check_resume(out: Path, prepared: PreparedList, config: ShardConfig) -> None:
    if config.mode != "incremental" or not out.is_dir():
        return
    finished = list(out.glob("*_stats.json"))
    if not finished:
        return
    recorded = None
    if (out / FINGERPRINT).is_file():
        recorded = json.loads((out / FINGERPRINT).read_text())
    if recorded != _fingerprint(prepared, config):
        raise DataPrepError(
            f"{out} already holds {len(finished)} finished shards from a different url list or "
            "samples-per-shard; resuming would mix them. Use --mode overwrite or another --out"
        )
    print(
        f"dissect-prep: resuming in {out}: {len(finished)} shards already finished are kept",
        flush=True,
    )


def _run_img2dataset(prepared: PreparedList, out: Path, config: ShardConfig) -> None:
    from img2dataset import download  # heavy import (cv2, albumentations, wandb): only here

    # img2dataset installs a SIGINT handler that exits with status 0; put ours back after it
    previous_sigint = signal.getsignal(signal.SIGINT)
    try:
        download(
            url_list=str(prepared.parts_dir),
            input_format="parquet",
            url_col=config.url_col,
            caption_col=config.caption_col,
            save_additional_columns=list(prepared.carried),
            output_folder=str(out),
            output_format="webdataset",
            image_size=config.image_size,
            resize_mode=config.resize_mode,
            encode_format=config.encode_format,
            encode_quality=config.quality,
            number_sample_per_shard=config.samples_per_shard,
            oom_shard_count=OOM_SHARD_COUNT,
            processes_count=config.processes,
            thread_count=config.threads,
            timeout=config.timeout,
            retries=config.retries,
            incremental_mode="incremental",  # overwrite already emptied the folder above
            min_image_size=config.min_image_size,
            extract_exif=config.exif,
            compute_hash=None,  # a sha256 per image costs CPU and nothing here reads it
            distributor="multiprocessing",
        )
    except SystemExit as err:
        # img2dataset's SIGINT handler: sys.exit(0) after stopping its logger. Without this a
        # Ctrl-C would end the command silently with status 0, as if it had finished
        raise KeyboardInterrupt from err
    finally:
        signal.signal(signal.SIGINT, previous_sigint)


def _drop_unfinished(out: Path, expected: list[str]) -> None:
    """A shard without its stats file was interrupted: its tar is partial. Remove it so no
    reader globbing *.tar sees half a shard; the next incremental run redoes it."""
    for name in expected:
        if not (out / f"{name}_stats.json").exists():
            for suffix in (".tar", ".parquet"):
                (out / f"{name}{suffix}").unlink(missing_ok=True)


def _download_manifest(
    out: Path,
    prepared: PreparedList,
    config: ShardConfig,
    expected: list[str],
    started: float,
    build: dict | None,
) -> dict:
    shards, missing = [], []
    failures: Counter = Counter(prepared.skipped)
    errors: Counter = Counter()
    labels: Counter | None = Counter() if prepared.has_label else None
    max_uid = -1
    for name in expected:
        stats_path = out / f"{name}_stats.json"
        if not stats_path.exists():
            missing.append(f"{name}.tar")
            continue
        stats = json.loads(stats_path.read_text())
        shards.append(
            {"name": f"{name}.tar", "samples": int(stats["successes"]), "rows": int(stats["count"])}
        )
        for message, count in stats["status_dict"].items():
            if message != "success":
                errors[message] += count
                failures[error_category(message)] += count
        meta = pq.read_table(
            out / f"{name}.parquet",
            columns=["status", "uid"] + (["label"] if labels is not None else []),
        )
        meta = meta.to_pandas()
        ok = meta[meta["status"] == "success"]
        if len(ok):
            max_uid = max(max_uid, int(ok["uid"].max()))
        if labels is not None:
            labels.update(ok["label"].astype(int).tolist())
    samples = sum(s["samples"] for s in shards)
    return new_manifest(
        "download",
        shards,
        max_uid=max_uid,
        label_counts=labels,
        noisy=0,
        complete=not missing,
        build=build,
        input={
            "path": str(
                Path(prepared.files[0])
                if len(prepared.files) == 1
                else Path(prepared.files[0]).parent
            ),
            "format": prepared.input_format,
            "rows": prepared.rows,
            "kept": prepared.kept,
            "fingerprint": prepared.fingerprint,
        },
        success_rate=samples / prepared.rows if prepared.rows else 0.0,
        failures=dict(failures.most_common()),
        errors=dict(errors.most_common(20)),
        missing_shards=missing,
        dropped_file=DROPPED,
        carried_columns=prepared.carried,
        params={
            **{k: v for k, v in asdict(config).items() if k not in ("input_format",)},
            "encode_quality": config.quality,
        },
        duration_s=round(time.time() - started, 2),
    )
