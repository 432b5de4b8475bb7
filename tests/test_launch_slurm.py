"""launch/slurm.sbatch (and launch/supervise.sh, which runs torchrun on each node): end to end
through a fake srun that starts one torchrun per "node" (c10d rendezvous on localhost) and a
requeued start that resumes; the USR1 requeue trap; SIGTERM stops every process of the job.
(Shared cases, --dry-run anywhere, the sbatch commands of docs/launching.md and the README: test_launch_common.py.)
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
from launchutil import (
    CONFIG,
    LAUNCH,
    alive,
    dissect_overrides,
    kill_all,
    kill_procs,
    launch_env,
    make_shards,
    metrics_rows,
    printed_cmd,
    run,
    start,
    wait_for,
    write_fake,
)

from pipeline.dist import free_port


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory)


# srun --nodes N ... --output PATTERN CMD: CMD once per node (SLURM_NODEID), output per node
FAKE_SRUN = r"""
nodes=1 out=/dev/stdout
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nodes) nodes=$2; shift 2 ;;
        --output) out=$2; shift 2 ;;
        --ntasks-per-node | --cpus-per-task) shift 2 ;;
        --kill-on-bad-exit=1) shift ;;
        -*) echo "fake srun: unexpected option $1" >&2; exit 9 ;;
        *) break ;;
    esac
