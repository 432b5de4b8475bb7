"""Print the short table `make demo` ends with: this run's accuracy and what selection kept."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def summary(run_dir: Path) -> str:
    rows = [
        json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()
    ]
    train = [r for r in rows if "loss" in r]
    after = [r for r in train if not r.get("select/warmup", 0)]
    ev = json.loads((run_dir / "eval.json").read_text())

    def mean(key, rs):
        xs = [r[key] for r in rs if r.get(key) is not None and not math.isnan(r[key])]
        return sum(xs) / len(xs) if xs else float("nan")

    lines = [
        f"{'run directory':<38} {run_dir}",
        f"{'steps / samples seen / trained':<38} {train[-1]['step']} / {train[-1]['samples_seen']} / "
        f"{train[-1]['samples_trained']}",
        f"{'zero-shot top-1 (clean test split)':<38} {ev.get('eval/zeroshot_top1', float('nan')):.3f}",
        f"{'zero-shot top-5':<38} {ev.get('eval/zeroshot_top5', float('nan')):.3f}",
        f"{'noisy fraction of the super-batches':<38} {mean('select/superbatch_noisy_frac', after):.3f}",
        f"{'noisy fraction of what was trained':<38} {mean('select/kept_noisy_frac', after):.3f}  "
        "(after selection warm-up)",
        f"{'noise AUC of the selection score':<38} {mean('select/noise_auc', after):.3f}  (0.5 = chance)",
        f"{'wall time':<38} {train[-1]['time_s']:.0f} s",
        "",
        f"TensorBoard:  .venv/bin/tensorboard --logdir {run_dir / 'tb'} --host 127.0.0.1 --port 6006",
        "              then open http://127.0.0.1:6006",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")))
