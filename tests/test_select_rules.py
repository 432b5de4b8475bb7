"""The rules of issue 19 (pipeline/selection/rules.py), each on constructed inputs, and the
method registry the config reads. The selector-level guarantees (1 rank == 2 ranks, exact
resume) are in test_select_selector.py, end to end under ZeRO-3 in test_select_e2e.py."""

import dataclasses
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from pipeline.config import SelectionConfig
from pipeline.loss import WeightedClipLoss
from pipeline.selection.methods import METHODS, ScoreInputs, per_sample_clip_loss
from pipeline.selection.names import SELECTION_METHODS
from pipeline.selection.rules import (
    RULES,
    BicGate,
    MarginTrend,
    RuleOptions,
    SwapNullShare,
    bic_gain,
    fit_gmm,
    fn_aware_loss,
    grenander,
    gumbel_keys,
    infobatch_weights,
    margin_evidence,
    null_posterior,
    posterior_tiers,
    rank_tiers,
    same_caption,
    soft_tiers,
    spec_rule,
    structure_consistency,
    swap_rank,
)


def _opt(keep_ratio: float = 0.5) -> RuleOptions:
    """The rules' options of these tests: no pooling of the share over steps (gate_momentum 0),
    a few rows per cluster; the visit momentum is the config's."""
    return RuleOptions(
        gamma=1.0,
        min_cluster_rows=8,
        same_caption_cos=0.995,
        gsc_temperature=0.1,
        margin_momentum=0.5,
        gate_momentum=0.0,
        visit_momentum=SelectionConfig().visit_momentum,
        keep_ratio=keep_ratio,
    )


def test_config_method_names_are_the_registry():
    assert set(METHODS) | {"none"} == set(SELECTION_METHODS)
    # the config reads the names without importing torch
    code = "import sys, pipeline.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_bench_configs_name_registered_methods():
    for path in sorted(Path(__file__).parents[1].glob("configs/bench/*.yaml")):
        for spec in yaml.safe_load(path.read_text())["methods"]:
            name = spec.split("+")[0].split(":")[0]
            assert name in SELECTION_METHODS, (path.name, spec)


def _classes(G=48, C=4, D=16, seed=0):
    """Images and captions of C classes in two unaligned spaces (an early model: the cross-modal
    cosine says little), each class a tight cluster in both. Returns img, txt, class."""
    gen = torch.Generator().manual_seed(seed)
    cls = torch.arange(G) % C
    rot = torch.linalg.qr(torch.randn(D, D, generator=gen))[0]  # image space = rotated text space
    centre = torch.eye(D)[:C] * 3
    txt = F.normalize(centre[cls] + 0.3 * torch.randn(G, D, generator=gen), dim=-1)
    img = F.normalize(centre[cls] @ rot + 0.3 * torch.randn(G, D, generator=gen), dim=-1)
    return img, txt, cls, rot, gen


def test_structure_consistency_tells_a_swap_from_a_hard_clean_pair():
    img, txt, cls, rot, gen = _classes()
    D = img.shape[1]
    txt[0] = txt[1]  # pair 0 (class 0) carries class 1's caption: swapped
    # pair 4 (class 0) is hard: its image is far from its class's centre, but still nearest it
    img[4] = F.normalize(torch.eye(D)[0] * 3 @ rot + 2.5 * torch.randn(D, generator=gen), dim=0)
    c = structure_consistency(img, txt, temperature=0.1)
    cross = (img * txt).sum(1)
    assert cross[4] < 0.5 and abs(cross[4] - cross[0]) < 0.6  # the cross-modal view: no verdict
    assert c[0] == c.min() and c[4] > c[0] + 0.2
    assert (c[1:] > c[0]).all()


