"""What goes into a checkpoint, how it is published, and how resume finds it.

Layout under ``<run>/checkpoints/``:
    step_00000100/            DeepSpeed's files (model, optimizer, scheduler partitions per rank)
    step_00000100/state_rank{r}.pt   per-rank state: trainer counters, loader position, RNG,
                                     score-store shard, historical-weight partitions
    step_00000100/COMPLETE    written by rank 0 after every rank finished writing
    latest                    the tag of the newest COMPLETE checkpoint (atomic replace)

Write, then publish: ``latest`` moves only after the barrier that follows every rank's
writes, so a crash during a save leaves the previous checkpoint as latest. Retention deletes
only complete checkpoints older than the newest ``keep`` and never the one ``latest`` names.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.config import ConfigError
from pipeline.dist import DistInfo, barrier

if (
    TYPE_CHECKING
):  # importing pipeline.engine imports deepspeed; checkpoint paths alone need neither
    from pipeline.engine import Engine

COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int | None:
    """The step a tag names (``step_00000100`` -> 100); None for a name of another shape."""
    head, _, digits = tag.partition("_")
    return int(digits) if head == "step" and digits.isdigit() else None


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if st.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    with open(tmp) as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(d: Path) -> None:
    """Flush every file under ``d`` (and ``d`` itself) to disk. COMPLETE is written only after
    this: a power loss must not leave a durable marker in front of data still in the page cache.
    On a shared filesystem the writers' close() has already sent the data to the server."""
    for p in sorted(d.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_tags(ckpt_dir: Path) -> list[str]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and (p / COMPLETE).is_file())


def latest_tag(ckpt_dir: Path) -> str | None:
    f = ckpt_dir / "latest"
    if f.is_file():
        tag = f.read_text().strip()
        if (ckpt_dir / tag / COMPLETE).is_file():
            return tag
    tags = complete_tags(ckpt_dir)  # `latest` lost or pointing at a broken dir: newest complete
    return tags[-1] if tags else None


def save(engine: Engine, ckpt_dir: Path, step: int, states: dict, dist: DistInfo, keep: int) -> str:
    """All ranks call this. ``states``: name -> object with state_dict(), or plain data."""
    tag = tag_for(step)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    # Saving a tag again (after resuming from an older checkpoint) overwrites a complete dir: its
    # old marker must go first, or a crash mid-write leaves COMPLETE on a mix of old and new
    # files. Every rank unlinks before writing; COMPLETE comes back only after the barrier below.
    (ckpt_dir / tag / COMPLETE).unlink(missing_ok=True)
    engine.save(ckpt_dir, tag, client_state={"step": step})
    mine = {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in states.items()}
    mine["rng"] = rng_state()
    path = ckpt_dir / tag / f"state_rank{dist.rank}.pt"
    torch.save(mine, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    barrier()  # every rank has written its part
    if dist.is_main:
        _fsync_tree(ckpt_dir / tag)
        _atomic_write(ckpt_dir / tag / COMPLETE, "ok\n")
        _atomic_write(ckpt_dir / "latest", tag + "\n")
        prune(ckpt_dir, keep)
    barrier()
    return tag


def prune(ckpt_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    latest = latest_tag(ckpt_dir)
    tags = complete_tags(ckpt_dir)
    for tag in tags[:-keep]:
        if tag != latest:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    # leftovers of crashed saves older than the latest complete one
    for p in ckpt_dir.iterdir():
        if p.is_dir() and p.name.startswith("step_") and not (p / COMPLETE).is_file():
            if latest and p.name < latest:
                shutil.rmtree(p, ignore_errors=True)


def resolve(resume: str, ckpt_dir: Path) -> tuple[Path, str] | None:
    """``latest`` or a path to a checkpoint dir -> (parent dir, tag); None when nothing to resume."""
    if not resume:
        return None
    if resume == "latest":
        tag = latest_tag(ckpt_dir)
        return (ckpt_dir, tag) if tag else None
    p = Path(resume)
    if not (p / COMPLETE).is_file():
        what = (
            "has no COMPLETE marker (its save did not finish)" if p.is_dir() else "does not exist"
        )
        raise ConfigError(
            f"checkpoint.resume={resume!r} {what}; give 'latest' or a complete step_* dir"
        )
    return p.parent, p.name


def load(engine: Engine, where: tuple[Path, str], dist: DistInfo) -> dict:
    """Load DeepSpeed state and return this rank's state dict (trainer, selector, rng ...)."""
    parent, tag = where
    engine.load(parent, tag)
    path = parent / tag / f"state_rank{dist.rank}.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: was the checkpoint written with another world size?"
        )
    return torch.load(path, map_location="cpu", weights_only=False)
