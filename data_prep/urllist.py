"""Read and validate a url list, give every row a dataset-unique uid, and write the parquet
parts img2dataset downloads from.

A url list is one file (parquet, csv, tsv; `.gz` for csv/tsv) or a folder of such files.
Every row gets `uid` = its row index in the whole list (files in sorted order, rows counted
before anything is skipped), unless the list already has a `uid` column, which is then
checked: integers, non-negative, unique. uids are therefore stable across re-runs of the
same list, which is what lets incremental mode resume without re-numbering samples.

Rows that cannot become a training pair are dropped here, before download, and counted:
  - `missing_url`: null or blank url;
  - `unsupported_url_scheme`: anything but http(s):// (file:// would copy local files);
  - `empty_caption`: null or blank caption (an image with no text teaches a contrastive
    model nothing and would be a silent noisy pair). Their uids are simply never used.
Each dropped row is also listed (`PreparedList.dropped`: file, row, uid, url, reason) so that
it can be found and fixed; shard.py writes that list beside the shards.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep import DataPrepError

# suffix -> img2dataset/our input format name
_SUFFIX_FORMATS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".csv.gz": "csv",
    ".tsv": "tsv",
    ".tsv.gz": "tsv",
}
INPUT_FORMATS = ("parquet", "csv", "tsv")
DROPPED_COLUMNS = ("file", "row", "uid", "url", "reason")

# Columns img2dataset writes itself; a carried column must not collide with them.
RESERVED_COLUMNS = frozenset(
    {
        "key",
        "caption",
        "url",
        "width",
        "height",
        "original_width",
        "original_height",
        "status",
        "error_message",
        "exif",
        "md5",
        "sha256",
        "sha512",
    }
)


def infer_format(path: str | Path) -> str:
    """Input format from a file name (`x.parquet`, `x.csv`, `x.tsv.gz`, ...)."""
    name = Path(path).name.lower()
    for suffix, fmt in sorted(_SUFFIX_FORMATS.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(suffix):
            return fmt
    raise DataPrepError(
        f"cannot tell the format of url list {path}: expected a .parquet, .csv or .tsv file "
        "(or pass --input-format)"
    )


def list_input_files(path: str | Path, input_format: str | None = None) -> tuple[list[Path], str]:
    """The url list files (sorted) and their format. `path` is a file or a folder of files."""
    path = Path(path)
    if not path.exists():
        raise DataPrepError(f"url list not found: {path}")
    if input_format is not None and input_format not in INPUT_FORMATS:
        raise DataPrepError(
            f"input format must be one of {', '.join(INPUT_FORMATS)}, got {input_format!r}"
        )
    if path.is_file():
        return [path], input_format or infer_format(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if input_format is None:
        formats = {infer_format(p) for p in files if _has_known_suffix(p)}
        if len(formats) > 1:
            raise DataPrepError(
                f"url list folder {path} mixes formats {sorted(formats)}; pass --input-format"
            )
        input_format = formats.pop() if formats else None
    files = [p for p in files if _has_known_suffix(p) and infer_format(p) == input_format]
    if not files:
        raise DataPrepError(f"url list folder {path} holds no .parquet, .csv or .tsv files")
    return files, input_format


def _has_known_suffix(p: Path) -> bool:
    return any(p.name.lower().endswith(s) for s in _SUFFIX_FORMATS)


def read_table(path: Path, input_format: str) -> pd.DataFrame:
    """One url list file as a DataFrame (strings stay strings; no type guessing on ids)."""
    try:
        if input_format == "parquet":
            return pd.read_parquet(path)
        sep = "\t" if input_format == "tsv" else ","
        # keep_default_na=False: a caption "NA" or "null" is text, not a missing value;
        # an empty field still reads as "" and is caught as an empty caption.
        return pd.read_csv(
            path, sep=sep, keep_default_na=False, na_values=[], dtype_backend="numpy_nullable"
        )
    except (OSError, ValueError) as err:  # pyarrow/pandas parse errors are ValueError subclasses
        raise DataPrepError(f"cannot read url list {path} as {input_format}: {err}") from err


@dataclass
class PreparedList:
    """What `prepare_url_list` wrote: the folder of parquet parts img2dataset reads."""

    parts_dir: Path
    files: list[Path]  # the user's input files, in uid order
    input_format: str
    rows: int  # rows in the user's list
    kept: int  # rows handed to the downloader
    rows_per_part: list[int]  # kept rows per part, in part order (shard ids follow this)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows dropped before download
    # one row per dropped row: file, row (0-based data row in that file), uid, url, reason
    dropped: pd.DataFrame = field(default_factory=lambda: _dropped_frame([]))
    carried: list[str] = field(default_factory=list)  # columns written into each sample's json
    has_label: bool = False
    max_uid: int = -1
    fingerprint: str = ""  # sha256 over (uid, url, caption) of the kept rows


def prepare_url_list(
    urls: str | Path,
    parts_dir: str | Path,
    *,
    input_format: str | None = None,
    url_col: str = "url",
    caption_col: str = "caption",
    extra_cols: tuple[str, ...] | list[str] = (),
) -> PreparedList:
    """Validate the url list at `urls` and write one parquet part per input file to
    `parts_dir` with columns url, caption, uid, [label], extra columns."""
    files, input_format = list_input_files(urls, input_format)
    extra_cols = [c for c in dict.fromkeys(extra_cols) if c not in ("uid", "label")]
    bad = sorted(set(extra_cols) & RESERVED_COLUMNS)
    if bad:
        raise DataPrepError(f"cannot carry column(s) {bad}: img2dataset reserves these names")
    if url_col == caption_col:
        raise DataPrepError(f"url and caption column are both {url_col!r}")

    parts_dir = Path(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    for old in parts_dir.glob("*.parquet"):
        old.unlink()

    prepared = PreparedList(
        parts_dir=parts_dir,
        files=files,
        input_format=input_format,
        rows=0,
        kept=0,
        rows_per_part=[],
    )
    digest = hashlib.sha256()
    uids_seen: list[np.ndarray] = []
    label_flags: list[bool] = []
    frames: list[pd.DataFrame] = []
    dropped: list[pd.DataFrame] = []
    for path in files:
        df = read_table(path, input_format)
        missing = [c for c in [url_col, caption_col, *extra_cols] if c not in df.columns]
        if missing:
            raise DataPrepError(
                f"url list {path} has no column(s) {missing}; its columns are {list(df.columns)} "
                "(set --url-col / --caption-col / --extra-cols)"
            )
        uid = _uids(df, path, offset=prepared.rows)
        prepared.rows += len(df)
        label_flags.append("label" in df.columns)
        frames.append(
            _clean_part(df, path, uid, url_col, caption_col, extra_cols, prepared.skipped, dropped)
        )
        uids_seen.append(frames[-1]["uid"].to_numpy())

    prepared.dropped = _dropped_frame(dropped)
    if prepared.rows == 0:
        raise DataPrepError(f"url list {urls} is empty (no rows)")
    all_uids = np.concatenate(uids_seen)
    if len(all_uids) == 0:
        raise DataPrepError(
            f"url list {urls}: none of its {prepared.rows} rows has both a url and a caption "
            f"(skipped: {prepared.skipped})"
        )
    uniq, counts = np.unique(all_uids, return_counts=True)
    if len(uniq) != len(all_uids):
        raise DataPrepError(
            f"url list {urls}: uid column has duplicates, e.g. {uniq[counts > 1][:5].tolist()}"
        )
    if any(label_flags) and not all(label_flags):
        raise DataPrepError(f"url list {urls}: some files have a label column and some do not")
    prepared.has_label = all(label_flags)
    prepared.max_uid = int(all_uids.max())
    prepared.carried = ["uid"] + (["label"] if prepared.has_label else []) + extra_cols

    for i, df in enumerate(frames):
        df = df[[url_col, caption_col, *prepared.carried]]
        # the fingerprint ties finished shards to this exact list (see shard.py, incremental mode)
        digest.update(
            pd.util.hash_pandas_object(df[["uid", url_col, caption_col]], index=False)
            .to_numpy()
            .tobytes()
        )
        df.to_parquet(parts_dir / f"part-{i:05d}.parquet", index=False)
        prepared.rows_per_part.append(len(df))
        prepared.kept += len(df)
    prepared.fingerprint = digest.hexdigest()
    return prepared


def _uids(df: pd.DataFrame, path: Path, offset: int) -> np.ndarray:
    if "uid" not in df.columns:
        return np.arange(offset, offset + len(df), dtype=np.int64)
    col = df["uid"]
    if col.isna().any():
        raise DataPrepError(f"url list {path}: uid column has missing values")
    values = pd.to_numeric(col, errors="coerce")
    if values.isna().any() or not np.all(np.asarray(values, dtype=np.float64) % 1 == 0):
        raise DataPrepError(f"url list {path}: uid column must hold integers")
    values = np.asarray(values, dtype=np.int64)
    if (values < 0).any():
        raise DataPrepError(
            f"url list {path}: uid column must be non-negative (found {values.min()})"
        )
    return values


def _dropped_frame(parts: list[pd.DataFrame]) -> pd.DataFrame:
    if not parts:
        return pd.DataFrame(
            {
                "file": pd.Series([], dtype=object),
                "row": pd.Series([], dtype=np.int64),
                "uid": pd.Series([], dtype=np.int64),
                "url": pd.Series([], dtype=object),
                "reason": pd.Series([], dtype=object),
            }
        )
    return pd.concat(parts, ignore_index=True)


def _clean_part(df, path, uid, url_col, caption_col, extra_cols, skipped, dropped) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            url_col: df[url_col].astype("string").str.strip(),
            caption_col: df[caption_col].astype("string"),
            "uid": uid,
        }
    )
    if "label" in df.columns:
        label = pd.to_numeric(df["label"], errors="coerce")
        bad = label.notna() & (label % 1 != 0)
        bad |= df["label"].notna() & label.isna() & (df["label"].astype("string").str.strip() != "")
        if bad.any():
            raise DataPrepError(
                f"url list {path}: label column must hold integers (row {int(np.flatnonzero(bad)[0])})"
            )
        out["label"] = label.fillna(-1).astype(np.int64)  # -1: unlabelled, as in the trainer
    for c in extra_cols:
        out[c] = df[c]
    no_url = out[url_col].isna() | (out[url_col] == "")
    # only http(s): urllib would also open file:// (and ftp://) urls, copying local files
    # into shards that get shared; such rows are dropped and counted, never fetched
    bad_scheme = ~no_url & ~out[url_col].str.lower().str.match(r"^https?://").fillna(False).astype(
        bool
    )
    no_url = no_url | bad_scheme
    no_caption = ~no_url & (out[caption_col].isna() | (out[caption_col].str.strip() == ""))
    reasons = np.full(len(out), None, dtype=object)
    for reason, mask in (
        ("missing_url", no_url & ~bad_scheme),
        ("unsupported_url_scheme", bad_scheme),
        ("empty_caption", no_caption),
    ):
        if mask.any():
            skipped[reason] = skipped.get(reason, 0) + int(mask.sum())
            reasons[mask.to_numpy(dtype=bool)] = reason
    rows = np.flatnonzero(pd.notna(reasons))
    if len(rows):
        urls = out[url_col].iloc[rows]
        dropped.append(
            pd.DataFrame(
                {
                    "file": str(path),
                    "row": rows.astype(np.int64),  # in file order
                    "uid": out["uid"].to_numpy()[rows].astype(np.int64),
                    "url": urls.astype(object).where(urls.notna(), None).to_numpy(),
                    "reason": reasons[rows],
                }
            )
        )
    out = out[~(no_url | no_caption)].reset_index(drop=True)
    # plain object strings: img2dataset hands these to urllib and json.dumps
    out[url_col] = out[url_col].astype(object)
    out[caption_col] = out[caption_col].astype(object)
    return out