def test_bic_says_one_component_on_unimodal_data_at_any_scale_and_two_on_a_mixture():
    gen = torch.Generator().manual_seed(0)
    G = 256
    one_mode = torch.randn(G, 2, generator=gen, dtype=torch.float64)
    one_mode[:, 1] = 0.6 * one_mode[:, 0] + 0.8 * one_mode[:, 1]  # correlated features
    two_modes = torch.randn(G, 2, generator=gen, dtype=torch.float64)
    two_modes[: int(0.35 * G)] += 4.0  # 35% noisy rows, shifted in both features
    for scale, shift in ((1e-3, 5.0), (1.0, 0.0), (1e3, -2e3)):
        for cols in ([0], [0, 1]):
            x1, x2 = one_mode[:, cols] * scale + shift, two_modes[:, cols] * scale + shift
            assert bic_gain(fit_gmm(x1, 1), fit_gmm(x1, 2), G) < 0, (scale, cols)
            assert bic_gain(fit_gmm(x2, 1), fit_gmm(x2, 2), G) > 0, (scale, cols)
            fit = fit_gmm(x2, 2)
            assert float(fit.weight_K.min()) == pytest.approx(0.35, abs=0.03)


def test_bic_gate_follows_the_running_gain_and_round_trips():
    gate = BicGate(momentum=0.5)
    assert not gate.is_open and gate.stats() == {}
    assert gate.observe(0.2) and not gate.observe(-0.6)  # 0.2, then 0.5*0.2 - 0.3 = -0.2
    other = BicGate(momentum=0.5)
    other.load_state_dict(gate.state_dict())
    assert other.stats() == gate.stats()
    assert gate.stats() == {"select/bic_gain": pytest.approx(-0.2), "select/filtering": 0.0}


@pytest.mark.parametrize("gamma", [1.0, 2.0])
def test_gumbel_top_k_draws_in_proportion_to_the_posterior_power(gamma):
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    n = 20000
    u = torch.rand(n, 4, generator=gen, dtype=torch.float64)
    first = gumbel_keys(p.log(), gamma, u).argmax(1)  # n draws at once (broadcast)
    freq = torch.bincount(first, minlength=4).double() / n
    want = p**gamma / (p**gamma).sum()
    assert torch.allclose(freq, want, atol=0.015), (freq, want)


def test_soft_keep_drops_no_more_than_the_estimated_noise_share():
    gen = torch.Generator().manual_seed(1)
    clean = torch.rand(100, generator=gen, dtype=torch.float64)
    for share in (0.0, 0.13, 0.4):
        noisy = soft_tiers(clean, share, 1.0, torch.rand(100, generator=gen))
        assert int(noisy.sum()) == round(share * 100)
    # the rows called noisy are mostly the low-posterior ones, not all of them (soft)
    hits = torch.zeros(100)
    for _ in range(300):
        hits += soft_tiers(clean, 0.3, 1.0, torch.rand(100, generator=gen)).double()
    assert torch.corrcoef(torch.stack([hits, clean]))[0, 1] < -0.5
    lowest = clean.argsort()[:30]
    assert 0 < hits[lowest].min() and hits[lowest].max() < 300  # each drawn, none always


def test_rank_keep_drops_the_shares_count_of_most_evidence():
    ev = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2, 0.7, 0.0, 0.3, 0.8, 0.4])
    assert rank_tiers(ev, 0.3).nonzero().flatten().tolist() == [1, 3, 8]  # ties: lower row first
    assert not rank_tiers(ev, 0.04).any() and rank_tiers(ev, 1.0).all()


def test_rank_keep_drops_noisier_rows_than_the_soft_draw_on_the_same_evidence():
    # the reason for draw='rank': the loss mixture's posterior over a bounded, skewed evidence is
    # poorly calibrated, and a Gumbel draw from it drops clean rows the evidence ranks as clean
    opt = _opt()
    x, noisy = _rule_inputs()
    precision = {}
    for name in ("gsc_null", "gsc_rank", "swap_null"):
        key = _make_rule(name, opt, store_size=256).key(x)
        assert int((key < 1).sum()) == 112  # the same count: the swap null's share, 0.4375
        precision[name] = float(noisy[key < 1].double().mean())
    assert precision["gsc_rank"] > precision["gsc_null"] + 0.1
    # unique captions, a model that has learnt the clean pairs: the rank of the swap statistic
    # itself finds the swaps where their neighbourhoods (isotropic images here) say little
    img, txt, noisy = _swapped(0.4, align=2.0)
    x = ScoreInputs(feats=(img, txt, torch.tensor(10.0)), uid_G=torch.arange(512), seed=1)
    key = _make_rule("swap_null", opt, store_size=512).key(x)
    assert float(noisy[key < 1].double().mean()) > 0.9


