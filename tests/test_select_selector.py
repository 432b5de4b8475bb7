"""Selector.select in-process with a small fake engine: 1 rank == 2 gloo ranks for every method,
source and the balance; the warm-up boundary; resume; uniform tie-breaking; the oracle's guard.

The fake engine is a linear CLIP: image features = images @ Wi, text features = mean of token
embeddings Wt, both L2-normalised; ``partitions`` are (Wi, Wt), replicated like ZeRO 0-2, and a
fake optimizer step moves them by a seeded random amount (the same on every rank).
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile

import pytest
import torch
import torch.nn.functional as F
from distutil import run_ranks

POOL = 40  # distinct uids: samples are revisited, so stores and memos get hits
G, K_TRAIN = 16, 8  # global super-batch and global train batch (r = 0.5)
V, D = 20, 8


class FakeEngine:
    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        self.device = torch.device("cpu")
        self.Wi = torch.randn(12, D, generator=gen)
        self.Wt = torch.randn(V, D, generator=gen)
        self.scale = torch.tensor(10.0)

    def forward(self, images, tokens):
        img = F.normalize(images.flatten(1).float() @ self.Wi, dim=-1)
        txt = F.normalize(self.Wt[tokens].mean(1), dim=-1)
        return img, txt, self.scale

    def partitions(self):
        return [self.Wi, self.Wt]

    @contextlib.contextmanager
    def swapped_weights(self, shards):
        saved = [t.clone() for t in self.partitions()]
        for t, s in zip(self.partitions(), shards):
            t.copy_(s)
        try:
            yield
        finally:
            for t, s in zip(self.partitions(), saved):
                t.copy_(s)

    def fake_step(self, step: int) -> None:
        gen = torch.Generator().manual_seed(1000 + step)
        self.Wi += 0.2 * torch.randn(self.Wi.shape, generator=gen)
        self.Wt += 0.2 * torch.randn(self.Wt.shape, generator=gen)


def sample(uid: int) -> dict:
    """One pair: 5 classes; uids divisible by 3 carry another class's caption (noisy)."""
    gen = torch.Generator().manual_seed(uid)
    c = uid % 5
    noisy = uid % 3 == 0
    cap = (c + 1) % 5 if noisy else c
    img = torch.zeros(12)
    img[c * 2 : c * 2 + 3] = 1.0
    img += 0.3 * torch.randn(12, generator=gen)
    tok = torch.tensor([cap + 1, cap + 6, cap + 11, int(torch.randint(V, (1,), generator=gen))])
    return {"images": img.view(3, 2, 2), "tokens": tok, "uid": uid, "label": c, "noisy": noisy}


def global_batch(step: int, pool: int = POOL, fresh: bool = False) -> dict:
    gen = torch.Generator().manual_seed(step)
    uids = (
        torch.arange(step * G, (step + 1) * G) if fresh else torch.randperm(pool, generator=gen)[:G]
    )
    rows = [sample(int(u)) for u in uids]
    return {
        "images": torch.stack([r["images"] for r in rows]),
        "tokens": torch.stack([r["tokens"] for r in rows]),
        "uid": torch.tensor([r["uid"] for r in rows]),
        "label": torch.tensor([r["label"] for r in rows]),
        "noisy": torch.tensor([r["noisy"] for r in rows]),
        "captions": [f"uid {r['uid']}" for r in rows],
    }


def local_part(batch: dict, rank: int, world: int) -> dict:
    B = G // world
    sl = slice(rank * B, (rank + 1) * B)
    return {k: (v[sl] if torch.is_tensor(v) else v[sl]) for k, v in batch.items()}


