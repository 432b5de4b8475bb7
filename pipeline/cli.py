"""Entry points of `dissect-eval` and `dissect-export`: parse, then import the heavy modules.

Argument parsing needs nothing but the standard library, so `--help` and a usage error answer
at once, even on a loaded machine; torch, open_clip and deepspeed are imported only for real
work. (`dissect-train` does the same in pipeline/train.py.)
"""

from __future__ import annotations

import argparse
import sys


def eval_parser() -> argparse.ArgumentParser:
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


def export_parser() -> argparse.ArgumentParser:
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


def eval_main(argv: list[str] | None = None) -> int:
    args = eval_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from pipeline.evaluate import run

    return run(args)


def export_main(argv: list[str] | None = None) -> int:
    args = export_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from pipeline.export import run

    return run(args)
