"""Run a function on W gloo ranks (CPU) with a hard timeout, so a hang fails instead of blocking.

    results = run_ranks(fn, world=2, args=(...,), timeout=120)   # list of fn's return, by rank

``fn(rank, world, *args)`` must live at module level in an importable module (spawn pickles it
by name). Each rank gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* and an initialised process group.
"""

from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import traceback
from pathlib import Path

import torch.multiprocessing as mp

from pipeline.dist import free_port  # noqa: F401  (re-exported for the tests)


def _entry(rank, world, port, fn, args, out_dir):
    import torch.distributed as dist

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import pipeline  # noqa: F401

    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        result = ("ok", fn(rank, world, *args))
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        result = ("error", traceback.format_exc())
    Path(out_dir, f"{rank}.pkl").write_bytes(pickle.dumps(result))
    try:
        dist.destroy_process_group()
    except Exception:
        pass


def run_ranks(fn, world: int, args: tuple = (), timeout: float = 120):
    out_dir = tempfile.mkdtemp(prefix="ranks")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world, port, fn, args, out_dir)) for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = __import__("time").time() + timeout
    for p in procs:
        p.join(max(0.1, deadline - __import__("time").time()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if hung:
        raise TimeoutError(f"ranks {hung} did not finish within {timeout}s (hang?)")
    results = []
    for r in range(world):
        f = Path(out_dir, f"{r}.pkl")
        if not f.exists():
            raise RuntimeError(f"rank {r} died without a result (exit code {procs[r].exitcode})")
        status, value = pickle.loads(f.read_bytes())
        if status != "ok":
            raise RuntimeError(f"rank {r} failed:\n{value}")
        results.append(value)
    return results