def make_cfg(world: int, run_dir: str, **sel):
    from pipeline.config import config_from_dict

    selection = {
        "method": "dissect",
        "ratio": 0.5,
        "warmup_steps": 3,
        "log_samples": False,
        "ema_momentum": 0.5,
        **sel,
    }
    return config_from_dict(
        {
            "run": {"seed": 3, "dir": run_dir},
            "data": {"batch_size": K_TRAIN // world},
            "selection": selection,
        }
    )


def make_selector(rank: int, world: int, run_dir: str, store_size: int = POOL, **sel):
    from pipeline.dist import DistInfo
    from pipeline.selection import Selector

    engine = FakeEngine()
    dist = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    return Selector(
        make_cfg(world, run_dir, **sel), engine, dist, store_size, steps_per_epoch=4
    ), engine


def run_steps(
    rank: int,
    world: int,
    run_dir: str,
    steps: int,
    sel: dict,
    start: int = 0,
    state=None,
    fresh: bool = False,
    store_size: int = POOL,
):
    """Selections of steps [start, steps): per step the uids this rank trains on, and the stats."""
    selector, engine = make_selector(rank, world, run_dir, store_size=store_size, **sel)
    for step in range(start):  # replay the weights' trajectory up to the resume point
        engine.fake_step(step)
    if state is not None:
        selector.load_state_dict(torch.load(io.BytesIO(state), weights_only=False))
    out = []
    for step in range(start, steps):
        train, stats = selector.select(
            local_part(global_batch(step, fresh=fresh), rank, world), step
        )
        assert train["uid"].shape[0] == K_TRAIN // world
        rec = {
            "uid": train["uid"].tolist(),
            "weight": sorted(
                (u, round(w, 5)) for u, w in zip(train["uid"].tolist(), train["weight"].tolist())
            )
            if "weight" in train
            else [],
            "stats": {k: v for k, v in stats.items() if k.startswith("select/")},
        }
        if selector.reporter.last is not None:
            g = selector.reporter.last["g"]
            last = selector.reporter.last
            rec.update(
                s=g.s.clone(),
                h=g.h.clone(),
                uid_G=g.uid.clone(),
                kept=last["kept"],
                cluster=last["cluster"],
            )
        out.append(rec)
        selector.after_step(step)
        engine.fake_step(step)
    buf = io.BytesIO()
    torch.save(selector.state_dict(), buf)
    return out, buf.getvalue()


def _rank_runs(rank, world, run_dir, steps, cases):
    return [run_steps(rank, world, run_dir, steps, sel)[0] for sel in cases]


CASES = [
    {"method": "random"},
    {"method": "clipscore"},
    {"method": "small_loss"},
    {"method": "big_loss"},
    {"method": "dissect", "history": "memory"},
    {
        "method": "dissect",
        "history": "snapshot",
        "score_chunk": 3,
    },  # chunked memo forwards in lockstep
    {"method": "dissect", "history": "ema"},
    {"method": "dissect", "history": "score_ema"},
    {"method": "dissect_z", "history": "memory"},
    {"method": "filter_random", "balance": "clusters", "clusters": 3},
    {"method": "filter_visits", "split_min_d": 0.0},
    {"method": "filter_soft", "balance": "clusters", "clusters": 3, "min_cluster_rows": 4},
    {"method": "gsc"},
    {"method": "margin_trend"},  # the per-sample margin store, sharded
    {"method": "filter_2d"},
    {"method": "infobatch", "balance": "clusters", "clusters": 3},  # loss weights move too
    {"method": "gsc_null", "balance": "clusters", "clusters": 3},  # the swap-null share
    {"method": "gsc_rank"},
    {"method": "swap_null", "balance": "clusters", "clusters": 3},  # drop by rank of swap_rank
    {"method": "swap_mean", "balance": "clusters", "clusters": 3},  # its per-sample mean, sharded
    {"method": "swap_lfdr", "balance": "clusters", "clusters": 3},  # a draw from the lfdr
    {"method": "swap_guard"},  # swap_null's rank with the guard
    {"method": "dissect", "history": "snapshot", "balance": "clusters", "clusters": 3},
    {"method": "small_loss", "balance": "clusters", "clusters": 4},
]


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_two_ranks_select_what_one_rank_selects(tmp_path):
    steps = 7  # warm-up is steps 0-2
    ranks = run_ranks(_rank_runs, 2, args=(str(tmp_path), steps, CASES), timeout=240)
    for i, sel in enumerate(CASES):
        one = run_steps(0, 1, str(tmp_path), steps, sel)[0]
        two = [ranks[0][i], ranks[1][i]]
        for step in range(steps):
            got = sorted(two[0][step]["uid"] + two[1][step]["uid"])
            assert got == sorted(one[step]["uid"]), (sel, step)
            weights = sorted(two[0][step]["weight"] + two[1][step]["weight"])
            assert weights == sorted(one[step]["weight"]), (sel, step)
            for key, v in one[step]["stats"].items():
                if key == "select/moved_frac":  # rebalancing exists only across ranks
                    continue
                assert two[0][step]["stats"][key] == pytest.approx(v, abs=1e-5, nan_ok=True), (
                    sel,
                    step,
                    key,
                )
        assert [r["stats"]["select/warmup"] for r in one] == [1.0] * 3 + [0.0] * (steps - 3)


def test_warmup_boundary_of_every_source(tmp_path):
    # memory: after warm-up, h of a sample seen in warm-up is its last warm-up s; unseen: h = s
    rec, _ = run_steps(0, 1, str(tmp_path), 6, {"method": "dissect", "history": "memory"})
    last_s = {}
    for r in rec[:3]:
        assert torch.equal(r["h"], torch.zeros(G))  # nothing is read during warm-up
        last_s.update(zip(r["uid_G"].tolist(), r["s"].tolist()))
    for r in rec[3:]:
        for u, h, s in zip(r["uid_G"].tolist(), r["h"].tolist(), r["s"].tolist()):
            assert h == pytest.approx(last_s.get(u, s), abs=1e-5)
    # snapshot: frozen at the first post-warm-up step, so there h = s exactly; later steps read the memo
    rec, _ = run_steps(0, 1, str(tmp_path), 6, {"method": "dissect", "history": "snapshot"})
    assert all(torch.equal(r["h"], torch.zeros(G)) for r in rec[:3])
    assert torch.allclose(rec[3]["h"], rec[3]["s"], atol=1e-5)
    memo = dict(zip(rec[3]["uid_G"].tolist(), rec[3]["h"].tolist()))
    again = [(u, h) for u, h in zip(rec[4]["uid_G"].tolist(), rec[4]["h"].tolist()) if u in memo]
    assert again and all(h == pytest.approx(memo[u], abs=1e-6) for u, h in again)
    assert not torch.allclose(rec[4]["h"], rec[4]["s"], atol=1e-3)  # the live model has moved on
    # ema: averaged from step 0 (momentum 0.5), so after warm-up h differs from s
    rec, _ = run_steps(0, 1, str(tmp_path), 5, {"method": "dissect", "history": "ema"})
    assert torch.equal(rec[2]["h"], torch.zeros(G)) and not torch.allclose(
        rec[3]["h"], rec[3]["s"], atol=1e-3
    )
    # score_ema: read in warm-up too; h = s at first sight
    rec, _ = run_steps(0, 1, str(tmp_path), 2, {"method": "dissect", "history": "score_ema"})
    assert torch.allclose(rec[0]["h"], rec[0]["s"])


@pytest.mark.parametrize(
    "sel",
    [
        {"method": "dissect", "history": "memory"},
        {"method": "dissect", "history": "snapshot"},
        {"method": "dissect", "history": "ema"},
        {"method": "dissect", "history": "score_ema"},
        {"method": "clipscore", "balance": "clusters", "clusters": 3},
        {"method": "filter_random", "split_momentum": 0.5},  # the gate's running separation
        {"method": "filter_visits", "split_min_d": 0.0},  # the per-sample visit means
        {"method": "margin_trend", "split_momentum": 0.5},  # margin store and the BIC gate
        {"method": "infobatch"},
        {"method": "gsc_null", "split_momentum": 0.5},  # the swap-null running share
        {"method": "swap_null", "split_momentum": 0.5},
        {"method": "swap_mean", "split_momentum": 0.5},  # the per-sample swap_rank means
        {"method": "swap_lfdr", "split_momentum": 0.5},
        {"method": "swap_guard", "split_momentum": 0.5},
    ],
)
def test_resume_from_state_dict_is_exact(tmp_path, sel):
    straight, _ = run_steps(0, 1, str(tmp_path), 8, sel)
    _, state = run_steps(0, 1, str(tmp_path), 5, sel)
    resumed, _ = run_steps(0, 1, str(tmp_path), 8, sel, start=5, state=state)
    for a, b in zip(straight[5:], resumed):
        assert a["uid"] == b["uid"] and a["weight"] == b["weight"]
        assert a["stats"] == b["stats"]


def test_neutral_keys_are_kept_uniformly_over_the_uid_range(tmp_path):
    # never-seen samples get h = s, so every differential is exactly 0: a tie over the whole
    # super-batch. uids arrive in ascending (url-list) order; a uid tie-break would always keep
    # the lowest half, the seeded draw keeps each position about half of the time.
    steps = 200
    rec, _ = run_steps(
        0,
        1,
        str(tmp_path),
        steps,
        {"method": "dissect", "history": "memory", "warmup_steps": 0},
        fresh=True,
        store_size=steps * G,
    )
    kept = torch.zeros(G)
    for r in rec:
        assert torch.all(r["h"] == r["s"])
        kept += r["kept"].float()
    frac = kept / steps
    assert frac.min() > 0.35 and frac.max() < 0.65, frac
    assert abs(frac[: G // 2].mean() - frac[G // 2 :].mean()) < 0.08


def write_tiny_shard(path, with_noisy: bool):
    with tarfile.open(path, "w") as tf:
        meta = {"uid": 0, **({"noisy": False} if with_noisy else {})}
        data = json.dumps(meta).encode()
        info = tarfile.TarInfo("000000.json")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))


def test_oracle_keeps_clean_pairs_and_is_refused_without_the_flag(tmp_path):
    from pipeline.config import ConfigError

    write_tiny_shard(tmp_path / "flagged.tar", True)
    write_tiny_shard(tmp_path / "plain.tar", False)
    sel = {"method": "oracle", "warmup_steps": 0}
    sc = make_cfg(1, str(tmp_path), **sel)
    from pipeline.dist import DistInfo
    from pipeline.selection import Selector

    dist = DistInfo(0, 1, 0, torch.device("cpu"))
    sc.data.train = str(tmp_path / "plain.tar")
    with pytest.raises(ConfigError, match="selection.method=oracle .* carry none"):
        Selector(sc, FakeEngine(), dist, POOL, 4)
    sc.data.train = str(tmp_path / "flagged.tar")
    selector = Selector(sc, FakeEngine(), dist, POOL, 4)
    for step in range(4):
        batch = global_batch(step)
        train, stats = selector.select(batch, step)
        n_clean = int((~batch["noisy"]).sum())
        assert stats["select/kept_noisy_frac"] == max(0, K_TRAIN - n_clean) / K_TRAIN
        assert stats["select/noise_auc"] == 1.0


def test_balance_reports_kept_fraction_per_cluster(tmp_path):
    rec, _ = run_steps(
        0, 1, str(tmp_path), 6, {"method": "clipscore", "balance": "clusters", "clusters": 3}
    )
    for r in rec[:3]:
        assert not any(
            k.startswith("select/cluster_kept_frac/") for k in r["stats"]
        )  # warm-up: random
    for r in rec[3:]:
        n = torch.bincount(r["cluster"], minlength=3)
        kept = torch.bincount(r["cluster"][r["kept"]], minlength=3)
        assert int(n.sum()) == G and int(kept.sum()) == K_TRAIN
        for c in range(3):
            # largest remainder: each cluster keeps its share of the kept set, within one sample
            assert abs(int(kept[c]) - K_TRAIN * int(n[c]) / G) < 1
            if n[c]:
                assert r["stats"][f"select/cluster_kept_frac/c{c:02d}"] == pytest.approx(
                    float(kept[c] / n[c])
                )
        assert r["stats"]["select/clusters_used"] == int((n > 0).sum()) >= 2


def test_bad_balance_config_names_the_field(tmp_path):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="selection.clusters"):
        make_selector(0, 1, str(tmp_path), balance="clusters", clusters=G + 1)
    with pytest.raises(ConfigError, match="selection.balance"):
        make_cfg(1, str(tmp_path), balance="stratified")
    with pytest.raises(ConfigError, match="selection.clusters"):
        make_cfg(1, str(tmp_path), balance="clusters", clusters=0)


