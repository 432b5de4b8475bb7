"""Text cut at the batch's longest caption (model.trim_text) trains exactly like full rows:
same features, same loss, same gradients, same checkpoint keys, on a real open_clip model;
and a compiled engine (deepspeed.compile) trains like an eager one on those cut rows."""

from __future__ import annotations

import pytest
import torch
from open_clip import ClipLoss

from pipeline.model import accept_trimmed_text, build_model, trim_tokens


def _batch(tokenizer, n=6):
    gen = torch.Generator().manual_seed(3)
    words = ["a photo of a shoe", "bag", "a pullover with long sleeves and a collar", "t-shirt"]
    return torch.randn(n, 3, 32, 32, generator=gen), tokenizer([words[i % 4] for i in range(n)])


def _loss_and_grads(model, images, tokens):
    model.zero_grad()
    img, txt, scale = model(images, tokens)
    loss = ClipLoss()(img, txt, scale)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_trimmed_rows_train_like_full_rows():
    full = build_model("tiny-vit", seed=0)
    cut = build_model("tiny-vit", seed=0)
    keys = list(cut.model.state_dict())
    assert accept_trimmed_text(cut.model)
    assert list(cut.model.state_dict()) == keys  # checkpoints are unchanged
    images, tokens = _batch(full.tokenizer)
    short = trim_tokens(tokens)
    assert short.shape[1] < tokens.shape[1]  # the test cuts something
    loss_full, grads_full = _loss_and_grads(full.model, images, tokens)
    loss_cut, grads_cut = _loss_and_grads(cut.model, images, short)
    torch.testing.assert_close(loss_cut, loss_full, atol=1e-6, rtol=1e-6)
    assert grads_cut.keys() == grads_full.keys()
    for name, g in grads_full.items():
        torch.testing.assert_close(grads_cut[name], g, atol=1e-6, rtol=1e-5, msg=name)
    # the cut positions' embeddings get no gradient either way
    assert grads_full["positional_embedding"][short.shape[1] :].abs().max() == 0
    # full rows still work through the bound method (zero-shot prompts, untrimmed callers)
    with torch.no_grad():
        torch.testing.assert_close(cut.model.encode_text(tokens), full.model.encode_text(tokens))


def test_trim_rounds_up_and_never_grows():
    t = torch.zeros(3, 32, dtype=torch.long)
    t[0, :5], t[1, :11] = 7, 7
    assert trim_tokens(t).shape == (3, 16)  # longest 11, rounded up to a multiple of 8
    assert trim_tokens(t, multiple=1).shape == (3, 11)
    assert trim_tokens(torch.zeros(2, 32, dtype=torch.long)).shape == (2, 8)  # all padding
    t[2, :] = 7
    assert trim_tokens(t).shape == (3, 32)  # full row: no cut
    assert trim_tokens(t[:, :13]).shape == (3, 13)  # never longer than the rows were


def test_models_where_a_cut_changes_the_result_are_left_alone():
    bundle = build_model("tiny-vit", seed=0)
    bundle.model.text_pool_type = "last"  # pooling at the last position sees the padding
    before = bundle.model.encode_text
    assert not accept_trimmed_text(bundle.model)
    assert bundle.model.encode_text == before
    assert not accept_trimmed_text(torch.nn.Linear(2, 2))


def _compiled_losses(rank, world, backend):
    """Losses of 3 steps (two text lengths) with deepspeed.compile=backend, and without."""
    import torch._dynamo

    from pipeline.config import config_from_dict
    from pipeline.engine import Engine

    losses = {}
    for compile_ in ("", backend):
        cfg = config_from_dict(
            {
                "data": {"batch_size": 4},
                "optim": {"lr": 1e-2, "warmup_steps": 0},
                "deepspeed": {"compile": compile_},
            }
        )
        bundle = build_model("tiny-vit", seed=0)
        engine = Engine(cfg, bundle.model, total_steps=3)
        gen = torch.Generator().manual_seed(0)
        got = []
        for words in (3, 12, 3):  # rows cut to 8, 16, 8 positions
            tokens = torch.randint(1, 1000, (4, 32), generator=gen)
            tokens[:, words], tokens[:, words + 1 :] = 49407, 0
            loss = ClipLoss()(*engine.forward(torch.randn(4, 3, 32, 32, generator=gen), tokens))
            engine.backward_step(loss)
            got.append(loss.item())
        losses[compile_ or "eager"] = got
        losses[f"compiled:{compile_}"] = engine.ds.is_compiled
    losses["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return losses


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_compiled_engine_trains_like_eager():
    from distutil import run_ranks

    # aot_eager: dynamo's graph capture and AOT autograd without inductor's C++ build, which is
    # what this test would otherwise spend its time on; inductor runs in benchmarks and on GPU
    (losses,) = run_ranks(_compiled_losses, 1, args=("aot_eager",), timeout=220)
    assert not losses["compiled:"] and losses["compiled:aot_eager"]
    assert losses["graphs"] > 0  # dynamo really captured the forward
    assert len(set(losses["eager"])) == 3  # the steps differ, so the comparison means something
    for eager, compiled in zip(losses["eager"], losses["aot_eager"]):
        assert abs(eager - compiled) < 1e-4, losses


def test_unknown_compile_backend_is_named_before_anything_is_built():
    from pipeline.config import ConfigError
    from pipeline.engine import check_compile_backend

    check_compile_backend("")  # off
    with pytest.raises(ConfigError, match="deepspeed.compile: 'inductr'.*inductor"):
        check_compile_backend("inductr")
