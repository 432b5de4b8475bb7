"""launch/single_node.sh: the printed command is the one that runs; GPUs decide the rank count;
a hung rank ends the job within deepspeed.timeout_s; SIGTERM to the script stops every rank
(torchrun starts each in a session of its own); the script's exit status is the launcher's and
processes a launcher leaves behind are stopped. (Shared cases: test_launch_common.py.)
"""

from __future__ import annotations

import os
import signal
import sys
import time

import psutil
import pytest
from launchutil import (
    CONFIG,
    LAUNCH,
    TRICKY,
    alive,
    dissect_overrides,
    kill_all,
    kill_procs,
    launch_env,
    make_recorder,
    make_shards,
    printed_cmd,
    run,
    start,
    train_workers,
    wait_for,
    write_fake,
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory)


@pytest.fixture
def recorder(tmp_path):
    return make_recorder(tmp_path)


# ---------------------------------------------------------------------------------------------
# commands: printed exactly, overrides untouched


@pytest.mark.timeout(30)
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_single_node_runs_exactly_the_printed_command(launcher, tmp_path, recorder):
    fake, rec = recorder
    env = launch_env(
        TORCHRUN=str(fake), DEEPSPEED=str(fake), DISSECT_CHECK="0", NPROC="3", LAUNCHER=launcher
    )
    p = run([LAUNCH / "single_node.sh", CONFIG, *TRICKY], 20, env)
    assert p.returncode == 0, p.stderr
    cmd = printed_cmd(p.stdout)
    assert cmd == [str(fake), *rec.read_text().splitlines()]  # what ran is what was printed
    assert cmd[-len(TRICKY) - 3 :] == ["pipeline.train", "--config", CONFIG, *TRICKY]
    if launcher == "torchrun":
        assert cmd[1:6] == ["--standalone", "--nnodes", "1", "--nproc-per-node", "3"]
    else:
        assert cmd[1:3] == ["--num_gpus", "3"] and "--module" in cmd


@pytest.mark.timeout(30)
def test_single_node_counts_visible_gpus(recorder):
    """CUDA_VISIBLE_DEVICES decides the rank count, and the deepspeed launcher gets those GPUs
    (with --num_gpus it would drop the variable and take GPUs 0..N-1)."""
    fake, rec = recorder
    for launcher, expected in (
        ("torchrun", ["--nproc-per-node", "3"]),
        ("deepspeed", ["--include", "localhost:1,4,6"]),
    ):
        env = launch_env(
            TORCHRUN=str(fake),
            DEEPSPEED=str(fake),
            DISSECT_CHECK="0",
            LAUNCHER=launcher,
            CUDA_VISIBLE_DEVICES="1,4,6",
        )
        p = run([LAUNCH / "single_node.sh", "--dry-run", CONFIG], 20, env)
        assert p.returncode == 0, p.stderr
        cmd = printed_cmd(p.stdout)
        i = cmd.index(expected[0])
        assert cmd[i : i + 2] == expected
    assert not rec.exists()


@pytest.mark.timeout(30)
def test_missing_config_file_is_refused(tmp_path, recorder):
    fake, rec = recorder
    p = run([LAUNCH / "single_node.sh", tmp_path / "nope.yaml"], 20, launch_env(TORCHRUN=str(fake)))
    assert p.returncode == 2 and "config file" in p.stderr and "does not exist" in p.stderr
    assert not rec.exists()


@pytest.mark.timeout(30)
def test_bad_kill_grace_is_refused(recorder):
    fake, rec = recorder
    p = run(
        [LAUNCH / "single_node.sh", CONFIG],
        20,
        launch_env(TORCHRUN=str(fake), DISSECT_CHECK="0", DISSECT_KILL_GRACE_S="ten"),
    )
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "DISSECT_KILL_GRACE_S must be a whole number of seconds, got 'ten'" in p.stderr
    assert "+ " not in p.stdout and not rec.exists()


# ---------------------------------------------------------------------------------------------
# exit status and leftovers, with a fake launcher (no training)


def _fake_torchrun(tmp_path, body: str):
    """A fake torchrun that starts two "ranks" (sleeps) each in a session of its own, as
    torchrun does, writes their PIDs to a file, then runs ``body``."""
    pids = tmp_path / "ranks.pids"
    fake = write_fake(
        tmp_path / "fake-torchrun",
        f"""
setsid sleep 300 & echo $! >> {pids}
setsid bash -c 'trap "" TERM; exec sleep 301' & echo $! >> {pids}   # a rank that ignores SIGTERM
{body}
""",
    )
    return fake, pids


