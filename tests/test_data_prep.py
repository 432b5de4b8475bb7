"""data_prep: url list -> img2dataset shards + manifest, incremental resume, noise, inspect.

Downloads run offline against an HTTP server on 127.0.0.1 started here. Routes:
  /img/<i>.png   a 16x16 PNG whose colour encodes i
  /missing/<i>   404
  /slow/<i>      sleeps past the client timeout, then sends a PNG
  /text/<i>      200 with an HTML body (not an image)
"""

from __future__ import annotations

import filecmp
import http.server
import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from data_prep import DataPrepError
from data_prep.cli import main
from data_prep.fmnist import PHRASES, make_mosaics, mosaic_captions
from data_prep.noise import inject_noise
from data_prep.tario import iter_samples
from data_prep.urllist import prepare_url_list
from dissect_common.manifest import brace_spec, error_category, read_manifest

REPO = Path(__file__).resolve().parents[1]
SLOW_S = 3.0  # /slow sleeps this long; runs use --timeout 1


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (i % 256, (7 * i) % 256, 99)).save(buf, format="PNG")
    return buf.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server API)
        server = self.server
        with server.lock:
            server.requests.append(self.path)
        if server.delay_s:
            time.sleep(server.delay_s)
        route, _, rest = self.path.strip("/").partition("/")
        i = int(rest.split(".")[0])
        if route == "missing":
            self.send_error(404)
            return
        if route == "slow":
            time.sleep(SLOW_S)
        if route == "text":
            body, ctype = b"<html><body>not an image</body></html>", "text/html"
        else:
            body, ctype = _png(i), "image/png"
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass

    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


@pytest.fixture(scope="module")
def server():
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.requests, srv.lock, srv.delay_s = [], threading.Lock(), 0.0
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def read_shards(folder: Path) -> list[dict]:
    """Every sample of every shard in `folder`, with its json parsed and txt decoded."""
    out = []
    for tar in sorted(folder.glob("*.tar")):
        for s in iter_samples(tar):
            s["meta"] = json.loads(s["json"])
            s["caption"] = s["txt"].decode()
            s["shard"] = tar.name
            out.append(s)
    return out


def one_line_error(capfd) -> str:
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("dissect-prep: error: "), err
    return lines[0]


# --- shard: failures are counted, successes are exactly what the shards hold -----------------


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_shard_holds_exactly_the_successes_and_counts_each_failure(tmp_path, server, capfd):
    rows = (
        [("img", f"a red square number {i}") for i in range(10)]
        + [("missing", "gone")] * 3
        + [("slow", "too slow")]
        + [("text", "an html page")] * 2
        + [("img", "")]  # empty caption: dropped before download, counted as empty_caption
        + [("img", "   ")]  # blank caption: same
    )
    n = len(rows)
    df = pd.DataFrame(
        {
            "image_url": [f"{server.base}/{route}/{i}.png" for i, (route, _) in enumerate(rows)],
            "text": [cap for _, cap in rows],
            "uid": [1000 + 3 * i for i in range(n)],  # an existing uid column is kept as is
            "label": [i % 4 for i in range(n)],
            "source": [f"site{i}" for i in range(n)],
        }
    )
    urls = tmp_path / "pairs.csv"
    df.to_csv(urls, index=False)
    out = tmp_path / "shards"
    rc = main(
        ["shard", "--urls", str(urls), "--out", str(out), "--url-col", "image_url",
         "--caption-col", "text", "--extra-cols", "source", "--samples-per-shard", "4",
         "--processes", "2", "--threads", "4", "--timeout", "1", "--image-size", "24"]
    )  # fmt: skip
    printed = capfd.readouterr().out
    assert rc == 0

    good = [i for i, (route, cap) in enumerate(rows) if route == "img" and cap.strip()]
    samples = read_shards(out)
    uids = [s["meta"]["uid"] for s in samples]
    assert sorted(uids) == [1000 + 3 * i for i in good]  # exactly the successes, no duplicates
    for s in samples:
        i = (s["meta"]["uid"] - 1000) // 3
        assert s["caption"] == rows[i][1]
        assert s["meta"]["label"] == i % 4 and isinstance(s["meta"]["label"], int)
        assert s["meta"]["source"] == f"site{i}"
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.size == (24, 24)
        # the image is the one served for this row (colour encodes the row index)
        r, g, _ = img.convert("RGB").getpixel((12, 12))
        assert abs(r - i % 256) <= 8 and abs(g - (7 * i) % 256) <= 8

    m = read_manifest(out)
    assert m["kind"] == "download" and m["complete"]
    assert m["total"] == len(good) == 10
    assert m["failures"] == {
        "http_404": 3,
        "not_an_image": 2,
        "empty_caption": 2,
        "timeout": 1,
    }
    assert m["success_rate"] == pytest.approx(10 / n)
    assert m["input"]["rows"] == n and m["input"]["kept"] == n - 2
    assert m["max_uid"] == 1000 + 3 * good[-1]
    assert m["label_counts"] == {str(k): sum(1 for i in good if i % 4 == k) for k in range(4)}
    # the 16 rows with a caption reach img2dataset at 4 per shard: 4 shards
    assert n == 18
    assert [s["name"] for s in m["shards"]] == [f"{i:05d}.tar" for i in range(4)]
    assert sum(s["samples"] for s in m["shards"]) == 10
    assert {s["shard"] for s in samples} <= {s["name"] for s in m["shards"]}
    assert brace_spec(out) == f"{out}/{{00000..00003}}.tar"
    # the summary says what failed
    assert "http_404: 3" in printed and "timeout: 1" in printed and "not_an_image: 2" in printed
    assert "empty_caption: 2" in printed and f"10/{n}" in printed
    # ... and where the rows are: img2dataset's per-shard parquet, our list of dropped rows
    assert f"{out}/NNNNN.parquet" in printed
    assert f"{out / 'dropped.parquet'} (2 rows dropped before download" in printed
    dropped = pd.read_parquet(out / "dropped.parquet")
    assert dropped["uid"].tolist() == [1000 + 3 * 16, 1000 + 3 * 17]
    assert set(dropped["reason"]) == {"empty_caption"}


