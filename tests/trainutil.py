"""Run the real entry point (`python -m pipeline.train`, or torchrun for several ranks) with a timeout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from procutil import ROOT, run_cmd, torchrun

CONFIG = str(ROOT / "configs" / "tiny-cpu.yaml")


def run_train(overrides: list[str], nproc: int = 1, timeout: float = 240, check: bool = True):
    """On timeout the whole process tree is killed (torchrun's ranks too) and TimeoutExpired raised."""
    launcher = [sys.executable] if nproc == 1 else [*torchrun(nproc)]
    cmd = [*launcher, "-m", "pipeline.train", "--config", CONFIG, *overrides]
    proc = run_cmd(cmd, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_rows(run_dir: Path) -> list[dict]:
    return [m for m in metrics(run_dir) if "loss" in m]