def _ranks(pids_file) -> list[psutil.Process]:
    procs = []
    for pid in pids_file.read_text().split():
        try:
            procs.append(psutil.Process(int(pid)))
        except psutil.NoSuchProcess:
            pass
    return procs


@pytest.mark.timeout(60)
def test_single_node_exit_status_is_the_launchers_and_leftovers_are_stopped(tmp_path):
    """A launcher that dies (exit 7) leaving its ranks running: the script exits 7 and its exit
    stops the orphaned ranks, SIGKILL for the one that ignores SIGTERM."""
    fake, pids = _fake_torchrun(tmp_path, "sleep 2\nexit 7\n")
    env = launch_env(TORCHRUN=str(fake), DISSECT_CHECK="0", DISSECT_KILL_GRACE_S="2")
    log = tmp_path / "job.log"
    job = start([LAUNCH / "single_node.sh", CONFIG], log, env=env)
    ranks = []
    try:
        wait_for(
            lambda: pids.is_file() and len(pids.read_text().split()) == 2,
            20,
            "fake ranks",
            [job],
            [log],
        )
        ranks = _ranks(pids)
        rc = job.wait(timeout=30)
        time.sleep(0.5)
        out = log.read_text()
        assert rc == 7, out
        assert not [r for r in ranks if alive(r)], out
        assert "exiting with processes left: stopping 2 processes" in out
        assert "still alive after 2 s: SIGKILL to 1 processes" in out
    finally:
        kill_all([job])
        kill_procs(ranks)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_single_node_signal_stops_fake_ranks(sig, tmp_path):
    fake, pids = _fake_torchrun(tmp_path, "wait\n")
    env = launch_env(TORCHRUN=str(fake), DISSECT_CHECK="0", DISSECT_KILL_GRACE_S="2")
    log = tmp_path / "job.log"
    job = start([LAUNCH / "single_node.sh", CONFIG], log, env=env)
    ranks = []
    try:
        wait_for(
            lambda: pids.is_file() and len(pids.read_text().split()) == 2,
            20,
            "fake ranks",
            [job],
            [log],
        )
        ranks = _ranks(pids)
        time.sleep(1.5)  # the script has looked at its tree at least once
        job.send_signal(sig)
        rc = job.wait(timeout=15)
        time.sleep(0.5)
        out = log.read_text()
        assert rc == 128 + sig, out
        assert not [r for r in ranks if alive(r)], out
        assert f"{sig.name}: stopping" in out
    finally:
        kill_all([job])
        kill_procs(ranks)


# ---------------------------------------------------------------------------------------------
# real runs: a hung rank, SIGTERM to the launcher


