"""The shard stream: split by rank and worker, exact mid-epoch resume, too few shards."""

import pytest
import torch
from shardutil import write_digit_shards

from pipeline.config import ConfigError
from pipeline.data import EpochPlan, StreamSpec, expand_shards, make_loader


def _spec(urls, **kw):
    def pre(im):
        return torch.zeros(3, 4, 4)

    def tok(caps):
        return torch.zeros(len(caps), 3, dtype=torch.long)

    base = dict(urls=urls, batch_size=8, preprocess=pre, tokenizer=tok, seed=3, shuffle_buffer=32)
    base.update(kw)
    return StreamSpec(**base)


@pytest.fixture(scope="module")
def urls(tmp_path_factory):
    d = tmp_path_factory.mktemp("loader")
    write_digit_shards(d, n_shards=4, per_shard=32)
    return expand_shards(str(d))


def _uids(loader):
    return [b["uid"].tolist() for b in loader]


@pytest.mark.timeout(120)
def test_ranks_see_disjoint_shards_covering_the_epoch(urls):
    seen = []
    for rank in range(2):
        spec = _spec(urls, rank=rank, world=2, nworkers=0)
        seen.append([u for b in _uids(make_loader(spec, EpochPlan(epoch=0, steps=8))) for u in b])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(128))
    # the next epoch reshuffles the shard order
    again = [
        u
        for b in _uids(make_loader(_spec(urls, rank=0, world=2), EpochPlan(epoch=1, steps=8)))
        for u in b
    ]
    assert again != seen[0]


@pytest.mark.timeout(120)
def test_mid_epoch_resume_continues_exactly(urls):
    spec = _spec(urls, nworkers=2)
    full = list(make_loader(spec, EpochPlan(epoch=0, steps=14)))
    k = 5  # resume after 5 batches: the next one is worker 1's turn
    raw_pos = {}
    for b in full[:k]:
        raw_pos[b["worker"]] = b["raw_pos"]
    rest = list(make_loader(spec, EpochPlan(epoch=0, steps=14, start_step=k, raw_pos=raw_pos)))
    assert [b["uid"].tolist() for b in rest] == [b["uid"].tolist() for b in full[k:]]
    flat = [u for b in full for u in b["uid"].tolist()]
    assert len(flat) == len(set(flat)) == 14 * 8  # no sample twice within the pass


@pytest.mark.timeout(60)
def test_too_few_shards_for_ranks_times_workers(urls):
    spec = _spec(urls[:2], rank=1, world=2, nworkers=2)
    with pytest.raises(Exception, match="cannot feed 2 ranks x 2 workers"):
        list(make_loader(spec, EpochPlan(epoch=0, steps=2)))
    with pytest.raises(ConfigError, match="does not exist"):
        expand_shards("/nonexistent/{000..003}.tar")


def test_batches_are_pinned_only_on_a_gpu_host(urls, monkeypatch):
    # pinned host memory makes the engine's non_blocking copies asynchronous; without a GPU
    # there is nothing to pin for (and a CPU-only torch refuses to pin)
    assert not make_loader(_spec(urls), EpochPlan(epoch=0, steps=1)).pin_memory
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert make_loader(_spec(urls), EpochPlan(epoch=0, steps=1)).pin_memory