def _class_visit(visit, G=256, C=8, D=16):
    """The same 256 pairs of 8 classes (96 with another class's caption, fixed) seen again: each
    visit draws fresh feature noise around the class centres, as each epoch's augmentations and
    updated weights do; a swapped class caption is not learnt over visits."""
    gen = torch.Generator().manual_seed(0)
    cls = torch.arange(G) % C
    noisy = torch.zeros(G, dtype=torch.bool)
    noisy[torch.randperm(G, generator=gen)[:96]] = True
    cap = torch.where(noisy, (cls + torch.randint(1, C, (G,), generator=gen)) % C, cls)
    centre = torch.eye(D)[:C] * 3
    g = torch.Generator().manual_seed(100 + visit)
    img = F.normalize(centre[cls] + 1.2 * torch.randn(G, D, generator=g), dim=-1)
    txt = F.normalize(centre[cap] + 1.2 * torch.randn(G, D, generator=g), dim=-1)
    feats = (img, txt, torch.tensor(10.0))
    return ScoreInputs(feats=feats, uid_G=torch.arange(G), seed=visit), noisy


def test_swap_mean_ranks_by_the_visits_mean_and_is_swap_null_at_first_sight():
    opt = _opt()
    mean, null = _make_rule("swap_mean", opt, 256), _make_rule("swap_null", opt, 256)
    precision = []
    for visit in range(6):
        x, noisy = _class_visit(visit)
        k_mean, k_null = mean.key(x), null.key(x)
        if visit == 0:  # nothing stored yet: the mean is this visit's swap_rank
            assert torch.equal(k_mean, k_null)
        precision.append([float(noisy[k < 1].double().mean()) for k in (k_mean, k_null)])
    # one visit's rank is noisy; its running mean is less so: from the third visit on, the mean
    # drops clearly noisier rows, from the same count (the swap null's share)
    later = precision[2:]
    assert all(m >= n for m, n in later), precision
    assert sum(m - n for m, n in later) / len(later) > 0.08, precision
    # the per-sample means round-trip through the rule's state (checkpoints)
    again = _make_rule("swap_mean", opt, 256)
    again.load_state_dict(mean.state_dict())
    x, _ = _class_visit(6)
    assert torch.equal(again.key(x), mean.key(x))


def test_margin_trend_keeps_a_rising_pair_that_is_still_low():
    trend = MarginTrend(store_size=8, rank=0, world=1, momentum=0.5)
    uid = torch.arange(8)
    # uids 0-5 sit at 0.2; uid 6 rises from -0.4 to -0.1; uid 7 stays at -0.1
    for m6 in (-0.4, -0.25, -0.1):
        level, tr = trend(uid, torch.tensor([0.2] * 6 + [m6, -0.1], dtype=torch.float64))
    assert level[6] < level[7] and tr[6] > 0.1 and abs(tr[7]) < 1e-6
    ev = margin_evidence(level, tr)  # high = noisy
    assert ev[6] < ev[7] and ev[7] == ev.max()
    again = MarginTrend(store_size=8, rank=0, world=1, momentum=0.5)
    again.load_state_dict(trend.state_dict())
    assert torch.equal(again(uid, level)[0], trend(uid, level)[0])


