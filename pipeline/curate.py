"""Export the curated subset a run's selection chose: the uids it would keep.

    dissect-curate runs/demo --out kept_uids.txt [--policy last|any|majority] [--after-warmup]

Reads the per-sample selection log (runs/<name>/selection/part-*.parquet, one row per scored
sample per step: step, epoch, uid, s, h, d, kept, noisy, warmup) and writes one uid per line.
Policies: `last` keeps a uid if its most recent decision was keep; `any` if it was ever kept;
`majority` if it was kept in at least half of its scorings. `--after-warmup` ignores the
random warm-up decisions. (`python -m pipeline.curate` is the same command. It parses its
arguments before importing pandas, so `--help` answers at once.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def load_selection_log(run_dir: Path):
    """Every part of the run's selection log as one pandas DataFrame."""
    import pandas as pd

    parts = sorted((Path(run_dir) / "selection").glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(
            f"{run_dir}/selection holds no selection log (was selection.log_samples off?)"
        )
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


def curate(run_dir: Path, policy: str = "last", after_warmup: bool = False) -> list[int]:
    log = load_selection_log(run_dir)
    if after_warmup:
        log = log[~log["warmup"]]
    if policy == "last":
        kept = log.sort_values("step").groupby("uid")["kept"].last()
    elif policy == "any":
        kept = log.groupby("uid")["kept"].any()
    elif policy == "majority":
        kept = log.groupby("uid")["kept"].mean() >= 0.5
    else:
        raise ValueError(f"policy must be last, any or majority, got {policy!r}")
    return sorted(int(u) for u in kept[kept].index)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dissect-curate", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="run directory (holds selection/part-*.parquet)")
    ap.add_argument("--out", required=True, help="file to write, one uid a line")
    ap.add_argument(
        "--policy",
        default="last",
        choices=["last", "any", "majority"],
        help="last: the latest decision was keep; any: ever kept; majority: kept at least half",
    )
    ap.add_argument(
        "--after-warmup", action="store_true", help="ignore the random warm-up decisions"
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        uids = curate(Path(args.run_dir), args.policy, args.after_warmup)
    except (FileNotFoundError, ValueError) as err:
        print(f"dissect-curate: error: {err}", file=sys.stderr)
        return 2
    Path(args.out).write_text("".join(f"{u}\n" for u in uids))
    print(f"{len(uids)} uids -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
