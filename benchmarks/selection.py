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

Each (method, seed) is one real training run (`python -m pipeline.train`, or torchrun with
--nproc); --seeds K runs every method with run.seed = base seed + 0..K-1 (initialisation and data
order; the noise is fixed by the shards), --jobs N runs N of them at once (each with
cpu_count // N threads). Outputs in --out: runs/<method>/s<seed>/ (full run directories),
results.csv (one row per method and seed), summary.csv and results.md (per method: means, spread,
the paired difference to `random` with a 95% interval over seeds), and curves.png (mean over
seeds with a +-1 sd band).

A finished run is reused only when its bench.json stamp (the run's config hash, the code's
commit and dirty state) matches this invocation; a finished run that does not match stops the
bench with one line, unless --rerun-stale reruns it. --reuse-commit C (repeatable) also accepts
runs finished at the clean commit C with the same config (for rows a code change cannot touch, such
as `random` and `oracle` beside a newly added rule); the table's header then names every commit its
rows come from, and each row of results.csv keeps its own. --reuse-rows CSV (repeatable) takes
rows of an earlier results.csv for runs whose folders are gone, under the same rule: the row's
config hash equals this run's and its commit is this clean code's or one named by --reuse-commit.
Such a row has no curve to draw, and its columns against `none` are those its own table computed.

Code and config do not fix the numbers alone: one machine repeats a run to the last digit, but
another machine gave final metrics up to 0.016 apart for the same code, config and seed (a
CPU kernel level, or shards rebuilt there), which is as large as the differences a table
resolves. So every run is also stamped with its testbed: `data` (a hash of the shard files the
config names) and `cpu` (torch's version and CPU kernel level). A folder or a row from another
testbed is not reused; one stamped before these keys existed is, with a warning naming what
cannot be checked.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from pipeline.config import ConfigError, parse_overrides

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


def code_version() -> dict:
    """The commit and whether the tree differs from it (bench outputs under benchmarks/results
    aside); ``tree`` hashes the difference, so two different dirty states do not match."""

    def git(*a):
        r = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
        return r.stdout if r.returncode == 0 else None

    commit = (git("rev-parse", "HEAD") or "unknown").strip()
    paths = ["--", ".", ":(exclude)benchmarks/results"]
    status = git("status", "--porcelain", *paths)
    dirty = status is None or bool(status.strip())
    diff = (git("diff", "HEAD", *paths) or "") + (status or "")
    tree = hashlib.sha256(diff.encode()).hexdigest()[:12] if dirty else ""
    return {"commit": commit, "dirty": dirty, "tree": tree}


def config_hash(base: dict, overrides: list[str]) -> str:
    """What a run trains: the base config and its overrides (its own dir and name aside)."""
    ov = [o for o in overrides if not o.startswith(("run.dir=", "run.name="))]
    blob = json.dumps({"base": base, "overrides": ov}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def testbed(data: dict) -> dict:
    """What a run's numbers depend on beside the code and the config: the bytes of the files
    under every path of its ``data`` section (the shards), and the CPU kernel level torch
    dispatches to."""
    import torch

    h = hashlib.sha256()
    for key, spec in sorted(data.items()):
        path = ROOT / spec if isinstance(spec, str) else None  # ROOT / an absolute path = it
        if path is not None and path.is_dir():
            files = {str(f.relative_to(path)): f for f in path.rglob("*") if f.is_file()}
        elif path is not None and path.is_file():
            files = {path.name: path}
        else:  # not a path (batch_size, ...), or one that does not exist
            continue
        for name, f in sorted(files.items()):
            h.update(f"{key}:{name}:".encode())
            with open(f, "rb") as fh:
                h.update(hashlib.file_digest(fh, "sha256").digest())
    cpu = f"torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()}"
    return {"data": h.hexdigest()[:12], "cpu": cpu}


# stamp keys added after runs were first stamped: a stamp or row without them is reused, with a
# warning, since it cannot be checked
TESTBED_KEYS = ("data", "cpu")


class Run:
    """One (method, seed) training run of a bench and its stamp."""

    def __init__(self, method: str, seed: int, out: Path, base: dict, extra: list[str], ratio):
        self.method, self.seed = method, seed
        self.dir = out / "runs" / run_dir_name(method) / f"s{seed}"
        self.overrides = [
            *extra,
            *method_overrides(method),
            f"run.seed={seed}",
            f"run.dir={self.dir}",
            f"run.name={run_dir_name(method)}-s{seed}",
        ]
        if method == "none":  # 1/r more (smaller) steps per epoch: keep eval/log cadence per epoch
            for sec, key in (("eval", "every_steps"), ("log", "every_steps")):
                every = base.get(sec, {}).get(key)
                if every:
                    self.overrides.append(f"{sec}.{key}={int(round(every / ratio))}")

    def stamp(self, base: dict, version: dict) -> dict:
        return {"config_hash": config_hash(base, self.overrides), **version}

    def stale(self, want: dict, accept_commits: tuple[str, ...] = ()) -> str:
        """'' when the finished run matches ``want`` (or differs only by being from a clean
        commit that starts with one of ``accept_commits``), else what differs (one phrase)."""
        stamp_file = self.dir / "bench.json"
        if not stamp_file.exists():
            return "it has no bench.json stamp (made before stamps, or by hand)"
        have = json.loads(stamp_file.read_text())
        accepted = have.get("dirty") is False and any(
            str(have.get("commit", "")).startswith(c) for c in accept_commits
        )
        version_keys = ("commit", "dirty", "tree") if accepted else ()
        unknown = tuple(k for k in TESTBED_KEYS if k not in have)
        diff = [
            f"{k} {have.get(k)!r} != {want[k]!r}"
            for k in want
            if k not in version_keys + unknown and have.get(k) != want[k]
        ]
        return ", ".join(diff)


def run_one(
    run: Run, base_file: Path, want: dict, nproc: int, timeout: float, threads: int, port: int
) -> None:
    """Train one run (its directory replaced) and stamp it with ``want`` and its process time."""
    if run.dir.exists():
        shutil.rmtree(run.dir)
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(port),
            "-m",
            "pipeline.train",
        ]
    else:
        cmd = [sys.executable, "-m", "pipeline.train"]
    cmd += ["--config", str(base_file), *run.overrides]
    name = f"{run.method} seed {run.seed}"
    print(f"[bench] {name}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.time()
    log = run.dir.parent / f"{run.dir.name}.log"
    run.dir.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", DISSECT_DIE_WITH_PARENT="1")
    env["OMP_NUM_THREADS"] = str(threads)
    with open(log, "w") as f:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            # the run dies with this process, however it dies (pipeline._env.die_with_parent)
            env=env,
        )
    if proc.returncode != 0:
        raise SystemExit(f"[bench] {name} failed (exit {proc.returncode}); see {log}")
    wall = time.time() - t0
    stamp = {**want, "proc_wall_s": wall, "threads": threads}
    (run.dir / "bench.json").write_text(json.dumps(stamp, indent=2) + "\n")
    print(f"[bench] {name}: done in {wall:.0f}s", file=sys.stderr, flush=True)


def read_rows(run_dir: Path) -> list[dict]:
    return [
        json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()
    ]


# results.csv columns that are not numbers (the rest are floats, or None where left empty)
TEXT_COLS = ("method", "config_hash", "commit", "data", "cpu")
INT_COLS = ("seed", "trained_samples", "threads", "nproc")


def read_reused_rows(paths: list[str]) -> dict[tuple[str, int], dict]:
    """(method, seed) -> a row of earlier results.csv files (the first file that has it wins)."""
    rows: dict[tuple[str, int], dict] = {}
    for path in paths:
        try:
            with open(path, newline="") as f:
                got = list(csv.DictReader(f))
        except OSError as e:
            raise SystemExit(f"--reuse-rows {path}: cannot read it ({e.strerror})") from None
        if not got or not {"method", "seed", "final", "config_hash", "commit"} <= set(got[0]):
            raise SystemExit(f"--reuse-rows {path}: not a bench results.csv (no rows, or no "
                             "method, seed, final, config_hash and commit columns)")  # fmt: skip
        for r in got:
            row: dict = {"_reused_row": True, "_evals": [], "_noisy": []}
            for k, v in r.items():
                if k in TEXT_COLS:
                    row[k] = v
                elif k == "dirty":
                    row[k] = v == "True"
                else:
                    row[k] = float(v) if v != "" else None
            for k in INT_COLS:
                if row.get(k) is not None:
                    row[k] = int(row[k])
            rows.setdefault((row["method"], row["seed"]), row)
    return rows


def reused_row_stale(row: dict, want: dict, accept_commits: tuple[str, ...]) -> str:
    """'' when a row of an earlier results.csv stands for the run ``want`` describes (the same
    config hash and processes per run; this clean commit or a named clean one), else why not."""
    if row["config_hash"] != want["config_hash"]:
        return f"config_hash {row['config_hash']!r} != {want['config_hash']!r}"
    for k in TESTBED_KEYS:
        if row.get(k) and row[k] != want[k]:
            return f"{k} {row[k]!r} != {want[k]!r} (another testbed)"
    nproc = row.get("nproc") or 1  # tables from before the column ran 1 process per run
    if nproc != want["nproc"]:
        return f"nproc {nproc:g} != {want['nproc']}"
    if row["dirty"]:
        return "it ran on a dirty tree"
    named = any(row["commit"].startswith(c) for c in accept_commits)
    if not named and (row["commit"] != want["commit"] or want["dirty"]):
        return f"commit {row['commit']!r} is neither this clean code nor a --reuse-commit"
    return ""


def unchecked(stamp: dict) -> str:
    """A warning for a reused stamp or row that predates the testbed keys."""
    missing = [k for k in TESTBED_KEYS if not stamp.get(k)]
    if not missing:
        return ""
    return (f" (WARNING: it records no {' or '.join(missing)}, so it cannot be checked to come "
            "from these shards and this CPU kernel level)")  # fmt: skip


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(run: Run, metric: str, ratio: float) -> dict:
    rows = read_rows(run.dir)
    stamp = json.loads((run.dir / "bench.json").read_text())
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if metric in r]
    after = [r for r in train if not r.get("select/warmup", 0)]
    final = evals[-1][metric] if evals else float("nan")
    best = max((r[metric] for r in evals), default=float("nan"))
    step_s = _mean([r.get("perf/step_s") for r in train[1:]])
    steps = train[-1]["step"] if train else 0
    loaded = train[-1]["samples_seen"] / max(steps, 1) if train else float("nan")
    wall = rows[-1]["time_s"] if rows else float("nan")
    eval_s = sum(r.get("perf/eval_s", 0.0) for r in rows if "loss" not in r)
    return {
        "method": run.method,
        "seed": run.seed,
        "final": final,
        "best": best,
        "wall_s": wall,
        "trained_samples": train[-1]["samples_trained"] if train else 0,
        "steps": steps,
        "noise_auc": _mean([r.get("select/noise_auc") for r in after]),
        "kept_noisy_frac": _mean([r.get("select/kept_noisy_frac") for r in after]),
        "kept_label_entropy": _mean([r.get("select/kept_label_entropy") for r in after]),
        # gated rules (filter_random): the share of logged post-warm-up steps that filtered
        "filtering_frac": _mean([r.get("select/filtering") for r in after]),
        "step_s_per_loaded": step_s / loaded if loaded else float("nan"),
        "cost_model": cost_model(run.method, ratio),
        # where the process's time went: start-up (and the final save) outside train()'s clock,
        # evaluations, loader waits and the rest of the steps (logged steps' means x steps)
        "proc_wall_s": stamp.get("proc_wall_s", float("nan")),
        "startup_s": stamp.get("proc_wall_s", float("nan")) - wall,
        "eval_s": eval_s,
        # the first step waits for the loader's start; later logged steps sample the rest
        "data_s": (
            train[0].get("perf/data_s", 0.0)
            + _mean([r.get("perf/data_s") for r in train[1:]]) * (steps - 1)
            if len(train) > 1
            else float("nan")
        ),
        "threads": stamp.get("threads"),
        "nproc": stamp.get("nproc"),
        "data": stamp.get("data"),
        "cpu": stamp.get("cpu"),
        "config_hash": stamp.get("config_hash"),
        "commit": stamp.get("commit"),
        "dirty": stamp.get("dirty"),
        "_evals": [(r["time_s"], r["samples_trained"], r[metric]) for r in evals],
        "_noisy": [(r["step"], r.get("select/kept_noisy_frac")) for r in train],
    }


def time_to_reach(evals: list[tuple], target: float) -> float:
    for t, _, v in evals:
        if v >= target - 1e-12:
            return t
    return float("nan")


# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (no scipy needed)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def t975(dof: int) -> float:
    if dof <= len(T975):
        return T975[dof - 1]
    z = 1.959964  # beyond the table: the first Cornish-Fisher term (2.021 at 40, true 2.021)
    return z + (z**3 + z) / (4 * dof)


def interval(xs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval over seeds; NaN bounds with fewer than two finite values."""
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan"), float("nan")
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, float("nan"), float("nan")
    half = t975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return m, m - half, m + half


def per_seed_columns(runs: list[dict]) -> None:
    """Columns of each run measured against `none` and `oracle` of the same seed."""
    by = {(r["method"], r["seed"]): r for r in runs}
    for r in runs:
        if r.get("_reused_row"):
            continue  # a row of an earlier results.csv keeps the columns its table computed
        base, oracle = by.get(("none", r["seed"])), by.get(("oracle", r["seed"]))
        target = base["best"] if base else float("nan")
        t = time_to_reach(r["_evals"], target)
        if base and base.get("_reused_row"):  # no curve: its time to its own best is its row's
            t_none = float(base["time_to_none_best_s"] or "nan")
        else:
            t_none = time_to_reach(base["_evals"], target) if base else float("nan")
        r["time_to_none_best_s"] = t if base else None  # None: no `none` run to compare with
        # equal compute: the best `none` had reached by the time this method finished
        r["none_at_same_wall_s"] = (
            max((v for tt, _, v in base["_evals"] if tt <= r["wall_s"]), default=float("nan"))
            if base
            else float("nan")
        )
        r["speedup_vs_none"] = t_none / t if t and not math.isnan(t) else float("nan")
        r["best_minus_oracle"] = r["best"] - oracle["best"] if oracle else float("nan")
        r["step_cost_vs_none"] = (
            r["step_s_per_loaded"] / base.get("step_s_per_loaded", float("nan"))
            if base
            else float("nan")
        )


RUN_COLS = [
    "method",
    "seed",
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
    "proc_wall_s",
    "startup_s",
    "eval_s",
    "data_s",
    "threads",
    "nproc",
    "data",
    "cpu",
    "config_hash",
    "commit",
    "dirty",
]
# a mean over seeds is "never" when any seed never reached the target
ALL_OR_NOTHING = ("time_to_none_best_s", "speedup_vs_none")
SUMMARY_COLS = [
    "method",
    "n_seeds",
    "final",
    "final_sd",
    "diff_vs_random",
    "diff_lo",
    "diff_hi",
    "resolved",
    "oracle_gain_share",
    "share_lo",
    "share_hi",
    *RUN_COLS[3:16],
]


def summary(runs: list[dict], metric: str) -> list[dict]:
    """One row per method: means over seeds, the final metric's spread, and the paired
    differences (per seed) to `random` and the share of the oracle's gain over random."""
    by = {(r["method"], r["seed"]): r for r in runs}
    out = []
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        row: dict = {"method": method, "n_seeds": len(mine)}
        for k in RUN_COLS[2:16]:
            vals = [float("nan") if r[k] is None else float(r[k]) for r in mine]
            if all(r[k] is None for r in mine):
                row[k] = None
            elif k in ALL_OR_NOTHING and any(math.isnan(v) for v in vals):
                row[k] = float("nan")
            else:
                row[k] = _mean(vals)
        finals = [r["final"] for r in mine]
        row["final_sd"] = statistics.stdev(finals) if len(finals) > 1 else float("nan")
        diffs, shares = [], []
        for r in mine:
            rnd, orc = by.get(("random", r["seed"])), by.get(("oracle", r["seed"]))
            if rnd:
                diffs.append(r["final"] - rnd["final"])
                gain = orc["final"] - rnd["final"] if orc else 0.0
                shares.append((r["final"] - rnd["final"]) / gain if gain else float("nan"))
        row["diff_vs_random"], row["diff_lo"], row["diff_hi"] = interval(diffs)
        row["oracle_gain_share"], row["share_lo"], row["share_hi"] = interval(shares)
        lo, hi = row["diff_lo"], row["diff_hi"]
        row["resolved"] = (
            "–" if method == "random" or math.isnan(lo) else "yes" if lo > 0 or hi < 0 else "no"
        )
        out.append(row)
    return out


def _fmt(v, k):
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "never" if k == "time_to_none_best_s" else "–"
        whole = ("wall_s", "time_to_none_best_s", "trained_samples", "proc_wall_s", "startup_s")
        whole += ("eval_s", "data_s")
        return f"{v:.0f}" if k in whole else f"{v:.3f}"
    return str(v)


def write_report(runs: list[dict], metric: str, out: Path, header: str) -> str:
    per_seed_columns(runs)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RUN_COLS, extrasaction="ignore")
        w.writeheader()
        w.writerows(runs)
    table = summary(runs, metric)
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_COLS, extrasaction="ignore")
        w.writeheader()
        w.writerows(table)
    lines = [header, "", "| " + " | ".join(SUMMARY_COLS) + " |", "|" + "---|" * len(SUMMARY_COLS)]
    for row in table:
        lines.append("| " + " | ".join(_fmt(row[c], c) for c in SUMMARY_COLS) + " |")
    lines += [
        "",
        f"Primary metric: `{metric}` (final = last evaluation, best = best evaluation); every "
        "column is the mean over the method's n_seeds runs (one row per run in results.csv), "
        "final_sd their standard deviation. diff_vs_random: the final metric minus `random`'s "
        "in the same seed, mean over seeds, [diff_lo, diff_hi] its 95% t-interval; resolved = "
        "the interval excludes 0. oracle_gain_share: (method - random) / (oracle - random) per "
        "seed, mean and 95% interval [share_lo, share_hi] (1 = all of the oracle's gain over "
        "random). time_to_none_best_s: wall seconds until the method first reaches the best "
        "value `none` reached in the same seed (never if in any seed it did not); "
        "speedup_vs_none = none's time to that value / the method's; none_at_same_wall_s: the "
        "best value `none` had reached by the time the method finished (equal wall time). "
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


def _mean_band(curves: list[list[tuple]]) -> tuple[list, list, list]:
    """Pointwise mean and sd of curves sampled at the same points (cut to the shortest)."""
    n = min(len(c) for c in curves)
    mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
    sd = [statistics.stdev(c[i] for c in curves) if len(curves) > 1 else 0.0 for i in range(n)]
    return mean, sd, n


def plot(runs: list[dict], metric: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    methods = list(dict.fromkeys(r["method"] for r in runs))
    for i, method in enumerate(methods):
        color = f"C{i % 10}"  # one colour per method in every panel
        mine = [r for r in runs if r["method"] == method]
        label = method if len(mine) == 1 else f"{method} ({len(mine)} seeds)"
        if all(r["_evals"] for r in mine):
            y, sd, n = _mean_band([[e[2] for e in r["_evals"]] for r in mine])
            t = _mean_band([[e[0] for e in r["_evals"]] for r in mine])[0]
            samples = [e[1] for e in mine[0]["_evals"][:n]]
            lo, hi = [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)]
            for ax, x in ((axes[0], t), (axes[1], samples)):
                ax.plot(x, y, marker=".", color=color, label=label)
                ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0)
        nz = [[(s, v) for s, v in r["_noisy"] if v is not None] for r in mine]
        if all(nz):
            y, sd, n = _mean_band([[v for _, v in c] for c in nz])
            x = [s for s, _ in nz[0][:n]]
            axes[2].plot(x, y, color=color, label=label)
            axes[2].fill_between(
                x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)],
                color=color, alpha=0.2, linewidth=0,
            )  # fmt: skip
    axes[0].set(xlabel="wall time (s, mean)", ylabel=metric, title=f"{metric} vs wall time")
    axes[1].set(xlabel="trained samples", ylabel=metric, title=f"{metric} vs trained samples")
    axes[2].set(
        xlabel="step", ylabel="kept noisy fraction", title="noisy fraction of trained samples"
    )
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if len(runs) > len(methods):
        fig.suptitle("mean over seeds, band: +-1 sd", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def run_bench(config: Path, out: Path, args, cmd: str) -> str:
    """Every method and seed of one bench config, then its table and plots in ``out``."""
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
    seed0 = int(effective.get("run", {}).get("seed", 0))
    started = time.strftime("%Y-%m-%d %H:%M")
    try:  # the data paths every run trains and evaluates on, command-line overrides included
        data = merge(effective, parse_overrides(extra)).get("data", {})
    except ConfigError as e:
        raise SystemExit(f"[bench] {e}") from None
    # processes per run change the training; the testbed changes the numbers
    version = {**code_version(), "nproc": args.nproc, **testbed(data)}
    # seed-major: an interrupted table holds whole seeds
    runs = [
        Run(m, seed0 + k, out, effective, extra, ratio) for k in range(args.seeds) for m in methods
    ]
    csv_rows = read_reused_rows(args.reuse_rows)
    reused: dict[tuple[str, int], dict] = {}
    todo = []
    for run in runs:
        want = run.stamp(base, version)
        row = csv_rows.get((run.method, run.seed))
        if row and not (run.dir / "eval.json").exists():
            why = reused_row_stale(row, want, tuple(args.reuse_commit))
            if not why:
                print(f"[bench] {run.method} seed {run.seed}: reusing its row"
                      f"{unchecked(row)}", file=sys.stderr)  # fmt: skip
                reused[(run.method, run.seed)] = row
                continue
            print(f"[bench] {run.method} seed {run.seed}: not reusing its row ({why})",
                  file=sys.stderr)  # fmt: skip
        if (run.dir / "eval.json").exists():
            why = run.stale(want, tuple(args.reuse_commit))
            if not why:
                have = json.loads((run.dir / "bench.json").read_text())
                print(f"[bench] {run.method} seed {run.seed}: reusing {run.dir}{unchecked(have)}",
                      file=sys.stderr)  # fmt: skip
                continue
            if not args.rerun_stale:
                raise SystemExit(
                    f"[bench] {run.dir} is finished but not by this config and code ({why}): "
                    "pass --rerun-stale to rerun such runs, or use another --out"
                )
        todo.append((run, want))
    threads = args.threads or max(1, (os.cpu_count() or 1) // (args.jobs * args.nproc))
    port0 = 29500 + os.getpid() % 1000
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [
            pool.submit(
                run_one, run, base_file, want, args.nproc, args.timeout, threads, port0 + 10 * i
            )
            for i, (run, want) in enumerate(todo)
        ]
        errors = [f.exception() for f in futures]
    failed = [str(e) for e in errors if e is not None]
    if failed:
        raise SystemExit("\n".join(failed))
    results = [
        reused.get((run.method, run.seed)) or summarize(run, spec["metric"], ratio) for run in runs
    ]
    versions = sorted({f"{r['commit'][:10]}{' (dirty)' if r['dirty'] else ''}" for r in results})
    header = (
        f"`{cmd}` ({config.stem}) — started {started}, {os.cpu_count()} CPU cores, {args.nproc} "
        f"process(es) per run, {args.jobs} run(s) at once, {args.seeds} seed(s)"
        f"{', quick setting' if args.quick else ''}; code {', '.join(versions)}."
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
    ap.add_argument(
        "--seeds", type=int, default=1, help="run seeds per method: base run.seed + 0..K-1"
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once, each with cpu_count // (jobs x nproc) threads (wall_s is then "
        "measured under contention)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per process (OMP_NUM_THREADS; default cpu_count // (jobs x nproc))",
    )
    ap.add_argument(
        "--rerun-stale",
        action="store_true",
        help="rerun finished runs whose config or code version differ (default: stop)",
    )
    ap.add_argument(
        "--reuse-commit",
        action="append",
        default=[],
        metavar="COMMIT",
        help="also reuse runs finished at this clean commit (a prefix of at least 7 hex digits) "
        "with the same config; the table names every commit; repeatable",
    )
    ap.add_argument(
        "--reuse-rows",
        action="append",
        default=[],
        metavar="CSV",
        help="also take the rows of an earlier results.csv for runs without a finished folder, "
        "where the row's config hash matches and its commit is this clean code's or a "
        "--reuse-commit (no curve is drawn for them); repeatable",
    )
    ap.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun)")
    ap.add_argument(
        "--timeout", type=float, default=3600, help="seconds per run before it is killed"
    )
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        ap.error("--seeds and --jobs must be at least 1")
    for c in args.reuse_commit:
        if len(c) < 7 or any(ch not in "0123456789abcdef" for ch in c.lower()):
            ap.error(f"--reuse-commit {c!r}: give a commit's hex prefix of at least 7 digits")

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