def test_infobatch_rescaling_keeps_the_expected_gradient():
    # 10 learned rows of which 4 are kept, every subset equally likely (the random pruning): over
    # all 210 subsets the mean weighted sum of a per-row quantity (a gradient) over the kept rows
    # is exactly its sum over all rows; without the weights it would be short by 6/10 of the group
    gen = torch.Generator().manual_seed(0)
    learned = torch.zeros(16, dtype=torch.bool)
    learned[:10] = True
    grad = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    subsets = list(itertools.combinations(range(10), 4))
    total = torch.zeros(3, dtype=torch.float64)
    for sub in subsets:
        kept = ~learned.clone()  # the 6 hard clean rows are always kept
        kept[list(sub)] = True
        w = infobatch_weights(learned, kept).double()
        assert torch.all(w[~learned] == 1) and torch.all(w[learned & kept] == 2.5)
        total += (w[kept, None] * grad[kept]).sum(0)
    assert torch.allclose(total / len(subsets), grad.sum(0), atol=1e-12)


def _rule_inputs(seed=0):
    """256 pairs of 8 classes, 96 of them (37.5%) with another class's caption, from a model that
    has learned a little (image and text spaces aligned)."""
    gen = torch.Generator().manual_seed(seed)
    G, C, D = 256, 8, 16
    cls = torch.arange(G) % C
    noisy = torch.zeros(G, dtype=torch.bool)
    noisy[torch.randperm(G, generator=gen)[:96]] = True
    cap = torch.where(noisy, (cls + torch.randint(1, C, (G,), generator=gen)) % C, cls)
    centre = torch.eye(D)[:C] * 3
    img = F.normalize(centre[cls] + 0.8 * torch.randn(G, D, generator=gen), dim=-1)
    txt = F.normalize(centre[cap] + 0.8 * torch.randn(G, D, generator=gen), dim=-1)
    x = ScoreInputs(feats=(img, txt, torch.tensor(10.0)), uid_G=torch.arange(G), seed=seed)
    return x, noisy


def _auc(score_noisy, noisy):
    pos, neg = score_noisy[noisy], score_noisy[~noisy]
    return float((pos[:, None] > neg[None, :]).double().mean())


def _make_rule(name, opt, store_size):
    return spec_rule(RULES[name], opt, store_size, 0, 1)


@pytest.mark.parametrize("name", [n for n in RULES if n != "margin_trend"])  # no history here
def test_rules_rank_swapped_captions_last_and_infobatch_keeps_hard_clean_first(name):
    prune = RULES[name].prune
    opt = _opt()
    rule = _make_rule(name, opt, store_size=256)
    x, noisy = _rule_inputs()
    key = rule.key(x)
    assert rule.filtering and rule.stats()["select/filtering"] == 1.0
    dropped = key < 1  # the rows dropped as noisy: mostly noisy, about as many as given
    assert 60 <= int(dropped.sum()) <= 130
    # (37.5% given; the swap null's share is an upper bound, 44% here, so it drops more rows
    # and its bar is lower, still well above the base rate)
    assert float(noisy[dropped].double().mean()) > (0.5 if RULES[name].share == "null" else 0.7)
    assert _auc(-key[dropped], noisy[dropped]) > 0.6  # the least noisy of them first
    if prune == "infobatch":
        w = rule.weights(key >= torch.sort(key, descending=True).values[127])
        loss = fn_aware_loss(*x.feats, same_caption(x.feats[1], 0.995))
        hard = key >= 2
        assert hard.any() and (loss[hard].min() >= loss[(key >= 1) & ~hard].max())
        assert w is not None and float(w.max()) >= 1
    else:
        assert rule.weights(key > 0.5) is None


