"""Smoke runs of the benchmark commands on tiny shards: they finish and report what they claim."""

import csv
import json
import shutil
import statistics

import pytest
import yaml
from shardutil import write_digit_shards


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_selection_benchmark_quick(tmp_path):
    from benchmarks.selection import main

    write_digit_shards(tmp_path / "train", n_shards=2, per_shard=160, noise=0.4)
    write_digit_shards(tmp_path / "val", n_shards=1, per_shard=100, seed=1, with_val_meta=True)
    spec = {
        "metric": "eval/zeroshot_top1",
        "methods": ["none", "dissect:memory"],
        "base": {
            "data": {
                "train": str(tmp_path / "train"),
                "val": str(tmp_path / "val"),
                "batch_size": 16,
                "workers": 0,
            },
            "model": {"name": "tiny-vit"},
            "optim": {"lr": 2e-3, "epochs": 8},
            "selection": {"ratio": 0.5, "warmup_epochs": 1},
            "eval": {"every_steps": 10},
            "log": {"every_steps": 5, "progress": False},
        },
        "quick": {"optim": {"epochs": 2}},
    }
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    argv = ["--config", str(cfg), "--out", str(out), "--quick", "--seeds", "2", "--jobs", "2"]
    assert main(argv) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    # seed-major, one row per (method, seed), each stamped with its config and code version
    assert [(r["method"], r["seed"]) for r in rows] == [
        ("none", "0"),
        ("dissect:memory", "0"),
        ("none", "1"),
        ("dissect:memory", "1"),
    ]
    assert all(r["commit"] and r["config_hash"] and r["threads"] == "1" for r in rows)
    assert rows[0]["config_hash"] != rows[2]["config_hash"]  # the seed is part of the config
    for r in rows:  # where the time went: each part measured, within the process's wall time
        parts = [float(r[k]) for k in ("startup_s", "eval_s", "data_s")]
        assert all(0 <= p < float(r["proc_wall_s"]) for p in parts) and parts[1] > 0, r
    cfg_s1 = yaml.safe_load((out / "runs" / "dissect-memory" / "s1" / "config.yaml").read_text())
    assert cfg_s1["run"]["seed"] == 1
    none0 = [r for r in rows if r["method"] == "none"][0]
    dis = [r for r in rows if r["method"] == "dissect:memory"]
    # same epochs: selection trains half as many samples at r = 0.5
    assert int(none0["trained_samples"]) == 2 * int(dis[0]["trained_samples"]) == 2 * 320
    assert float(dis[0]["noise_auc"]) == float(dis[0]["noise_auc"])  # measured after warm-up
    # two seeds are two trainings (init and data order differ), not one run copied
    assert dis[0]["final"] != dis[1]["final"] or dis[0]["noise_auc"] != dis[1]["noise_auc"]
    summary = list(csv.DictReader(open(out / "summary.csv")))
    assert [(s["method"], s["n_seeds"]) for s in summary] == [
        ("none", "2"),
        ("dissect:memory", "2"),
    ]
    mean = sum(float(r["final"]) for r in dis) / 2
    assert float(summary[1]["final"]) == pytest.approx(mean)
    assert (out / "curves.png").stat().st_size > 10_000
    md = (out / "results.md").read_text()
    assert "speedup_vs_none" in md and "diff_vs_random" in md and "2 seed(s)" in md
    # the none run logged its evaluations at the same per-epoch cadence (1/r more steps)
    cfg_none = yaml.safe_load((out / "runs" / "none" / "s0" / "config.yaml").read_text())
    assert cfg_none["eval"]["every_steps"] == 20


FINALS = {  # (method, seed) -> final metric of the fake runs below
    ("none", 0): 0.50, ("none", 1): 0.52, ("none", 2): 0.49,
    ("random", 0): 0.60, ("random", 1): 0.58, ("random", 2): 0.62,
    ("oracle", 0): 0.70, ("oracle", 1): 0.68, ("oracle", 2): 0.72,
    ("rule", 0): 0.65, ("rule", 1): 0.62, ("rule", 2): 0.69,
}  # fmt: skip


