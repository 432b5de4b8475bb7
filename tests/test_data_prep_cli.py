"""dissect-prep's command line: encode formats and their quality ranges, --help defaults, the
list of rows dropped before download, and img2dataset's chatter kept off the terminal.

Downloads run offline against the 127.0.0.1 server of test_data_prep.py.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
from PIL import Image
from procutil import default_signals
from test_data_prep import REPO, _Handler, _Server, one_line_error, read_shards

from data_prep import chatter
from data_prep.cli import main
from dissect_common.manifest import read_manifest


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


# img2dataset 1.47.0's output during a small run (parent, workers and logger process together)
CHATTER = [
    "Starting the downloading of this file",
    "0it [00:00, ?it/s]Sharding file number 1 of 1 called /tmp/dissect-prep-x/parts/part-00000.parquet",
    "\x1b[ASharding file number 1 of 1 called /tmp/dissect-prep-x/parts/part-00000.parquet",
    "File sharded in 8 shards",
    "Downloading starting now, check your bandwidth speed (with bwm-ng)your cpu (with htop), "
    "and your disk usage (with iotop)!",
    "1it [00:02,  2.72s/it]2it [00:02,  1.27s/it]8it [00:07,  1.08it/s]",
    "worker  - success: 1.000 - failed to download: 0.000 - failed to resize: 0.000 - "
    "images per sec: 985 - count: 250",
    "total   - success: 1.000 - failed to download: 0.000 - failed to resize: 0.000 - "
    "images per sec: 642 - count: 500",
    "\x1b[A",
    "",
]


def test_chatter_is_dropped_and_errors_are_kept():
    assert [chatter.shown(line) for line in CHATTER] == [None] * len(CHATTER)
    error = [
        "Traceback (most recent call last):",
        '  File "/x/img2dataset/downloader.py", line 120, in __call__',
        "    self.download_shard(row)",
        "OSError: [Errno 28] No space left on device",
        "shard 3 failed with error [Errno 28] No space left on device",
        "Retrying 1 shards, try 1",
    ]
    assert [chatter.shown(line) for line in error] == error  # indentation kept
    assert chatter.shown("3it [00:03,  1.23it/s]Retrying 1 shards, try 1") == (
        "Retrying 1 shards, try 1"
    )


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_png_run_lists_dropped_rows_and_prints_no_chatter(tmp_path, server, capfd, monkeypatch):
    monkeypatch.setattr(chatter, "PROGRESS_EVERY_S", 0.0)  # a progress line at every poll
    rows = (
        [(f"{server.base}/img/{i}.png", f"square {i}") for i in range(6)]
        + [(f"{server.base}/img/6.png", "")]  # empty caption
        + [("ftp://example.org/7.png", "an ftp url")]  # unsupported scheme
        + [(None, "no url at all")]  # missing url
        + [(f"{server.base}/missing/9.png", "gone")]  # 404: img2dataset's per-shard parquet
    )
    urls = tmp_path / "pairs.parquet"
    pd.DataFrame({"url": [u for u, _ in rows], "caption": [c for _, c in rows]}).to_parquet(urls)
    out = tmp_path / "shards"
    rc = main(
        ["shard", "--urls", str(urls), "--out", str(out), "--encode-format", "png",
         "--samples-per-shard", "4", "--processes", "2", "--threads", "4", "--image-size", "16"]
    )  # fmt: skip
    captured = capfd.readouterr()
    assert rc == 0, captured.err

    # png members, losslessly encoded at png's default compression
    samples = read_shards(out)
    assert sorted(s["meta"]["uid"] for s in samples) == list(range(6))
    for s in samples:
        assert "png" in s and "jpg" not in s
        img = Image.open(io.BytesIO(s["png"]))
        assert img.format == "PNG" and img.size == (16, 16)
    m = read_manifest(out)
    assert m["params"]["encode_format"] == "png" and m["params"]["encode_quality"] == 9

    # every row dropped before download is listed with its reason
    dropped = pd.read_parquet(out / "dropped.parquet")
    assert list(dropped.columns) == ["file", "row", "uid", "url", "reason"]
    assert dropped[["row", "uid", "reason"]].values.tolist() == [
        [6, 6, "empty_caption"],
        [7, 7, "unsupported_url_scheme"],
        [8, 8, "missing_url"],
    ]
    assert dropped["url"].tolist()[:2] == [f"{server.base}/img/6.png", "ftp://example.org/7.png"]
    assert dropped["url"].isna().tolist()[2] and set(dropped["file"]) == {str(urls)}
    status = pd.concat(pd.read_parquet(p) for p in sorted(out.glob("0*.parquet")))
    assert status.loc[status["uid"] == 9, "status"].tolist() == ["failed_to_download"]

    # the summary names both row-level lists; img2dataset's chatter stays in its log
    printed = captured.out + captured.err
    assert f"{out}/NNNNN.parquet" in captured.out
    assert f"{out / 'dropped.parquet'} (3 rows dropped before download" in captured.out
    assert "6/10 = 60.0%" in captured.out
    for noise in ("worker  - success", "total   - success", "bandwidth", "Sharding file", "it/s"):
        assert noise not in printed, noise
    assert "shards finished" in captured.err  # the progress line on a non-terminal
    log = (out / "img2dataset.log").read_text()
    assert "worker  - success" in log and "bandwidth" in log


@pytest.mark.timeout(30)
def test_bad_encode_quality_is_one_line_before_any_work(tmp_path, capfd):
    urls = tmp_path / "urls.csv"
    pd.DataFrame({"url": ["http://127.0.0.1:9/1.png"], "caption": ["a"]}).to_csv(urls, index=False)
    out = tmp_path / "out"
    base = ["shard", "--urls", str(urls), "--out", str(out)]
    assert main([*base, "--encode-format", "png", "--encode-quality", "95"]) == 2
    line = one_line_error(capfd)
    assert "png" in line and "compression level" in line and "0..9" in line and "95" in line
    assert main([*base, "--encode-format", "webp", "--encode-quality", "0"]) == 2
    assert "1..100" in one_line_error(capfd)
    assert main([*base, "--encode-quality", "101"]) == 2  # jpg
    assert "jpg" in (line := one_line_error(capfd)) and "0..100" in line
    assert not out.exists()  # refused before any folder, list or worker


@pytest.mark.parametrize(
    "command, expected",
    [
        ("shard", ["(default: 256)", "(default: border)", "(default: jpg)", "png 9",
                   "(default: 10000)", "(default: 64)", "(default: 10.0)", "(default: 0)",
                   "(default: incremental)", "(default: url)", "(default: caption)"]),
        ("demo", ["(default: 64)", "(default: 0)", "(default: single)", "(default: 0)",
                  "default: all 60000", "default: /usr/share/datasets/fashion-mnist"]),
        ("noise", ["(default: 0)"]),
        ("inspect", ["(default: 6)"]),
    ],
)  # fmt: skip
def test_help_shows_defaults(command, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for default in expected:
        assert default in text, (default, text)
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_ctrl_c_is_one_line_and_status_130(tmp_path, server):
    """Ctrl-C reaches img2dataset's workers too; their dying tracebacks stay in the log."""
    n = 40
    urls = tmp_path / "urls.parquet"
    pd.DataFrame(
        {"url": [f"{server.base}/img/{i}.png" for i in range(n)], "caption": ["x"] * n}
    ).to_parquet(urls)
    out = tmp_path / "shards"
    server.delay_s = 0.2  # ~1 s per shard of 5
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_prep", "shard", "--urls", str(urls), "--out", str(out),
         "--samples-per-shard", "5", "--processes", "1", "--threads", "1", "--image-size", "16"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=default_signals,
    )  # fmt: skip
    try:
        deadline = time.time() + 60
        while not list(out.glob("*_stats.json")) and time.time() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        server.delay_s = 0.0
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, (stdout, stderr)
    assert stderr.strip().splitlines() == [
        "dissect-prep: interrupted (re-run the same command to resume)"
    ], stderr
