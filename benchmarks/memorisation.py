"""Does the model memorise the noisy pairs? The mean current agreement s of the clean and of
the noisy pairs it trained on, over steps, per method (mean over the runs of a method, i.e.
its seeds, with a min-max band).

    python -m benchmarks.memorisation --runs results/web-memorising/runs/* --out memorisation.png

Reads each run's metrics.jsonl: `select/train_s/clean` and `select/train_s/noisy` (the trainer
logs them for every method, `none` included, from the training forward's own features) and,
with --kinds, `select/train_s/<kind>` per noise kind. A run's method is read from its
config.yaml (selection.method, :history for the dissect rules, +clusters); runs of the same
method are seeds of it. DISSect's premise holds where the noisy curve stays low through
warm-up and rises late, while the clean one rises early.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import yaml

GROUPS = ("clean", "noisy")
KINDS = ("swap", "unrelated", "partial")


def method_of(run: Path) -> str:
    cfg = (
        yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    )
    sel = (cfg or {}).get("selection", {})
    name = sel.get("method", run.name)
    if str(name).startswith("dissect") and sel.get("history"):
        name = f"{name}:{sel['history']}"
    if sel.get("balance") == "clusters":
        name += "+clusters"
    return str(name)


def curves(run: Path, groups: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """group -> (steps, mean s) from the run's metrics.jsonl (rows that log the group)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"memorisation: {run} has no metrics.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = {}
    for g in groups:
        pts = [(r["step"], r[f"select/train_s/{g}"]) for r in rows if f"select/train_s/{g}" in r]
        if pts:
            steps, vals = map(np.asarray, zip(*sorted(dict(pts).items())))
            out[g] = (steps, vals)
    return out


def gather(runs: list[Path], groups: tuple[str, ...]) -> dict[str, dict[str, list]]:
    """method -> group -> [(steps, values) per run]."""
    by_method: dict[str, dict[str, list]] = {}
    for run in runs:
        for g, c in curves(run, groups).items():
            by_method.setdefault(method_of(run), {}).setdefault(g, []).append(c)
    if not by_method:
        raise SystemExit(
            "memorisation: no run logs select/train_s/* (runs from before this diagnostic?)"
        )
    return by_method


def band(series: list) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, min, max) over runs, on the steps every run logged."""
    common = series[0][0]
    for steps, _ in series[1:]:
        common = np.intersect1d(common, steps)
    vals = np.stack([v[np.isin(s, common)] for s, v in series])
    return common, vals.mean(0), vals.min(0), vals.max(0)


def plot(by_method: dict, out: Path, groups: tuple[str, ...], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {
        "clean": "-",
        "noisy": "--",
        "swap": ":",
        "unrelated": "-.",
        "partial": (0, (3, 1, 1, 1, 1, 1)),
    }
    for i, (method, per_group) in enumerate(sorted(by_method.items())):
        colour = f"C{i % 10}"
        for g in groups:
            if g not in per_group:
                continue
            steps, mean, lo, hi = band(per_group[g])
            n = len(per_group[g])
            ax.plot(steps, mean, linestyle=styles[g], color=colour, label=f"{method} {g} (n={n})")
            if n > 1:
                ax.fill_between(steps, lo, hi, color=colour, alpha=0.15, linewidth=0)
    ax.set(xlabel="step", ylabel="mean s of trained pairs (100 * cos)", title=title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True, type=Path, help="run directories")
    ap.add_argument("--out", required=True, type=Path, help="the PNG to write")
    ap.add_argument("--kinds", action="store_true", help="also a curve per noise kind")
    ap.add_argument("--title", default="agreement s of the trained clean and noisy pairs")
    args = ap.parse_args(argv)
    groups = GROUPS + (KINDS if args.kinds else ())
    by_method = gather([r for r in args.runs if r.is_dir()], groups)
    plot(by_method, args.out, groups, args.title)
    for method, per_group in sorted(by_method.items()):
        parts = []
        for g in groups:
            if g in per_group:
                steps, mean, _, _ = band(per_group[g])
                parts.append(f"{g} {mean[0]:.1f} -> {mean[len(mean) // 2]:.1f} -> {mean[-1]:.1f}")
        print(f"{method}: s at first / middle / last step: " + "; ".join(parts))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
