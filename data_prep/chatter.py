"""img2dataset's terminal output, folded into ours.

img2dataset prints from its parent process, its spawned download workers and its logger
process: a "worker - success: ..." and a "total - success: ..." line per shard, a bandwidth
hint, sharding notes and a tqdm counter without a total. A first demo build printed ~40 such
lines (each of them also carried by our own summary, or by nothing at all).

While img2dataset runs, `folded_output` points file descriptors 1 and 2 (inherited by the
workers) at `<out>/img2dataset.log`, which keeps everything for debugging, and a thread tails
that file: known chatter is dropped, every other line (errors, tracebacks, anything new) is
passed on to the real stderr as it arrives. The one progress indication is ours: finished
shards counted from img2dataset's `NNNNN_stats.json` files, as a tqdm bar on a terminal or a
short line every `PROGRESS_EVERY_S` seconds otherwise (a log file gets no bar scraps).
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOG = "img2dataset.log"
PROGRESS_EVERY_S = 30.0  # non-terminal progress line interval
_POLL_S = 0.25
# Shown lines wait this long: Ctrl-C reaches every worker too, and the tracebacks they print
# while dying are dropped (they stay in the log) once the parent has seen the interrupt.
HOLD_S = 1.0

# tqdm's counter without a total ("3it [00:03,  1.23it/s]"); it shares lines with prints.
# With our bar open in the same process, img2dataset's bar takes the next position and adds
# cursor movements (ESC [ A) around its scraps.
_TQDM_SCRAP = re.compile(r"\d+it \[[^\]\n]*\]|\x1b\[[0-9;]*[A-Za-z]")
_CHATTER = re.compile(
    r"^(?:"
    r"Starting the downloading of this file"
    r"|Sharding file number \d+ of \d+ called .*"
    r"|File sharded in \d+ shards"
    r"|Downloading starting now, check your bandwidth.*"
    r"|(?:worker|total)\s+- success: .*"  # per-shard speed lines (our summary has the counts)
    r")$"
)


def shown(line: str) -> str | None:
    """The part of one img2dataset output line worth showing, or None for chatter."""
    rest = _TQDM_SCRAP.sub("", line).rstrip()
    if not rest.strip() or _CHATTER.match(rest.strip()):
        return None
    return rest


class ShardProgress:
    """Finished shards and their images, read from img2dataset's per-shard stats files."""

    def __init__(self, out: Path, expected: list[str]):
        self.out, self.expected = out, expected
        self.images: dict[str, int] = {}  # shard name -> successes, once its stats are readable

    def poll(self) -> tuple[int, int]:
        for name in self.expected:
            if name in self.images:
                continue
            path = self.out / f"{name}_stats.json"
            try:
                self.images[name] = int(json.loads(path.read_text())["successes"])
            except (OSError, ValueError, KeyError):  # not there yet, or still being written
                pass
        return len(self.images), sum(self.images.values())


@contextmanager
def folded_output(out: Path, progress: ShardProgress) -> Iterator[Path]:
    """Run the body (an img2dataset call) with its output folded; yields the log path."""
    log = out / LOG
    # multiprocessing's resource tracker, when img2dataset's pool starts it in here, inherits the
    # log as its stderr: its "leaked semaphore" notes after a Ctrl-C belong to img2dataset's
    # workers and go to the log with their tracebacks, not to the user's terminal.
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    # O_APPEND: the parent and every worker share the file; each write lands at its end
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    # Workers write to a file now, which Python block-buffers; a worker that the pool
    # terminates would take its unflushed lines (an error, say) with it.
    unbuffered = os.environ.get("PYTHONUNBUFFERED")
    os.environ["PYTHONUNBUFFERED"] = "1"
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # sys.stdout/err need not write to fds 1 and 2 (pytest's capture, notebooks): point the
    # Python-level streams of this process at the log as well
    saved_streams = sys.stdout, sys.stderr
    stream = open(log, "a", buffering=1, encoding="utf-8", errors="replace")
    sys.stdout = sys.stderr = stream
    done, interrupted = threading.Event(), threading.Event()
    tail = threading.Thread(
        target=_tail,
        args=(log, saved_err, progress, done, interrupted),
        name="img2dataset-output",
        daemon=True,
    )
    tail.start()
    try:
        yield log
    except (KeyboardInterrupt, SystemExit):
        interrupted.set()
        raise
    finally:
        sys.stdout, sys.stderr = saved_streams
        stream.close()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        if unbuffered is None:
            os.environ.pop("PYTHONUNBUFFERED", None)
        else:
            os.environ["PYTHONUNBUFFERED"] = unbuffered
        done.set()
        tail.join()
        os.close(saved_err)


def _tail(
    log: Path,
    err_fd: int,
    progress: ShardProgress,
    done: threading.Event,
    interrupted: threading.Event,
) -> None:
    stream = os.fdopen(os.dup(err_fd), "w", buffering=1)
    bar = None
    if os.isatty(err_fd):
        from tqdm import tqdm

        first, images = progress.poll()
        bar = tqdm(
            total=len(progress.expected),
            initial=first,
            unit="shard",
            desc="dissect-prep",
            file=stream,
            leave=False,
            position=0,  # ours is the only bar on the terminal; img2dataset's writes to the log
        )
        bar.set_postfix(images=images, refresh=False)
    started = last_line = time.monotonic()
    pending = ""
    held: list[tuple[float, str]] = []  # (arrival, line) not shown yet
    try:
        with open(log, encoding="utf-8", errors="replace", newline="") as f:
            while True:
                finished = done.is_set()  # read once more after the body ended, then stop
                pending += f.read()
                *lines, pending = re.split(r"\r\n|\r|\n", pending)
                if finished and pending:
                    lines.append(pending)
                now = time.monotonic()
                held += [(now, text) for text in map(shown, lines) if text is not None]
                if interrupted.is_set():
                    held = []
                while held and (finished or now - held[0][0] >= HOLD_S):
                    text = held.pop(0)[1]
                    if bar is not None:
                        bar.write(text, file=stream)
                    else:
                        stream.write(text + "\n")
                shards, images = progress.poll()
                if bar is not None:
                    bar.n = shards
                    bar.set_postfix(images=images)
                elif now - last_line >= PROGRESS_EVERY_S and not finished:
                    stream.write(
                        f"dissect-prep: {shards}/{len(progress.expected)} shards finished, "
                        f"{images} images, {now - started:.0f}s\n"
                    )
                    last_line = now
                if finished:
                    return
                done.wait(_POLL_S)
    finally:
        if bar is not None:
            bar.close()
        stream.close()
