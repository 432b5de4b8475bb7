"""End to end through dissect-train: balanced selection with a new rule on 2 ranks under ZeRO-3
(the scoring forwards run in lockstep), stopped and resumed, equal to the straight run. The rule
is infobatch: its BIC gate's running state is checkpointed and its per-row loss weights travel
with their rows into the weighted training loss."""

import pandas as pd
import pytest
from shardutil import write_digit_shards
from trainutil import run_train, train_rows


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_balanced_infobatch_two_ranks_zero3_resumes_exactly(tmp_path):
    write_digit_shards(tmp_path / "noisy", n_shards=4, per_shard=64, seed=2, noise=0.4)
    common = [
        f"data.train={tmp_path / 'noisy'}",
        "deepspeed.zero_stage=3",
        "selection.method=infobatch",
        "selection.balance=clusters",
        "selection.clusters=4",
        "selection.ratio=0.5",
        "data.batch_size=16",
        "selection.warmup_steps=2",
        "optim.epochs=2",
        "log.every_steps=1",
        "eval.at_end=false",
        "optim.warmup_steps=2",
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train([*common, f"run.dir={straight}"], nproc=2)
    run_train([*common, f"run.dir={split}", "run.stop_after_steps=4"], nproc=2)
    run_train([*common, f"run.dir={split}", "checkpoint.resume=latest"], nproc=2)
    a = {r["step"]: r for r in train_rows(straight)}
    b = {r["step"]: r for r in train_rows(split)}
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        assert a[step]["select/kept_frac"] == 0.5
        if step > 2:  # after warm-up: the clusters are learned and reported
            assert a[step]["select/clusters_used"] >= 2
            fracs = [v for k, v in a[step].items() if k.startswith("select/cluster_kept_frac/")]
            assert len(fracs) == a[step]["select/clusters_used"] and all(0 <= f <= 1 for f in fracs)
            assert "select/bic_gain" in a[step]
            if a[step]["select/filtering"]:  # infobatch prunes only while the gate is open
                assert a[step]["select/weight_max"] >= 1
    for step in range(5, 9):  # after the resume: same centroids, so the same selections
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], abs=1e-6)
        assert a[step]["select/bic_gain"] == pytest.approx(b[step]["select/bic_gain"], abs=1e-9)
        cl = {k: v for k, v in a[step].items() if k.startswith("select/cluster_kept_frac/")}
        assert cl == {k: v for k, v in b[step].items() if k.startswith("select/cluster_kept_frac/")}
    sel = [
        pd.concat(pd.read_parquet(p) for p in sorted((r / "selection").glob("*.parquet")))
        for r in (straight, split)
    ]
    cols = ["step", "uid", "cluster"]
    kept = [s[s.kept & (s.step >= 4)].sort_values(cols)[cols].values.tolist() for s in sel]
    assert kept[0] == kept[1]
    assert (sel[0][sel[0].warmup].cluster == -1).all() and (
        sel[0][~sel[0].warmup].cluster >= 0
    ).all()
