"""Resume on another world size: the pure resharding (in-process, no DeepSpeed), and real gloo
runs of 2 ranks stopped mid-epoch, resumed on 1 and 3 ranks and back on 2 (ZeRO 1-3, dissect
with memory and with ema), each checking that what it loaded is what the previous run saved."""

from __future__ import annotations

import shutil

import pytest
import torch
from distutil import run_ranks
from shardutil import write_digit_shards
from trainutil import CONFIG, run_train, train_rows

from pipeline import checkpoint as ckpt
from pipeline import elastic
from pipeline.dist import DistInfo
from pipeline.selection.store import ScoreStore

DIST = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

# --- pure resharding ----------------------------------------------------------------------------


def _stores(size: int, world: int, seed: int) -> tuple[list[ScoreStore], dict[int, float]]:
    """``world`` store shards with a random half of the uids written; uid -> value written."""
    g = torch.Generator().manual_seed(seed)
    uids = torch.randperm(size, generator=g)[: size // 2]
    vals = torch.rand(uids.numel(), generator=g)
    shards = [ScoreStore(size, r, world) for r in range(world)]
    for s in shards:
        s.write(uids, vals)  # owners keep theirs
    return shards, dict(zip(uids.tolist(), vals.tolist()))


def _lookup(sds: list[dict]) -> dict[int, float]:
    """uid -> value of every known entry, read the way ScoreStore addresses it."""
    out = {}
    for sd in sds:
        W, r = sd["world"], sd["rank"]
        for slot in torch.nonzero(sd["known"]).flatten().tolist():
            out[slot * W + r] = float(sd["value"][slot])
    return out


@pytest.mark.parametrize("size", [1, 2, 97, 1000])
def test_store_keeps_every_uid_through_2_3_1_2(size):
    shards, written = _stores(size, 2, seed=size)
    sds = [s.state_dict() for s in shards]
    assert _lookup(sds) == written
    for world in (3, 1, 2):
        value, known = elastic.consolidate_store(sds)
        sds = [elastic.split_store(value, known, r, world) for r in range(world)]
        assert _lookup(sds) == written, world
        for r, sd in enumerate(sds):  # loads into a store of the new world
            ScoreStore(size, r, world).load_state_dict(sd)


@pytest.mark.parametrize(
    "numel,old,new", [(10, 3, 2), (10, 2, 3), (7, 1, 4), (1, 4, 1), (64, 2, 2)]
)
def test_flat_partitions_follow_zero3_layout(numel, old, new):
    flat = torch.arange(1.0, numel + 1)
    parts = [elastic.split_flat(flat, r, old) for r in range(old)]
    n = -(-numel // old)  # DeepSpeed: ceil(numel / W) a rank, zero padding at the end
    assert all(p.numel() == n for p in parts)
    assert torch.equal(torch.cat(parts)[numel:], torch.zeros(old * n - numel))
    again = [elastic.split_flat(elastic.consolidate_flat(parts, numel), r, new) for r in range(new)]
    assert torch.equal(elastic.consolidate_flat(again, numel), flat)


def _rank_file(rank: int, world: int, zero3: bool, numels: list[int]) -> dict:
    full = [torch.arange(float(n)) + 100 * i for i, n in enumerate(numels)]
    store = ScoreStore(10, rank, world)
    store.write(torch.arange(10), torch.arange(10.0))
    trend = ScoreStore(10, rank, world)  # a rule's store, nested (margin_trend's level/trend)
    trend.write(torch.arange(10), -torch.arange(10.0))
    shards = [elastic.split_flat(f, rank, world) for f in full] if zero3 else full
    return {
        "train_state": {"step": 6, "epoch": 1, "step_in_epoch": 2, "raw_pos": {0: 99}},
        "selector": {
            "store": store.state_dict(),
            "weights": {"momentum": 0.9, "shards": shards},
            "gate": {"x": 1},
            "visits": None,
            "rule": {
                "gate": {"y": 2},
                "trend": {"level": store.state_dict(), "trend": trend.state_dict()},
            },
        },
        "rng": {"rank": rank},
    }


@pytest.mark.parametrize("zero3", [False, True])
def test_reshard_state_2_to_3(zero3):
    numels = [5, 8, 1]
    loaded = []

    def load(r):
        loaded.append(r)
        return _rank_file(r, 2, zero3, numels)

    got = []
    for r in range(3):
        loaded.clear()
        got.append(elastic.reshard_state(load, 2, r, 3, numels if zero3 else None))
        assert sorted(loaded) == [0, 1], loaded  # every old file once
    assert [g["rng"] for g in got] == [{"rank": 0}, {"rank": 1}, None]  # rank 2 is new
    for g in got:
        ts = g["train_state"]
        assert (ts["step"], ts["epoch"], ts["step_in_epoch"], ts["raw_pos"]) == (6, 1, 1, {})
        assert g["selector"]["gate"] == {"x": 1} and g["selector"]["visits"] is None
    assert _lookup([g["selector"]["store"] for g in got]) == {u: float(u) for u in range(10)}
    rules = [g["selector"]["rule"] for g in got]
    assert all(r["gate"] == {"y": 2} and r["trend"]["level"]["world"] == 3 for r in rules)
    assert _lookup([r["trend"]["level"] for r in rules]) == {u: float(u) for u in range(10)}
    assert _lookup([r["trend"]["trend"] for r in rules]) == {u: -float(u) for u in range(10)}
    shards = [g["selector"]["weights"]["shards"] for g in got]
    for i, n in enumerate(numels):
        want = torch.arange(float(n)) + 100 * i
        have = elastic.consolidate_flat([s[i] for s in shards], n) if zero3 else shards[0][i]
        assert torch.equal(have, want)
        if zero3:
            assert shards[0][i].numel() == -(-n // 3)


# --- the universal conversion: once, complete or not at all, one clear line ----------------------


class ConvertingEngine:
    """Stands in for Engine.to_universal: writes a fragment, then finishes or is killed."""

    def __init__(self, killed: bool = False):
        self.killed, self.calls = killed, 0

    def to_universal(self, step_dir, out):
        self.calls += 1
        (out / "zero" / "w").mkdir(parents=True)
        (out / "zero" / "w" / "fp32.pt").write_bytes(b"fragment")
        if self.killed:
            raise KeyboardInterrupt("killed while converting")  # not caught: like a SIGKILL
        (out / "mp_rank_00_model_states.pt").write_bytes(b"model")


def _step_dir(tmp_path, tag="step_00000005"):
    d = tmp_path / tag
    d.mkdir()
    (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 1000)
    return d


def test_a_conversion_killed_midway_is_never_used(tmp_path):
    d = _step_dir(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        ckpt.ensure_universal(ConvertingEngine(killed=True), d, DIST)
    assert not (d / ckpt.UNIVERSAL).exists()  # only a universal.tmp* folder was left
    assert [p.name.startswith(ckpt.UNIVERSAL + ".tmp") for p in d.iterdir() if p.is_dir()] == [True]
    eng = ConvertingEngine()
    out = ckpt.ensure_universal(eng, d, DIST)  # the next start converts again, and cleans up
    assert (out / ckpt.UNIVERSAL_DONE).read_text().strip() == d.name
    assert [p.name for p in d.iterdir() if p.is_dir()] == [ckpt.UNIVERSAL]
    ckpt.ensure_universal(eng, d, DIST)  # converted once: a later start reuses it
    assert eng.calls == 1


def test_bad_conversions_are_one_line(tmp_path, monkeypatch):
    d = _step_dir(tmp_path)
    (d / ckpt.UNIVERSAL).mkdir()
    (d / ckpt.UNIVERSAL / ckpt.UNIVERSAL_DONE).write_text("step_00000003\n")
    with pytest.raises(
        ckpt.CheckpointError, match="converted from step_00000003, not step_00000005"
    ):
        ckpt.ensure_universal(ConvertingEngine(), d, DIST)

    d2 = _step_dir(tmp_path, "step_00000007")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6, 10))
    with pytest.raises(ckpt.CheckpointError, match="needs about .* GiB are free there"):
        ckpt.ensure_universal(ConvertingEngine(), d2, DIST)
    monkeypatch.undo()

    class Incompatible(ConvertingEngine):
        def to_universal(self, step_dir, out):
            raise AssertionError("shape mismatch\nmore lines of DeepSpeed's own")

    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.ensure_universal(Incompatible(), d2, DIST)
    assert "cannot be converted" in str(err.value) and "\n" not in str(err.value)
    assert not any(p.is_dir() for p in d2.iterdir())  # nothing half-made stays behind

    (d2 / "state_rank0.pt").write_bytes(b"")
    (d2 / "state_rank2.pt").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="ranks \\[0, 2\\], not 0..W-1"):
        ckpt.saved_world(d2)


# --- real runs: 2 ranks -> 1 -> 2, and 2 -> 3 ---------------------------------------------------


def _snapshot(tr) -> dict:
    """The consolidated state a checkpoint must carry over (a collective: every rank calls)."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_optimizer_state

    out = {"weights": tr.engine.full_state_dict(), "step": tr.state.step}
    opt = tr.engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked"):  # ZeRO 1-2: link to the loaded moments
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    for key in ("exp_avg", "exp_avg_sq"):
        out[key] = {
            n: safe_get_full_optimizer_state(p, key).detach().clone()
            for n, p in tr.engine.module.named_parameters()
        }
    src = tr.selector.source
    if hasattr(src, "store"):
        sds = [None] * dist.get_world_size()
        dist.all_gather_object(sds, src.store.state_dict())
        out["store"] = elastic.consolidate_store(sds)
    if hasattr(src, "weights"):
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, src.weights.shards)
        numels = tr.engine.partition_numels()
        out["history"] = [
            elastic.consolidate_flat([p[i] for p in parts], n) if numels else parts[0][i]
            for i, n in enumerate(numels or [0] * len(parts[0]))
        ]
    return out


def _rank_run(rank: int, world: int, overrides: list[str]) -> dict:
    from pipeline.config import load_config
    from pipeline.dist import init_distributed
    from pipeline.trainer import Trainer, plan_run

    cfg = load_config(CONFIG, overrides)
    plan = plan_run(cfg, init_distributed(cfg.deepspeed.timeout_s))
    tr = Trainer(cfg, plan)
    loaded = _snapshot(tr) if plan.resume_from else None
    tr.train()
    final = _snapshot(tr)
    return {"loaded": loaded, "final": final, "total": plan.total_steps} if rank == 0 else {}


def _same(a: dict, b: dict, what: str) -> None:
    assert a["step"] == b["step"], what
    for key in ("weights", "exp_avg", "exp_avg_sq"):
        assert a[key].keys() == b[key].keys()
        for n in a[key]:
            assert torch.equal(a[key][n], b[key][n]), (what, key, n)
    if "store" in b:
        (va, ka), (vb, kb) = a["store"], b["store"]
        assert torch.equal(ka, kb) and ka.sum() > 0, what
        assert torch.equal(va[ka], vb[kb]), what
    if "history" in b:
        assert len(a["history"]) == len(b["history"])
        assert all(torch.equal(x, y) for x, y in zip(a["history"], b["history"])), what


@pytest.fixture(scope="module")
def elastic_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("elastic") / "noisy"
    write_digit_shards(d, n_shards=6, per_shard=48, seed=3, noise=0.4)
    return d


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
# ZeRO-2 shares ZeRO-1's checkpoint layout and DeepSpeed code path (stage_1_and_2.py); it moves
# 2 -> 1 in tests/test_launch_slurm.py (a requeue on fewer nodes). Each case here is 3-4 starts:
# add (2, "ema", 3, None) to see it here too, at about the cost of the ZeRO-3 case.
@pytest.mark.parametrize("stage,history,to,also", [(1, "memory", 1, None), (3, "ema", 3, 1)])
def test_resume_on_another_world_size(elastic_shards, tmp_path, stage, history, to, also):
    """2 ranks stop at step 5 (mid-epoch, after warm-up), resume on ``to`` ranks for 2 steps,
    then on 2 again: each start loads exactly what the run before it saved (weights, Adam
    moments, every uid's stored score, the historical weights), and the loss keeps falling.
    ``also``: one more world size resumed from a copy of the step-5 checkpoint."""
    run = tmp_path / "run"
    common = [
        f"data.train={elastic_shards}",
        f"deepspeed.zero_stage={stage}",
        "selection.method=dissect",
        f"selection.history={history}",
        "selection.ratio=0.5",
        "data.batch_size=12",
        "selection.warmup_steps=3",
        "optim.epochs=3",
        "optim.warmup_steps=2",
        "optim.lr=2e-3",
        "log.every_steps=1",
        "eval.at_end=false",
        "log.tensorboard=false",
        "log.progress=false",
        "selection.log_samples=false",
    ]
    here = [*common, f"run.dir={run}"]
    first = run_ranks(_rank_run, 2, ([*here, "run.stop_after_steps=5"],), timeout=300)[0]
    saved = first["final"]
    ckpts = run / "checkpoints"
    if also:
        shutil.copytree(run, tmp_path / "also")
        other = [*common, f"run.dir={tmp_path / 'also'}", "checkpoint.resume=latest"]
        res = run_ranks(_rank_run, also, ([*other, "run.stop_after_steps=6"],), timeout=300)[0]
        _same(res["loaded"], saved, f"2 -> {also}")
        assert res["final"]["step"] == 6
    if to == 1:  # another model's checkpoint: converted, but it does not load; one line, exit 2
        bad = run_train([*here, "checkpoint.resume=latest", "model.name=small-vit"], check=False)
        assert bad.returncode == 2, bad.stderr[-3000:]
        assert "Traceback" not in bad.stderr, bad.stderr[-3000:]
        assert "dissect-train: cannot resume: " in bad.stderr
        assert "does not load into this model on 1" in bad.stderr
    moved = run_ranks(
        _rank_run,
        to,
        ([*here, "checkpoint.resume=latest", "run.stop_after_steps=7"],),
        timeout=300,
    )[0]
    _same(moved["loaded"], saved, f"2 -> {to}")
    assert (ckpts / "step_00000005" / "universal" / "DONE").read_text().strip() == "step_00000005"
    back = run_ranks(
        _rank_run,
        2,
        ([*here, "checkpoint.resume=latest", "run.stop_after_steps=9"],),
        timeout=300,
    )[0]
    _same(back["loaded"], moved["final"], f"{to} -> 2")
    assert back["final"]["step"] == 9
    # 288 samples, 2 ranks x 24 = 6 steps an epoch: 3 epochs end at step 18 on 2 ranks; the
    # detour re-scales the rest of the epoch, not the run (within one step of 18)
    assert abs(back["total"] - 18) <= 1, back["total"]
    rows = {r["step"]: r for r in train_rows(run)}
    assert sorted(rows) == list(range(1, 10))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows.values())
    assert (rows[8]["loss"] + rows[9]["loss"]) / 2 < rows[1]["loss"]
