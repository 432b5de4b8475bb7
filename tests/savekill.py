"""The real training entry point, killed inside a checkpoint save (a hook, not a race):

    python tests/savekill.py STEP MARKER [dissect-train args ...]      (or under torchrun)

Rank 0 SIGKILLs itself inside `checkpoint.save` of step STEP, after every rank wrote its files
and they were flushed, before COMPLETE and `latest` are written: the last moment a crash can
hit a save. MARKER gets the tag just before, so a test can assert the kill landed there.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def main() -> None:
    step, marker, argv = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    from pipeline import checkpoint as ckpt

    flush = ckpt._fsync_tree

    def flush_then_die(d: Path) -> None:
        flush(d)
        if d.name == ckpt.tag_for(step):
            marker.write_text(d.name)
            os.kill(os.getpid(), signal.SIGKILL)

    ckpt._fsync_tree = flush_then_die
    from pipeline.train import main as train

    sys.exit(train(argv))


if __name__ == "__main__":
    main()
