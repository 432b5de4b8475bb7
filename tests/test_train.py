"""End-to-end training through the real entry point: one and two processes, ZeRO 0-3, resume."""

import json

import pandas as pd
import pytest
from shardutil import write_digit_shards
from trainutil import metrics, run_train, train_rows

from pipeline.curate import curate


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    write_digit_shards(root / "train", n_shards=4, per_shard=128, seed=0)
    write_digit_shards(
        root / "val", n_shards=1, per_shard=200, seed=1, uid_offset=10_000, with_val_meta=True
    )
    write_digit_shards(root / "noisy", n_shards=4, per_shard=128, seed=2, noise=0.4)
    return root


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_single_process_learns_and_writes_run_dir(shards, tmp_path):
    from pipeline.cmd_eval import main as eval_main

    run = tmp_path / "run"
    proc = run_train(
        [
            f"data.train={shards / 'train'}",
            f"data.val={shards / 'val'}",
            f"run.dir={run}",
            "optim.lr=2e-3",
            "optim.epochs=5",
            "log.every_steps=4",
            "checkpoint.every_steps=40",
            "eval.every_steps=40",
            "log.progress_every_s=0.5",
        ]
    )
    # not a terminal: progress lines (first and last step at least), readable eval lines
    progress = [ln for ln in proc.stderr.splitlines() if ln.startswith("step ")]
    assert progress[0].startswith("step 1/80 ") and progress[-1].startswith("step 80/80 (100%)")
    assert all(" | loss " in ln and " samples/s | ETA " in ln for ln in progress)
    evals = [ln for ln in proc.stderr.splitlines() if ln.startswith("eval @ step")]
    assert len(evals) == 2 and all("zero-shot top-1" in ln and "{" not in ln for ln in evals)
    assert "No pretrained weights loaded" not in proc.stderr and "Warning" not in proc.stderr
    for name in (
        "config.yaml",
        "ds_config.json",
        "metrics.jsonl",
        "eval.json",
        "model.pt",
        "tb",
        "checkpoints/latest",
    ):
        assert (run / name).exists(), name
    # the optimizer DeepSpeed built is torch's fused AdamW (deepspeed.fused_adam, the default)
    opt = json.loads((run / "ds_config.json").read_text())["optimizer"]["params"]
    assert opt["torch_adam"] is True and opt["fused"] is True
    rows = train_rows(run)
    for key in (
        "step",
        "epoch",
        "samples_seen",
        "samples_trained",
        "loss",
        "lr",
        "time_s",
        "perf/data_s",
        "perf/train_s",
        "perf/samples_per_s",
    ):
        assert key in rows[-1], key
    losses = [r["loss"] for r in rows]
    third = max(1, len(losses) // 3)
    assert sum(losses[-third:]) / third < losses[0] - 0.15, losses
    ev = json.loads((run / "eval.json").read_text())
    assert ev["eval/zeroshot_top1"] > 0.2  # chance is 0.1
    assert rows[-1]["samples_trained"] == rows[-1]["samples_seen"] == 80 * 32
    assert any(p.name.startswith("events") for p in (run / "tb").iterdir())
    # dissect-eval on the exported weights reproduces the run's own final evaluation
    assert eval_main(["--run", str(run), "--out", str(tmp_path / "ev.json")]) == 0
    again = json.loads((tmp_path / "ev.json").read_text())
    assert again["eval/zeroshot_top1"] == pytest.approx(ev["eval/zeroshot_top1"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "stage,history,chunk",
    [
        (0, "memory", 512),
        (1, "snapshot", 512),
        (2, "score_ema", 512),
        (3, "ema", 512),
        (3, "snapshot", 8),
    ],
)
def test_two_ranks_every_zero_stage_with_selection(shards, tmp_path, stage, history, chunk):
    # (3, snapshot, chunk 8): ranks have different numbers of samples to score with the snapshot,
    # so they must pad their chunked forwards to run ZeRO-3's gathers in lockstep
    run = tmp_path / "run"
    proc = run_train(
        [
            f"data.train={shards / 'noisy'}",
            f"data.val={shards / 'val'}",
            f"run.dir={run}",
            f"deepspeed.zero_stage={stage}",
            "selection.method=dissect",
            f"selection.history={history}",
            "selection.ratio=0.5",
            "data.batch_size=16",
            "selection.warmup_steps=4",
            f"selection.score_chunk={chunk}",
            "optim.lr=2e-3",
            "optim.epochs=3",
            "log.every_steps=2",
        ],
        nproc=2,
    )
    # each warning once per job: no library deprecation notices, no per-rank duplicates
    assert "Warning" not in proc.stderr and proc.stderr.count("built successfully") == 0, (
        proc.stderr[-3000:]
    )
    rows = train_rows(run)
    assert rows[-1]["step"] == 3 * 512 // (2 * 32)
    assert rows[-1]["samples_trained"] * 2 == rows[-1]["samples_seen"]
    assert all(abs(r["select/kept_frac"] - 0.5) < 1e-6 for r in rows)
    assert all("select/noise_auc" in r and "select/kept_noisy_frac" in r for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    sel = pd.concat(pd.read_parquet(p) for p in sorted((run / "selection").glob("*.parquet")))
    per_step = sel.groupby("step")["kept"].sum()
    assert (per_step == 32).all()  # W * b kept every step
    assert sel[sel.warmup].step.max() == 3 and not sel[~sel.warmup].empty
    assert (run / "model.pt").exists() and (run / "eval.json").exists()
    if history == "memory":
        check_memory_store(sel)
    if history == "score_ema":
        check_score_ema(sel, momentum=0.9)
    uids = curate(run, "last", after_warmup=True)
    assert 0 < len(uids) < 512


def check_memory_store(sel):
    """After warm-up, h is the s a sample last had during warm-up; unseen samples get h = s."""
    warm = sel[sel.warmup].sort_values("step").groupby("uid")["s"].last()
    after = sel[~sel.warmup]
    seen = after[after.uid.isin(warm.index)]
    assert len(seen) > 50
    assert (seen.h.values - warm.loc[seen.uid].values).__abs__().max() < 1e-4
    fresh = after[~after.uid.isin(warm.index)]
    assert len(fresh) > 0 and (fresh.h - fresh.s).abs().max() < 1e-4


def check_score_ema(sel, momentum):
    """Upstream's rule: h = s at first sight, then h <- m h + (1 - m) s after every use."""
    checked = 0
    for _, g in sel.sort_values("step").groupby("uid"):
        h, s = g.h.values, g.s.values
        assert abs(h[0] - s[0]) < 1e-4
        for k in range(1, len(g)):
            assert abs(h[k] - (momentum * h[k - 1] + (1 - momentum) * s[k - 1])) < 1e-3
            checked += 1
    assert checked > 100


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_resume_reproduces_the_uninterrupted_run(shards, tmp_path):
    common = [
        f"data.train={shards / 'noisy'}",
        "deepspeed.zero_stage=2",
        "selection.method=dissect",
        "selection.history=memory",
        "selection.ratio=0.5",
        "data.batch_size=16",
        "selection.warmup_steps=4",
        "optim.epochs=2",
        "log.every_steps=1",
        "eval.at_end=false",
        "optim.warmup_steps=3",
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train([*common, f"run.dir={straight}"], nproc=2)
    run_train([*common, f"run.dir={split}", "run.stop_after_steps=8"], nproc=2)
    assert (split / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    run_train([*common, f"run.dir={split}", "checkpoint.resume=latest"], nproc=2)
    a = {r["step"]: r for r in train_rows(straight)}
    b = {r["step"]: r for r in train_rows(split)}
    assert sorted(a) == sorted(b) == list(range(1, 17))
    for step in range(9, 17):  # after the resume: same losses, lr and selections
        assert abs(a[step]["loss"] - b[step]["loss"]) < 1e-5, step
        assert a[step]["lr"] == pytest.approx(b[step]["lr"])
        assert a[step]["select/kept_noisy_frac"] == b[step]["select/kept_noisy_frac"]

    def kept(run):
        sel = pd.concat(pd.read_parquet(p) for p in sorted((run / "selection").glob("*.parquet")))
        sel = sel[sel.step >= 8]
        return sorted(map(tuple, sel[sel.kept][["step", "uid"]].values.tolist()))

    assert kept(straight) == kept(split)
    assert metrics(split)[-1]["step"] == 16
