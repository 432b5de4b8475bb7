"""The scoring forward's options on a real open_clip model (tiny-vit, CPU): the lean path and
token trimming reproduce the engine forward, the approximate options are seeded privately and
refused where they cannot run."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.model import build_model, text_features
from pipeline.selection.scoring import (
    ScoreOptions,
    Scorer,
    chunk_lengths,
    interpolate_pos,
)


class ModuleEngine:
    """What Scorer needs of pipeline.engine.Engine: the module, called as the engine calls it."""

    def __init__(self, module, zero_stage: int = 0):
        self.module = module.eval()
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.zero_stage = zero_stage

    def forward(self, images, tokens):
        return self.module(images, tokens)


@pytest.fixture(scope="module")
def bundle():
    return build_model("tiny-vit", seed=0)


def _batch(bundle, n=10):
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 32, 32, generator=gen)
    words = ["a photo of a shoe", "bag", "a very long caption " * 3, "pullover", "t-shirt or top"]
    tokens = bundle.tokenizer([words[i % len(words)] for i in range(n)])
    return images, tokens


def _scorer(bundle, **kw):
    return Scorer(ModuleEngine(bundle.model), chunk=4, precision="fp32", options=ScoreOptions(**kw))


def test_trimmed_text_features_equal_untrimmed(bundle):
    _, tokens = _batch(bundle)
    m = bundle.model.eval()
    (length,) = chunk_lengths(tokens, len(tokens), trim=True)
    assert length < tokens.shape[1]  # the test trims something
    with torch.no_grad():
        full = m.encode_text(tokens)
        trimmed = text_features(m, tokens[:, :length])
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-5)


def test_lean_path_equals_engine_forward(bundle):
    images, tokens = _batch(bundle)
    ref = _scorer(bundle, lean=False).features(images, tokens)
    for trim in (False, True):
        got = _scorer(bundle, trim_tokens=trim).features(images, tokens)
        torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)
        assert not got[0].is_inference()  # usable by the gather and the methods


def test_chunk_lengths_per_chunk():
    t = torch.zeros(5, 8, dtype=torch.long)
    t[0, :3] = 1
    t[1, :2] = 1
    t[2, :6] = 1
    t[3, :1] = 1  # t[4] all padding
    assert chunk_lengths(t, 2, trim=True) == [3, 6, 1]
    assert chunk_lengths(t, 2, trim=False) == [8, 8, 8]


def test_patch_dropout_is_seeded_privately(bundle):
    images, tokens = _batch(bundle)
    sc = _scorer(bundle, patch_dropout=0.5)
    sc.seed = 3
    state = torch.get_rng_state()
    a = sc.features(images, tokens)[0]
    assert torch.equal(torch.get_rng_state(), state)  # training's random draws are untouched
    b = sc.features(images, tokens)[0]
    torch.testing.assert_close(a, b)
    sc.seed = 4
    assert not torch.allclose(sc.features(images, tokens)[0], a)
    full = _scorer(bundle).features(images, tokens)[0]
    assert not torch.allclose(a, full)


def test_lower_resolution_scores_and_full_size_is_identity(bundle):
    images, tokens = _batch(bundle)
    full = _scorer(bundle).features(images, tokens)
    same = _scorer(bundle, image_size=32).features(images, tokens)
    torch.testing.assert_close(same[0], full[0], atol=1e-5, rtol=1e-5)
    small = _scorer(bundle, image_size=16).features(images, tokens)
    assert small[0].shape == full[0].shape and torch.isfinite(small[0]).all()
    pos = torch.randn(1 + 16, 4)
    out = interpolate_pos(pos, 4, 2)
    assert out.shape == (1 + 4, 4) and torch.equal(out[0], pos[0])


def test_approximate_options_refused_under_zero3(bundle):
    with pytest.raises(ConfigError, match="score_patch_dropout"):
        Scorer(ModuleEngine(bundle.model, zero_stage=3), 4, "fp32", ScoreOptions(image_size=16))
    sc = Scorer(ModuleEngine(bundle.model, zero_stage=3), 4, "fp32", ScoreOptions())
    assert not sc.lean  # exact defaults fall back to the engine forward


def test_config_fields_validated():
    from pipeline.config import SelectionConfig

    with pytest.raises(ConfigError, match="selection.score_patch_dropout"):
        SelectionConfig(score_patch_dropout=1.0)
    with pytest.raises(ConfigError, match="selection.score_image_size"):
        SelectionConfig(score_image_size=-1)
