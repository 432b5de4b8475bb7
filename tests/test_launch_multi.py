"""launch/multi_node.sh: real runs as two "nodes" on one machine (two torchrun invocations with
--nnodes 2; the deepspeed launcher with a hostfile naming localhost); a rank killed mid-run ends
both nodes; command shapes that need machines we do not have (multi-host deepspeed, c10d
torchrun) as dry runs; usage errors; SIGTERM to the script stops every local process.
(Shared cases, hostfile validation: test_launch_common.py.)
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

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
    metrics_rows,
    printed_cmd,
    run,
    start,
    train_workers,
    wait_all,
    wait_for,
    write_fake,
)

from pipeline.dist import free_port


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory)


@pytest.fixture
def recorder(tmp_path):
    return make_recorder(tmp_path)


def start_two_nodes(procs: list, logs: list, tmp_path, port: int, args: list, env=None) -> None:
    """Two `multi_node.sh torchrun` "nodes" (one rank each) on this machine, static rendezvous at
    127.0.0.1:``port``; appends to ``procs``/``logs`` as it goes, so a failed start is still
    cleaned up by the caller's finally."""
    for node in (0, 1):
        logs.append(tmp_path / f"node{node}.log")
        cmd = [LAUNCH / "multi_node.sh", "torchrun", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
               CONFIG, *args]  # fmt: skip
        procs.append(start(cmd, logs[-1], env=env))


# ---------------------------------------------------------------------------------------------
# real runs


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_two_nodes_torchrun_static_rendezvous(shards, tmp_path):
    run_dir = tmp_path / "run"
    port = free_port()
    args = [
        *dissect_overrides(shards, run_dir),
        f"data.val={shards / 'val'}",
        "optim.max_steps=6",
        "checkpoint.every_steps=3",
        "run.name=two nodes",
    ]
    procs, logs = [], []
    try:
        start_two_nodes(procs, logs, tmp_path, port, args)
        rcs = wait_all(procs, 150, logs)
    finally:
        kill_all(procs)
    assert rcs == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)

    for node, log in enumerate(logs):
        cmd = printed_cmd(log.read_text())
        assert cmd[cmd.index("--node-rank") + 1] == str(node)
        assert cmd[cmd.index("--config") + 1 :] == [CONFIG, *args]  # overrides untouched
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
    assert (
        len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1
    )  # TensorBoard: rank 0 only
    assert "eval/zeroshot_top1" in json.loads((run_dir / "eval.json").read_text())