@pytest.mark.parametrize("name", [n for n in RULES if n != "margin_trend"])
def test_a_rule_computes_the_per_sample_loss_only_where_it_reads_it(name, monkeypatch):
    """The FN-aware loss is one more [G, G] pass per step: the swap-null rules that neither rank
    by it nor prune by it (InfoBatch) skip it, and their keys do not change."""
    import pipeline.selection.rules as rules

    spec = RULES[name]
    opt = _opt()
    x, _ = _rule_inputs()
    want = _make_rule(name, opt, store_size=256).key(x)
    calls = []
    real = rules.fn_aware_loss
    monkeypatch.setattr(rules, "fn_aware_loss", lambda *a: calls.append(1) or real(*a))
    assert torch.equal(_make_rule(name, opt, store_size=256).key(x), want)
    reads = "loss" in spec.features or spec.share == "bic" or spec.prune == "infobatch"
    assert bool(calls) == reads, (name, calls)


@pytest.mark.parametrize("name", list(RULES))
def test_rules_are_random_selection_on_clean_data(name):
    # no noise (a skewed but unimodal loss): the BIC gate stays closed (gsc_null: the swap-null
    # share rounds to no row), nothing is dropped as noisy and every rule, infobatch too, orders
    # the rows at random with unit loss weights
    gen = torch.Generator().manual_seed(3)
    G, D = 256, 16
    img = F.normalize(torch.randn(G, D, generator=gen), dim=-1)
    txt = F.normalize(img + 0.1 * torch.randn(G, D, generator=gen), dim=-1)
    opt = _opt()
    rule = _make_rule(name, opt, store_size=G)
    x = ScoreInputs(feats=(img, txt, torch.tensor(10.0)), uid_G=torch.arange(G), seed=5)
    key = rule.key(x)
    u = torch.rand(2, G, generator=torch.Generator().manual_seed(5), dtype=torch.float64)[1]
    assert not rule.filtering and rule.stats()["select/filtering"] == 0.0
    assert torch.equal(key, 1.0 + u)
    assert rule.weights(key > 1.5) is None


def _swapped(pi, align, seed=0, G=512, D=16):
    """G pairs, a share pi of them with another pair's caption; align: how well the model has
    learnt the clean pairs (text = align * image + noise)."""
    gen = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(G, D, generator=gen), dim=-1)
    txt = F.normalize(align * img + 0.5 * torch.randn(G, D, generator=gen), dim=-1)
    noisy = torch.rand(G, generator=gen) < pi
    txt = torch.where(noisy[:, None], txt[torch.randperm(G, generator=gen)], txt)
    return img, txt, noisy


@pytest.mark.parametrize("pi", [0.0, 0.2, 0.4])
def test_swap_rank_is_uniform_for_swapped_captions_and_twice_its_tail_is_their_share(pi):
    img, txt, noisy = _swapped(pi, align=3.0, G=2048)
    rank = swap_rank(img, txt, same_caption(txt, 0.995))
    assert float(rank[~noisy].mean()) < 0.02  # a learnt clean pair: its own caption ranks first
    if pi:  # 400-800 swapped rows: a binomial sd of at most 0.025 on each share below
        r = rank[noisy]
        for q in (0.25, 0.5, 0.75):  # uniform on [0, 1] (a triangle's quartiles would fail)
            assert abs(float((r <= q).double().mean()) - q) < 0.08, q
    est = SwapNullShare(0.0).observe(rank)
    assert abs(est - float(noisy.double().mean())) < 0.05


def test_swap_rank_is_scale_free_and_excludes_identical_captions():
    img, txt, _ = _swapped(0.3, align=1.0)
    same = same_caption(txt, 0.995)
    assert torch.equal(swap_rank(img, txt, same), swap_rank(5 * img, 0.1 * txt, same))
    # a caption duplicated on another row is not 'another caption' of either row
    txt2 = txt.clone()
    txt2[1] = txt2[0]
    rank = swap_rank(img, txt2, same_caption(txt2, 0.995))
    rank_alone = swap_rank(img[1:], txt2[1:], same_caption(txt2[1:], 0.995))
    assert float(rank[1]) == pytest.approx(float(rank_alone[0]), abs=1e-12)


