"""A first run and a re-run never hang: JIT build locks, launcher death, a finished run restarted.

Each training run here goes through the real entry point with a hard timeout that kills the
whole process tree, so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from procutil import ROOT, kill_tree, run_cmd, start_cmd, stop_tree, torchrun
from shardutil import write_digit_shards
from trainutil import CONFIG, train_rows

EXT_OP = "deepspeed_shm_comm"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("first") / "train"
    write_digit_shards(d, n_shards=4, per_shard=64)
    return d


def _ext_dir() -> Path:
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


# --- JIT cache ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_stale_build_lock_is_cleared_and_training_starts(shards, tmp_path):
    """A lock left by a killed build (no process holds it) is removed with a warning naming it."""
    built = _ext_dir() / EXT_OP
    if not any(built.glob("*.so")):
        pytest.skip("the comm op is not prebuilt (make setup builds it)")
    ext = tmp_path / "ext"
    shutil.copytree(built, ext / EXT_OP)
    lock = ext / EXT_OP / "lock"
    lock.write_text("")
    env_cmd = [
        "env",
        f"TORCH_EXTENSIONS_DIR={ext}",
        sys.executable,
        "-m",
        "pipeline.train",
        "--config",
        CONFIG,
        f"data.train={shards}",
        f"run.dir={tmp_path / 'run'}",
        "optim.max_steps=2",
        "eval.at_end=false",
        "log.tensorboard=false",
        # warm-up longer than the run: selection never starts, and the run says so
        "selection.method=dissect",
        "selection.ratio=0.5",
        "data.batch_size=16",
        "selection.warmup_steps=50",
    ]
    p = run_cmd(env_cmd, timeout=60)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"stale torch extensions build lock {lock}" in p.stderr
    assert not lock.exists()
    assert "selection never starts" in p.stderr


def _child_holding(path: Path) -> subprocess.Popen:
    code = f"import time; f = open({str(path)!r}); print('held', flush=True); time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.mark.timeout(60)
def test_a_lock_held_by_a_live_build_is_left_alone(tmp_path):
    from pipeline.engine import clear_stale_locks

    live, dead = tmp_path / "a" / "lock", tmp_path / "b" / "lock"
    for f in (live, dead):
        f.parent.mkdir()
        f.write_text("")
    holder = _child_holding(live)
    try:
        assert clear_stale_locks(tmp_path) == [dead]
        assert live.exists() and not dead.exists()
    finally:
        holder.kill()
        holder.wait()


_BUILDER = """
import sys, time
from pathlib import Path
from pipeline.engine import locked_build

ext, log = Path(sys.argv[1]), Path(sys.argv[2])

def fake_build():  # what torch does: a lock held open while compiling, then the .so
    lock = ext / "op" / "lock"
    lock.parent.mkdir(exist_ok=True)
    with open(lock, "x"):
        with open(log, "a") as f:
            f.write(f"start {time.time()}\\n")
        time.sleep(2)
        (ext / "op" / "op.so").touch()
    lock.unlink()
    with open(log, "a") as f:
        f.write(f"end {time.time()}\\n")

