"""manifest.json: data_prep writes it, the trainer reads it (pipeline.data.shards, through
data_prep's own reader). The two must agree on every field both use: the shard names, the
samples in each shard, the largest uid."""

import json
from pathlib import Path

import pytest
from shardutil import write_digit_shards

from data_prep import DataPrepError
from data_prep.noise import inject_noise
from dissect_common.manifest import brace_spec, read_manifest
from pipeline.config import ConfigError
from pipeline.data import count_samples, expand_shards, max_uid


def test_the_trainer_reads_what_data_prep_writes(tmp_path):
    write_digit_shards(tmp_path / "clean", n_shards=3, per_shard=20, uid_offset=100)
    written = inject_noise(tmp_path / "clean", tmp_path / "noisy", rate=0.25, seed=0)
    assert read_manifest(tmp_path / "noisy") == written
    urls = expand_shards(
        brace_spec(tmp_path / "noisy")
    )  # data_prep's spec, expanded by the trainer
    assert [Path(u).name for u in urls] == [s["name"] for s in written["shards"]]
    assert count_samples(urls) == written["total"] == 60
    assert count_samples(urls[:2]) == 40
    assert max_uid(urls) == written["max_uid"] == 159

    # the counts come from the manifest when it names every shard ...
    m = json.loads((tmp_path / "noisy" / "manifest.json").read_text())
    m["shards"][0]["samples"] = 7
    (tmp_path / "noisy" / "manifest.json").write_text(json.dumps(m))
    assert count_samples(urls) == 47
    # ... and without one the tars are counted (the score store is then sized from the count)
    (tmp_path / "noisy" / "manifest.json").unlink()
    assert count_samples(urls) == 60 and max_uid(urls) is None


def test_a_corrupt_manifest_fails_in_both_with_the_file_named(tmp_path):
    urls = write_digit_shards(tmp_path / "train", n_shards=1, per_shard=4)
    (tmp_path / "train" / "manifest.json").write_text('{"shards": [')
    with pytest.raises(DataPrepError, match="manifest.json is not valid JSON"):
        read_manifest(tmp_path / "train")
    with pytest.raises(ConfigError, match="manifest.json is not valid JSON"):
        count_samples(urls)