done
pids=()
for ((i = 0; i < nodes; i++)); do
    f=${out//%j/$SLURM_JOB_ID}; f=${f//%n/$i}; f=${f//%N/node$i}
    SLURM_NODEID=$i SLURM_PROCID=$i "$@" >"$f" 2>&1 &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def _fake_ranks_launcher(tmp_path):
    """A fake torchrun: two "ranks" (sleeps) each in a session of its own, one ignoring
    SIGTERM, their PIDs appended to a file."""
    pids = tmp_path / "ranks.pids"
    fake = write_fake(
        tmp_path / "fake-torchrun",
        f"""
setsid sleep 300 & echo $! >> {pids}
setsid bash -c 'trap "" TERM; exec sleep 301' & echo $! >> {pids}
wait
""",
    )
    return fake, pids


def _procs(pids_file) -> list[psutil.Process]:
    procs = []
    for pid in pids_file.read_text().split():
        try:
            procs.append(psutil.Process(int(pid)))
        except psutil.NoSuchProcess:
            pass
    return procs


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_slurm_sbatch_two_nodes_and_requeued_resume(shards, tmp_path):
    """slurm.sbatch end to end, srun faked: one torchrun per "node", c10d rendezvous on localhost.

    The second start has SLURM_RESTART_COUNT=1 (what a requeue sets), gets one node instead of
    two, and resumes from the first start's checkpoint on the new world size through the
    checkpoint.resume=latest the script always passes.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_fake(
        bin_dir / "scontrol",
        'case "$1 $2" in "show hostnames") echo localhost ;; *) exit 1 ;; esac\n',
    )
    write_fake(bin_dir / "srun", FAKE_SRUN)
    run_dir = tmp_path / "run"
    args = dissect_overrides(shards, run_dir) + ["checkpoint.every_steps=2", "eval.at_end=false"]
    env = launch_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="node[0-1]",
        SLURM_SUBMIT_DIR=str(tmp_path),
        NPROC_PER_NODE="1",
        MASTER_PORT=str(free_port()),
    )

    first = run(
        ["bash", LAUNCH / "slurm.sbatch", CONFIG, *args, "optim.max_steps=4"],
        110,
        env,
        cwd=tmp_path,
    )
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    cmd = printed_cmd(first.stdout)
    assert cmd[0] == "srun" and "--kill-on-bad-exit=1" in cmd
    assert cmd[cmd.index("--rdzv-backend") + 1] == "c10d"
    assert cmd[cmd.index("--rdzv-id") + 1] == "4242"
    assert cmd[cmd.index("--config") :] == [
        "--config",
        CONFIG,
        "checkpoint.resume=latest",
        *args,
        "optim.max_steps=4",
    ]
    logs = sorted((run_dir / "logs").glob("4242.r0-node*.log"))
    assert [p.name for p in logs] == ["4242.r0-node0-node0.log", "4242.r0-node1-node1.log"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"

    # the restart skips the config check (the batch host may not see the data): logs go to LOG_DIR.
    # It comes back on 1 node (sbatch --nodes=1-2 after a node failure): the 2-rank ZeRO-2
    # checkpoint resumes on 1 rank
    env.update(
        SLURM_RESTART_COUNT="1",
        DISSECT_CHECK="0",
        LOG_DIR=str(run_dir / "logs"),
        SLURM_JOB_NUM_NODES="1",
        SLURM_JOB_NODELIST="node0",
    )
    second = run(
        ["bash", LAUNCH / "slurm.sbatch", CONFIG, *args, "optim.max_steps=6"],
        110,
        env,
        cwd=tmp_path,
    )
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert (
        printed_cmd(second.stdout)[-1] == "checkpoint.resume=latest"
    )  # after the user's overrides
    node_logs = "".join(p.read_text() for p in (run_dir / "logs").glob("4242.r1-node*.log"))
    assert "resumed from" in node_logs and "at step 4" in node_logs
    assert "checkpoint from 2 ranks, resuming on 1: model and optimizer through a universal" in (
        node_logs
    )
    rows = [r for r in metrics_rows(run_dir) if "loss" in r]
    assert rows[-1]["step"] == 6 and rows[-1]["samples_seen"] == 4 * 2 * 32 + 2 * 32
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"


@pytest.mark.timeout(30)
def test_slurm_requeues_on_usr1(tmp_path):
    """The time-limit warning (SIGUSR1 to the batch shell) triggers `scontrol requeue JOBID`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    pidfile = tmp_path / "srun.pid"
    write_fake(bin_dir / "srun", f"echo $$ > {pidfile}\nexec sleep 60\n")
    # requeue stops the job's steps, as SLURM does
    write_fake(
        bin_dir / "scontrol",
        f"""case "$1 $2" in
    "show hostnames") echo node-a ;;
    *) echo "$*" >> {calls}; kill "$(cat {pidfile})" ;;
esac
""",
    )
    env = launch_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        DISSECT_CHECK="0",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NUM_NODES="2",
        SLURM_SUBMIT_DIR=str(tmp_path),
        NPROC_PER_NODE="8",
    )
    log = tmp_path / "batch.log"
    job = start(
        ["bash", LAUNCH / "slurm.sbatch", CONFIG, "data.train=x"], log, env=env, cwd=tmp_path
    )
    try:
        wait_for(pidfile.exists, 15, "srun to start", [job], [log])
        job.send_signal(signal.SIGUSR1)  # the batch shell is the session leader: job.pid
        rc = job.wait(timeout=15)
    finally:
        kill_all([job])
    out = log.read_text()
    assert calls.read_text() == "requeue 4242\n", out
    assert "requeueing job 4242" in out and rc != 0
    cmd = printed_cmd(out)
    assert "checkpoint.resume=latest" in cmd and "--kill-on-bad-exit=1" in cmd


# ---------------------------------------------------------------------------------------------
# stopping: supervise.sh on each node, the batch shell above srun