def test_error_categories():
    assert error_category("HTTP Error 404: Not Found") == "http_404"
    assert error_category("HTTP Error 503: Service Unavailable") == "http_503"
    assert error_category("<urlopen error timed out>") == "timeout"
    assert error_category("The read operation timed out") == "timeout"
    assert error_category("Image decoding error") == "not_an_image"
    assert error_category("<urlopen error [Errno 111] Connection refused>") == "connection_error"
    assert error_category("<urlopen error [Errno -2] Name or service not known>") == "dns_error"
    assert error_category("something new") == "other"


# --- incremental mode: a killed run resumes without redoing or duplicating shards ------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_interrupted_run_resumes_without_duplicates(tmp_path, server, capfd):
    n, per_shard = 20, 5
    urls = tmp_path / "urls.parquet"
    pd.DataFrame(
        {"url": [f"{server.base}/img/{i}.png" for i in range(n)],
         "caption": [f"square {i}" for i in range(n)]}
    ).to_parquet(urls)  # fmt: skip
    out = tmp_path / "shards"
    args = ["shard", "--urls", str(urls), "--out", str(out), "--samples-per-shard", str(per_shard),
            "--processes", "1", "--image-size", "16"]  # fmt: skip

    # run 1 in a child process, slowed to ~1 s per shard, killed once a shard has finished
    server.delay_s = 0.2
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_prep", *args, "--threads", "1"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 60
        while not list(out.glob("*_stats.json")) and time.time() < deadline:
            assert proc.poll() is None, "first run ended before it could be interrupted"
            time.sleep(0.05)
        finished_before = sorted(p.name for p in out.glob("*_stats.json"))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert 1 <= len(finished_before) < n // per_shard, finished_before
    kept_bytes = {f: (out / f.replace("_stats.json", ".tar")).read_bytes() for f in finished_before}
    assert not (out / "manifest.json").exists()

    # run 2: same command; finished shards are kept and not downloaded again
    server.delay_s = 0.0
    with server.lock:
        server.requests.clear()
    assert main([*args, "--threads", "8"]) == 0
    assert "resuming" in capfd.readouterr().out
    done_uids = {
        int(s.name.split("_")[0]) * per_shard + j
        for s in map(Path, finished_before)
        for j in range(per_shard)
    }
    requested = {int(p.rsplit("/", 1)[1].split(".")[0]) for p in server.requests}
    assert requested == set(range(n)) - done_uids
    for f, data in kept_bytes.items():
        assert (out / f.replace("_stats.json", ".tar")).read_bytes() == data

    samples = read_shards(out)
    uids = [s["meta"]["uid"] for s in samples]
    assert sorted(uids) == list(range(n))  # row index uids, nothing duplicated or lost
    assert all(s["caption"] == f"square {s['meta']['uid']}" for s in samples)
    m = read_manifest(out)
    assert m["complete"] and m["total"] == n and m["num_shards"] == n // per_shard

    # resuming into the same folder with a different list is refused, and nothing is touched
    other = tmp_path / "other.parquet"
    pd.DataFrame(
        {"url": [f"{server.base}/img/{i}.png" for i in range(7)], "caption": ["x"] * 7}
    ).to_parquet(other)
    assert main(["shard", "--urls", str(other), "--out", str(out), "--samples-per-shard", "5"]) == 2
    assert "different url list" in one_line_error(capfd)
    assert read_manifest(out)["total"] == n