@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_deepspeed_launcher_with_localhost_hostfile(shards, tmp_path):
    run_dir = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# this machine only: the launcher runs here, no ssh\nlocalhost slots=2\n")
    args = [*dissect_overrides(shards, run_dir), "optim.max_steps=4", "eval.at_end=false"]
    p = run(
        [
            LAUNCH / "multi_node.sh",
            "deepspeed",
            "--hostfile",
            hostfile,
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            free_port(),
            CONFIG,
            *args,
        ],
        timeout=130,
        env=launch_env(DISSECT_CHECK="0"),
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    cmd = printed_cmd(p.stdout)
    assert cmd[0].endswith("deepspeed") and "--no_ssh_check" in cmd
    assert cmd[cmd.index("--hostfile") + 1] == str(hostfile)
    assert cmd[cmd.index("--module") :] == ["--module", "pipeline.train", "--config", CONFIG, *args]
    rows = [r for r in metrics_rows(run_dir) if "loss" in r]
    assert rows[-1]["step"] == 4 and rows[-1]["samples_seen"] == 4 * 2 * 32
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"


# ---------------------------------------------------------------------------------------------
# dead ranks, signals


@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_killed_rank_ends_both_nodes_within_timeout(shards, tmp_path):
    """SIGKILL node 1's rank once training runs: both torchruns exit non-zero, well within
    deepspeed.timeout_s (gloo sees the peer's socket close; torchrun stops its node)."""
    timeout_s = 30
    run_dir = tmp_path / "run"
    port = free_port()
    args = [
        *dissect_overrides(shards, run_dir),
        "optim.epochs=1000",
        "log.every_steps=1",
        f"deepspeed.timeout_s={timeout_s}",
        "eval.at_end=false",
    ]
    procs, logs = [], []
    try:
        start_two_nodes(procs, logs, tmp_path, port, args, env=launch_env(DISSECT_CHECK="0"))
        metrics = run_dir / "metrics.jsonl"
        wait_for(
            lambda: metrics.is_file() and metrics.stat().st_size > 0,
            90,
            "training to start",
            procs,
            logs,
        )
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


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["torchrun", "deepspeed"])
def test_multi_node_sigterm_stops_every_local_process(mode, tmp_path):
    """SIGTERM to multi_node.sh: the launcher's "ranks", each in a session of its own (one of
    them ignoring SIGTERM), are gone; the script exits 143. Fake launcher, no training."""
    pids = tmp_path / "ranks.pids"
    fake = write_fake(
        tmp_path / "fake-launcher",
        f"""
setsid sleep 300 & echo $! >> {pids}
setsid bash -c 'trap "" TERM; exec sleep 301' & echo $! >> {pids}
wait
""",
    )
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    opts = {
        "torchrun": ["--nnodes", "2", "--node-rank", "0", "--master-addr", "127.0.0.1"],
        "deepspeed": ["--hostfile", hostfile],
    }[mode]
    log = tmp_path / "job.log"
    job = start(
        [LAUNCH / "multi_node.sh", mode, *opts, CONFIG],
        log,
        env=launch_env(
            TORCHRUN=str(fake), DEEPSPEED=str(fake), DISSECT_CHECK="0", DISSECT_KILL_GRACE_S="2"
        ),
    )
    ranks = []
    try:
        wait_for(
            lambda: pids.is_file() and len(pids.read_text().split()) == 2,
            20,
            "fake ranks",
            [job],
            [log],
        )
        ranks = [psutil.Process(int(pid)) for pid in pids.read_text().split()]
        time.sleep(1.5)  # the script has looked at its tree at least once
        job.send_signal(signal.SIGTERM)
        rc = job.wait(timeout=15)
        time.sleep(0.5)
        out = log.read_text()
        assert rc == 128 + signal.SIGTERM, out
        assert not [r for r in ranks if alive(r)], out
        assert "launch/multi_node.sh: SIGTERM: stopping" in out
    finally:
        kill_all([job])
        kill_procs(ranks)


# ---------------------------------------------------------------------------------------------
# commands: printed exactly, overrides untouched (dry runs for what needs other machines)


