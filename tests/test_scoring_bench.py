"""Smoke runs of benchmarks.scoring and benchmarks.loader on tiny digit shards."""

import json

import pytest
from shardutil import write_digit_shards


@pytest.mark.timeout(300)
def test_scoring_benchmark_reports_every_setting(tmp_path):
    from benchmarks.scoring import main

    write_digit_shards(tmp_path / "d", n_shards=10, per_shard=32, noise=0.4)
    settings = "engine,full,pd0.5,size0.5"
    args = ["--data", str(tmp_path / "d"), "--train-steps", "6", "--early-step", "2"]
    args += ["--super", "16", "--eval-batches", "2", "--settings", settings, "--reps", "1"]
    args += ["--cost-models", "tiny-vit", "--cost-batch", "8", "--out", str(tmp_path / "o")]
    assert main(args) == 0
    rep = json.loads((tmp_path / "o" / "scoring.json").read_text())
    q = {r["setting"]: r for r in rep["quality"]}
    assert set(q) == set(settings.split(","))
    # the exact path agrees with the reference; the sizes are whole patches
    assert q["full"]["spearman_s"] > 0.999 and q["full"]["overlap_clip"] == 1.0
    assert q["size0.5"]["image_size"] == 16
    assert [r["setting"] for r in rep["cost"]] == settings.split(",")


@pytest.mark.timeout(300)
def test_loader_benchmark_reports_workers(tmp_path):
    from benchmarks.loader import main

    write_digit_shards(tmp_path / "d", n_shards=2, per_shard=64)
    args = ["--shards", f"dig={tmp_path / 'd'}", "--models", "tiny-vit", "--n", "60"]
    args += ["--reps", "1", "--batch", "20", "--out", str(tmp_path / "o")]
    assert main(args) == 0
    rep = json.loads((tmp_path / "o" / "loader.json").read_text())
    assert {r["shards"] for r in rep["rows"]} == {"photo", "dig"}
    assert all(w["workers"] >= 1 for w in rep["workers"])