# --- bad input: one clear line, non-zero exit, no download ---------------------------------


@pytest.mark.timeout(30)
def test_bad_url_lists_fail_with_one_line(tmp_path, capfd):
    out = str(tmp_path / "out")
    assert main(["shard", "--urls", str(tmp_path / "nope.parquet"), "--out", out]) == 2
    assert "url list not found" in one_line_error(capfd)

    p = tmp_path / "nocap.csv"
    pd.DataFrame({"url": ["http://x/1.jpg"], "title": ["t"]}).to_csv(p, index=False)
    assert main(["shard", "--urls", str(p), "--out", out]) == 2
    assert "no column(s) ['caption']" in one_line_error(capfd)

    p = tmp_path / "empty.tsv"
    p.write_text("url\tcaption\n")
    assert main(["shard", "--urls", str(p), "--out", out]) == 2
    assert "is empty" in one_line_error(capfd)

    p = tmp_path / "dup.parquet"
    pd.DataFrame(
        {"url": ["http://x/1", "http://x/2"], "caption": ["a", "b"], "uid": [3, 3]}
    ).to_parquet(p)
    assert main(["shard", "--urls", str(p), "--out", out]) == 2
    assert "duplicates" in one_line_error(capfd)

    p = tmp_path / "neg.parquet"
    pd.DataFrame({"url": ["http://x/1"], "caption": ["a"], "uid": [-1]}).to_parquet(p)
    assert main(["shard", "--urls", str(p), "--out", out]) == 2
    assert "non-negative" in one_line_error(capfd)

    p = tmp_path / "urls.txt"
    p.write_text("http://x/1\n")
    assert main(["shard", "--urls", str(p), "--out", out]) == 2
    assert "cannot tell the format" in one_line_error(capfd)
    assert not (tmp_path / "out").exists()


def test_prepare_url_list_tsv_folder_uids_and_skips(tmp_path):
    src = tmp_path / "lists"
    src.mkdir()
    (src / "a.tsv").write_text(
        "url\tcaption\tlabel\nhttp://h/0\tNA\t1\nhttp://h/1\t\t2\n\tno url\t3\n"
    )
    (src / "b.tsv").write_text("url\tcaption\tlabel\nhttp://h/3\tnull\t\nhttp://h/4\tfour\t0\n")
    prepared = prepare_url_list(src, tmp_path / "parts")
    assert prepared.input_format == "tsv" and prepared.rows == 5 and prepared.kept == 3
    assert prepared.skipped == {"empty_caption": 1, "missing_url": 1}
    parts = [pd.read_parquet(p) for p in sorted((tmp_path / "parts").glob("*.parquet"))]
    both = pd.concat(parts)
    # uids count rows over the files in order, before skipping; "NA"/"null" captions are text
    assert both["uid"].tolist() == [0, 3, 4]
    assert both["caption"].tolist() == ["NA", "null", "four"]
    assert both["label"].tolist() == [1, -1, 0]  # a missing label is -1 (unlabelled)
    assert prepared.rows_per_part == [1, 2] and prepared.max_uid == 4
    # each dropped row is listed: its file, row in that file, uid, url and reason
    dropped = prepared.dropped
    assert dropped["file"].tolist() == [str(src / "a.tsv")] * 2
    assert dropped[["row", "uid", "url", "reason"]].values.tolist() == [
        [1, 1, "http://h/1", "empty_caption"],
        [2, 2, "", "missing_url"],
    ]


# --- noise ---------------------------------------------------------------------------------


