"""Crash safety of checkpoints: write, then publish; retention; resume after kill -9.

Unit tests drive pipeline.checkpoint with a stand-in engine (no DeepSpeed); the rest are real
runs of `python -m pipeline.train` (and torchrun for 2 ranks) that are killed with SIGKILL while
a checkpoint is being written, then resumed with checkpoint.resume=latest.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from procutil import run_cmd, torchrun
from shardutil import write_digit_shards

from pipeline import checkpoint as ckpt
from pipeline.config import ConfigError
from pipeline.dist import DistInfo

DIST = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class Counters:
    def __init__(self, step: int):
        self.step = step

    def state_dict(self) -> dict:
        return {"step": self.step}


class FakeEngine:
    """Writes DeepSpeed-like files; ``crash=True`` dies halfway, like a kill during the save."""

    def __init__(self, crash: bool = False):
        self.crash = crash

    def save(self, ckpt_dir, tag, client_state):
        d = Path(ckpt_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"weights %d" % client_state["step"])
        if self.crash:
            raise KeyboardInterrupt("killed while writing the optimizer states")
        (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"optim")


def _save(d: Path, step: int, keep: int = 0, crash: bool = False) -> str:
    return ckpt.save(FakeEngine(crash), d, step, {"train_state": Counters(step)}, DIST, keep)


def _complete(d: Path, *steps: int, incomplete: tuple[int, ...] = ()) -> None:
    for s in steps:
        _save(d, s)
    for s in incomplete:
        (d / ckpt.tag_for(s)).mkdir(parents=True)
        (d / ckpt.tag_for(s) / "mp_rank_00_model_states.pt").write_bytes(b"half")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("latest", ["step_00000006\n", "step_00000099\n", "", "../../etc\n", None])
def test_latest_never_names_an_incomplete_checkpoint(tmp_path, latest):
    _complete(tmp_path, 2, 4, incomplete=(6,))
    if latest is None:
        (tmp_path / "latest").unlink()
    else:
        (tmp_path / "latest").write_text(latest)
    assert ckpt.latest_tag(tmp_path) == "step_00000004"
    assert ckpt.resolve("latest", tmp_path) == (tmp_path, "step_00000004")


@pytest.mark.timeout(30)
def test_crash_during_save_leaves_the_previous_latest(tmp_path):
    _complete(tmp_path, 2)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 4, crash=True)
    assert not (tmp_path / "step_00000004" / ckpt.COMPLETE).exists()
    assert (tmp_path / "latest").read_text().strip() == "step_00000002"
    assert ckpt.latest_tag(tmp_path) == "step_00000002"
    # the next save of the same step (after a resume from step 2) completes it normally
    _save(tmp_path, 4)
    assert ckpt.latest_tag(tmp_path) == "step_00000004"


@pytest.mark.timeout(30)
def test_crash_while_rewriting_a_complete_checkpoint(tmp_path):
    """Resumed from step 2 after step 4 was saved (e.g. resume=<path to step 2>): saving step 4
    again overwrites a complete dir; a crash then must not leave a stale COMPLETE on mixed files."""
    _complete(tmp_path, 2, 4)
    (tmp_path / "latest").write_text("step_00000002\n")
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 4, crash=True)
    assert ckpt.latest_tag(tmp_path) == "step_00000002"
    assert "step_00000004" not in ckpt.complete_tags(tmp_path)


@pytest.mark.timeout(30)
def test_checkpoint_files_are_on_disk_before_complete(tmp_path, monkeypatch):
    """COMPLETE must not reach the disk ahead of the data it vouches for (power loss, not only
    kill -9): every file of the checkpoint is fsynced before the marker is written."""
    synced: set[str] = set()
    real_fsync = os.fsync

    def fsync(fd):
        synced.add(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    seen_at_complete: list[set[str]] = []
    real_atomic = ckpt._atomic_write

    def atomic(path, text):
        if Path(path).name == ckpt.COMPLETE:
            seen_at_complete.append(set(synced))
        return real_atomic(path, text)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(ckpt, "_atomic_write", atomic)
    _save(tmp_path, 2)
    files = {
        os.path.realpath(p)
        for p in (tmp_path / "step_00000002").iterdir()
        if p.name != ckpt.COMPLETE
    }
    assert files and files <= seen_at_complete[0], files - seen_at_complete[0]


@pytest.mark.timeout(30)
def test_retention_keeps_k_and_never_the_latest(tmp_path):
    _complete(tmp_path, 2, 4, 6, 8, incomplete=(3, 10))
    (tmp_path / "latest").write_text("step_00000004\n")  # e.g. a resume from step 4
    ckpt.prune(tmp_path, keep=2)
    assert ckpt.complete_tags(tmp_path) == ["step_00000004", "step_00000006", "step_00000008"]
    assert not (tmp_path / "step_00000003").exists()  # a crashed save older than latest
    # keep=1 through a real save: the new one is latest, the rest go
    _save(tmp_path, 12, keep=1)
    assert ckpt.complete_tags(tmp_path) == ["step_00000012"]
    ckpt.prune(tmp_path, keep=0)  # 0 keeps everything
    assert ckpt.complete_tags(tmp_path) == ["step_00000012"]


@pytest.mark.timeout(30)
def test_resume_from_a_path_that_is_not_a_complete_checkpoint(tmp_path):
    _complete(tmp_path, 2, incomplete=(4,))
    for bad in (tmp_path / "step_00000004", tmp_path / "nope"):
        with pytest.raises(ConfigError, match="checkpoint.resume"):
            ckpt.resolve(str(bad), tmp_path)
    assert ckpt.resolve(str(tmp_path / "step_00000002"), tmp_path) == (tmp_path, "step_00000002")
    assert ckpt.resolve("latest", tmp_path / "empty") is None  # nothing yet: a fresh start
    assert ckpt.resolve("", tmp_path) is None


# ---------------------------------------------------------------------------------------------
# real runs


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ck") / "train"
    write_digit_shards(d, n_shards=4, per_shard=32)
    return d


def _cmd(shards: Path, run: Path, *extra: str, nproc: int = 1) -> list[str]:
    head = (
        [sys.executable, "-m", "pipeline.train"]
        if nproc == 1
        else [*torchrun(nproc), "-m", "pipeline.train"]
    )
    return [
        *head,
        "--config",
        "configs/tiny-cpu.yaml",
        f"data.train={shards}",
        f"run.dir={run}",
        "data.batch_size=16",
        "optim.epochs=10",
        "eval.at_end=false",
        "log.tensorboard=false",
        "log.progress=false",
        "log.every_steps=1",
        *extra,
    ]


def _rows(run: Path) -> list[dict]:
    return [
        r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]


def _resumed_step(stderr: str) -> int:
    line = next(ln for ln in stderr.splitlines() if "resumed from" in ln)
    return int(line.rsplit("at step", 1)[1])


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_resume_skips_a_save_that_never_finished(shards, tmp_path):
    run = tmp_path / "run"
    p = run_cmd(
        _cmd(shards, run, "optim.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep=0"), 120
    )
    assert p.returncode == 0, p.stderr[-3000:]
    ck = run / "checkpoints"
    # a save of step 6 that died halfway, and `latest` already moved to it
    shutil.copytree(ck / "step_00000004", ck / "step_00000006")
    (ck / "step_00000006" / ckpt.COMPLETE).unlink()
    (ck / "step_00000006" / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 100)
    (ck / "latest").write_text("step_00000006\n")
    p = run_cmd(
        _cmd(
            shards,
            run,
            "optim.max_steps=10",
            "checkpoint.every_steps=2",
            "checkpoint.keep=2",
            "checkpoint.resume=latest",
        ),
        120,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert _resumed_step(p.stderr) == 4
    steps = [r["step"] for r in _rows(run)]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], steps
    assert ckpt.complete_tags(ck) == [
        "step_00000008",
        "step_00000010",
    ]  # keep=2, the broken 6 replaced
    assert ckpt.latest_tag(ck) == "step_00000010"


def _snapshot(run: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


def _kill_and_resume(shards: Path, tmp_path: Path, total: int, nproc: int, *extra: str) -> None:
    """Killed inside the save of step 3 (tests/savekill.py: after every rank's files, before
    COMPLETE), then resumed: step 2 is latest, the run finishes, step 3 is written again."""
    run = tmp_path / "run"
    ck = run / "checkpoints"
    args = (f"optim.max_steps={total}", "checkpoint.every_steps=1", "checkpoint.keep=2", *extra)
    marker = tmp_path / "killed_in_save"
    cmd = _cmd(shards, run, *args, nproc=nproc)
    at = cmd.index("-m")  # the same run through the hook script
    hooked = [*cmd[:at], str(Path(__file__).with_name("savekill.py")), "3", str(marker)]
    p = run_cmd([*hooked, *cmd[at + 2 :]], 180)
    assert p.returncode != 0, p.stderr[-3000:]
    assert marker.is_file() and marker.read_text() == "step_00000003", p.stderr[-3000:]
    tag = "step_00000003"
    assert (ck / tag / "state_rank0.pt").is_file()  # its files were written ...
    assert not (ck / tag / ckpt.COMPLETE).exists()  # ... and the kill landed before COMPLETE
    before = _snapshot(run)
    time.sleep(1.0)
    assert _snapshot(run) == before, "something of the killed run is still writing"
    good = ckpt.latest_tag(ck)
    assert good == "step_00000002"
    assert (ck / good / ckpt.COMPLETE).is_file()

    p2 = run_cmd(_cmd(shards, run, *args, "checkpoint.resume=latest", nproc=nproc), 180)
    assert p2.returncode == 0, p2.stderr[-3000:]
    start = _resumed_step(p2.stderr)
    assert start == int(good.split("_")[1])
    # metrics.jsonl is appended to: rows the killed run logged after its last checkpoint stay
    steps = [r["step"] for r in _rows(run)]
    assert steps[-(total - start) :] == list(range(start + 1, total + 1)), steps
    assert (run / "model.pt").is_file() and ckpt.latest_tag(ck) == ckpt.tag_for(total)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_during_a_save_then_resume_finishes(shards, tmp_path):
    _kill_and_resume(shards, tmp_path, total=16, nproc=1)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_two_ranks_zero3_sigkill_during_a_save_then_resume(shards, tmp_path):
    _kill_and_resume(shards, tmp_path, 12, 2, "deepspeed.zero_stage=3")
