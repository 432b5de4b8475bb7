"""What goes into a checkpoint, how it is published, and how resume finds it.

Layout under ``<run>/checkpoints/``:
    step_00000100/            DeepSpeed's files (model, optimizer, scheduler partitions per rank)
    step_00000100/state_rank{r}.pt   per-rank state: trainer counters, loader position, RNG,
                                     score-store shard, historical-weight partitions
    step_00000100/COMPLETE    written by rank 0 after every rank finished writing
    step_00000100/universal/  DeepSpeed's universal checkpoint of this step, made on the first
                              resume with another world size (``universal/DONE`` names the step)
    latest                    the tag of the newest COMPLETE checkpoint (atomic replace)

Write, then publish: ``latest`` moves only after the barrier that follows every rank's
writes, so a crash during a save leaves the previous checkpoint as latest. Retention deletes
only complete checkpoints older than the newest ``keep`` and never the one ``latest`` names.

Resume on another world size (a requeue on fewer nodes, a job grown to more GPUs): rank 0
converts the step's ZeRO partitions into a universal checkpoint once (into a temporary folder,
renamed into place only when complete, so a conversion killed midway is never used) while the
other ranks wait; every rank loads it, and rebuilds its own state from all ranks' state files
(pipeline.elastic).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline import elastic
from pipeline.config import ConfigError
from pipeline.dist import DistInfo, barrier, broadcast_object

if (
    TYPE_CHECKING
):  # importing pipeline.engine imports deepspeed; checkpoint paths alone need neither
    from pipeline.engine import Engine

COMPLETE = "COMPLETE"
UNIVERSAL = "universal"  # subfolder of a step: its DeepSpeed universal checkpoint
UNIVERSAL_DONE = "DONE"  # inside it, written last: the tag it was converted from


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from here; the message says why, in one line."""


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
    if dist.is_main:  # a universal copy of the old contents would outlive them
        shutil.rmtree(ckpt_dir / tag / UNIVERSAL, ignore_errors=True)
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


def saved_world(step_dir: Path) -> int:
    """How many ranks wrote the checkpoint (its ``state_rank{r}.pt`` files, r = 0..W-1)."""
    ranks = sorted(
        int(p.stem.removeprefix("state_rank"))
        for p in step_dir.glob("state_rank*.pt")
        if p.stem.removeprefix("state_rank").isdigit()
    )
    if not ranks or ranks != list(range(len(ranks))):
        raise CheckpointError(
            f"{step_dir} has state files of ranks {ranks or 'none'}, not 0..W-1: an incomplete copy"
        )
    return len(ranks)


def saved_counters(step_dir: Path) -> dict:
    """Rank 0's trainer counters (step, epoch, step_in_epoch ...) without loading the rest."""
    sd = torch.load(step_dir / "state_rank0.pt", map_location="cpu", weights_only=False, mmap=True)
    return dict(sd["train_state"])


def _universal_tag(out: Path) -> str | None:
    done = out / UNIVERSAL_DONE
    return done.read_text().strip() if done.is_file() else None


def _convert(engine: Engine, step_dir: Path) -> None:
    """Rank 0: write ``step_dir/universal`` unless a complete one for this step is there."""
    out = step_dir / UNIVERSAL
    made_from = _universal_tag(out)
    if made_from == step_dir.name:
        return
    if made_from is not None:
        raise CheckpointError(
            f"{out} was converted from {made_from}, not {step_dir.name}; delete it and resume again"
        )
    for old in step_dir.glob(UNIVERSAL + ".tmp*"):  # a conversion killed midway
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)  # no DONE: never used
    need = 2 * sum(p.stat().st_size for p in step_dir.glob("*.pt"))  # fragments + merged
    free = shutil.disk_usage(step_dir).free
    if free < need:
        raise CheckpointError(
            f"converting {step_dir} to a universal checkpoint needs about {need / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB are free there; free space and resume again"
        )
    tmp = step_dir / f"{UNIVERSAL}.tmp{os.getpid()}"
    try:
        engine.to_universal(step_dir, tmp)
        _atomic_write(tmp / UNIVERSAL_DONE, step_dir.name + "\n")
        _fsync_tree(tmp)
        os.replace(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(
                f"no disk space left converting {step_dir} to a universal checkpoint; free space "
                "and resume again"
            ) from None
        raise
    except Exception as err:  # DeepSpeed's converter: asserts, KeyErrors, shape mismatches
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"{step_dir} cannot be converted to a universal checkpoint "
            f"({type(err).__name__}: {(str(err).splitlines() or [''])[0]}); resume it "
            "on the world size that wrote it"
        ) from None


def ensure_universal(engine: Engine, step_dir: Path, dist: DistInfo) -> Path:
    """Rank 0 converts (once per step), the other ranks wait; all raise the same error."""
    err = None
    if dist.is_main:
        try:
            _convert(engine, step_dir)
        except CheckpointError as e:
            err = str(e)
    err = broadcast_object(err)  # also the wait: nobody reads the folder before it is complete
    if err:
        raise CheckpointError(err)
    return step_dir / UNIVERSAL


def load(engine: Engine, where: tuple[Path, str], dist: DistInfo) -> dict:
    """Load DeepSpeed state and return this rank's state dict (trainer, selector, rng ...).

    From a checkpoint of another world size: model and optimizer through a universal
    checkpoint (ZeRO 1-3; a ZeRO-0 fp32 checkpoint is not partitioned and loads as it is), the
    rest resharded from every rank's state file (pipeline.elastic); ``rng`` is None on a rank
    the checkpoint did not have."""
    parent, tag = where
    step_dir = parent / tag
    old = saved_world(step_dir)

    def state_of(r: int) -> dict:
        return torch.load(step_dir / f"state_rank{r}.pt", map_location="cpu", weights_only=False)

    if old == dist.world_size:
        engine.load(parent, tag)
        return state_of(dist.rank)
    try:
        if engine.partitioned_checkpoint(step_dir):
            ensure_universal(engine, step_dir, dist)
            engine.load(step_dir, UNIVERSAL, universal=True)
        else:
            engine.load(parent, tag)
    except CheckpointError:
        raise
    except Exception as err:  # DeepSpeed's loader: missing parameter files, numel mismatches
        raise CheckpointError(
            f"{step_dir} (from {old} ranks) does not load into this model on {dist.world_size} "
            f"({type(err).__name__}: {(str(err).splitlines() or [''])[0]}); was it written by "
            "another model.name or deepspeed.zero_stage?"
        ) from None
    return elastic.reshard_state(
        state_of, old, dist.rank, dist.world_size, engine.partition_numels()
    )