def test_swap_null_share_pools_over_steps_and_round_trips():
    share = SwapNullShare(0.5)
    assert share.share == 0.0 and share.stats() == {}
    share.observe(torch.tensor([0.9, 0.1, 0.1, 0.1]))  # 1 of 4 above 1/2: share 0.5
    assert share.share == pytest.approx(0.5)
    share.observe(torch.tensor([0.1, 0.1, 0.1, 0.1]))  # f = 0.5 * 0.25 + 0.5 * 0 = 0.125
    assert share.share == pytest.approx(0.25)
    other = SwapNullShare(0.5)
    other.load_state_dict(share.state_dict())
    assert other.observe(torch.ones(4)) == share.observe(torch.ones(4)) == pytest.approx(1.0)


def test_fn_aware_loss_does_not_count_an_identical_caption_as_a_negative():
    gen = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    txt[1] = txt[0]  # rows 0 and 1 have the same caption
    same = same_caption(txt, 0.995)
    assert same.sum() == 2 and same[0, 1] and same[1, 0]
    aware = fn_aware_loss(img, txt, torch.tensor(10.0), same)
    keep = [0, 2, 3, 4, 5]
    without_1 = per_sample_clip_loss(img[keep], txt[keep], torch.tensor(10.0))
    assert aware[0] == pytest.approx(float(without_1[0]), abs=1e-5)
    plain = per_sample_clip_loss(img, txt, torch.tensor(10.0))
    assert plain[0] > aware[0] + 1e-3


def test_weighted_clip_loss_is_clip_loss_at_unit_weights():
    from open_clip import ClipLoss

    gen = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(8, 4, generator=gen), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(8, 4, generator=gen), dim=-1)
    scale = torch.tensor(10.0)
    ref = ClipLoss()(img, txt, scale)
    ours = WeightedClipLoss(rank=0, world_size=1)
    assert torch.allclose(ours(img, txt, scale, torch.ones(8)), ref, atol=1e-6)
    w = torch.rand(8, generator=gen)
    want = (w * per_sample_clip_loss(img, txt, scale)).mean()
    got = ours(img, txt, scale, w)
    assert torch.allclose(got, want, atol=1e-6)
    (g1,) = torch.autograd.grad(got, img)
    (g2,) = torch.autograd.grad(want, img)
    assert torch.allclose(g1, g2, atol=1e-6)


def test_bench_configs_are_run_configs_with_known_models_and_metrics():
    """Each bench config's base (and base + quick) builds as a run config, names a model that
    configs/models or open_clip's built-ins hold, and ranks by a metric the evaluator writes."""
    import open_clip

    from benchmarks.selection import merge
    from pipeline.config import config_from_dict

    root = Path(__file__).parents[1]
    local = {p.stem for p in (root / "configs/models").glob("*.json")}
    builtin = set(open_clip.list_models())
    metrics = {f"eval/{p}{m}" for p in ("", "ret_") for m in ("i2t_r1", "i2t_r5", "i2t_r10")}
    metrics |= {"eval/zeroshot_top1", "eval/zeroshot_top5"}
    for path in sorted(root.glob("configs/bench/*.yaml")):
        spec = yaml.safe_load(path.read_text())
        assert spec["metric"] in metrics, (path.name, spec["metric"])
        for raw in (spec["base"], merge(spec["base"], spec.get("quick", {}))):
            cfg = config_from_dict(raw)
            assert cfg.model.name in local | builtin, (path.name, cfg.model.name)


def test_grenander_is_the_non_increasing_density_of_the_sample():
    gen = torch.Generator().manual_seed(0)
    spike = 0.05 * torch.rand(1200, generator=gen)  # 60% on [0, 0.05]: density 12 + 0.4 there
    x = torch.cat([spike, torch.rand(800, generator=gen)])
    f = grenander(x)
    order = torch.argsort(x)
    assert bool((f[order][1:] <= f[order][:-1] + 1e-12).all())  # non-increasing in x
    assert 9.0 < float(f[x < 0.04].median()) < 16.0
    assert 0.3 < float(f[x > 0.3].median()) < 0.5
    # it is a density: each gap between neighbouring values lies on one hull segment, the one
    # of its right end, and the slopes over the gaps add up to the CDF's rise, 1
    xs, first = torch.unique(x.double(), return_inverse=True)
    f_xs = torch.zeros_like(xs).scatter_(0, first, f)
    assert float((f_xs * torch.diff(xs, prepend=torch.zeros(1, dtype=torch.float64))).sum()) == (
        pytest.approx(1.0, abs=1e-9)
    )
    # a mass at 0 (pairs whose own caption ranks first) has infinite density
    assert torch.isinf(grenander(torch.tensor([0.0, 0.0, 0.3, 0.9]))[:2]).all()