@pytest.mark.timeout(30)
def test_multi_node_dry_runs(tmp_path, recorder):
    fake, rec = recorder
    env = launch_env(
        DISSECT_CHECK="0",
        DISSECT_RDZV_TIMEOUT_S="120",
        TORCHRUN=str(fake),
        DEEPSPEED=str(fake),
        IFNAME="eth7",
    )
    mn = LAUNCH / "multi_node.sh"
    tail = ["-m", "pipeline.train", "--config", CONFIG, *TRICKY]

    # torchrun, static: node rank + master address
    p = run(
        [
            mn,
            "--dry-run",
            "torchrun",
            "--nnodes",
            "4",
            "--nproc_per_node=8",
            "--node-rank",
            "3",
            "--master-addr",
            "10.1.2.3",
            "--master-port",
            "29999",
            CONFIG,
            *TRICKY,
        ],
        20,
        env,
    )
    assert p.returncode == 0, p.stderr
    assert printed_cmd(p.stdout) == [
        str(fake),
        "--nnodes",
        "4",
        "--nproc-per-node",
        "8",
        "--max-restarts",
        "0",
        "--node-rank",
        "3",
        "--master-addr",
        "10.1.2.3",
        "--master-port",
        "29999",
        "--rdzv-conf",
        "timeout=120",
        *tail,
    ]
    assert "NCCL_SOCKET_IFNAME=eth7" in p.stdout and "GLOO_SOCKET_IFNAME=eth7" in p.stdout

    # torchrun, c10d rendezvous
    p = run(
        [
            mn,
            "--dry-run",
            "torchrun",
            "--nnodes",
            "2",
            "--nproc-per-node",
            "8",
            "--rdzv-endpoint",
            "head:29400",
            "--rdzv-id",
            "exp1",
            CONFIG,
            *TRICKY,
        ],
        20,
        env,
    )
    assert p.returncode == 0, p.stderr
    assert printed_cmd(p.stdout) == [
        str(fake),
        "--nnodes",
        "2",
        "--nproc-per-node",
        "8",
        "--max-restarts",
        "0",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "head:29400",
        "--rdzv-id",
        "exp1",
        "--rdzv-conf",
        "join_timeout=120",
        *tail,
    ]

    # deepspeed over ssh: master = first host; the environment travels in a DS_ENV_FILE
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# cluster\nnode-a slots=8\nnode-b slots=8\n")
    p = run([mn, "--dry-run", "deepspeed", "--hostfile", hostfile, CONFIG, *TRICKY], 20, env)
    assert p.returncode == 0, p.stderr
    cmd = printed_cmd(p.stdout)
    assert cmd[0] == "env" and cmd[1].startswith("DS_ENV_FILE=")
    assert cmd[2:] == [
        str(fake),
        "--hostfile",
        str(hostfile),
        "--master_addr",
        "node-a",
        "--master_port",
        "29500",
        "--module",
        "pipeline.train",
        "--config",
        CONFIG,
        *TRICKY,
    ]
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
    p = run(
        [
            mn,
            "--dry-run",
            "deepspeed",
            "--hostfile",
            hostfile,
            "--no-ssh",
            "--node-rank",
            "1",
            "--master_addr=10.0.0.1",
            CONFIG,
            *TRICKY,
        ],
        20,
        env,
    )
    assert p.returncode == 0, p.stderr
    assert printed_cmd(p.stdout)[:10] == [
        str(fake),
        "--hostfile",
        str(hostfile),
        "--master_addr",
        "10.0.0.1",
        "--master_port",
        "29500",
        "--no_ssh",
        "--node_rank",
        "1",
    ]
    assert not rec.exists()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "args, expected",
    [
        (["torchrun", "--nnodes", "2", CONFIG], "torchrun needs --node-rank R"),
        (
            ["torchrun", "--nnodes", "2", "--node-rank", "2", "--master-addr", "a", CONFIG],
            "must be below --nnodes 2",
        ),
        (
            ["torchrun", "--nnodes", "2", "--rdzv-endpoint", "head", CONFIG],
            "--rdzv-endpoint must be HOST:PORT",
        ),
        (
            ["torchrun", "--nnodes", "2", "--rdzv-endpoint", "h:1", "--node-rank", "0", CONFIG],
            "not both",
        ),
        (["deepspeed", CONFIG], "deepspeed needs --hostfile"),
        (["deepspeed", "--hostfile", "/nonexistent/hostfile", CONFIG], "does not exist"),
        (["mpirun", CONFIG], "must be deepspeed or torchrun"),
        (
            ["torchrun", "--nnodes", "2", "--node-rank", "0", "--master-addr", "a"],
            "no config given",
        ),
    ],
)
def test_multi_node_usage_errors(args, expected, recorder):
    fake, rec = recorder
    p = run(
        [LAUNCH / "multi_node.sh", *args], 20, launch_env(TORCHRUN=str(fake), DEEPSPEED=str(fake))
    )
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
    p = run(
        [
            LAUNCH / "multi_node.sh",
            "--dry-run",
            "deepspeed",
            "--hostfile",
            hostfile,
            "--master-addr",
            "10.0.0.1",
            CONFIG,
        ],
        20,
        env,
    )
    assert p.returncode == 0, p.stderr
    Path(printed_cmd(p.stdout)[1].split("=", 1)[1]).unlink()
    assert not rec.exists()
