"""Metric sinks behind a tiny interface (log, close). Only rank 0 writes.

    sink = make_sink(run_dir, is_main, tensorboard=True)
    sink.log({"loss": 1.2, "select/kept_frac": 0.2}, step=10)

metrics.jsonl holds one JSON object per logged step (keys as in docs/training.md); TensorBoard
gets the scalars, plus histograms and images handed over with `sink.histogram` / `sink.image`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


class NullSink:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def histogram(self, tag: str, values, step: int) -> None:
        pass

    def image(self, tag: str, img_HWC: np.ndarray, step: int) -> None:
        pass

    def text(self, tag: str, text: str, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


class RunSink(NullSink):
    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = open(self.path, "a", buffering=1)  # line-buffered: a crash loses <= 1 line
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
                    if k != "step":
                        self.tb.add_scalar(k, float(v), step)

    def histogram(self, tag: str, values, step: int) -> None:
        if self.tb is not None and len(values):
            self.tb.add_histogram(tag, np.asarray(values), step)

    def image(self, tag: str, img_HWC: np.ndarray, step: int) -> None:
        if self.tb is not None:
            self.tb.add_image(tag, img_HWC, step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def make_sink(run_dir: Path, is_main: bool, tensorboard: bool = True):
    return RunSink(run_dir, tensorboard) if is_main else NullSink()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def truncate_metrics_after(run_dir: str | Path, step: int) -> int:
    """Drop metrics.jsonl rows past ``step`` (in place, so an open append handle stays valid).

    Returns how many rows were dropped. Used on resume: the steps after the checkpoint are
    trained again and logged again, so each step appears once.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
    with open(path, "r+") as f:
        f.writelines(keep)
        f.truncate()
    return len(lines) - len(keep)
