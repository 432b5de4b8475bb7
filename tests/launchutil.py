"""Shared by the tests of launch/ (test_launch_*.py): run a launcher with a clean environment
and a hard timeout, read back the command it printed, fake the binaries it calls.

Every subprocess runs in its own session; a timeout or a failed wait kills its whole process
tree (procutil.kill_tree: torchrun starts every rank in a session of its own, out of reach of a
process-group kill), so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from procutil import default_signals, kill_tree
from shardutil import write_digit_shards

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
CONFIG = str(ROOT / "configs" / "tiny-cpu.yaml")

# overrides a shell would mangle if a launcher did not quote them: they must arrive untouched
TRICKY = [
    "run.name=with space",
    "data.train=/d/{00000..00003}.tar",
    "optim.lr=$HOME",
    "log.every_steps=*",
]

# launch/env.sh settings and scheduler variables that must not leak in from the caller's shell
_LAUNCH_VARS = (
    "DISSECT_CHECK",
    "DISSECT_RDZV_TIMEOUT_S",
    "DISSECT_KILL_GRACE_S",
    "NPROC",
    "NPROC_PER_NODE",
    "LAUNCHER",
    "TORCHRUN",
    "DEEPSPEED",
    "PYTHON",
    "IFNAME",
    "NCCL_SOCKET_IFNAME",
    "GLOO_SOCKET_IFNAME",
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "DS_ENV_FILE",
    "LOG_DIR",
    "DRY_RUN",
)


def launch_env(**extra: str) -> dict:
    env = {
        k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith("SLURM_")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run(cmd: list, timeout: float, env: dict | None = None, cwd: Path = ROOT):
    """Run to completion; on timeout kill the whole process tree and fail."""
    p = subprocess.Popen(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env or launch_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_all([p])
        out, err = p.communicate()
        pytest.fail(
            f"{cmd[0]} timed out after {timeout}s\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
        )
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def start(cmd: list, log: Path, env: dict | None = None, cwd: Path = ROOT) -> subprocess.Popen:
    f = open(log, "w")
    return subprocess.Popen(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env or launch_env(),
        stdout=f,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=default_signals,
    )


def wait_all(procs: list[subprocess.Popen], timeout: float, logs: list[Path]) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(0.1, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        kill_all(procs)
        tails = "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in logs)
        pytest.fail(f"launch did not finish within {timeout}s\n{tails}")


def kill_all(procs: list[subprocess.Popen]) -> None:
    """SIGKILL each process's whole tree (the ranks too), then its session's group."""
    for p in procs:
        kill_tree(p.pid, signal.SIGKILL)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        p.wait(timeout=30)


def kill_procs(procs: list[psutil.Process]) -> None:
    """SIGKILL processes found earlier (ranks re-parented away from a dead launcher)."""
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (an orphan's zombie lingers where PID 1 does not reap)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def printed_cmd(stdout: str) -> list[str]:
    """The command a launcher printed ("+ ..." line), split back into its arguments."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("+ ")]
    assert len(lines) == 1, stdout
    return shlex.split(lines[0][2:])


def wait_for(cond, timeout: float, what: str, procs=(), logs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    kill_all(list(procs))
    tails = "\n".join(f"--- {log}\n{Path(log).read_text()[-3000:]}" for log in logs)
    pytest.fail(f"gave up waiting for {what}\n{tails}")


def train_workers(launcher_pid: int) -> list[psutil.Process]:
    """Rank processes under a launcher: torchrun starts each as `python -u -m pipeline.train ...`."""
    ranks = []
    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return ranks
    for k in children:
        try:
            if k.cmdline()[1:4] == ["-u", "-m", "pipeline.train"]:
                ranks.append(k)
        except psutil.NoSuchProcess:
            pass
    return ranks


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def write_fake(path: Path, body: str) -> Path:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


def make_shards(tmp_path_factory) -> Path:
    """Digit shards for real runs (each test module wraps this in a module-scoped fixture)."""
    d = tmp_path_factory.mktemp("launch_shards")
    write_digit_shards(d / "train", n_shards=4, per_shard=64, noise=0.2)
    write_digit_shards(
        d / "val", n_shards=1, per_shard=64, seed=1, uid_offset=10_000, with_val_meta=True
    )
    return d


def make_recorder(tmp_path: Path) -> tuple[Path, Path]:
    """A fake launcher binary that records its argv (one per line) instead of starting anything."""
    rec = tmp_path / "recorded"
    fake = write_fake(
        tmp_path / "fake-launcher", f'printf "%s\\n" "$@" > {shlex.quote(str(rec))}\n'
    )
    return fake, rec


def dissect_overrides(shards: Path, run_dir: Path) -> list[str]:
    # 2 ranks x super-batch 32 = 64 samples a step; 256 train samples = 4 steps an epoch
    return [
        f"data.train={shards / 'train'}",
        f"run.dir={run_dir}",
        "deepspeed.zero_stage=2",
        "selection.method=dissect",
        "selection.ratio=0.5",
        "data.batch_size=16",
        "selection.warmup_steps=4",
    ]


def entry_points(tmp_path: Path, fake: Path) -> tuple[dict, dict]:
    """Every launcher's command-line prefix (up to the config), with an environment in which
    torchrun, deepspeed and srun are ``fake`` and SLURM variables are set."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    write_fake(bin_dir / "srun", f'exec {shlex.quote(str(fake))} "$@"\n')
    write_fake(bin_dir / "scontrol", "echo localhost\n")
    env = launch_env(
        TORCHRUN=str(fake),
        DEEPSPEED=str(fake),
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID="7",
        SLURM_JOB_NUM_NODES="2",
        SLURM_SUBMIT_DIR=str(tmp_path),
    )
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    return env, {
        "single_node": [LAUNCH / "single_node.sh"],
        "multi_node deepspeed": [LAUNCH / "multi_node.sh", "deepspeed", "--hostfile", hostfile],
        "multi_node torchrun": [
            LAUNCH / "multi_node.sh",
            "torchrun",
            "--nnodes",
            "2",
            "--rdzv-endpoint",
            "127.0.0.1:29400",
        ],
        "slurm": ["bash", LAUNCH / "slurm.sbatch"],
    }


ENTRIES = ["single_node", "multi_node deepspeed", "multi_node torchrun", "slurm"]