locked_build(ext, "op", fake_build)
"""


@pytest.mark.timeout(60)
def test_a_second_concurrent_build_waits_for_the_first(tmp_path):
    ext, log = tmp_path / "ext", tmp_path / "log"
    script = tmp_path / "builder.py"
    script.write_text(_BUILDER)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(ext), str(log)],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    errs = [p.communicate(timeout=45)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    events = [ln.split() for ln in log.read_text().splitlines()]
    assert [e[0] for e in events] == ["start", "end", "start", "end"]  # never interleaved
    assert float(events[2][1]) >= float(events[1][1])
    # only the first announced a build: the second found the op built when its turn came
    assert sum("building DeepSpeed's CPU comm op" in e for e in errs) == 1
    assert not any("stale" in e for e in errs)


# --- no orphans ----------------------------------------------------------------------------------


def _ranks_of(pid: int) -> list[psutil.Process]:
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [k for k in kids if "pipeline.train" in " ".join(k.cmdline())]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_sigkill_of_torchrun_leaves_no_rank_alive(shards, tmp_path):
    run = tmp_path / "run"
    p = start_cmd(
        [
            *torchrun(2),
            "-m",
            "pipeline.train",
            "--config",
            CONFIG,
            f"data.train={shards}",
            f"run.dir={run}",
            "optim.epochs=1000",
            "eval.at_end=false",
            "log.tensorboard=false",
        ],
        tmp_path / "log",
    )
    ranks: list[psutil.Process] = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "metrics.jsonl").is_file():
            time.sleep(0.5)  # training has started: both ranks are past their start-up
        ranks = _ranks_of(p.pid)
        assert len(ranks) == 2, (tmp_path / "log").read_text()[-3000:]
        os.kill(p.pid, signal.SIGKILL)  # torchrun alone, as an OOM killer or `kill -9` would
        p.wait(timeout=10)
        _, alive = psutil.wait_procs(ranks, timeout=10)
        assert not alive, f"ranks outlived torchrun: {[r.pid for r in alive]}"
    finally:
        kill_tree(p.pid)
        for r in ranks:  # re-parented once torchrun died: no longer its descendants
            try:
                r.kill()
            except psutil.NoSuchProcess:
                pass


# --- a finished run restarted ------------------------------------------------------------------


def _snapshot(d: Path) -> dict:
    return {
        str(f.relative_to(d)): f.stat().st_mtime_ns for f in sorted(d.rglob("*")) if f.is_file()
    }


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_restarting_a_finished_run_exits_at_once_and_touches_nothing(shards, tmp_path):
    run = tmp_path / "run"
    args = [
        "-m",
        "pipeline.train",
        "--config",
        CONFIG,
        f"data.train={shards}",
        f"run.dir={run}",
        "optim.max_steps=6",
        "checkpoint.every_steps=3",
        "log.tensorboard=false",
        "deepspeed.zero_stage=2",
        "checkpoint.resume=latest",
    ]
    p = run_cmd([*torchrun(2), *args], timeout=200)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    before = _snapshot(run / "checkpoints")

    # the ranks by hand (what torchrun does), rank 1 starting 3 s after rank 0
    from pipeline.dist import free_port

    port = str(free_port())
    procs = []
    try:
        for rank in (0, 1):
            env = {
                **os.environ,
                "RANK": str(rank),
                "WORLD_SIZE": "2",
                "LOCAL_RANK": str(rank),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "OMP_NUM_THREADS": "1",
            }
            procs.append(
                subprocess.Popen(
                    [sys.executable, *args],
                    cwd=ROOT,
                    env=env,
                    text=True,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            )
            time.sleep(3 if rank == 0 else 0)
        outs = [q.communicate(timeout=60) for q in procs]
    finally:
        for q in procs:
            stop_tree(q.pid)
    assert [q.returncode for q in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert "already finished at step 6" in outs[0][1]
    assert _snapshot(run / "checkpoints") == before
    assert [r["step"] for r in train_rows(run)][-1] == 6


# --- exact resume after a crash ------------------------------------------------------------------


def _kept(run: Path, after: int) -> list[tuple[int, int]]:
    import pandas as pd

    sel = pd.concat(pd.read_parquet(p) for p in sorted((run / "selection").glob("*.parquet")))
    sel = sel[sel.step >= after]
    return sorted(map(tuple, sel[sel.kept][["step", "uid"]].values.tolist()))


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("crash") / "noisy"
    write_digit_shards(d, n_shards=4, per_shard=128, seed=2, noise=0.4)
    return d


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(400)
@pytest.mark.parametrize("stage,history,workers", [(2, "memory", 2), (3, "ema", 0)])
def test_sigkill_between_checkpoints_then_resume_is_exact(noisy, tmp_path, stage, history, workers):
    """The whole tree killed mid-epoch, between two periodic checkpoints: the resumed run
    reproduces the uninterrupted one (losses, lr, selected uids) from its checkpoint on.
    With loader workers, their augmentation seeds must not come from the training RNG."""
    common = [
        "-m",
        "pipeline.train",
        "--config",
        CONFIG,
        f"data.train={noisy}",
        f"data.workers={workers}",
        f"deepspeed.zero_stage={stage}",
        "selection.method=dissect",
        f"selection.history={history}",
        "selection.ratio=0.5",
        "data.batch_size=16",
        "selection.warmup_steps=4",
        "optim.epochs=3",
        "optim.warmup_steps=3",
        "log.every_steps=1",
        "eval.at_end=false",
        "log.tensorboard=false",
        "checkpoint.every_steps=10",
        "checkpoint.resume=latest",
    ]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    p = run_cmd([*torchrun(2), *common, f"run.dir={straight}"], timeout=200)
    assert p.returncode == 0, p.stderr[-3000:]

    # 8 steps an epoch: the checkpoint at step 10 is mid-epoch; kill a few steps after it
    log = tmp_path / "crashed.log"
    proc = start_cmd([*torchrun(2), *common, f"run.dir={crashed}"], log)
    try:
        deadline = time.time() + 200
        while time.time() < deadline:
            rows = train_rows(crashed) if (crashed / "metrics.jsonl").is_file() else []
            if rows and rows[-1]["step"] >= 13:
                break
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.05)
        kill_tree(proc.pid)  # SIGKILL, ranks first: a node lost, or a preemption without grace
        proc.wait(timeout=30)
    finally:
        stop_tree(proc.pid)
    resumed_at = int((crashed / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert resumed_at in (10, 20), resumed_at
    p = run_cmd([*torchrun(2), *common, f"run.dir={crashed}"], timeout=200)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"at step {resumed_at}" in p.stderr

    a = {r["step"]: r for r in train_rows(straight)}
    b = {r["step"]: r for r in train_rows(crashed)}
    assert sorted(b) == sorted(a) == list(range(1, 25))
    for step in range(resumed_at + 1, 25):
        assert abs(a[step]["loss"] - b[step]["loss"]) < 1e-5, (
            step,
            a[step]["loss"],
            b[step]["loss"],
        )
        assert a[step]["lr"] == pytest.approx(b[step]["lr"], rel=1e-9)
    assert _kept(straight, resumed_at) == _kept(crashed, resumed_at)


_PARENT = """
import os, subprocess, sys
child = subprocess.Popen(
    [sys.executable, "-c", "from pipeline import _env; import time; _env.die_with_parent(); "
     "print('armed', flush=True); time.sleep(60)"],
    env=dict(os.environ, DISSECT_DIE_WITH_PARENT=sys.argv[1]), stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL, text=True)  # a survivor must not hold our output pipes open
assert child.stdout.readline().strip() == "armed"
print(child.pid, flush=True)
os._exit(0)  # the parent dies without waiting, as a killed benchmark driver would
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("asked", ["1", "0"])
def test_a_run_started_by_a_benchmark_dies_with_it(asked):
    """DISSECT_DIE_WITH_PARENT=1 (what benchmarks.selection sets) arms the same kernel-side kill
    for a plain run; without it a plain run survives its parent (nohup semantics)."""
    p = subprocess.run(
        [sys.executable, "-c", _PARENT, asked], capture_output=True, text=True, timeout=30, cwd=ROOT
    )
    child = psutil.Process(int(p.stdout.split()[-1]))
    try:
        gone, _ = psutil.wait_procs([child], timeout=10)
        assert bool(gone) == (asked == "1")
    finally:
        if child.is_running():
            child.kill()
