"""Run the real entry point (`python -m pipeline.train`, or torchrun for several ranks) with a timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from distutil import free_port

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "tiny-cpu.yaml")


def run_train(overrides: list[str], nproc: int = 1, timeout: float = 240, check: bool = True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if nproc == 1:
        cmd = [sys.executable, "-m", "pipeline.train", "--config", CONFIG, *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "pipeline.train", "--config", CONFIG, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_rows(run_dir: Path) -> list[dict]:
    return [m for m in metrics(run_dir) if "loss" in m]