def fake_run(calls):
    """run_one without training: the metrics a run would log, from FINALS."""

    def run_one(run, base_file, want, nproc, timeout, threads, port):
        calls.append((run.method, run.seed))
        run.dir.mkdir(parents=True, exist_ok=True)
        final = FINALS.get((run.method.split(":")[0], run.seed), 0.55)
        rows = [
            {"step": 1, "loss": 1.0, "samples_seen": 8, "samples_trained": 4, "time_s": 1.0,
             "perf/step_s": 0.5, "perf/data_s": 0.1},
            {"step": 2, "loss": 0.9, "samples_seen": 16, "samples_trained": 8, "time_s": 2.0,
             "perf/step_s": 0.5, "perf/data_s": 0.1},
            {"step": 2, "samples_trained": 8, "time_s": 3.0, "eval/top1": final,
             "perf/eval_s": 1.0},
        ]  # fmt: skip
        (run.dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run.dir / "eval.json").write_text("{}")
        (run.dir / "bench.json").write_text(json.dumps({**want, "proc_wall_s": 5.0}))

    return run_one


def test_selection_seeds_intervals_and_versioned_reuse(tmp_path, monkeypatch):
    import benchmarks.selection as sel

    calls = []
    monkeypatch.setattr(sel, "run_one", fake_run(calls))
    monkeypatch.setattr(sel, "plot", lambda *a: None)
    monkeypatch.setattr(sel, "code_version", lambda: {"commit": "c1", "dirty": False, "tree": ""})
    spec = {
        "metric": "eval/top1",
        "methods": ["none", "random", "oracle", "rule:memory"],
        "base": {"run": {"seed": 0}, "selection": {"ratio": 0.5}},
    }
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    argv = ["--config", str(cfg), "--out", str(out), "--seeds", "3"]
    assert sel.main(argv) == 0
    assert len(calls) == 12
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {(r["method"], int(r["seed"])) for r in rows} == {
        (m if m != "rule" else "rule:memory", s) for m, s in FINALS
    }
    assert all(r["commit"] == "c1" and r["dirty"] == "False" for r in rows)
    assert float(rows[0]["startup_s"]) == 2.0 and float(rows[0]["eval_s"]) == 1.0
    s = {r["method"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    # rule - random per seed: 0.05, 0.04, 0.07; t(0.975, 2) = 4.303
    d = [0.05, 0.04, 0.07]
    m, sd = sum(d) / 3, (sum((x - sum(d) / 3) ** 2 for x in d) / 2) ** 0.5
    rule = s["rule:memory"]
    assert float(rule["diff_vs_random"]) == pytest.approx(m)
    assert float(rule["diff_lo"]) == pytest.approx(m - 4.303 * sd / 3**0.5)
    assert float(rule["diff_hi"]) == pytest.approx(m + 4.303 * sd / 3**0.5)
    assert rule["resolved"] == "yes"  # 0.053 +- 0.038
    # oracle - random = 0.10 in every seed: shares 0.5, 0.4, 0.7
    assert float(rule["oracle_gain_share"]) == pytest.approx(1.6 / 3)
    assert float(s["oracle"]["oracle_gain_share"]) == pytest.approx(1.0)
    # none - random: -0.10, -0.06, -0.13: resolved, below
    assert s["none"]["resolved"] == "yes" and float(s["none"]["diff_hi"]) < 0
    assert s["random"]["resolved"] == "–" and s["none"]["n_seeds"] == "3"
    assert float(s["none"]["final_sd"]) == pytest.approx(statistics.stdev([0.50, 0.52, 0.49]))
    md = (out / "results.md").read_text()
    assert "| rule:memory | 3 | 0.653 |" in md and "code c1." in md

    # the same table again: everything reused; one more seed: only the new runs
    calls.clear()
    assert sel.main(argv) == 0 and calls == []
    assert sel.main([*argv[:-1], "4"]) == 0 and len(calls) == 4 and {s for _, s in calls} == {3}
    # another config or another code version: the finished runs are not reused unseen
    calls.clear()
    with pytest.raises(
        SystemExit, match="not by this config and code .*config_hash.*--rerun-stale"
    ):
        sel.main([*argv, "optim.lr=0.1"])
    monkeypatch.setattr(sel, "code_version", lambda: {"commit": "c2", "dirty": True, "tree": "x"})
    with pytest.raises(SystemExit, match="commit 'c1' != 'c2'"):
        sel.main(argv)
    assert calls == []
    assert sel.main([*argv, "--rerun-stale"]) == 0 and len(calls) == 12
    assert "code c2 (dirty)." in (out / "results.md").read_text()


def test_selection_reuses_runs_of_a_named_clean_commit_and_names_every_commit(
    tmp_path, monkeypatch
):
    """A rule added at a later commit is measured beside random/oracle runs of an earlier one,
    only when asked, only for clean runs of the same config, and the table says so."""
    import benchmarks.selection as sel

    calls = []
    monkeypatch.setattr(sel, "run_one", fake_run(calls))
    monkeypatch.setattr(sel, "plot", lambda *a: None)
    spec = {"metric": "eval/top1", "methods": ["random", "oracle"], "base": {"run": {"seed": 0}}}
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    argv = ["--config", str(cfg), "--out", str(out), "--seeds", "2"]
    old = {"commit": "aaaaaaa111", "dirty": False, "tree": ""}
    monkeypatch.setattr(sel, "code_version", lambda: old)
    assert sel.main(argv) == 0 and len(calls) == 4
    monkeypatch.setattr(sel, "code_version", lambda: {**old, "commit": "bbbbbbb222"})
    more = [*argv, "--methods", "random,oracle,rule:memory"]
    with pytest.raises(SystemExit, match="commit 'aaaaaaa111' != 'bbbbbbb222'"):
        sel.main(more)
    with pytest.raises(SystemExit):  # not a commit prefix
        sel.main([*more, "--reuse-commit", "aaa"])
    # another commit's prefix, or the same commit with another config: still refused
    with pytest.raises(SystemExit, match="commit 'aaaaaaa111'"):
        sel.main([*more, "--reuse-commit", "ccccccc"])
    with pytest.raises(SystemExit, match="config_hash"):
        sel.main([*more, "--reuse-commit", "aaaaaaa", "optim.lr=0.1"])
    calls.clear()
    assert sel.main([*more, "--reuse-commit", "aaaaaaa"]) == 0
    assert sorted(calls) == [("rule:memory", 0), ("rule:memory", 1)]
    rows = {(r["method"], r["seed"]): r for r in csv.DictReader(open(out / "results.csv"))}
    assert rows[("random", "0")]["commit"] == "aaaaaaa111"
    assert rows[("rule:memory", "1")]["commit"] == "bbbbbbb222"
    assert "code aaaaaaa111, bbbbbbb222." in (out / "results.md").read_text()
    # a dirty run is never reused by commit: its tree is not that commit
    (out / "runs" / "oracle" / "s0" / "bench.json").write_text(
        json.dumps({**json.loads((out / "runs" / "oracle" / "s0" / "bench.json").read_text()),
                    "dirty": True, "tree": "x"})
    )  # fmt: skip
    with pytest.raises(SystemExit, match="dirty True != False"):
        sel.main([*more, "--reuse-commit", "aaaaaaa"])


def test_selection_reuses_rows_of_an_earlier_table_whose_runs_are_gone(tmp_path, monkeypatch):
    """A table is extended after its run folders were deleted: the earlier rows come from its
    results.csv under the same rule as folders (same config, a named clean commit), and the new
    rule's differences are taken against those rows."""
    import benchmarks.selection as sel

    calls = []
    monkeypatch.setattr(sel, "run_one", fake_run(calls))
    monkeypatch.setattr(sel, "plot", lambda *a: None)
    spec = {"metric": "eval/top1", "methods": ["none", "random", "oracle"],
            "base": {"run": {"seed": 0}, "selection": {"ratio": 0.5}}}  # fmt: skip
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    first, later = tmp_path / "first", tmp_path / "later"
    old = {"commit": "aaaaaaa111", "dirty": False, "tree": ""}
    monkeypatch.setattr(sel, "code_version", lambda: old)
    assert sel.main(["--config", str(cfg), "--out", str(first), "--seeds", "3"]) == 0
    kept = tmp_path / "kept.csv"
    kept.write_text((first / "results.csv").read_text())
    monkeypatch.setattr(sel, "code_version", lambda: {**old, "commit": "bbbbbbb222"})
    argv = ["--config", str(cfg), "--out", str(later), "--seeds", "3",
            "--methods", "none,random,oracle,rule:memory", "--reuse-rows", str(kept)]  # fmt: skip
    calls.clear()
    assert sel.main([*argv, "--reuse-commit", "aaaaaaa"]) == 0
    assert sorted(calls) == [("rule:memory", s) for s in range(3)]  # nothing else retrained
    rows = {(r["method"], r["seed"]): r for r in csv.DictReader(open(later / "results.csv"))}
    assert rows[("random", "2")]["commit"] == "aaaaaaa111"
    assert rows[("random", "2")]["final"] == "0.62" and rows[("random", "2")]["seed"] == "2"
    assert rows[("rule:memory", "0")]["commit"] == "bbbbbbb222"
    # the new rule against the earlier oracle: best 0.65 - 0.70
    assert float(rows[("rule:memory", "0")]["best_minus_oracle"]) == pytest.approx(-0.05)
    s = {r["method"]: r for r in csv.DictReader(open(later / "summary.csv"))}
    assert float(s["rule:memory"]["diff_vs_random"]) == pytest.approx(0.16 / 3)
    assert float(s["rule:memory"]["oracle_gain_share"]) == pytest.approx(1.6 / 3)
    assert "code aaaaaaa111, bbbbbbb222." in (later / "results.md").read_text()
    # refused like a folder would be: no named commit, or another config, means a retraining
    for extra in ([], ["--reuse-commit", "aaaaaaa", "optim.lr=0.1"]):
        shutil.rmtree(later)
        calls.clear()
        assert sel.main([*argv, *extra]) == 0
        assert len(calls) == 12, extra
    with pytest.raises(SystemExit, match="--reuse-rows .*missing.csv: cannot read it"):
        sel.main([*argv, "--reuse-rows", str(tmp_path / "missing.csv")])
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit, match="bad.csv: not a bench results.csv"):
        sel.main([*argv[:-1], str(tmp_path / "bad.csv")])


def test_selection_keeps_runs_of_another_testbed_apart(tmp_path, monkeypatch, capsys):
    """The same code, config and seed gave other numbers on another machine, so a run folder or
    an earlier row from other shards or another CPU kernel level is not reused; a stamp from
    before the testbed was recorded is reused with a warning."""
    import benchmarks.selection as sel

    real_testbed = sel.testbed
    calls = []
    monkeypatch.setattr(sel, "run_one", fake_run(calls))
    monkeypatch.setattr(sel, "plot", lambda *a: None)
    monkeypatch.setattr(sel, "code_version", lambda: {"commit": "c1", "dirty": False, "tree": ""})
    spec = {"metric": "eval/top1", "methods": ["none", "random"],
            "base": {"run": {"seed": 0}, "selection": {"ratio": 0.5}}}  # fmt: skip
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    argv = ["--config", str(cfg), "--out", str(out), "--seeds", "2"]
    here = {"data": "d1", "cpu": "torch X AVX512"}
    monkeypatch.setattr(sel, "testbed", lambda data: here)
    assert sel.main(argv) == 0 and len(calls) == 4
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {(r["data"], r["cpu"]) for r in rows} == {("d1", "torch X AVX512")}
    kept = tmp_path / "kept.csv"
    kept.write_text((out / "results.csv").read_text())

    monkeypatch.setattr(sel, "testbed", lambda data: {**here, "cpu": "torch X AVX2"})
    with pytest.raises(SystemExit, match="cpu 'torch X AVX512' != 'torch X AVX2'"):
        sel.main(argv)
    calls.clear()
    other = ["--config", str(cfg), "--out", str(tmp_path / "other"), "--seeds", "2"]
    assert sel.main([*other, "--reuse-rows", str(kept)]) == 0
    assert len(calls) == 4  # the earlier rows are from another testbed: all retrained
    assert "(another testbed)" in capsys.readouterr().err

    # stamps and rows from before the testbed keys: reused, with a warning
    monkeypatch.setattr(sel, "testbed", lambda data: here)
    for stamp in out.glob("runs/*/s*/bench.json"):
        have = json.loads(stamp.read_text())
        stamp.write_text(json.dumps({k: v for k, v in have.items() if k not in ("data", "cpu")}))
    calls.clear()
    assert sel.main(argv) == 0 and calls == []
    assert "WARNING: it records no data or cpu" in capsys.readouterr().err

    # the fingerprint itself: one changed byte in one shard changes it, the CPU level is torch's
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "000.tar").write_bytes(b"abc")
    (shards / "001.tar").write_bytes(b"def")
    first = real_testbed({"train": str(shards)})
    (shards / "001.tar").write_bytes(b"deg")
    second = real_testbed({"train": str(shards)})
    assert first["data"] != second["data"] and first["cpu"] == second["cpu"]
    assert first["cpu"].startswith("torch ")


