"""The web-like demo kind (unique captions) and the noise kinds (swap, unrelated, partial) with
their ground truth, the mix syntax, and the per-kind diagnostics the trainer logs."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_prep import DataPrepError, web
from data_prep.cli import main
from data_prep.fmnist import PHRASES, single_captions
from data_prep.noise import _PHRASE_OF, attribute_matches, inject_noise, parse_mix
from data_prep.tario import iter_samples
from pipeline.data.loader import NOISE_KINDS, collate, decode_sample
from pipeline.selection import diagnostics as diag
from pipeline.selection.sources import Gathered


def web_set(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.arange(100) % 10
    images = (np.arange(100, dtype=np.uint8) + 100)[:, None, None] * np.ones((1, 28, 28), np.uint8)
    canvases, captions, combos = web.make_web(images, labels, n, rng)
    return canvases, captions, combos


def write(folder: Path, captions: list[str], labels: list[int] | None = None) -> dict:
    """One shard per 100 samples; returns uid -> caption."""
    folder.mkdir(parents=True)
    truth = {}
    for s in range(0, len(captions), 100):
        with wds.TarWriter(str(folder / f"{s // 100:05d}.tar")) as tw:
            for i in range(s, min(s + 100, len(captions))):
                meta = {"uid": 1000 + i, "caption": captions[i]}
                if labels is not None:
                    meta["label"] = labels[i]
                tw.write(
                    {
                        "__key__": f"k{i:05d}",
                        "jpg": b"x",
                        "txt": captions[i],
                        "json": json.dumps(meta),
                    }
                )
                truth[1000 + i] = captions[i]
    return truth


def read(folder: Path) -> dict:
    out = {}
    for tar in sorted(folder.glob("*.tar")):
        for s in iter_samples(tar):
            meta = json.loads(s["json"])
            out[meta["uid"]] = (s["txt"].decode(), meta)
    return out


def test_web_captions_are_unique_and_name_what_the_image_shows():
    canvases, captions, combos = web_set(1500)
    assert len(set(captions)) == 1500  # every caption text unique ...
    assert len({tuple(c) for c in combos.tolist()}) == 1500  # ... and every meaning
    assert len({re.sub(r"\W", "", c.split(" ")[0]) for c in captions}) > 3  # varied phrasing
    colours, grounds = list(web.COLOURS), list(web.BACKGROUNDS)
    for text, (noun, colour, bg, pos, size) in zip(captions[:300], combos[:300].tolist()):
        assert any(re.search(rf"(?<![\w-]){re.escape(p)}(?![\w-])", text) for p in web.NOUNS[noun])
        assert colours[colour] in text and grounds[bg] in text
        assert any(p in text for p in web.POSITIONS[pos][0])
        assert any(re.search(rf"\b{p}\b", text) for p in web.SIZES[size][0])
        assert not re.search(r"\ba [aeiou]|\ban [^aeiou]", text), text  # articles agree
    # the item is where the caption says; the far corner shows the named background
    for img, (_, _, bg, pos, size) in zip(canvases[:200], combos[:200].tolist()):
        side = round(web.SIZES[size][1] * web.CANVAS)
        fx, fy = web.POSITIONS[pos][1]
        x, y = round(fx * (web.CANVAS - side)), round(fy * (web.CANVAS - side))
        centre = img[y + side // 2, x + side // 2]
        assert tuple(centre) != web.BACKGROUNDS[grounds[bg]]  # the tinted item is there
        far = img[-1 if fy < 0.5 else 0, -1 if fx < 0.5 else 0]
        if pos != 4:  # a centred item leaves every corner free too, but a large one nearly not
            assert tuple(far) == web.BACKGROUNDS[grounds[bg]]
    with pytest.raises(DataPrepError, match="distinct captions"):
        web.draw_combos(web.COMBOS + 1, np.arange(10), np.random.default_rng(0))


def test_noise_mix_makes_each_kind_with_ground_truth(tmp_path):
    _, captions, _ = web_set(400)
    truth = write(tmp_path / "clean", captions)
    m = inject_noise(
        tmp_path / "clean", tmp_path / "n1", mix={"swap": 0.2, "unrelated": 0.1, "partial": 0.1}
    )
    inject_noise(
        tmp_path / "clean", tmp_path / "n2", mix={"swap": 0.2, "unrelated": 0.1, "partial": 0.1}
    )
    assert m["noise"]["counts"] == {"swap": 80, "unrelated": 40, "partial": 40}
    assert m["noisy"] == 160 and m["noise"]["realised_rate"] == pytest.approx(0.4)
    out = read(tmp_path / "n1")
    assert out == read(tmp_path / "n2")  # same seed, same noise
    kinds = {k: 0 for k in ("clean", *m["noise"]["counts"])}
    originals = set(truth.values())
    for uid, (text, meta) in out.items():
        kinds[meta["noise_kind"]] += 1
        assert meta["noisy"] is (meta["noise_kind"] != "clean")  # a JSON boolean
        assert meta["caption"] == text
        if not meta["noisy"]:
            assert text == truth[uid] and "orig_caption" not in meta
            continue
        assert meta["orig_caption"] == truth[uid] != text
        if meta["noise_kind"] == "swap":  # the caption of exactly one other image
            assert meta["noise_donor_uid"] != uid and text == truth[meta["noise_donor_uid"]]
            assert sum(t == text for t in truth.values()) == 1
        elif meta["noise_kind"] == "unrelated":  # about nothing in the set
            assert text not in originals and not attribute_matches(text, labelled=False)
        else:  # partial: one attribute phrase changed to another value of the same attribute
            old, new = attribute_matches(truth[uid], False), attribute_matches(text, False)
            assert len(old) == len(new)
            changed = [(a, b) for a, b in zip(old, new) if a.group(1) != b.group(1)]
            assert len(changed) == 1, (truth[uid], text)
            a, b = changed[0]
            ga, va = _PHRASE_OF[a.group(1)]
            gb, vb = _PHRASE_OF[b.group(1)]
            assert ga == gb and va != vb
            norm = lambda t: re.sub(r"\ban? $", "a ", t)  # noqa: E731 (the article may change)
            assert norm(truth[uid][: a.start()]) == norm(text[: b.start()])
            assert truth[uid][a.end() :] == text[b.end() :]
    assert kinds == {"clean": 240, "swap": 80, "unrelated": 40, "partial": 40}


def test_partial_noise_on_class_captions_changes_the_class(tmp_path):
    labels = np.arange(200) % 10
    captions = single_captions(labels, np.random.default_rng(0))
    write(tmp_path / "clean", captions, labels.tolist())
    inject_noise(tmp_path / "clean", tmp_path / "noisy", mix={"partial": 0.5}, seed=3)
    n = 0
    for text, meta in read(tmp_path / "noisy").values():
        if meta["noise_kind"] != "partial":
            continue
        n += 1
        label = meta["label"]
        named = [m.group(1) for m in attribute_matches(text, labelled=True)]
        assert len(named) == 1 and named[0] not in PHRASES[label]
    assert n == 100


def test_noise_specs_and_their_errors(tmp_path, capfd):
    assert parse_mix("0.4") == {"swap": 0.4}  # the old --noise meaning
    assert parse_mix("swap=0.2, unrelated=0.1,partial=0.05") == {
        "swap": 0.2,
        "unrelated": 0.1,
        "partial": 0.05,
    }
    for bad, msg in [
        ("swap=0.2,noise=0.1", "not KIND=RATE"),
        ("swap=lots", "not a number"),
        ("swap=0.7,partial=0.5", "add up to 1.2"),
        ("unrelated=-0.1", r"in \[0, 1\]"),
        ("swap=0.1,swap=0.2", "given twice"),
    ]:
        with pytest.raises(DataPrepError, match=msg):
            parse_mix(bad)
    write(tmp_path / "clean", [f"caption number {i}" for i in range(50)])
    args = ["noise", "--in", str(tmp_path / "clean"), "--out", str(tmp_path / "n")]
    for extra, msg in [
        (["--kind", "swap"], "needs --rate"),
        (["--kind", "swap=0.1", "--rate", "0.2"], "drop --rate"),
        (["--kind", "wrong", "--rate", "0.2"], "must be one of"),
        (["--kind", "partial", "--rate", "0.2"], "only 0 of 50 captions name"),
    ]:
        assert main(args + extra) == 2
        err = capfd.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith("dissect-prep: error: ") and re.search(msg, err), err
    assert main(args + ["--kind", "unrelated", "--rate", "0.2"]) == 0
    assert "10 of 50 captions noisy (10 unrelated" in capfd.readouterr().out


def test_noise_kind_reaches_the_batch_and_the_diagnostics():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    items = [
        decode_sample(
            {"png": buf.getvalue(), "txt": b"a cap", "json": json.dumps(meta).encode()},
            lambda im: torch.zeros(3, 4, 4),
        )
        for meta in (
            {"uid": 1, "noisy": False, "noise_kind": "clean"},
            {"uid": 2, "noisy": True, "noise_kind": "partial"},
            {"uid": 3, "noisy": True},  # shards noised before the kinds: unknown kind
            {"uid": 4, "noisy": True, "noise_kind": "unrelated"},
        )
    ]
    batch = collate(items, lambda caps: torch.zeros(len(caps), 5, dtype=torch.long))
    assert batch["noise_kind"].tolist() == [0, NOISE_KINDS.index("partial"), -1, 2]
    odd = {"png": buf.getvalue(), "txt": b"c", "json": b'{"uid": 5, "noise_kind": ["swap"]}'}
    assert decode_sample(odd, lambda im: torch.zeros(3, 4, 4))["noise_kind"] == -1

    # kept fraction per kind (only when more than one kind is present)
    g = Gathered(
        uid=batch["uid"],
        s=torch.zeros(4),
        h=torch.zeros(4),
        noisy=batch["noisy"],
        label=torch.full((4,), -1),
        rank=0,
        B=4,
        noise_kind=batch["noise_kind"],
    )
    kept = torch.tensor([True, False, True, True])
    stats = diag.step_stats(g, torch.arange(4.0), kept, True, False, False)
    assert stats["select/kept_frac/clean"] == 1.0 and stats["select/kept_frac/partial"] == 0.0
    assert stats["select/kept_frac/unrelated"] == 1.0 and "select/kept_frac/swap" not in stats

    # the trained pairs' mean agreement s per group, from the training forward's features
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.6, 0.8]])
    sums = diag.train_pair_sums(img, txt, batch)
    stats = diag.train_pair_stats(sums + sums)  # two ranks' sums: the means stay
    assert stats["select/train_s/clean"] == pytest.approx(100.0)
    assert stats["select/train_s/noisy"] == pytest.approx((0 + 80 + 60) / 3)
    assert stats["select/train_s/partial"] == pytest.approx(0.0)
    assert stats["select/train_s/unrelated"] == pytest.approx(60.0)
    assert "select/train_s/swap" not in stats


def test_memorisation_plot_from_run_dirs(tmp_path, capsys):
    from benchmarks import memorisation

    for name, method, seed, rise in [("none-s0", "none", 0, 1.0), ("none-s1", "none", 1, 1.2),
                                     ("dm", "dissect", 0, 0.2)]:  # fmt: skip
        run = tmp_path / name
        run.mkdir()
        sel = {"method": method, "history": "memory", "balance": "none"}
        (run / "config.yaml").write_text(json.dumps({"run": {"seed": seed}, "selection": sel}))
        rows = [{"step": s, "select/train_s/clean": 30 + s, "select/train_s/noisy": 5 + rise * s,
                 "select/train_s/partial": 20.0}
                for s in range(0, 50, 10)] + [{"step": 55, "eval/ret_i2t_r1": 0.1}]  # fmt: skip
        (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    png = tmp_path / "m.png"
    runs = [str(p) for p in tmp_path.glob("*")]
    assert memorisation.main(["--runs", *runs, "--out", str(png), "--kinds"]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert (
        "none: s at first / middle / last step: clean 30.0 -> 50.0 -> 70.0; noisy 5.0 -> 27.0 -> 49.0"
        in out
    )
    assert "dissect:memory: " in out and "noisy 5.0 -> 9.0 -> 13.0; partial 20.0" in out
    with pytest.raises(SystemExit, match="no run logs"):
        memorisation.main(["--runs", str(tmp_path / "none-s0" / "config.yaml"), "--out", str(png)])
