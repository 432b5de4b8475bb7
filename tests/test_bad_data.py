"""Bad data: undecodable samples are skipped and counted by reason, bad shards are named, and too
much of it stops the run (exit 3) with the shards in the message.

The loader stages are tested directly (fast); two short training runs check what a user sees:
`data/skipped/<reason>` in metrics.jsonl, and the stop line on stderr.
"""

from __future__ import annotations

import json
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from procutil import run_cmd
from shardutil import png_bytes, write_digit_shards

from pipeline.data.loader import EpochPlan, ShardStream, SkipSample, StreamSpec, decode_sample

IMG = png_bytes(np.arange(64, dtype=np.float64).reshape(8, 8) % 16)


def _preprocess(im):
    return torch.zeros(3, 4, 4)


def _tokenize(captions):
    return torch.zeros(len(captions), 4, dtype=torch.int64)


def _good(uid: int) -> dict:
    return {
        "png": IMG,
        "txt": b"a photo of the digit one.",
        "json": json.dumps({"uid": uid}).encode(),
    }


# each bad sample and the reason it must be counted under
BAD_SAMPLES: list[tuple[str, dict, str]] = [
    ("non-image-bytes", {"png": b"<html>404 not found</html>"}, "bad_image"),
    ("truncated-png", {"png": IMG[: len(IMG) // 2]}, "bad_image"),
    ("no-image", {"png": None}, "no_image"),
    ("no-caption", {"txt": None}, "empty_caption"),
    ("empty-caption", {"txt": b""}, "empty_caption"),
    ("blank-caption", {"txt": b"  \n\t "}, "empty_caption"),
    ("no-json", {"json": None}, "no_json"),
    ("json-malformed", {"json": b'{"uid": 3,'}, "bad_json"),
    ("json-not-utf8", {"json": b"\xff\xfe{}"}, "bad_json"),
    ("json-not-object", {"json": b"[1, 2]"}, "bad_uid"),
    ("json-no-uid", {"json": b'{"label": 3}'}, "bad_uid"),
    ("json-uid-string", {"json": b'{"uid": "7"}'}, "bad_uid"),
    ("json-uid-negative", {"json": b'{"uid": -1}'}, "bad_uid"),
    ("json-uid-float", {"json": b'{"uid": 1.5}'}, "bad_uid"),
    ("json-uid-bool", {"json": b'{"uid": true}'}, "bad_uid"),
    ("json-deeply-nested", {"json": b"[" * 100_000 + b"]" * 100_000}, "bad_json"),
    # ground truth read strictly: a string "false" is not clean, nor noisy by truthiness
    ("noisy-string-false", {"json": b'{"uid": 4, "noisy": "false"}'}, "bad_noisy"),
    ("noisy-string-yes", {"json": b'{"uid": 4, "noisy": "yes"}'}, "bad_noisy"),
    ("noisy-null", {"json": b'{"uid": 4, "noisy": null}'}, "bad_noisy"),
    ("noisy-two", {"json": b'{"uid": 4, "noisy": 2}'}, "bad_noisy"),
    ("noisy-float", {"json": b'{"uid": 4, "noisy": 1.0}'}, "bad_noisy"),
]


def _sample(uid: int, patch: dict) -> dict:
    s = {"__key__": f"{uid:06d}", **_good(uid), **patch}
    return {k: v for k, v in s.items() if v is not None}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case_id,patch,reason", BAD_SAMPLES, ids=[c[0] for c in BAD_SAMPLES])
def test_decode_counts_reason(case_id, patch, reason):
    with pytest.raises(SkipSample) as err:
        decode_sample(_sample(5, patch), _preprocess)
    assert err.value.reason == reason


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "meta",
    [
        b'{"uid": 4, "label": NaN}',
        b'{"uid": 4, "label": 1e999}',
        b'{"uid": 4, "label": "cat"}',
    ],
)
def test_odd_optional_fields_do_not_crash(meta):
    """Optional fields that are malformed fall back to their defaults; the sample is kept."""
    out = decode_sample(_sample(4, {"json": meta}), _preprocess)
    assert out["uid"] == 4 and isinstance(out["label"], int)


@pytest.mark.parametrize(
    "value,noisy", [("true", True), ("false", False), ("1", True), ("0", False), (None, False)]
)
def test_noisy_flag_values(value, noisy):
    meta = {"uid": 4} if value is None else json.loads(f'{{"uid": 4, "noisy": {value}}}')
    assert (
        decode_sample(_sample(4, {"json": json.dumps(meta).encode()}), _preprocess)["noisy"]
        is noisy
    )


def test_bad_noisy_value_is_named(capfd):
    from pipeline.data.loader import SkipCounter

    with pytest.raises(SkipSample) as err:
        decode_sample(_sample(4, {"json": b'{"uid": 4, "noisy": "false"}'}), _preprocess)
    assert 'noisy="false"' in str(err.value)
    counter = SkipCounter()
    for _ in range(3):
        counter.skip(err.value.reason, "s-0.tar", err.value.detail)
    assert counter.take() == {"bad_noisy": 3}
    warned = capfd.readouterr().err.splitlines()
    assert warned == [
        "dissect-train: warning: shard s-0.tar: sample skipped (bad_noisy): "
        'noisy="false" is not true/false/0/1'
    ]


def _write_shard(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as tw:
        for s in samples:
            tw.write(s)
    return str(path)


def _stream(urls: list[str], batch: int = 8, steps: int = 1 << 20, shuffle: bool = False, **kw):
    spec = StreamSpec(
        urls=urls,
        batch_size=batch,
        preprocess=_preprocess,
        tokenizer=_tokenize,
        shuffle=shuffle,
        shuffle_buffer=0,
        **kw,
    )
    return ShardStream(spec, EpochPlan(epoch=0, steps=steps))


def _drain(stream) -> tuple[list[int], dict, set]:
    uids, skipped, bad = [], {}, set()
    for b in stream:
        uids += b["uid"].tolist()
        for k, v in b["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
        bad |= {name.rsplit(" (", 1)[0] for name in b["bad_shards"]}  # "url (k skipped)"
    return uids, skipped, bad


@pytest.mark.timeout(60)
def test_stream_skips_and_counts_every_bad_sample(tmp_path):
    good = [_sample(i, {}) for i in range(40)]
    bad = [_sample(100 + i, patch) for i, (_, patch, _) in enumerate(BAD_SAMPLES)]
    n = len(bad)
    mixed = [s for pair in zip(good[:n], bad) for s in pair] + good[n:]
    urls = [
        _write_shard(tmp_path / "00000.tar", mixed),
        _write_shard(tmp_path / "00001.tar", good[:8]),
    ]
    uids, skipped, shards = _drain(_stream(urls))
    assert sorted(uids) == sorted(list(range(40)) + list(range(8)))  # every good sample, no bad one
    want: dict = {}
    for _, _, reason in BAD_SAMPLES:
        want[reason] = want.get(reason, 0) + 1
    assert skipped == want
    # the shard the bad samples came from is named; the clean one is not
    assert shards == {urls[0]}, shards


def _digit_shards(d: Path, n: int = 3, per: int = 24) -> list[str]:
    return write_digit_shards(d, n_shards=n, per_shard=per)


def _member_offsets(path: str) -> list[tuple[int, int]]:
    with tarfile.open(path) as tf:
        return [(m.offset, m.offset_data) for m in tf.getmembers()]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["in-member-data", "at-member-header", "in-member-header"])
def test_truncated_tar_is_named_and_the_rest_is_read(tmp_path, where):
    urls = _digit_shards(tmp_path, n=3, per=24)
    header, data = _member_offsets(urls[1])[37]  # a member of sample 12 of 24
    cut = {
        "in-member-data": data + 100,
        "at-member-header": header,
        "in-member-header": header + 200,
    }[where]
    Path(urls[1]).write_bytes(Path(urls[1]).read_bytes()[:cut])
    uids, skipped, shards = _drain(_stream(urls, batch=4))
    # tarfile ends quietly at a cut header: only the end-of-archive check sees those
    assert skipped.get("truncated_tar") == 1 and "unreadable_tar" not in skipped, skipped
    assert shards == {urls[1]}, shards  # the path itself, not an error message
    got = set(uids)
    assert set(range(0, 24)) <= got and set(range(48, 72)) <= got  # the other shards in full
    assert 0 < len(got & set(range(24, 48))) < 24  # what came before the cut is still used


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["not-a-tar", "vanished", "empty-file"])
def test_unopenable_shard_is_named(tmp_path, kind, capfd):
    urls = _digit_shards(tmp_path, n=3, per=16)
    bad = Path(urls[0])  # first: counts reach the caller with the next batch
    if kind == "not-a-tar":
        bad.write_bytes(b"\x89PNG this is not a tar archive at all" * 40)
    elif kind == "vanished":
        bad.unlink()  # listed at start, gone when read (e.g. a network mount dropped it)
    else:
        bad.write_bytes(b"")
    uids, skipped, shards = _drain(_stream(urls, batch=4))
    assert set(uids) == set(range(16, 48))
    assert sum(skipped.get(r, 0) for r in ("unreadable_tar", "truncated_tar")) == 1, skipped
    assert shards == {str(bad)}, shards
    assert str(bad) in capfd.readouterr().err  # reported by name as it happens


@pytest.mark.timeout(60)
@pytest.mark.parametrize("resampled", [False, True])
def test_no_readable_shard_fails_instead_of_hanging(tmp_path, resampled):
    """Training streams loop over their shards forever; with none readable that used to spin."""
    urls = []
    for i in range(3):
        p = tmp_path / f"{i:05d}.tar"
        p.write_bytes(b"garbage" * 100)
        urls.append(str(p))
    stream = _stream(urls, steps=5, shuffle=True, resampled=resampled)
    result: list = []
    t = threading.Thread(target=lambda: result.append(_try(stream)), daemon=True)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "the stream hangs when no shard can be read"
    (err,) = result
    assert isinstance(err, Exception) and "00000.tar" in str(err), err


def _try(stream):
    try:
        _drain(stream)
    except Exception as err:  # noqa: BLE001
        return err
    return None


# ---------------------------------------------------------------------------------------------
# whole runs


def _bad_image_shard(path: Path, uid0: int, n: int) -> None:
    _write_shard(path, [_sample(uid0 + i, {"png": b"\x00not an image" * 8}) for i in range(n)])


def _train(tmp_path: Path, train: Path, *extra: str):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.train",
        "--config",
        "configs/tiny-cpu.yaml",
        f"data.train={train}",
        f"run.dir={run}",
        "optim.max_steps=6",
        "log.every_steps=2",
        "eval.at_end=false",
        "log.tensorboard=false",
        "log.progress=false",
        *extra,
    ]
    return run_cmd(cmd, timeout=150), run


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_run_with_some_bad_data_continues_and_logs_skips(tmp_path):
    train = tmp_path / "train"
    write_digit_shards(train, n_shards=4, per_shard=64)
    _bad_image_shard(train / "00004.tar", 1000, 6)  # 6 of 262: 2%, under the 5% default
    Path(train / "manifest.json").unlink()  # count by reading the tars (the bad one included)
    # 262 samples, 8 steps of 32: the epoch needs all 256 good ones, so all 6 bad are met
    # (no shuffle buffer: with one, samples of the next pass can fill the epoch first)
    p, run = _train(tmp_path, train, "optim.max_steps=8", "data.shuffle_buffer=0")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r][-1]
    assert last["step"] == 8 and last["data/skipped/bad_image"] == 6, last
    assert (run / "model.pt").is_file()


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_run_with_too_much_bad_data_stops_naming_the_shard(tmp_path):
    train = tmp_path / "train"
    write_digit_shards(train, n_shards=3, per_shard=64)
    _bad_image_shard(train / "00003.tar", 1000, 64)  # a quarter of the data
    Path(train / "manifest.json").unlink()
    p, run = _train(tmp_path, train, "data.max_skip_frac=0.05")
    assert p.returncode == 3, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("dissect-train: stopped:")]
    assert len(lines) == 1, p.stderr[-3000:]
    assert "data.max_skip_frac" in lines[0] and "bad_image" in lines[0]
    assert str(train / "00003.tar") in lines[0], lines[0]
