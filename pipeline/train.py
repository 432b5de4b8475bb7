"""`dissect-train --config FILE [key=value ...]` (also `python -m pipeline.train`).

Launch one process, or many through torchrun / the deepspeed launcher / launch/*.sh; each
process runs this same entry point. Bad configuration fails before any work with one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import _env


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="dissect-train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="YAML run config (see configs/)")
    ap.add_argument("--check", action="store_true", help="validate the config and paths, then exit")
    ap.add_argument(
        "--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS
    )  # deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    _env.die_with_parent()
    _env.quiet_duplicate_warnings()
    from pipeline.config import ConfigError, load_config

    try:  # the config alone first: a mistake in it answers before torch is even imported
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"dissect-train: config error: {err}", file=sys.stderr)
        return 2
    from pipeline import checkpoint as ckpt
    from pipeline.dist import init_distributed
    from pipeline.selection.store import StoreRangeError
    from pipeline.trainer import Trainer, TrainingError, plan_run, validate_paths

    try:
        if args.check:
            validate_paths(cfg)
            ckpt.resolve(cfg.checkpoint.resume, Path(cfg.run.dir) / "checkpoints")  # a bad path
            print(f"config ok: run.dir={cfg.run.dir}")
            return 0
        dist = init_distributed(cfg.deepspeed.timeout_s)
        plan = plan_run(cfg, dist)
        if plan.finished:  # a requeue or a re-run of a finished job: nothing is built
            if dist.is_main:
                print(
                    f"{cfg.run.dir} already finished at step {plan.resume_step}; nothing to "
                    f"train (its result: {cfg.run.dir}/eval.json)",
                    file=sys.stderr,
                )
            return 0
        Trainer(cfg, plan).train()
    except ConfigError as err:
        print(f"dissect-train: config error: {err}", file=sys.stderr)
        return 2
    except ckpt.CheckpointError as err:
        print(f"dissect-train: cannot resume: {err}", file=sys.stderr)
        return 2
    except (TrainingError, StoreRangeError) as err:
        print(f"dissect-train: stopped: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