def test_posterior_tiers_draw_each_row_with_its_probability_and_never_beyond_the_share():
    p = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.5])
    ev = torch.tensor([0.9, 0.8, 0.7, 0.95, 0.1, 0.5, 0.6, 0.4])
    u = torch.tensor([0.3, 0.9, 0.5, 0.0, 0.2, 0.4, 0.6, 0.1])
    # under the cap: exactly the rows with u < P(noisy); P = 0 is never dropped, P = 1 always
    assert posterior_tiers(p, 1.0, ev, u).nonzero().flatten().tolist() == [0, 1, 2, 5, 7]
    # over it (round(0.25 * 8) = 2): the drawn rows of most evidence
    assert posterior_tiers(p, 0.25, ev, u).nonzero().flatten().tolist() == [0, 1]
    # in expectation it drops sum(P) rows
    gen = torch.Generator().manual_seed(0)
    q = torch.rand(4000, generator=gen, dtype=torch.float64)
    n = posterior_tiers(q, 1.0, q, torch.rand(4000, generator=gen, dtype=torch.float64)).sum()
    assert abs(int(n) - float(q.sum())) < 100  # sd about 26


def test_swap_lfdr_drops_as_the_rank_where_learnt_and_spreads_where_not():
    """swap_null's failure, and the reason for swap_lfdr: with a weak model, dropping the null's
    count by rank keeps exactly the clean pairs of lowest swap_rank (the easiest); the local false
    discovery rate keeps clean pairs across their ranks, while it still drops noisier rows than
    chance, and as noisy rows as the rank once the clean pairs are learnt."""
    opt = _opt(keep_ratio=0.3)  # a step keeping 30%: the share (0.39-0.51 here) leaves enough
    for align, min_prec in ((2.0, 0.9), (0.6, 0.5)):
        img, txt, noisy = _swapped(0.4, align=align)
        x = ScoreInputs(feats=(img, txt, torch.tensor(10.0)), uid_G=torch.arange(512), seed=1)
        rank = swap_rank(img, txt, same_caption(txt, 0.995))
        kept_rank, prec = {}, {}
        for name in ("swap_null", "swap_lfdr"):
            dropped = _make_rule(name, opt, 512).key(x) < 1
            prec[name] = float(noisy[dropped].double().mean())
            kept_rank[name] = float(rank[~dropped & ~noisy].mean())
        assert prec["swap_lfdr"] > min_prec > float(noisy.double().mean())
        if align < 1:  # weak: the kept clean rows are not the easiest ones only
            assert kept_rank["swap_lfdr"] > 1.3 * kept_rank["swap_null"]
    # a weak model's share near 1 (0.84 here) leaves fewer rows than a step keeping half:
    # swap_lfdr drops nothing (a random share), swap_null keeps exactly the 256 rows of lowest
    # swap_rank; should a step's rounding leave fewer rows than it keeps, the rest come from the
    # dropped rows by a draw, not by rank, and the kept set stays no noisier than the super-batch
    img, txt, noisy = _swapped(0.4, align=0.15)
    x = ScoreInputs(feats=(img, txt, torch.tensor(10.0)), uid_G=torch.arange(512), seed=1)
    rank = swap_rank(img, txt, same_caption(txt, 0.995))
    null = _make_rule("swap_null", _opt(), 512)
    assert int((null.key(x) < 1).sum()) > 256 and null.filtering
    lfdr = _make_rule("swap_lfdr", _opt(), 512)
    assert not bool((lfdr.key(x) < 1).any()) and not lfdr.filtering
    small = _make_rule("swap_lfdr", _opt(keep_ratio=0.15), 512)
    assert bool((small.key(x) < 1).any()) and small.filtering  # 1 - 0.84 >= 0.15
    top = {}
    for name, rule in (("swap_null", null), ("swap_lfdr", _make_rule("swap_lfdr", _opt(), 512))):
        rule.opt.keep_ratio = 0.0  # the fill itself: as if the guard had let the step filter
        key = rule.key(x)
        assert int((key < 1).sum()) > 256
        top[name] = torch.argsort(-key)[:256]
    assert float(rank[top["swap_lfdr"]].max()) > 1.3 * float(rank[top["swap_null"]].max())
    assert float(noisy[top["swap_lfdr"]].double().mean()) <= float(noisy.double().mean())
    # the posterior itself: near 0 on a learnt spike, near 1 on the null's floor
    img, txt, noisy = _swapped(0.4, align=2.0)
    post = null_posterior(swap_rank(img, txt, same_caption(txt, 0.995)), 0.4)
    assert float(post[~noisy].mean()) < 0.1 and float(post[noisy].mean()) > 0.8


