"""Process environment of the training entry points (no torch here).

The defaults both packages share (offline Hugging Face, no update checks, the torch extensions
cache) live in `dissect_common.env`. What is only the trainer's:

- ``DS_ACCELERATOR``: cuda where torch sees a GPU, else cpu; `pipeline.engine` calls
  `set_accelerator` before it imports deepspeed (only torch knows whether CUDA is there).
- `die_with_parent`, `quiet_duplicate_warnings`: how a rank behaves under a launcher.
"""

from __future__ import annotations

import os
import sys


def set_accelerator(cuda: bool) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")


def die_with_parent() -> None:
    """Under a launcher (torchrun, deepspeed, srun + torchrun: RANK is set), make the kernel kill
    this rank when its parent (the launcher) dies, however it dies.

    torchrun starts each rank in a session of its own, so a SIGKILL of torchrun, or of its process
    group, does not reach the ranks: they would train on as orphans, writing the run directory
    beside a restarted job. ``PR_SET_PDEATHSIG`` fixes that at the source. The parent may already
    have died before the call; then our parent pid has changed and we exit at once. A plain
    ``python -m pipeline.train`` (no RANK) is left alone: ``nohup`` runs must survive their shell,
    unless its parent asks for it with ``DISSECT_DIE_WITH_PARENT=1`` (the benchmarks do).
    """
    asked = os.environ.get("DISSECT_DIE_WITH_PARENT") == "1"
    if not ("RANK" in os.environ or asked) or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not allowed here (a sandbox): the launchers' own tree kill still applies
    if os.getppid() != parent or parent == 1:
        sys.stderr.write("dissect-train: the launcher is gone; exiting\n")
        os._exit(1)


def quiet_duplicate_warnings() -> None:
    """Each warning once per job: ranks other than 0 drop Python warnings (rank 0 prints the same
    ones), and every rank drops the deprecation notices that torch and open_clip print from
    their own internals, which no user of this project can act on. Messages of our own (a
    rank's unreadable shard, say) are printed directly and are not affected."""
    import warnings

    for module in (r"open_clip\.loss", r"torch\.distributed"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
    if os.environ.get("RANK", "0") != "0":
        warnings.simplefilter("ignore")
