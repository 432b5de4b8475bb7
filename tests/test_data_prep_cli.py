"""dissect-prep's command line: encode formats and their quality ranges, --help defaults."""

from __future__ import annotations

import pandas as pd
import pytest
from test_data_prep import one_line_error

from data_prep.cli import main


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
        ("demo", ["(default: 64)", "(default: 0.0)", "(default: single)", "(default: 0)",
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