def test_swap_guard_is_swap_null_once_learnt_and_random_while_the_share_leaves_too_few():
    """swap_null's weak-model loop (a share near 1: dropping it by rank keeps only the easiest
    pairs) is cut by swap_lfdr's guard alone, and the rank's precision is kept where it works."""
    img, txt, _ = _swapped(0.4, align=2.0)  # learnt: share about 0.4 < 1 - 0.5
    x = ScoreInputs(feats=(img, txt, torch.tensor(10.0)), uid_G=torch.arange(512), seed=1)
    guard, null = _make_rule("swap_guard", _opt(), 512), _make_rule("swap_null", _opt(), 512)
    assert torch.equal(guard.key(x), null.key(x)) and guard.filtering
    img, txt, _ = _swapped(0.4, align=0.15)  # weak: share about 0.84 > 1 - 0.5
    x = ScoreInputs(feats=(img, txt, torch.tensor(10.0)), uid_G=torch.arange(512), seed=1)
    guard, null = _make_rule("swap_guard", _opt(), 512), _make_rule("swap_null", _opt(), 512)
    assert int((null.key(x) < 1).sum()) > 256 and null.filtering
    assert not bool((guard.key(x) < 1).any()) and not guard.filtering
    assert guard.stats()["select/noise_share"] > 0.5  # the share is still logged


@pytest.mark.parametrize("name", ["swap_lfdr", "swap_guard"])
def test_guarded_rules_resume_exactly_while_they_filter(name):
    """The selector-level resume and 1 rank == 2 ranks cases see the fake engine's random
    features, where the share stays near 1 and the guard keeps these rules random; here they
    filter (a learnt model, share about 0.4 < 1 - r: swap_lfdr's draw and fill, swap_guard's
    rank), and a rule restored from a mid-run state dict gives the same keys as the one that ran
    straight."""
    opt = dataclasses.replace(_opt(), gate_momentum=0.5)  # the share pools over steps: state
    straight, resumed = _make_rule(name, opt, 512), _make_rule(name, opt, 512)
    for step in range(4):
        img, txt, _ = _swapped(0.4, align=2.0, seed=step)
        x = ScoreInputs(feats=(img, txt, torch.tensor(10.0)), uid_G=torch.arange(512), seed=step)
        key = straight.key(x)
        assert straight.filtering and bool((key < 1).any())
        if step == 1:
            resumed.load_state_dict(straight.state_dict())
        elif step > 1:
            assert torch.equal(resumed.key(x), key)
    fresh = _make_rule(name, opt, 512)  # without the state, the pooled share differs
    assert not torch.equal(fresh.key(x), key)