def test_t_quantiles():
    from benchmarks.selection import interval, t975

    assert t975(1) == 12.706 and t975(30) == 2.042
    assert t975(40) == pytest.approx(2.021, abs=2e-3) and t975(120) == pytest.approx(
        1.980, abs=2e-3
    )
    m, lo, hi = interval([1.0, float("nan")])
    assert m == 1.0 and lo != lo and hi != hi  # one seed: no interval


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_overhead_benchmark(tmp_path):
    from benchmarks.overhead import main

    out = tmp_path / "overhead.md"
    assert (
        main(
            [
                "--worlds",
                "2",
                "--super-batch",
                "40,80",
                "--reps",
                "2",
                "--image-elems",
                "48",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = out.read_text()
    assert text.count("\n| 2 |") == 2 and "MB" in text


@pytest.mark.timeout(180)
def test_throughput_benchmark_cpu(tmp_path):
    from benchmarks.throughput import main

    out = tmp_path / "thr.json"
    assert (
        main(
            [
                "--batch",
                "8",
                "--ratio",
                "0.5",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--methods",
                "none@B,none@b,dissect:memory",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())["results"]
    assert [r["loaded_batch"] for r in res] == [16, 8, 16] and res[2]["train_batch"] == 8
    assert all(r["step_s"] > 0 for r in res)
    ratio = res[1]["step_s"] / res[0]["step_s"]
    assert (
        f"step(b) / step(B) = {ratio:.3f} against b / B = 0.500"
        in out.with_suffix(".md").read_text()
    )


def test_throughput_keeps_what_it_measured_when_cut_short(tmp_path, monkeypatch):
    # the GPU script runs each benchmark under a time limit: methods done before it hits are kept
    import benchmarks.throughput as thr

    def bench(method, args, dist):
        if method == "dissect:ema":
            raise KeyboardInterrupt  # stands in for the limit's signal
        return {
            "method": method,
            "train_batch": 8,
            "loaded_batch": 16,
            "world": 1,
            "step_s": 0.5,
            "scored_per_s": 32.0,
            "trained_per_s": 16.0,
        }

    monkeypatch.setattr(thr, "bench_method", bench)
    out = tmp_path / "thr.json"
    with pytest.raises(KeyboardInterrupt):
        thr.main(["--methods", "none@B,dissect:memory,dissect:ema", "--out", str(out)])
    res = json.loads(out.read_text())["results"]
    assert [r["method"] for r in res] == ["none@B", "dissect:memory"]
    assert "| dissect:memory |" in out.with_suffix(".md").read_text()


def test_digits_dataset_for_the_external_check(tmp_path):
    # a second dataset for the selection benchmarks: disjoint train/val images, injected noise
    # recorded per sample, zero-shot files beside val
    from benchmarks.digits import build
    from data_prep.tario import iter_samples

    build(tmp_path, noise=0.4)

    def rows(split):
        out = []
        for shard in sorted((tmp_path / split).glob("*.tar")):
            for s in iter_samples(shard):
                out.append((json.loads(s["json"]), s["png"], s["txt"].decode()))
        return out

    train, val, clean = rows("train"), rows("val"), rows("train_clean")
    assert (len(train), len(val)) == (1497, 300)
    assert not {png for _, png, _ in train} & {png for _, png, _ in val}
    noisy = [(m, t) for m, _, t in train if m["noisy"]]
    assert len(noisy) == round(0.4 * 1497)
    names = (tmp_path / "val" / "classnames.txt").read_text().split()
    # a noisy caption names another digit than the image shows; clean ones name the right one
    assert all(names[m["label"]] not in t for m, t in noisy)
    assert all(names[m["label"]] in t for m, _, t in clean)


def _swapped_pairs(G: int, noisy_share: float, seed: int = 0):
    """Features of a model that has learnt its clean pairs (text = image + small noise), with
    the captions of the first round(share G) rows exchanged in a cycle (each now belongs to one
    other row, as a swapped web caption does)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(G, 32, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.1 * torch.randn(G, 32, generator=g), dim=-1)
    n = int(round(noisy_share * G))
    txt[:n] = txt[:n].roll(1, dims=0)
    noisy = torch.zeros(G, dtype=torch.bool)
    noisy[:n] = True
    perm = torch.randperm(G, generator=g)
    return img[perm], txt[perm], noisy[perm]


def test_ranking_probe_finds_swapped_captions_and_estimates_their_share():
    import torch

    from benchmarks.ranking import EVIDENCE, auc, score_batch
    from pipeline.config import SelectionConfig
    from pipeline.selection.rules import make_rule

    rules = {k: make_rule(r, SelectionConfig(), 1, 0, 1) for k, r in EVIDENCE.items()}
    img, txt, noisy = _swapped_pairs(256, 0.4)
    out = score_batch(rules, (img, txt, torch.tensor(20.0)), noisy, seed=0, gamma=1.0)
    assert out["true_share"] == pytest.approx(102 / 256)
    # a learnt model: every evidence ranks the swapped rows first (consistency less sharply:
    # random features have little neighbourhood structure to compare)
    for name in EVIDENCE:
        assert out[f"{name}_prec"] > 0.8 and out[f"{name}_auc"] > 0.9, (name, out)
    assert out["swap_rank_prec"] > 0.95 and out["loss_prec"] > 0.95, out
    # a swapped caption's rank among the others is uniform: twice the share above 1/2 ~ 0.4
    assert abs(out["null_share"] - 0.4) < 0.15
    # an untrained model: no evidence ranks better than chance, and the null says so too
    g = torch.Generator().manual_seed(1)
    rand = [torch.nn.functional.normalize(torch.randn(256, 32, generator=g), dim=-1) for _ in "it"]
    out = score_batch(rules, (*rand, torch.tensor(20.0)), noisy, seed=0, gamma=1.0)
    assert all(abs(out[f"{n}_auc"] - 0.5) < 0.12 for n in EVIDENCE), out
    assert out["null_share"] > 0.7  # an upper bound while nothing is learnt
    assert auc(torch.tensor([1.0, 1.0]), torch.tensor([True, False])) == 0.5


def test_ranking_probe_on_a_run_directory(tmp_path):
    """The command end to end on a run directory (an untrained model, so only the plumbing and
    the ground truth are asserted), and a clear error on a directory that is not a run."""
    import torch

    from benchmarks.ranking import main
    from pipeline.model import build_model

    write_digit_shards(tmp_path / "train", n_shards=2, per_shard=64, noise=0.5)
    cfg = yaml.safe_load(open("configs/tiny-cpu.yaml"))
    cfg["data"].update(train=str(tmp_path / "train"), batch_size=16)
    cfg["selection"] = {"ratio": 0.5}
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    torch.save(build_model("tiny-vit").model.state_dict(), run / "model.pt")
    out = tmp_path / "ranking.md"
    assert main(["--runs", str(run), "--batches", "3", "--out", str(out)]) == 0
    text = out.read_text()
    row = next(ln for ln in text.splitlines() if ln.startswith(f"| {run} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == ["32", "3"]  # G = 16 / 0.5, three super-batches
    assert 0.3 < float(cells[3]) < 0.7  # the shards' noisy flags, read as ground truth
    assert "swap_rank rank: prec" in text and text.startswith("`python -m benchmarks.ranking")
    with pytest.raises(SystemExit, match="has no config.yaml"):
        main(["--runs", str(tmp_path / "train")])
