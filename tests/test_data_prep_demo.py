"""`dissect-prep demo` end to end on the real Fashion-MNIST files, through img2dataset."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.cli import main
from data_prep.demo import samples_per_shard, val_count
from data_prep.fmnist import CLASSNAMES, FMNIST_DIR, PHRASES, ZEROSHOT_TEMPLATES, load_split
from data_prep.tario import iter_samples
from dissect_common.manifest import read_manifest

needs_fmnist = pytest.mark.skipif(
    not (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="apt-get install dataset-fashion-mnist",
)


def samples_of(folder: Path) -> list[dict]:
    out = []
    for tar in sorted(folder.glob("*.tar")):
        for s in iter_samples(tar):
            s["meta"] = json.loads(s["json"])
            out.append(s)
    return out


@needs_fmnist
@pytest.mark.slow
@pytest.mark.timeout(60)
def test_demo_limit_end_to_end(tmp_path, capfd):
    out = tmp_path / "fmnist"
    assert main(["demo", "--out", str(out), "--limit", "400", "--noise", "0.4", "--seed", "1"]) == 0
    captured = capfd.readouterr()
    printed = captured.out
    assert "train" in printed and "160 noisy" in printed
    # img2dataset's chatter (~40 lines: per-shard speed, bandwidth hint, tqdm scraps) stays in
    # each split's img2dataset.log; the terminal gets our few lines (progress lines only
    # every 30 s, which a slow machine may add)
    both = captured.out + captured.err
    assert "worker  - success" not in both and "bandwidth" not in both, both
    assert len(both.splitlines()) <= 16, both
    assert "worker  - success" in (out / "train_clean" / "img2dataset.log").read_text()

    n_val = val_count(400)
    assert n_val == 200
    demo = json.loads((out / "demo.json").read_text())
    assert demo["splits"]["train"]["samples"] == 400 and demo["splits"]["val"]["samples"] == n_val
    assert demo["zeroshot"] == "val"

    train = samples_of(out / "train")
    assert len(train) == 400 and len({s["meta"]["uid"] for s in train}) == 400
    assert sum(s["meta"]["noisy"] for s in train) == 160
    m = read_manifest(out / "train")
    assert (
        m["noisy"] == 160 and m["total"] == 400 and m["num_shards"] == 400 // samples_per_shard(400)
    )
    for s in train[:50]:
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.size == (64, 64)
        label, caption = s["meta"]["label"], s["txt"].decode()
        assert 0 <= label < 10
        # clean captions name the item's class (some phrase of it); noisy ones name another class
        named = [c for c, _ in enumerate(CLASSNAMES) if _names_class(caption, c)]
        assert (label in named) != s["meta"]["noisy"], (caption, label)

    # the pixels really are Fashion-MNIST images of the stated class: compare with the source
    images, labels = load_split("train")
    first = train[0]
    url_index = int(first["meta"]["url"].rsplit("/", 1)[1].split(".")[0])
    assert url_index < 400
    got = Image.open(io.BytesIO(first["jpg"])).convert("L").resize((28, 28))
    errs = np.abs(images.astype(int) - np.asarray(got, dtype=int)).mean(axis=(1, 2))
    assert labels[int(errs.argmin())] == first["meta"]["label"]

    val = samples_of(out / "val")
    assert len(val) == n_val and not any("noisy" in s["meta"] for s in val)
    assert (out / "val" / "classnames.txt").read_text().splitlines() == list(CLASSNAMES)
    templates = (out / "val" / "templates.txt").read_text().splitlines()
    assert templates == list(ZEROSHOT_TEMPLATES) and all("{}" in t for t in templates)
    assert read_manifest(out / "train_clean")["success_rate"] == 1.0
    assert not (out / "_work").exists()

    # a re-run reuses everything; a new noise rate only redoes train/
    assert main(["demo", "--out", str(out), "--limit", "400", "--noise", "0.4", "--seed", "1"]) == 0
    assert "reused" in capfd.readouterr().out
    assert main(["demo", "--out", str(out), "--limit", "400", "--noise", "0.1", "--seed", "1"]) == 0
    printed = capfd.readouterr().out
    assert "reusing" in printed and "train_clean" in printed and "40 noisy" in printed


def _names_class(caption: str, c: int) -> bool:
    # the longest class phrase found in the caption decides (no phrase contains another's)
    hits = [(p, k) for k, ps in enumerate(PHRASES) for p in ps if p in caption]
    longest = max(hits, key=lambda h: len(h[0]))[1] if hits else None
    return longest == c


@needs_fmnist
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_demo_mosaic_layout(tmp_path, capfd):
    out = tmp_path / "mosaic"
    assert (
        main(["demo", "--out", str(out), "--limit", "300", "--noise", "0.4", "--kind", "mosaic"])
        == 0
    )
    capfd.readouterr()
    train = samples_of(out / "train")
    assert len(train) == 300 and sum(s["meta"]["noisy"] for s in train) == 120
    assert all(s["meta"]["label"] == -1 and len(s["meta"]["items"]) == 4 for s in train)
    clean = [s["txt"].decode() for s in samples_of(out / "train_clean")]
    assert len(set(clean)) > 0.95 * len(clean)  # near-unique captions, like web data
    val = samples_of(out / "val")
    assert len(val) == val_count(300) and not any("noisy" in s["meta"] for s in val)
    single = samples_of(out / "val_single")
    assert len(single) == val_count(300) and all(0 <= s["meta"]["label"] < 10 for s in single)
    assert (out / "val_single" / "classnames.txt").is_file()
    assert (out / "val_single" / "templates.txt").is_file()
    assert not (out / "val" / "classnames.txt").exists()


def test_demo_without_fashion_mnist_says_how_to_install(tmp_path, capfd):
    rc = main(["demo", "--out", str(tmp_path / "d"), "--fmnist-dir", str(tmp_path / "none")])
    assert rc == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "apt-get install dataset-fashion-mnist" in err
