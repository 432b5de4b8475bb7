"""Side-by-side comparison of selection methods on the same shards, seed and epoch budget.

    python -m benchmarks.selection --config configs/bench/fmnist-noisy.yaml --out results/fmnist-noisy
    python -m benchmarks.selection --config configs/bench/fmnist-mosaic.yaml --out results/mosaic --quick
    python -m benchmarks.selection --config configs/bench/budget-r0.5.yaml --config configs/bench/clean.yaml \
        --out results/regimes          # one table per config under results/regimes/<config name>/

A bench config is YAML with:
    base:     a run config (the same keys as dissect-train's), shared by every method
    methods:  e.g. [none, random, small_loss+clusters, dissect:memory, dissect:ema, oracle]:
              method[:history][+clusters] (+clusters: selection.balance=clusters); oracle is the
              ceiling of noise filtering (clean pairs first by ground truth) and needs noisy flags
    metric:   the primary metric key, e.g. eval/zeroshot_top1 or eval/ret_i2t_r1
    quick:    overrides (key: value) for --quick, a setting that finishes in minutes on 2 cores
    prepare:  the command that builds the shards, `dissect-prep ...` or `python -m ...` (run when
              data.train is missing)

Each method is one real training run (`python -m pipeline.train`, or torchrun with --nproc),
sequential in one invocation. Outputs in --out: runs/<method>/ (full run directories),
results.csv, results.md, and PNG plots (metric vs wall time, vs trained samples; kept noisy
fraction over training).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def flatten(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += flatten(v, f"{prefix}{k}.")
        elif isinstance(v, list):
            out.append(f"{prefix}{k}=[{','.join(map(str, v))}]")
        else:
            out.append(f"{prefix}{k}={v}")
    return out


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_method(method: str) -> tuple[str, str, bool]:
    """'dissect:memory+clusters' -> ('dissect', 'memory', True)."""
    spec, _, balance = method.partition("+")
    if balance not in ("", "clusters"):
        raise SystemExit(f"bench method {method!r}: the only balance suffix is +clusters")
    name, _, history = spec.partition(":")
    return name, history, balance == "clusters"


def method_overrides(method: str) -> list[str]:
    name, history, balanced = parse_method(method)
    ov = [f"selection.method={name}"]
    if history:
        ov.append(f"selection.history={history}")
    if balanced:
        ov.append("selection.balance=clusters")
    return ov


def cost_model(method: str, ratio: float) -> float:
    """The step cost per loaded sample relative to `none` by the cost model of docs/design.md
    (forward = 1, backward = 2)."""
    name, history, balanced = parse_method(method)
    if name == "none":
        return 1.0
    # random and oracle need no scoring forward, unless the balance needs text features
    forwards = 0 if name in ("random", "oracle") and not balanced else 1
    forwards += history == "ema"
    return (forwards + 3 * ratio) / 3


def run_dir_name(method: str) -> str:
    return method.replace(":", "-").replace("+", "-")


def run_method(
    method: str,
    base_file: Path,
    extra: list[str],
    out: Path,
    nproc: int,
    timeout: float,
    ratio: float,
    base: dict,
) -> Path:
    run_dir = out / "runs" / run_dir_name(method)
    if (run_dir / "eval.json").exists():
        print(f"[bench] {method}: reusing {run_dir}", file=sys.stderr)
        return run_dir
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    overrides = [
        *extra,
        *method_overrides(method),
        f"run.dir={run_dir}",
        f"run.name={run_dir.name}",
    ]
    if method == "none":  # 1/r more (smaller) steps per epoch: keep eval/log cadence per epoch
        for sec, key in (("eval", "every_steps"), ("log", "every_steps")):
            every = base.get(sec, {}).get(key)
            if every:
                overrides.append(f"{sec}.{key}={int(round(every / ratio))}")
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(29500 + os.getpid() % 1000),
            "-m",
            "pipeline.train",
        ]
    else:
        cmd = [sys.executable, "-m", "pipeline.train"]
    cmd += ["--config", str(base_file), *overrides]
    print(f"[bench] {method}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.time()
    log = run_dir.parent / f"{run_dir.name}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            # the run dies with this process, however it dies (pipeline._env.die_with_parent)
            env=dict(os.environ, PYTHONUNBUFFERED="1", DISSECT_DIE_WITH_PARENT="1"),
        )
    if proc.returncode != 0:
        raise SystemExit(f"[bench] {method} failed (exit {proc.returncode}); see {log}")
    print(f"[bench] {method}: done in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    return run_dir


def read_rows(run_dir: Path) -> list[dict]:
    return [
        json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()
    ]


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(method: str, rows: list[dict], metric: str, ratio: float) -> dict:
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if metric in r]
    after = [r for r in train if not r.get("select/warmup", 0)]
    final = evals[-1][metric] if evals else float("nan")
    best = max((r[metric] for r in evals), default=float("nan"))
    step_s = _mean([r.get("perf/step_s") for r in train[1:]])
    loaded = train[-1]["samples_seen"] / max(train[-1]["step"], 1) if train else float("nan")
    return {
        "method": method,
        "final": final,
        "best": best,
        "wall_s": rows[-1]["time_s"] if rows else float("nan"),
        "trained_samples": train[-1]["samples_trained"] if train else 0,
        "steps": train[-1]["step"] if train else 0,
        "noise_auc": _mean([r.get("select/noise_auc") for r in after]),
        "kept_noisy_frac": _mean([r.get("select/kept_noisy_frac") for r in after]),
        "kept_label_entropy": _mean([r.get("select/kept_label_entropy") for r in after]),
        # gated rules (filter_random): the share of logged post-warm-up steps that filtered
        "filtering_frac": _mean([r.get("select/filtering") for r in after]),
        "step_s_per_loaded": step_s / loaded if loaded else float("nan"),
        "cost_model": cost_model(method, ratio),
        "_evals": [(r["time_s"], r["samples_trained"], r[metric]) for r in evals],
        "_noisy": [(r["step"], r.get("select/kept_noisy_frac")) for r in train],
    }


def time_to_reach(evals: list[tuple], target: float) -> float:
    for t, _, v in evals:
        if v >= target - 1e-12:
            return t
    return float("nan")


def write_report(results: list[dict], metric: str, out: Path, header: str) -> str:
    base = next((r for r in results if r["method"] == "none"), None)
    oracle = next((r for r in results if r["method"] == "oracle"), None)
    target = base["best"] if base else float("nan")
    t_none = time_to_reach(base["_evals"], target) if base else float("nan")
    cols = [
        "method",
        "final",
        "best",
        "wall_s",
        "trained_samples",
        "none_at_same_wall_s",
        "time_to_none_best_s",
        "speedup_vs_none",
        "best_minus_oracle",
        "noise_auc",
        "kept_noisy_frac",
        "kept_label_entropy",
        "filtering_frac",
        "step_cost_vs_none",
        "cost_model",
    ]
    table = []
    for r in results:
        t = time_to_reach(r["_evals"], target)
        row = dict(r)
        row["time_to_none_best_s"] = t
        # equal compute: the best `none` had reached by the time this method finished
        row["none_at_same_wall_s"] = (
            max((v for tt, _, v in base["_evals"] if tt <= r["wall_s"]), default=float("nan"))
            if base
            else float("nan")
        )
        row["speedup_vs_none"] = t_none / t if t and not math.isnan(t) else float("nan")
        row["best_minus_oracle"] = r["best"] - oracle["best"] if oracle else float("nan")
        row["step_cost_vs_none"] = (
            (r["step_s_per_loaded"] / base["step_s_per_loaded"]) if base else float("nan")
        )
        table.append(row)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(table)

    def fmt(v, k):
        if isinstance(v, float):
            if math.isnan(v):
                return "–" if k != "time_to_none_best_s" else "never"
            return f"{v:.0f}" if k in ("wall_s", "time_to_none_best_s") else f"{v:.3f}"
        return str(v)

    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table:
        lines.append("| " + " | ".join(fmt(row[c], c) for c in cols) + " |")
    lines += [
        "",
        f"Primary metric: `{metric}` (final = last evaluation, best = best evaluation). "
        "time_to_none_best_s: wall seconds until the method first reaches the best value `none` "
        "reached; speedup_vs_none = none's time to that value / the method's; none_at_same_wall_s: "
        "the best value `none` had reached by the time the method finished (equal wall time). "
        "best_minus_oracle: best minus the oracle's best (the oracle keeps clean pairs first by "
        "ground truth, random among them: the ceiling of noise filtering here). noise_auc, "
        "kept_noisy_frac and kept_label_entropy are averaged over steps after selection warm-up. "
        "filtering_frac: the share of those steps in which a gated rule (filter_random) saw a real "
        "noise split and filtered (otherwise it kept a random share). "
        "step_cost_vs_none: measured step time per loaded sample relative to `none`; cost_model: "
        "the cost model's prediction in docs/design.md (forward = 1, backward = 2).",
    ]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def plot(results: list[dict], metric: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for i, r in enumerate(results):
        color = f"C{i % 10}"  # one colour per method in every panel
        ev = r["_evals"]
        if ev:
            axes[0].plot(
                [e[0] for e in ev], [e[2] for e in ev], marker=".", color=color, label=r["method"]
            )
            axes[1].plot(
                [e[1] for e in ev], [e[2] for e in ev], marker=".", color=color, label=r["method"]
            )
        nz = [(s, v) for s, v in r["_noisy"] if v is not None]
        if nz:
            axes[2].plot([s for s, _ in nz], [v for _, v in nz], color=color, label=r["method"])
    axes[0].set(xlabel="wall time (s)", ylabel=metric, title=f"{metric} vs wall time")
    axes[1].set(xlabel="trained samples", ylabel=metric, title=f"{metric} vs trained samples")
    axes[2].set(
        xlabel="step", ylabel="kept noisy fraction", title="noisy fraction of trained samples"
    )
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def run_bench(config: Path, out: Path, args, cmd: str) -> str:
    """Every method of one bench config, then its table and plots in ``out``; returns the table."""
    spec = yaml.safe_load(config.read_text())
    for key in ("base", "methods", "metric"):
        if key not in spec:
            raise SystemExit(f"bench config {config} lacks '{key}'")
    out.mkdir(parents=True, exist_ok=True)
    base = dict(spec["base"])
    base_file = out / "base.yaml"
    base_file.write_text(yaml.safe_dump(base, sort_keys=False))
    extra = flatten(spec.get("quick", {})) if args.quick else []
    extra += args.overrides
    quick = spec.get("quick", {}) if args.quick else {}
    train_spec = quick.get("data", {}).get("train") or base.get("data", {}).get("train")
    prepare = (
        spec.get("quick_prepare")
        if args.quick and spec.get("quick_prepare")
        else spec.get("prepare")
    )
    if prepare and not (ROOT / str(train_spec).split("{")[0]).exists():
        print(f"[bench] building the dataset: {prepare}", file=sys.stderr)
        argv = shlex.split(prepare)  # `dissect-prep ...` or `python -m module ...`
        if argv[0] not in ("dissect-prep", "python"):
            raise SystemExit(
                f"bench config {config}: prepare must start with dissect-prep or python"
            )
        head = ["-m", "data_prep.cli"] if argv[0] == "dissect-prep" else []
        subprocess.run([sys.executable, *head, *argv[1:]], cwd=ROOT, check=True)
    methods = args.methods.split(",") if args.methods else spec["methods"]
    effective = merge(base, quick)
    ratio = float(effective.get("selection", {}).get("ratio", 0.2))
    started = time.strftime("%Y-%m-%d %H:%M")
    results = []
    for m in methods:
        run_dir = run_method(m, base_file, extra, out, args.nproc, args.timeout, ratio, effective)
        results.append(summarize(m, read_rows(run_dir), spec["metric"], ratio))
    header = (
        f"`{cmd}` ({config.stem}) — started {started}, {os.cpu_count()} CPU cores, {args.nproc} "
        f"process(es) per run{', quick setting' if args.quick else ''}."
    )
    text = write_report(results, spec["metric"], out, header)
    plot(results, spec["metric"], out)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--config",
        required=True,
        action="append",
        help="a bench config; repeat for several regimes (one table each, in --out/<name>/)",
    )
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--quick", action="store_true", help="the few-minute setting from the config's quick:"
    )
    ap.add_argument("--methods", help="comma list overriding the config's methods")
    ap.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun)")
    ap.add_argument(
        "--timeout", type=float, default=3600, help="seconds per run before it is killed"
    )
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args(argv)

    cmd = "python -m benchmarks.selection " + " ".join(
        shlex.quote(a) for a in (argv or sys.argv[1:])
    )
    out = Path(args.out)
    configs = [Path(c) for c in args.config]
    if len(configs) == 1:
        texts = [run_bench(configs[0], out, args, cmd)]
    else:
        texts = [f"## {c.stem}\n\n" + run_bench(c, out / c.stem, args, cmd) for c in configs]
        (out / "results.md").write_text("\n".join(texts))
    print("\n".join(texts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
