"""The per-sample decode path: JPEG draft decoding only where the source is at least twice the
model's input, and the cheap per-sample augmentation seeding equal to fork_rng + manual_seed."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.loader import DRAFT_MARGIN, decode_sample, draft_size, open_image, seeded_cpu_rng
from pipeline.model import build_model


def _photo(side: int, fmt: str) -> bytes:
    from sklearn.datasets import load_sample_images

    img = Image.fromarray(load_sample_images().images[0]).crop((0, 0, 420, 420))
    buf = io.BytesIO()
    img.resize((side, side), Image.BICUBIC).save(buf, format=fmt, quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny-vit", seed=0)


def test_draft_size_from_the_transform(tiny):
    assert draft_size(tiny.preprocess_train) == int(np.ceil(32 * DRAFT_MARGIN))
    assert draft_size(tiny.preprocess_val) == int(np.ceil(32 * DRAFT_MARGIN))
    assert draft_size(lambda im: im) == 0  # unknown transform: no draft


def test_jpeg_draft_decodes_smaller_but_never_below_the_request():
    data = _photo(256, "JPEG")
    assert open_image(data).size == (256, 256)
    assert open_image(data, draft=40).size == (64, 64)  # 1/4 scale: 1/8 would be 32 < 40
    assert open_image(data, draft=200).size == (256, 256)  # less than 2x: full decode
    png = _photo(256, "PNG")
    assert open_image(png, draft=40).size == (256, 256)  # only JPEG has draft mode


def test_draft_changes_the_model_input_little(tiny):
    data = _photo(256, "JPEG")
    sample = {"jpg": data, "txt": b"a temple", "json": b'{"uid": 3}'}
    full = decode_sample(sample, tiny.preprocess_val)["image"]
    drafted = decode_sample(sample, tiny.preprocess_val, draft_size(tiny.preprocess_val))["image"]
    assert full.shape == drafted.shape
    # normalised pixels (std ~1): the DCT-domain downscale is a different, not a worse, filter
    assert (full - drafted).abs().mean() < 0.05


def test_seeded_cpu_rng_equals_fork_rng_manual_seed(tiny):
    sample = {"jpg": _photo(256, "JPEG"), "txt": b"a temple", "json": b'{"uid": 3}'}
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(99)
        a = decode_sample(sample, tiny.preprocess_train)["image"]
    with seeded_cpu_rng(99):
        b = decode_sample(sample, tiny.preprocess_train)["image"]
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), before)  # training's draws are untouched
