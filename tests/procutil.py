"""Run a command line (a training run, torchrun with its ranks) with a hard timeout.

    p = run_cmd([sys.executable, "-m", "pipeline.train", ...], timeout=120)

A timeout (or ``kill_tree``) kills the whole process tree: torchrun starts every rank in a
session of its own, so neither killing torchrun nor its process group reaches the ranks, which
would go on training (and writing the run directory) as orphans.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil  # a DeepSpeed dependency

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def torchrun(nproc: int) -> list[str]:
    # --standalone: torchrun picks a free port, so parallel test runs never collide
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc)]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_cmd(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run to completion; on timeout kill the process group and raise TimeoutExpired."""
    p = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_tree(p.pid)
        p.communicate()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _tree(pid: int) -> list[psutil.Process]:
    """``pid``'s descendants (ranks first), then ``pid``; listed before any signal, since once
    torchrun dies its ranks are re-parented and no longer found as its descendants."""
    try:
        root = psutil.Process(pid)
        return [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return []


def _signal_all(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal ``pid`` and every descendant (the ranks first), as a preemption would."""
    _signal_all(_tree(pid), sig)


def stop_tree(pid: int, grace: float = 5.0) -> None:
    """SIGTERM to ``pid`` and every descendant, then SIGKILL to whatever is left after ``grace`` s."""
    procs = _tree(pid)
    _signal_all(procs, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    _signal_all(alive, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=grace)


def default_signals() -> None:
    """For ``preexec_fn``: HUP, INT and TERM at their defaults in the child.

    A signal ignored when a process starts stays ignored in everything it runs, and bash cannot
    trap it: under `nohup` (HUP) or started with `&` from a script (INT) the suite would pass
    that on, and the tests that signal a launcher would test the harness instead.
    """
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def start_cmd(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start in the background, stdout+stderr to ``log``."""
    f = open(log, "w")
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=_env(),
        stdout=f,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=default_signals,
    )


def kill_all(p: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    kill_tree(p.pid, sig)
    p.wait(timeout=30)