def write_shards(folder: Path, n: int = 300, per_shard: int = 70, labels: int | None = 5) -> dict:
    """Synthetic shards (no download needed); returns uid -> (caption, label, image bytes)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(123)
    uids = rng.permutation(np.arange(10, 10 + 2 * n, 2))  # sparse, shuffled across shards
    truth = {}
    for s in range(math.ceil(n / per_shard)):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as tw:
            for uid in uids[s * per_shard : (s + 1) * per_shard].tolist():
                label = uid % labels if labels else None
                caption = f"caption of {uid}" + (f" class {label}" if labels else "")
                meta = {"uid": uid, "caption": caption} | ({"label": label} if labels else {})
                image = _png(uid)
                tw.write(
                    {
                        "__key__": f"k{uid:06d}",
                        "jpg": image,
                        "txt": caption,
                        "json": json.dumps(meta),
                    }
                )
                truth[uid] = (caption, label, image)
    (folder / "classnames.txt").write_text("a\nb\n")
    return truth


@pytest.mark.timeout(60)
def test_noise_rate_ground_truth_donors_and_determinism(tmp_path):
    truth = write_shards(tmp_path / "clean")
    m = inject_noise(tmp_path / "clean", tmp_path / "n1", rate=0.3, seed=7)
    inject_noise(tmp_path / "clean", tmp_path / "n2", rate=0.3, seed=7)
    inject_noise(tmp_path / "clean", tmp_path / "n3", rate=0.3, seed=8)

    k = round(0.3 * len(truth))
    assert m["kind"] == "noise" and m["noisy"] == k == 90 and m["total"] == 300
    assert m["noise"]["realised_rate"] == pytest.approx(0.3)
    assert abs(m["noise"]["realised_rate"] - 0.3) <= m["noise"]["tolerance"]
    assert m["label_counts"] == {str(c): 60 for c in range(5)}
    assert (tmp_path / "n1" / "classnames.txt").read_text() == "a\nb\n"

    samples = read_shards(tmp_path / "n1")
    assert sorted(s["meta"]["uid"] for s in samples) == sorted(truth)
    noisy = 0
    for s in samples:
        meta, (caption, label, image) = s["meta"], truth[s["meta"]["uid"]]
        assert meta["label"] == label and s["jpg"] == image  # labels and images untouched
        assert isinstance(meta["noisy"], bool)
        if meta["noisy"]:
            noisy += 1
            assert meta["orig_caption"] == caption and s["caption"] != caption
            donor_caption, donor_label, _ = truth[meta["noise_donor_uid"]]
            assert (
                s["caption"] == donor_caption == meta["caption"]
            )  # a real caption of another sample
            assert donor_label != label  # ... of another class: a true correspondence error
        else:
            assert s["caption"] == caption and "orig_caption" not in meta
    assert noisy == k

    # same seed: byte-identical shards; another seed: another noisy set
    for name in sorted(p.name for p in (tmp_path / "n1").glob("*.tar")):
        assert filecmp.cmp(tmp_path / "n1" / name, tmp_path / "n2" / name, shallow=False)
    noisy1 = {s["meta"]["uid"] for s in samples if s["meta"]["noisy"]}
    noisy3 = {s["meta"]["uid"] for s in read_shards(tmp_path / "n3") if s["meta"]["noisy"]}
    assert len(noisy3) == k and noisy1 != noisy3


def test_noise_without_labels_and_edge_cases(tmp_path):
    truth = write_shards(tmp_path / "clean", n=40, per_shard=40, labels=None)
    m = inject_noise(tmp_path / "clean", tmp_path / "noisy", rate=0.5, seed=0)
    assert m["noisy"] == 20 and m["label_counts"] is None
    for s in read_shards(tmp_path / "noisy"):
        if s["meta"]["noisy"]:
            assert s["meta"]["noise_donor_uid"] != s["meta"]["uid"]
            assert (
                s["caption"] == truth[s["meta"]["noise_donor_uid"]][0] != s["meta"]["orig_caption"]
            )

    m0 = inject_noise(tmp_path / "clean", tmp_path / "zero", rate=0.0, seed=0)
    assert m0["noisy"] == 0
    assert all(s["meta"]["noisy"] is False for s in read_shards(tmp_path / "zero"))

    with pytest.raises(DataPrepError, match="different folder"):
        inject_noise(tmp_path / "clean", tmp_path / "clean", rate=0.1)
    with pytest.raises(DataPrepError, match=r"\[0, 1\]"):
        inject_noise(tmp_path / "clean", tmp_path / "x", rate=1.5)

    same = tmp_path / "one_class"
    write_shards(same, n=10, per_shard=10, labels=1)  # every sample label 0
    with pytest.raises(DataPrepError, match="no donor"):
        inject_noise(same, tmp_path / "y", rate=0.5)


@pytest.mark.timeout(60)
def test_noise_and_inspect_cli(tmp_path, capfd):
    write_shards(tmp_path / "clean", n=100, per_shard=30)
    assert main(["noise", "--in", str(tmp_path / "clean"), "--out", str(tmp_path / "noisy"),
                 "--rate", "0.25", "--seed", "3"]) == 0  # fmt: skip
    out = capfd.readouterr().out
    assert "25 of 100 captions noisy (25 swap;" in out

    assert main(["inspect", str(tmp_path / "noisy")]) == 0
    out = capfd.readouterr().out
    assert "100 samples in 4 shards" in out
    assert "noisy       25 (25.0%)" in out
    assert "5 classes: 0:20 1:20 2:20 3:20 4:20" in out
    assert "[noisy]" in out and "was: 'caption of" in out

    # a root folder without shards but with shard subfolders reports each of them
    assert main(["inspect", str(tmp_path)]) == 0
    out = capfd.readouterr().out
    assert (
        f"{tmp_path / 'clean'}: 100 samples" in out and f"{tmp_path / 'noisy'}: 100 samples" in out
    )


def test_inspect_fails_clearly_without_shards(tmp_path, capfd):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    assert main(["inspect", str(tmp_path)]) == 2
    assert "holds no .tar shards" in one_line_error(capfd)
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "not a folder" in one_line_error(capfd)
    (tmp_path / "bad.tar").write_bytes(b"this is not a tar file" * 40)
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not a readable tar shard" in one_line_error(capfd)


# --- mosaics -------------------------------------------------------------------------------


def test_mosaics_are_four_distinct_items_named_in_reading_order():
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 10
    images = (np.arange(40, dtype=np.uint8) * 5)[:, None, None] * np.ones((1, 28, 28), np.uint8)
    mosaics, items = make_mosaics(images, labels, 500, rng)
    assert mosaics.shape == (500, 56, 56) and items.shape == (500, 4)
    quads = np.stack(
        [mosaics[:, :28, :28], mosaics[:, :28, 28:], mosaics[:, 28:, :28], mosaics[:, 28:, 28:]], 1
    )
    item_idx = quads[:, :, 0, 0] // 5  # each source image is a constant: its index * 5
    assert (quads == quads[:, :, :1, :1]).all()
    assert (labels[item_idx] == items).all()
    assert all(len(set(row)) == 4 for row in item_idx.tolist())

    captions = mosaic_captions(items, rng)
    for caption, row in zip(captions, items.tolist()):
        pos = 0
        for c in row:  # each item's phrase appears after the previous one
            found = [caption.find(p, pos) for p in PHRASES[c] if caption.find(p, pos) >= 0]
            assert found, (caption, row)
            pos = min(found) + 1
    assert len(set(captions)) > 0.95 * len(captions)  # near-unique, like web captions


def test_only_http_urls_are_fetched(tmp_path):
    """file:// (or any non-http) urls would copy local files into shards: dropped and counted."""
    p = tmp_path / "list.parquet"
    pd.DataFrame(
        {
            "url": ["file:///etc/passwd", "ftp://h/x.jpg", "HTTPS://h/ok.jpg", "../../x.jpg"],
            "caption": ["a", "b", "c", "d"],
        }
    ).to_parquet(p)
    prepared = prepare_url_list(p, tmp_path / "parts")
    assert prepared.kept == 1
    assert prepared.skipped == {"unsupported_url_scheme": 3}
    kept = pd.concat(pd.read_parquet(q) for q in (tmp_path / "parts").glob("*.parquet"))
    assert kept["url"].tolist() == ["HTTPS://h/ok.jpg"]
    assert prepared.dropped[["row", "url", "reason"]].values.tolist() == [
        [0, "file:///etc/passwd", "unsupported_url_scheme"],
        [1, "ftp://h/x.jpg", "unsupported_url_scheme"],
        [3, "../../x.jpg", "unsupported_url_scheme"],
    ]
