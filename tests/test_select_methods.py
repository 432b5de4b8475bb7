"""The rules beyond the paper (dissect_z, filter_random), the oracle, and what rules may read."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.selection.methods import (
    METHODS,
    ScoreInputs,
    SplitGate,
    VisitMean,
    differential,
    fit_mixture,
    per_sample_clip_loss,
    standardise,
)


def _inputs(G=24, seed=0, **over):
    gen = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(G, 8, generator=gen), dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn(G, 8, generator=gen), dim=-1)
    base = dict(
        s_G=100 * torch.rand(G, generator=gen),
        h_G=100 * torch.rand(G, generator=gen),
        feats=(img, txt, torch.tensor(10.0)),
        rand_G=torch.rand(G, generator=gen),
        history="memory",
        cluster_G=torch.arange(G) % 3,
        gate=SplitGate(min_d=0.0, momentum=0.9),
        uid_G=torch.arange(G),
        visits=VisitMean(G, rank=0, world=1, momentum=0.5),
    )
    base.update(over)
    return ScoreInputs(**base)


def test_no_rule_reads_the_ground_truth():
    # every method but the oracle scores without the noisy flag (the selector never passes it)
    for name, m in METHODS.items():
        if m.needs_truth:
            assert name == "oracle"
            continue
        x = _inputs(noisy_G=None)
        if m.rule:  # the rules of issue 19 are objects with state, built from the config
            from pipeline.config import SelectionConfig
            from pipeline.selection.rules import make_rule

            x.rule = make_rule(name, SelectionConfig(), store_size=24, rank=0, world=1)
        key = m.score(x)
        assert key.shape == (24,) and torch.isfinite(key).all(), name


def test_oracle_ranks_clean_first_and_random_inside():
    noisy = torch.tensor([True, False, True, False, False, True])
    rand = torch.tensor([0.9, 0.1, 0.8, 0.7, 0.3, 0.2])
    key = METHODS["oracle"].score(ScoreInputs(noisy_G=noisy, rand_G=rand))
    assert torch.argsort(key, descending=True).tolist() == [3, 4, 1, 0, 2, 5]


def test_dissect_z_weighs_history_and_current_equally():
    x = _inputs()
    d = METHODS["dissect_z"].score(x)
    # separately rescaling h or s (a weak history has a small spread) changes nothing
    y = _inputs(h_G=0.01 * x.h_G + 3.0, s_G=7.0 * x.s_G - 1.0)
    assert torch.allclose(METHODS["dissect_z"].score(y), d, atol=1e-5)
    # while the published differential then becomes 'keep the lowest s'
    published = differential(y.s_G, y.h_G)
    low_s = torch.argsort(y.s_G)[:8]
    assert set(torch.argsort(published, descending=True)[:8].tolist()) == set(low_s.tolist())
    assert set(torch.argsort(d, descending=True)[:8].tolist()) != set(low_s.tolist())


def test_standardise_within_groups():
    x = torch.tensor([1.0, 3.0, 10.0, 30.0, 5.0])
    g = torch.tensor([0, 0, 1, 1, 2])
    z = standardise(x, g)
    assert torch.allclose(z[:4], torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64))
    assert z[4] == 0  # a group without spread is neutral


def test_mixture_splits_a_two_mode_loss_and_measures_the_gap():
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(300, generator=gen) * 0.3 - 1.0
    noisy = torch.randn(200, generator=gen) * 0.3 + 1.5
    mix = fit_mixture(torch.cat([clean, noisy]))
    assert (mix.clean_G[:300] > 0.5).float().mean() > 0.97
    assert (mix.clean_G[300:] < 0.5).float().mean() > 0.97
    assert 7 < mix.separation < 10  # 2.5 / 0.3
    # one mode (skewed, like a clean loss distribution): the fit still splits, but not far apart
    one = torch.distributions.Gamma(4.0, 1.0).sample((500,))
    assert fit_mixture(one).separation < 2.5


def test_split_gate_follows_the_running_separation():
    gate = SplitGate(min_d=2.5, momentum=0.5)
    assert not gate.is_open and gate.stats() == {}
    assert gate.observe(4.0)  # starts at the first value
    assert gate.observe(2.0)  # 3.0: one low batch does not close it
    assert not gate.observe(1.0)  # 2.0
    assert gate.stats() == {"select/split_d": 2.0, "select/filtering": 0.0}
    again = SplitGate(min_d=2.5, momentum=0.5)
    again.load_state_dict(gate.state_dict())
    assert again.observe(5.0) == gate.observe(5.0) and again.d == gate.d == 3.5


def test_filter_random_keeps_likely_clean_at_random():
    # noisy pairs: text unrelated to the image, so a large loss; clean: text = image
    G = 40
    gen = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(G, 16, generator=gen), dim=-1)
    noisy = torch.arange(G) % 4 == 0
    txt = img.clone()
    txt[noisy] = F.normalize(torch.randn(int(noisy.sum()), 16, generator=gen), dim=-1)
    keys = []
    for seed in range(2):
        rand = torch.rand(G, generator=torch.Generator().manual_seed(seed))
        gate = SplitGate(min_d=2.5, momentum=0.9)
        key = METHODS["filter_random"].score(
            ScoreInputs(
                feats=(img, txt, torch.tensor(20.0)), rand_G=rand, cluster_G=None, gate=gate
            )
        )
        assert gate.is_open
        top = torch.argsort(key, descending=True)[:20]
        assert not noisy[top].any()
        keys.append(set(top.tolist()))
    assert keys[0] != keys[1]  # random among the likely-clean, not the smallest losses


def test_filter_random_is_random_selection_without_noise():
    # every pair clean (text near its image, spread of difficulty): no well-separated split,
    # so the gate stays shut and the key is the random draw itself, hard pairs included
    G = 128
    gen = torch.Generator().manual_seed(5)
    img = F.normalize(torch.randn(G, 16, generator=gen), dim=-1)
    noise = torch.rand(G, 1, generator=gen) * torch.randn(G, 16, generator=gen)
    txt = F.normalize(img + 0.2 * noise, dim=-1)
    rand = torch.rand(G, generator=gen)
    gate = SplitGate(min_d=2.5, momentum=0.9)
    key = METHODS["filter_random"].score(
        ScoreInputs(feats=(img, txt, torch.tensor(20.0)), rand_G=rand, cluster_G=None, gate=gate)
    )
    assert gate.d is not None and not gate.is_open
    assert torch.equal(key.float(), rand)
    # the same pairs with a quarter of the captions swapped: the gate opens
    swapped = txt.clone()
    swapped[: G // 4] = txt[G // 4 : G // 2]  # each a caption of another image
    gate = SplitGate(min_d=2.5, momentum=0.9)
    METHODS["filter_random"].score(
        ScoreInputs(
            feats=(img, swapped, torch.tensor(20.0)), rand_G=rand, cluster_G=None, gate=gate
        )
    )
    assert gate.is_open, gate.d


@pytest.mark.parametrize("name", ["dissect", "dissect_z"])
def test_history_rules_declare_it(name):
    assert METHODS[name].needs_h and METHODS[name].needs_s


def test_visit_mean_averages_each_sample_over_its_visits():
    vm = VisitMean(10, rank=0, world=1, momentum=0.5)
    uid = torch.tensor([3, 7])
    assert vm(uid, torch.tensor([2.0, -1.0])).tolist() == [2.0, -1.0]  # first sight: the value
    assert vm(torch.tensor([7, 5]), torch.tensor([1.0, 4.0])).tolist() == [0.0, 4.0]
    assert vm(uid, torch.tensor([0.0, 2.0])).tolist() == [1.0, 1.0]


def test_filter_visits_filters_the_visit_mean_of_the_loss():
    # at a sample's first visit (all of single-pass data) it is filter_random; afterwards the
    # split is made on each sample's running mean of the standardised loss
    x = _inputs(G=64, seed=1)
    x.gate = SplitGate(min_d=0.0, momentum=0.0)
    first = METHODS["filter_visits"].score(x)
    x.gate = SplitGate(min_d=0.0, momentum=0.0)
    assert torch.equal(first, METHODS["filter_random"].score(x))
    z_first = x.visits.store.value.clone()
    x.feats = _inputs(G=64, seed=2).feats  # the same samples, another visit
    METHODS["filter_visits"].score(x)
    z_second = standardise(per_sample_clip_loss(*x.feats), x.cluster_G).float()
    assert torch.allclose(x.visits.store.value, 0.5 * z_first + 0.5 * z_second, atol=1e-6)