class ListSink:
    def __init__(self):
        self.calls = []

    def histogram(self, tag, vals, step):
        self.calls.append(("histogram", tag, step))

    def image(self, tag, img, step):
        self.calls.append(("image", tag, step))

    def text(self, tag, txt, step):
        self.calls.append(("text", tag, step))


def test_report_writes_histograms_grid_and_sample_log(tmp_path):
    import pandas as pd

    (tmp_path / "selection").mkdir()
    selector, engine = make_selector(
        0, 1, str(tmp_path), history="memory", log_samples=True, grid_every_steps=3
    )
    sink = ListSink()
    for step in range(4):
        selector.select(global_batch(step), step)
        selector.after_step(step)
        if step % 2 == 1:
            selector.report(sink, step)
    tags = {(kind, tag) for kind, tag, _ in sink.calls}
    assert {
        ("histogram", "select/hist_s"),
        ("histogram", "select/hist_h"),
        ("histogram", "select/hist_key"),
        ("image", "select/most_rejected"),
        ("text", "select/most_rejected_captions"),
    } <= tags
    parts = sorted((tmp_path / "selection").glob("part-*.parquet"))
    assert [p.name for p in parts] == ["part-00000001.parquet", "part-00000003.parquet"]
    df = pd.concat(pd.read_parquet(p) for p in parts)
    assert len(df) == 4 * G and (df.groupby("step").kept.sum() == K_TRAIN).all()
    assert df[df.step < 3].warmup.all() and not df[df.step == 3].warmup.any()
