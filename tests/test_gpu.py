"""On CUDA (marked gpu, skipped without it): the DeepSpeed engine's bf16 training step, through
the same StepRunner the trainer and the throughput benchmark use, on one GPU.

What the CPU suite cannot show: the model really runs in bf16 on the device (loader batches
arrive on the CPU as fp32 and are moved and cast by the engine), ZeRO's bf16 optimizer updates
the weights, the loss comes down on a fixed batch, and selection scores and picks on the GPU.
"""

import math

import pytest
import torch

from benchmarks.throughput import make_batch


def _runner(stage: int, selection: dict, b: int, steps: int, compile_: str = "", caption_len=0):
    from pipeline.config import config_from_dict
    from pipeline.dist import init_distributed
    from pipeline.model import build_model
    from pipeline.trainer import StepRunner

    cfg = config_from_dict(
        {
            "run": {"seed": 0},
            "data": {"batch_size": b},
            "model": {"name": "tiny-vit"},
            "optim": {"lr": 1e-3, "warmup_steps": 0},
            "selection": selection,
            "deepspeed": {"zero_stage": stage, "precision": "bf16", "compile": compile_},
        }
    )
    dist = init_distributed()
    bundle = build_model("tiny-vit", seed=0)
    size = bundle.preprocess_val.transforms[0].size
    size = size[0] if isinstance(size, (tuple, list)) else size
    runner = StepRunner(cfg, dist, bundle.model, steps, store_size=4096, steps_per_epoch=steps)
    gen = torch.Generator().manual_seed(0)
    batch = make_batch(
        cfg.super_batch_size, size, bundle.context_length, 0, torch.device("cpu"), gen, caption_len
    )
    return runner, batch


@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("stage", "compile_"), [(0, ""), (2, ""), (0, "inductor")])
def test_bf16_step_on_cuda_updates_the_weights_and_lowers_the_loss(stage, compile_):
    # short captions: the rows are cut at 8 positions (model.trim_text), compiled or not
    runner, batch = _runner(stage, {"method": "none"}, 32, 8, compile_, caption_len=5)
    engine = runner.engine
    assert engine.device.type == "cuda"
    assert {p.dtype for p in engine.module.parameters()} == {torch.bfloat16}
    before = [p.detach().float().clone() for p in engine.module.parameters()]
    losses = []
    for step in range(8):
        m = runner.step(dict(batch), step, epoch=0)
        assert "train/skipped_nonfinite" not in m, step
        losses.append(m["loss"])
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0] - 0.05, losses  # the same batch 8 times: it must fit it
    moved = sum(
        not torch.equal(a, p.detach().float()) for a, p in zip(before, engine.module.parameters())
    )
    assert moved > len(before) // 2, (moved, len(before))


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_bf16_selection_step_on_cuda_keeps_its_ratio():
    sel = {
        "method": "dissect",
        "history": "memory",
        "ratio": 0.25,
        "warmup_steps": 2,
        "log_samples": False,
    }
    runner, batch = _runner(2, sel, b=16, steps=4)
    assert len(batch["uid"]) == 64  # super-batch b / r
    for step in range(4):
        batch["uid"] = torch.arange(64, dtype=torch.int64) + 64 * (
            step % 2
        )  # revisit after warm-up
        m = runner.step(dict(batch), step, epoch=0)
        assert "train/skipped_nonfinite" not in m, step
        assert math.isfinite(m["loss"]), m
        assert m["select/kept_frac"] == pytest.approx(0.25), m
        assert m["select/warmup"] == (1.0 if step < 2 else 0.0), m