@pytest.mark.timeout(30)
def test_slurm_runs_torchrun_under_supervise(tmp_path):
    """The per-node command (what srun starts) is launch/supervise.sh wrapping torchrun."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_fake(bin_dir / "scontrol", "echo node-a\n")
    env = launch_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        DISSECT_CHECK="0",
        SLURM_JOB_ID="5",
        SLURM_JOB_NUM_NODES="2",
        SLURM_SUBMIT_DIR=str(tmp_path),
        NPROC_PER_NODE="8",
        TORCHRUN="/opt/torchrun",
    )
    p = run(["bash", LAUNCH / "slurm.sbatch", "--dry-run", CONFIG], 20, env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    cmd = printed_cmd(p.stdout)
    i = cmd.index("/opt/torchrun")
    assert cmd[i - 2 : i] == ["bash", str(LAUNCH / "supervise.sh")]
    assert cmd[: i - 2].count("srun") == 1 and cmd[0] == "srun"


@pytest.mark.timeout(30)
def test_supervise_exit_status_and_usage(tmp_path):
    p = run([LAUNCH / "supervise.sh", "bash", "-c", "exit 5"], 20)
    assert p.returncode == 5, p.stderr
    assert p.stderr == ""  # nothing left behind, nothing to say
    p = run([LAUNCH / "supervise.sh"], 20)
    assert p.returncode == 2 and p.stderr.startswith("launch/supervise.sh: error: no command given")


@pytest.mark.timeout(60)
def test_supervise_sigterm_stops_the_tree(tmp_path):
    """What srun does on scancel or at the time limit: SIGTERM to its task, supervise.sh, which
    stops torchrun's ranks (each in a session of its own; one ignores SIGTERM: SIGKILL)."""
    fake, pids = _fake_ranks_launcher(tmp_path)
    log = tmp_path / "node.log"
    job = start([LAUNCH / "supervise.sh", fake], log, env=launch_env(DISSECT_KILL_GRACE_S="2"))
    ranks = []
    try:
        wait_for(
            lambda: pids.is_file() and len(pids.read_text().split()) == 2,
            20,
            "fake ranks",
            [job],
            [log],
        )
        ranks = _procs(pids)
        time.sleep(1.5)  # supervise.sh has looked at its tree at least once
        job.send_signal(signal.SIGTERM)
        rc = job.wait(timeout=15)
        time.sleep(0.5)
        out = log.read_text()
        assert rc == 128 + signal.SIGTERM, out
        assert not [r for r in ranks if alive(r)], out
        assert "launch/supervise.sh: SIGTERM: stopping" in out and "SIGKILL to 1 processes" in out
    finally:
        kill_all([job])
        kill_procs(ranks)


@pytest.mark.timeout(60)
def test_slurm_batch_sigterm_stops_every_node(tmp_path):
    """SIGTERM to the batch shell (scancel --batch, or the job ending): srun, both "nodes'"
    supervise.sh and torchrun, and their ranks are all gone; the batch shell exits 143."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_fake(bin_dir / "scontrol", "echo localhost\n")
    write_fake(bin_dir / "srun", FAKE_SRUN)
    fake, pids = _fake_ranks_launcher(tmp_path)
    env = launch_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        DISSECT_CHECK="0",
        SLURM_JOB_ID="77",
        SLURM_JOB_NUM_NODES="2",
        SLURM_SUBMIT_DIR=str(tmp_path),
        NPROC_PER_NODE="1",
        TORCHRUN=str(fake),
        DISSECT_KILL_GRACE_S="2",
        LOG_DIR=str(tmp_path / "logs"),
    )
    log = tmp_path / "batch.log"
    job = start(["bash", LAUNCH / "slurm.sbatch", CONFIG], log, env=env, cwd=tmp_path)
    ranks, tree = [], []
    try:
        wait_for(
            lambda: pids.is_file() and len(pids.read_text().split()) == 4,
            20,
            "fake ranks",
            [job],
            [log],
        )
        ranks = _procs(pids)
        time.sleep(1.5)  # the shells have looked at their trees at least once
        tree = psutil.Process(job.pid).children(recursive=True)
        job.send_signal(signal.SIGTERM)
        rc = job.wait(timeout=15)
        time.sleep(0.5)
        out = log.read_text()
        assert rc == 128 + signal.SIGTERM, out
        assert not [r for r in ranks + tree if alive(r)], out
        assert "launch/slurm.sbatch: SIGTERM: stopping" in out
    finally:
        kill_all([job])
        kill_procs(ranks + tree)
