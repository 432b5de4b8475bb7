"""launch/: the launchers run real jobs as two "nodes" on one machine (loopback, gloo, CPU).

Real runs: two torchrun invocations (--nnodes 2, --node-rank 0/1), the deepspeed launcher with a
hostfile naming localhost, slurm.sbatch through a fake srun that starts one torchrun per "node"
(c10d rendezvous) and a requeued start that resumes. Failure paths: a rank killed mid-run ends
the job non-zero within deepspeed.timeout_s; a hung rank likewise; a bad config or a malformed
hostfile is refused with one line before anything starts. Command shapes (multi-host deepspeed,
c10d torchrun, SLURM) that need machines we do not have are checked as dry runs.

Every subprocess runs in its own session with a timeout that kills the whole group, so a hang
fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from shardutil import write_digit_shards

from pipeline.dist import free_port

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
CONFIG = str(ROOT / "configs" / "tiny-cpu.yaml")

# ---------------------------------------------------------------------------------------------
# helpers


# launch/env.sh settings and scheduler variables that must not leak in from the caller's shell
_LAUNCH_VARS = ("DISSECT_CHECK", "DISSECT_RDZV_TIMEOUT_S", "NPROC", "NPROC_PER_NODE", "LAUNCHER",
                "TORCHRUN", "DEEPSPEED", "PYTHON", "IFNAME", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME",
                "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "DS_ENV_FILE", "LOG_DIR",
                "DRY_RUN")


def launch_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run(cmd: list[str], timeout: float, env: dict | None = None, cwd: Path = ROOT):
    """Run to completion; on timeout kill the whole process group and fail."""
    p = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env or launch_env(), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"{cmd[0]} timed out after {timeout}s\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def start(cmd: list[str], log: Path, env: dict | None = None, cwd: Path = ROOT) -> subprocess.Popen:
    f = open(log, "w")
    return subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env or launch_env(), stdout=f,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_all(procs: list[subprocess.Popen], timeout: float, logs: list[Path]) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(0.1, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        kill_all(procs)
        tails = "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in logs)
        pytest.fail(f"launch did not finish within {timeout}s\n{tails}")


def kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=30)


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
    for k in psutil.Process(launcher_pid).children(recursive=True):
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


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("launch_shards")
    write_digit_shards(d / "train", n_shards=4, per_shard=64, noise=0.2)
    write_digit_shards(d / "val", n_shards=1, per_shard=64, seed=1, uid_offset=10_000, with_val_meta=True)
    return d


def dissect_overrides(shards: Path, run_dir: Path) -> list[str]:
    # 2 ranks x super-batch 32 = 64 samples a step; 256 train samples = 4 steps an epoch
    return [f"data.train={shards / 'train'}", f"run.dir={run_dir}", "deepspeed.zero_stage=2",
            "selection.method=dissect", "selection.ratio=0.5", "data.batch_size=16",
            "selection.warmup_steps=4"]


@pytest.fixture
def recorder(tmp_path):
    """A fake launcher binary that records its argv (one per line) instead of starting anything."""
    rec = tmp_path / "recorded"
    fake = write_fake(tmp_path / "fake-launcher", f'printf "%s\\n" "$@" > {shlex.quote(str(rec))}\n')
    return fake, rec


# ---------------------------------------------------------------------------------------------
# real runs


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_two_nodes_torchrun_static_rendezvous(shards, tmp_path):
    run_dir = tmp_path / "run"
    port = free_port()
    args = [*dissect_overrides(shards, run_dir), f"data.val={shards / 'val'}", "optim.max_steps=6",
            "checkpoint.every_steps=3", "run.name=two nodes"]
    procs, logs = [], []
    for node in (0, 1):
        logs.append(tmp_path / f"node{node}.log")
        procs.append(start([LAUNCH / "multi_node.sh", "torchrun", "--nnodes", "2", "--nproc-per-node", "1",
                            "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
                            CONFIG, *args], logs[-1]))
    rcs = wait_all(procs, 150, logs)
    assert rcs == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)

    for node, log in enumerate(logs):
        cmd = printed_cmd(log.read_text())
        assert cmd[cmd.index("--node-rank") + 1] == str(node)
        assert cmd[cmd.index("--config") + 1:] == [CONFIG, *args]  # overrides untouched
    # one run directory, written once by rank 0, with both ranks' parts in each checkpoint
    rows = [r for r in metrics_rows(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 5, 6]  # log.every_steps=5, plus first and last
    assert rows[-1]["samples_seen"] == 6 * 2 * 32  # world size 2
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    for tag in ("step_00000003", "step_00000006"):
        ck = run_dir / "checkpoints" / tag
        assert (ck / "COMPLETE").is_file()
        assert (ck / "state_rank0.pt").is_file() and (ck / "state_rank1.pt").is_file()
    for name in ("config.yaml", "ds_config.json", "model.pt", "eval.json"):
        assert (run_dir / name).is_file(), name
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1  # TensorBoard: rank 0 only
    assert "eval/zeroshot_top1" in json.loads((run_dir / "eval.json").read_text())


@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_deepspeed_launcher_with_localhost_hostfile(shards, tmp_path):
    run_dir = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# this machine only: the launcher runs here, no ssh\nlocalhost slots=2\n")
    args = [*dissect_overrides(shards, run_dir), "optim.max_steps=4", "eval.at_end=false"]
    p = run([LAUNCH / "multi_node.sh", "deepspeed", "--hostfile", hostfile, "--master-addr", "127.0.0.1",
             "--master-port", free_port(), CONFIG, *args], timeout=130, env=launch_env(DISSECT_CHECK="0"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    cmd = printed_cmd(p.stdout)
    assert cmd[0].endswith("deepspeed") and "--no_ssh_check" in cmd
    assert cmd[cmd.index("--hostfile") + 1] == str(hostfile)
    assert cmd[cmd.index("--module"):] == ["--module", "pipeline.train", "--config", CONFIG, *args]
    rows = [r for r in metrics_rows(run_dir) if "loss" in r]
    assert rows[-1]["step"] == 4 and rows[-1]["samples_seen"] == 4 * 2 * 32
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_slurm_sbatch_two_nodes_and_requeued_resume(shards, tmp_path):
    """slurm.sbatch end to end, srun faked: one torchrun per "node", c10d rendezvous on localhost.

    The second start has SLURM_RESTART_COUNT=1 (what a requeue sets) and resumes from the first
    start's checkpoint through the checkpoint.resume=latest the script always passes.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_fake(bin_dir / "scontrol", 'case "$1 $2" in "show hostnames") echo localhost ;; *) exit 1 ;; esac\n')
    # srun --nodes N ... --output PATTERN CMD: CMD once per node (SLURM_NODEID), output per node
    write_fake(bin_dir / "srun", r'''
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
''')
    run_dir = tmp_path / "run"
    args = dissect_overrides(shards, run_dir) + ["checkpoint.every_steps=2", "eval.at_end=false"]
    env = launch_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2",
                     SLURM_JOB_NODELIST="node[0-1]", SLURM_SUBMIT_DIR=str(tmp_path), NPROC_PER_NODE="1",
                     MASTER_PORT=str(free_port()))

    first = run(["bash", LAUNCH / "slurm.sbatch", CONFIG, *args, "optim.max_steps=4"], 110, env, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    cmd = printed_cmd(first.stdout)
    assert cmd[0] == "srun" and "--kill-on-bad-exit=1" in cmd
    assert cmd[cmd.index("--rdzv-backend") + 1] == "c10d"
    assert cmd[cmd.index("--rdzv-id") + 1] == "4242"
    assert cmd[cmd.index("--config"):] == ["--config", CONFIG, "checkpoint.resume=latest", *args, "optim.max_steps=4"]
    logs = sorted((run_dir / "logs").glob("4242.r0-node*.log"))
    assert [p.name for p in logs] == ["4242.r0-node0-node0.log", "4242.r0-node1-node1.log"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"

    # the restart skips the config check (the batch host may not see the data): logs go to LOG_DIR
    env.update(SLURM_RESTART_COUNT="1", DISSECT_CHECK="0", LOG_DIR=str(run_dir / "logs"))
    second = run(["bash", LAUNCH / "slurm.sbatch", CONFIG, *args, "optim.max_steps=6"], 110, env, cwd=tmp_path)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert printed_cmd(second.stdout)[-1] == "checkpoint.resume=latest"  # after the user's overrides
    node_logs = "".join(p.read_text() for p in (run_dir / "logs").glob("4242.r1-node*.log"))
    assert "resumed from" in node_logs and "at step 4" in node_logs
    rows = [r for r in metrics_rows(run_dir) if "loss" in r]
    assert rows[-1]["step"] == 6 and rows[-1]["samples_seen"] == 6 * 2 * 32
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"


# ---------------------------------------------------------------------------------------------
# dead and hung ranks


@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_killed_rank_ends_both_nodes_within_timeout(shards, tmp_path):
    """SIGKILL node 1's rank once training runs: both torchruns exit non-zero, well within
    deepspeed.timeout_s (gloo sees the peer's socket close; torchrun stops its node)."""
    timeout_s = 30
    run_dir = tmp_path / "run"
    port = free_port()
    args = [*dissect_overrides(shards, run_dir), "optim.epochs=1000", "log.every_steps=1",
            f"deepspeed.timeout_s={timeout_s}", "eval.at_end=false"]
    procs, logs = [], []
    for node in (0, 1):
        logs.append(tmp_path / f"node{node}.log")
        procs.append(start([LAUNCH / "multi_node.sh", "torchrun", "--nnodes", "2", "--nproc-per-node", "1",
                            "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
                            CONFIG, *args], logs[-1], env=launch_env(DISSECT_CHECK="0")))
    try:
        metrics = run_dir / "metrics.jsonl"
        wait_for(lambda: metrics.is_file() and metrics.stat().st_size > 0, 90, "training to start", procs, logs)
        victims = train_workers(procs[1].pid)
        assert len(victims) == 1, victims
        t0 = time.monotonic()
        victims[0].send_signal(signal.SIGKILL)
        rcs = wait_all(procs, timeout_s, logs)  # fails the test if either node outlives timeout_s
        elapsed = time.monotonic() - t0
    finally:
        kill_all(procs)
    assert rcs[0] != 0 and rcs[1] != 0, rcs
    assert elapsed < timeout_s


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
    args = [*dissect_overrides(shards, run_dir), "optim.epochs=1000", "log.every_steps=1",
            f"deepspeed.timeout_s={timeout_s}", "eval.at_end=false"]
    log = tmp_path / "job.log"
    job = start([LAUNCH / "single_node.sh", CONFIG, *args], log, env=launch_env(NPROC="2", DISSECT_CHECK="0"))
    try:
        metrics = run_dir / "metrics.jsonl"
        wait_for(lambda: metrics.is_file() and metrics.stat().st_size > 0, 90, "training to start", [job], [log])
        ranks = sorted(train_workers(job.pid), key=lambda w: int(w.environ().get("RANK", "-1")))
        assert len(ranks) == 2, ranks
        t0 = time.monotonic()
        ranks[1].send_signal(signal.SIGSTOP)
        try:
            ranks[0].wait(timeout=timeout_s + 20)  # the bound: timeout_s, plus a step in flight
        except psutil.TimeoutExpired:
            pytest.fail(f"rank 0 still running {timeout_s + 20}s after rank 1 hung\n{log.read_text()[-3000:]}")
        elapsed = time.monotonic() - t0
        ranks[1].send_signal(signal.SIGCONT)  # lets torchrun's SIGTERM in now, not after its 30 s grace
        rc = job.wait(timeout=60)
    finally:
        kill_all([job])
    assert rc != 0
    assert elapsed < timeout_s + 20


# ---------------------------------------------------------------------------------------------
# refusals: one line, non-zero, nothing started


BAD_HOSTFILES = {
    "missing slots": ("node-a slots=8\nnode-b\n", "line 2: 'node-b'"),
    "misspelt slots": ("node-a slot=8\n", "line 1: 'node-a slot=8'"),
    "zero slots": ("node-a slots=0\n", "slots must be at least 1"),
    "trailing junk": ("node-a slots=8 gpus=8\n", "line 1: 'node-a slots=8 gpus=8'"),
    "duplicate host": ("node-a slots=8\n# again\nnode-a slots=8\n", "line 3: 'node-a slots=8': host 'node-a' is listed twice"),
    "no hosts": ("# nothing here\n\n", "names no hosts"),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", list(BAD_HOSTFILES))
def test_malformed_hostfile_is_refused(case, tmp_path, recorder):
    fake, rec = recorder
    text, expected = BAD_HOSTFILES[case]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(text)
    p = run([LAUNCH / "multi_node.sh", "deepspeed", "--hostfile", hostfile, CONFIG, "data.train=x"], 20,
            launch_env(DEEPSPEED=str(fake)))
    assert p.returncode == 2
    assert p.stdout == "" and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"launch/multi_node.sh: error: hostfile {hostfile} ")
    assert expected in p.stderr
    assert not rec.exists()


def _entry_points(tmp_path: Path, fake: Path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    write_fake(bin_dir / "srun", f'exec {shlex.quote(str(fake))} "$@"\n')
    write_fake(bin_dir / "scontrol", "echo localhost\n")
    env = launch_env(TORCHRUN=str(fake), DEEPSPEED=str(fake), PATH=f"{bin_dir}:{os.environ['PATH']}",
                     SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="2", SLURM_SUBMIT_DIR=str(tmp_path))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    return env, {
        "single_node": [LAUNCH / "single_node.sh"],
        "multi_node deepspeed": [LAUNCH / "multi_node.sh", "deepspeed", "--hostfile", hostfile],
        "multi_node torchrun": [LAUNCH / "multi_node.sh", "torchrun", "--nnodes", "2", "--rdzv-endpoint",
                                "127.0.0.1:29400"],
        "slurm": ["bash", LAUNCH / "slurm.sbatch"],
    }


@pytest.mark.timeout(60)
@pytest.mark.parametrize("entry", ["single_node", "multi_node deepspeed", "multi_node torchrun", "slurm"])
def test_bad_config_is_refused_before_anything_starts(entry, shards, tmp_path, recorder):
    fake, rec = recorder
    env, entries = _entry_points(tmp_path, fake)
    p = run([*entries[entry], CONFIG, f"data.train={shards / 'train'}", "selection.method=nope"], 50, env,
            cwd=tmp_path)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "+ " not in p.stdout  # no command printed: nothing was about to start
    assert p.stderr.count("\n") == 1, p.stderr
    assert "refusing to start: dissect-train: config error: selection.method must be one of" in p.stderr
    assert not rec.exists()
    assert not (tmp_path / "runs").exists()


@pytest.mark.timeout(30)
def test_missing_config_file_is_refused(tmp_path, recorder):
    fake, rec = recorder
    p = run([LAUNCH / "single_node.sh", tmp_path / "nope.yaml"], 20, launch_env(TORCHRUN=str(fake)))
    assert p.returncode == 2 and "config file" in p.stderr and "does not exist" in p.stderr
    assert not rec.exists()


# ---------------------------------------------------------------------------------------------
# commands: printed exactly, overrides untouched (dry runs for what needs other machines)

TRICKY = ["run.name=with space", "data.train=/d/{00000..00003}.tar", "optim.lr=$HOME", "log.every_steps=*"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_single_node_runs_exactly_the_printed_command(launcher, tmp_path, recorder):
    fake, rec = recorder
    env = launch_env(TORCHRUN=str(fake), DEEPSPEED=str(fake), DISSECT_CHECK="0", NPROC="3", LAUNCHER=launcher)
    p = run([LAUNCH / "single_node.sh", CONFIG, *TRICKY], 20, env)
    assert p.returncode == 0, p.stderr
    cmd = printed_cmd(p.stdout)
    assert cmd == [str(fake), *rec.read_text().splitlines()]  # what ran is what was printed
    assert cmd[-len(TRICKY) - 3:] == ["pipeline.train", "--config", CONFIG, *TRICKY]
    if launcher == "torchrun":
        assert cmd[1:6] == ["--standalone", "--nnodes", "1", "--nproc-per-node", "3"]
    else:
        assert cmd[1:3] == ["--num_gpus", "3"] and "--module" in cmd


@pytest.mark.timeout(30)
def test_single_node_counts_visible_gpus(recorder):
    """CUDA_VISIBLE_DEVICES decides the rank count, and the deepspeed launcher gets those GPUs
    (with --num_gpus it would drop the variable and take GPUs 0..N-1)."""
    fake, rec = recorder
    for launcher, expected in (("torchrun", ["--nproc-per-node", "3"]), ("deepspeed", ["--include", "localhost:1,4,6"])):
        env = launch_env(TORCHRUN=str(fake), DEEPSPEED=str(fake), DISSECT_CHECK="0", LAUNCHER=launcher,
                         CUDA_VISIBLE_DEVICES="1,4,6")
        p = run([LAUNCH / "single_node.sh", "--dry-run", CONFIG], 20, env)
        assert p.returncode == 0, p.stderr
        cmd = printed_cmd(p.stdout)
        i = cmd.index(expected[0])
        assert cmd[i:i + 2] == expected
    assert not rec.exists()


@pytest.mark.timeout(30)
def test_multi_node_dry_runs(tmp_path, recorder):
    fake, rec = recorder
    env = launch_env(DISSECT_CHECK="0", DISSECT_RDZV_TIMEOUT_S="120", TORCHRUN=str(fake), DEEPSPEED=str(fake),
                     IFNAME="eth7")
    mn = LAUNCH / "multi_node.sh"
    tail = ["-m", "pipeline.train", "--config", CONFIG, *TRICKY]

    # torchrun, static: node rank + master address
    p = run([mn, "--dry-run", "torchrun", "--nnodes", "4", "--nproc_per_node=8", "--node-rank", "3",
             "--master-addr", "10.1.2.3", "--master-port", "29999", CONFIG, *TRICKY], 20, env)
    assert p.returncode == 0, p.stderr
    assert printed_cmd(p.stdout) == [str(fake), "--nnodes", "4", "--nproc-per-node", "8", "--max-restarts", "0",
                                     "--node-rank", "3", "--master-addr", "10.1.2.3", "--master-port", "29999",
                                     "--rdzv-conf", "timeout=120", *tail]
    assert "NCCL_SOCKET_IFNAME=eth7" in p.stdout and "GLOO_SOCKET_IFNAME=eth7" in p.stdout

    # torchrun, c10d rendezvous
    p = run([mn, "--dry-run", "torchrun", "--nnodes", "2", "--nproc-per-node", "8", "--rdzv-endpoint",
             "head:29400", "--rdzv-id", "exp1", CONFIG, *TRICKY], 20, env)
    assert p.returncode == 0, p.stderr
    assert printed_cmd(p.stdout) == [str(fake), "--nnodes", "2", "--nproc-per-node", "8", "--max-restarts", "0",
                                     "--rdzv-backend", "c10d", "--rdzv-endpoint", "head:29400", "--rdzv-id", "exp1",
                                     "--rdzv-conf", "join_timeout=120", *tail]

    # deepspeed over ssh: master = first host; the environment travels in a DS_ENV_FILE
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# cluster\nnode-a slots=8\nnode-b slots=8\n")
    p = run([mn, "--dry-run", "deepspeed", "--hostfile", hostfile, CONFIG, *TRICKY], 20, env)
    assert p.returncode == 0, p.stderr
    cmd = printed_cmd(p.stdout)
    assert cmd[0] == "env" and cmd[1].startswith("DS_ENV_FILE=")
    assert cmd[2:] == [str(fake), "--hostfile", str(hostfile), "--master_addr", "node-a", "--master_port", "29500",
                       "--module", "pipeline.train", "--config", CONFIG, *TRICKY]
    env_file = Path(cmd[1].split("=", 1)[1])
    exported = dict(ln.split("=", 1) for ln in env_file.read_text().splitlines())
    env_file.unlink()
    assert exported["GLOO_SOCKET_IFNAME"] == "eth7" and exported["OMP_NUM_THREADS"] == "1"
    assert exported["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"

    # one remote host: forced over ssh (the launcher would otherwise run a 1-host hostfile here)
    one = tmp_path / "one-host"
    one.write_text("gpu-node-7 slots=4\n")
    p = run([mn, "--dry-run", "deepspeed", "--hostfile", one, CONFIG], 20, env)
    assert p.returncode == 0, p.stderr
    cmd = printed_cmd(p.stdout)
    assert "--force_multi" in cmd and cmd[cmd.index("--master_addr") + 1] == "gpu-node-7"
    Path(cmd[1].split("=", 1)[1]).unlink()

    # deepspeed without ssh: the same command on each host with its --node-rank
    p = run([mn, "--dry-run", "deepspeed", "--hostfile", hostfile, "--no-ssh", "--node-rank", "1",
             "--master_addr=10.0.0.1", CONFIG, *TRICKY], 20, env)
    assert p.returncode == 0, p.stderr
    assert printed_cmd(p.stdout)[:10] == [str(fake), "--hostfile", str(hostfile), "--master_addr", "10.0.0.1",
                                          "--master_port", "29500", "--no_ssh", "--node_rank", "1"]
    assert not rec.exists()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("args, expected", [
    (["torchrun", "--nnodes", "2", CONFIG], "torchrun needs --node-rank R"),
    (["torchrun", "--nnodes", "2", "--node-rank", "2", "--master-addr", "a", CONFIG], "must be below --nnodes 2"),
    (["torchrun", "--nnodes", "2", "--rdzv-endpoint", "head", CONFIG], "--rdzv-endpoint must be HOST:PORT"),
    (["torchrun", "--nnodes", "2", "--rdzv-endpoint", "h:1", "--node-rank", "0", CONFIG], "not both"),
    (["deepspeed", CONFIG], "deepspeed needs --hostfile"),
    (["deepspeed", "--hostfile", "/nonexistent/hostfile", CONFIG], "does not exist"),
    (["mpirun", CONFIG], "must be deepspeed or torchrun"),
    (["torchrun", "--nnodes", "2", "--node-rank", "0", "--master-addr", "a"], "no config given"),
])
def test_multi_node_usage_errors(args, expected, recorder):
    fake, rec = recorder
    p = run([LAUNCH / "multi_node.sh", *args], 20, launch_env(TORCHRUN=str(fake), DEEPSPEED=str(fake)))
    assert p.returncode == 2 and expected in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert not rec.exists()


@pytest.mark.timeout(30)
def test_localhost_first_of_several_hosts_needs_master_addr(tmp_path, recorder):
    fake, rec = recorder
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=8\nnode-b slots=8\n")
    env = launch_env(DEEPSPEED=str(fake), DISSECT_CHECK="0")
    p = run([LAUNCH / "multi_node.sh", "deepspeed", "--hostfile", hostfile, CONFIG], 20, env)
    assert p.returncode == 2 and "give --master-addr" in p.stderr, p.stderr
    p = run([LAUNCH / "multi_node.sh", "--dry-run", "deepspeed", "--hostfile", hostfile, "--master-addr", "10.0.0.1",
             CONFIG], 20, env)
    assert p.returncode == 0, p.stderr
    Path(printed_cmd(p.stdout)[1].split("=", 1)[1]).unlink()
    assert not rec.exists()


@pytest.mark.timeout(30)
def test_slurm_requeues_on_usr1(tmp_path):
    """The time-limit warning (SIGUSR1 to the batch shell) triggers `scontrol requeue JOBID`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    pidfile = tmp_path / "srun.pid"
    write_fake(bin_dir / "srun", f'echo $$ > {pidfile}\nexec sleep 60\n')
    # requeue stops the job's steps, as SLURM does
    write_fake(bin_dir / "scontrol", f'''case "$1 $2" in
    "show hostnames") echo node-a ;;
    *) echo "$*" >> {calls}; kill "$(cat {pidfile})" ;;
esac
''')
    env = launch_env(PATH=f"{bin_dir}:{os.environ['PATH']}", DISSECT_CHECK="0", SLURM_JOB_ID="4242",
                     SLURM_JOB_NUM_NODES="2", SLURM_SUBMIT_DIR=str(tmp_path), NPROC_PER_NODE="8")
    log = tmp_path / "batch.log"
    job = start(["bash", LAUNCH / "slurm.sbatch", CONFIG, "data.train=x"], log, env=env, cwd=tmp_path)
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
# README.md, "Launching at scale": every launch command in it runs as a dry run


def launch_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Launching at scale")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def readme_commands() -> list[str]:
    text = launch_section()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [ln for block in blocks for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]


@pytest.mark.timeout(60)
def test_readme_commands_dry_run(tmp_path):
    text = launch_section()
    hosts = re.search(r"```text\n# hosts\n(.*?)```", text, flags=re.S).group(1)
    (tmp_path / "hosts").write_text(hosts)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text((ROOT / "configs" / "demo.yaml").read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_fake(bin_dir / "scontrol", "echo node-a\n")
    commands = readme_commands()
    assert len(commands) >= 10
    for line in commands:
        words = shlex.split(line, comments=True)
        env = launch_env(DISSECT_CHECK="0", TMPDIR=str(tmp_path), PATH=f"{bin_dir}:{os.environ['PATH']}")
        while "=" in words[0] and not words[0].startswith("-"):
            k, v = words.pop(0).split("=", 1)
            env[k] = v
        if words[0] == "sbatch":
            opts = dict(w[2:].split("=", 1) for w in words[1:words.index("launch/slurm.sbatch")])
            env.update(DRY_RUN="1", SLURM_JOB_ID="1", SLURM_SUBMIT_DIR=str(tmp_path),
                       SLURM_JOB_NUM_NODES=opts.get("nodes", "2"), SLURM_GPUS_PER_NODE=opts.get("gpus-per-node", "8"))
            args = words[words.index("launch/slurm.sbatch") + 1:]
            cmd = ["bash", LAUNCH / "slurm.sbatch", *args]
        else:
            assert words[0].startswith("launch/"), line
            args = words[1:]
            cmd = [ROOT / words[0], "--dry-run", *args]
        p = run(cmd, 20, env, cwd=tmp_path)
        assert p.returncode == 0, f"{line}\n{p.stderr}"
        printed = printed_cmd(p.stdout)
        config_at = printed.index("--config")
        user = args[args.index("configs/demo.yaml"):]
        assert [x for x in printed[config_at + 1:] if x != "checkpoint.resume=latest"] == user, line
