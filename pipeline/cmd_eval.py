"""`dissect-eval` (also `python -m pipeline.cmd_eval`): parse, then import the heavy modules.

Argument parsing needs nothing but the standard library, so `--help` and a usage error answer
at once, even on a loaded machine; torch and open_clip are imported (in `pipeline.evaluate`)
only for real work. Every console script follows this pattern: `pipeline/train.py`,
`pipeline/cmd_export.py`, `pipeline/curate.py`, `data_prep/cli.py`.
"""

from __future__ import annotations

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dissect-eval",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Zero-shot classification and image-text retrieval of trained weights.",
    )
    ap.add_argument("--run", help="run directory (uses its model.pt and config's val sets)")
    ap.add_argument("--checkpoint", help="a dissect-export folder, or a state dict with --model")
    ap.add_argument("--model", help="open_clip model name (with a state-dict --checkpoint)")
    ap.add_argument(
        "--val", default="", help="val shards (zero-shot if classnames.txt is beside them)"
    )
    ap.add_argument("--val-retrieval", default="", help="a retrieval-only val set")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--max-samples", type=int, default=0, help="0: every val sample")
    ap.add_argument("--out", help="write the metrics as JSON here")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    from pipeline.evaluate import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
