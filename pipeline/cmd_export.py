"""`dissect-export` (also `python -m pipeline.cmd_export`): parse, then import the heavy modules.

Argument parsing needs nothing but the standard library, so `--help` and a usage error answer
at once; torch, open_clip and deepspeed are imported (in `pipeline.export`) only for real work.
"""

from __future__ import annotations

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dissect-export",
        description="A run's trained weights for open_clip (a folder for its local-dir: loader).",
    )
    ap.add_argument("run_dir", help="run directory (holds config.yaml and checkpoints/)")
    ap.add_argument(
        "--out",
        required=True,
        help="folder for open_clip's local-dir: loader (or a .pt file: the state dict only)",
    )
    ap.add_argument(
        "--tag",
        help="checkpoint tag (step_00000100), 'latest' or a checkpoint dir "
        "(default: the latest complete checkpoint)",
    )
    ap.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="skip the weights_only vetting of DeepSpeed's optimizer files",
    )
    ap.add_argument(
        "--no-verify", action="store_true", help="skip loading the result through open_clip"
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    from pipeline.export import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