def _pipeline_bounds_every_group(timeout_s: int = 7) -> bool:
    """Does pipeline.dist make deepspeed.timeout_s the default of groups created after init?

    DeepSpeed's ZeRO data-parallel group comes from dist.new_group(ranks), which takes torch's
    default timeout (30 min gloo, 10 min NCCL), not the world group's: without that, a hung
    rank stalls its peers in a ZeRO all-gather for 30 minutes.
    """
    code = (
        "import torch.distributed as d;"
        "from torch.distributed.distributed_c10d import _get_default_timeout;"
        "from pipeline.dist import init_distributed;"
        f"init_distributed({timeout_s});"
        "print(_get_default_timeout(d.Backend('gloo')).total_seconds())"
    )
    env = {k: v for k, v in launch_env().items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    p = run([sys.executable, "-c", code], 60, env)
    return p.returncode == 0 and p.stdout.strip().endswith(f"{float(timeout_s)}")


@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_hung_rank_ends_job_within_collective_timeout(shards, tmp_path):
    """SIGSTOP one rank (alive, silent: a hung GPU, a stuck filesystem read): the other rank's
    next collective times out after deepspeed.timeout_s, it exits, torchrun stops the job."""
    # DeepSpeed's own groups must inherit the bound too (pipeline/dist.py sets the default)
    assert _pipeline_bounds_every_group()
    timeout_s = 10
    run_dir = tmp_path / "run"
    args = [
        *dissect_overrides(shards, run_dir),
        "optim.epochs=1000",
        "log.every_steps=1",
        f"deepspeed.timeout_s={timeout_s}",
        "eval.at_end=false",
    ]
    log = tmp_path / "job.log"
    job = start(
        [LAUNCH / "single_node.sh", CONFIG, *args],
        log,
        env=launch_env(NPROC="2", DISSECT_CHECK="0"),
    )
    try:
        metrics = run_dir / "metrics.jsonl"
        wait_for(
            lambda: metrics.is_file() and metrics.stat().st_size > 0,
            90,
            "training to start",
            [job],
            [log],
        )
        ranks = sorted(train_workers(job.pid), key=lambda w: int(w.environ().get("RANK", "-1")))
        assert len(ranks) == 2, ranks
        t0 = time.monotonic()
        ranks[1].send_signal(signal.SIGSTOP)
        try:
            ranks[0].wait(timeout=timeout_s + 20)  # the bound: timeout_s, plus a step in flight
        except psutil.TimeoutExpired:
            pytest.fail(
                f"rank 0 still running {timeout_s + 20}s after rank 1 hung\n{log.read_text()[-3000:]}"
            )
        elapsed = time.monotonic() - t0
        ranks[1].send_signal(
            signal.SIGCONT
        )  # lets torchrun's SIGTERM in now, not after its 30 s grace
        rc = job.wait(timeout=60)
    finally:
        kill_all([job])
    assert rc != 0
    assert elapsed < timeout_s + 20


@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_sigterm_to_single_node_stops_every_rank(shards, tmp_path):
    """SIGTERM to launch/single_node.sh (not to torchrun): both ranks, each in a session of its
    own, are gone and the script has exited 143 within 15 s."""
    run_dir = tmp_path / "run"
    args = [*dissect_overrides(shards, run_dir), "optim.epochs=100", "eval.at_end=false"]
    log = tmp_path / "job.log"
    job = start(
        [LAUNCH / "single_node.sh", CONFIG, *args],
        log,
        env=launch_env(NPROC="2", DISSECT_CHECK="0"),
    )
    ranks = []
    try:
        wait_for(lambda: len(train_workers(job.pid)) == 2, 90, "both ranks to start", [job], [log])
        ranks = train_workers(job.pid)
        # the premise: under torchrun, each in a session of its own (a group kill misses them)
        assert all(r.ppid() != job.pid and os.getsid(r.pid) != os.getsid(job.pid) for r in ranks)
        job.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (job.poll() is None or any(alive(r) for r in ranks)):
            time.sleep(0.2)
        out = log.read_text()
        assert not [r for r in ranks if alive(r)], out[-3000:]
        assert job.poll() == 128 + signal.SIGTERM, out[-3000:]
        assert "SIGTERM: stopping" in out
    finally:
        kill_all([job])
        kill_procs(ranks)


@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_killed_torchrun_takes_its_ranks_along(shards, tmp_path):
    """SIGKILL to torchrun (out of memory, a stray kill -9): its ranks, orphaned in sessions of
    their own, are stopped by the script, which exits with torchrun's status (137)."""
    run_dir = tmp_path / "run"
    args = [*dissect_overrides(shards, run_dir), "optim.epochs=100", "eval.at_end=false"]
    log = tmp_path / "job.log"
    job = start(
        [LAUNCH / "single_node.sh", CONFIG, *args],
        log,
        env=launch_env(NPROC="2", DISSECT_CHECK="0"),
    )
    ranks = []
    try:
        wait_for(lambda: len(train_workers(job.pid)) == 2, 90, "both ranks to start", [job], [log])
        ranks = train_workers(job.pid)
        time.sleep(1.5)  # the script has looked at its tree since both ranks started
        torchrun = psutil.Process(ranks[0].ppid())
        assert torchrun.ppid() == job.pid and "torchrun" in " ".join(torchrun.cmdline())
        torchrun.kill()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (job.poll() is None or any(alive(r) for r in ranks)):
            time.sleep(0.2)
        out = log.read_text()
        assert not [r for r in ranks if alive(r)], out[-3000:]
        assert job.poll() == 128 + signal.SIGKILL, out[-3000:]
    finally:
        kill_all([job])
        kill_procs(ranks)
