"""Run a command line (a training run, torchrun with its ranks) with a hard timeout.

    p = run_cmd([sys.executable, "-m", "pipeline.train", ...], timeout=120)

The command gets its own process group, and a timeout kills the whole group: torchrun's ranks
are grandchildren, and killing only torchrun would leave them running (and holding CPUs).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def torchrun(nproc: int) -> list[str]:
    # --standalone: torchrun picks a free port, so parallel test runs never collide
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc)]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_cmd(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run to completion; on timeout kill the process group and raise TimeoutExpired."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def start_cmd(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start in the background (own process group), stdout+stderr to ``log``."""
    f = open(log, "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_group(p: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass
    p.wait(timeout=30)
