"""Smoke runs of the benchmark commands on tiny shards: they finish and report what they claim."""

import csv
import json

import pytest
import yaml
from shardutil import write_digit_shards


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_selection_benchmark_quick(tmp_path):
    from benchmarks.selection import main

    write_digit_shards(tmp_path / "train", n_shards=2, per_shard=160, noise=0.4)
    write_digit_shards(tmp_path / "val", n_shards=1, per_shard=100, seed=1, with_val_meta=True)
    spec = {
        "metric": "eval/zeroshot_top1",
        "methods": ["none", "dissect:memory"],
        "base": {
            "data": {
                "train": str(tmp_path / "train"),
                "val": str(tmp_path / "val"),
                "batch_size": 16,
                "workers": 0,
            },
            "model": {"name": "tiny-vit"},
            "optim": {"lr": 2e-3, "epochs": 8},
            "selection": {"ratio": 0.5, "warmup_epochs": 2},
            "eval": {"every_steps": 10},
            "log": {"every_steps": 5, "progress": False},
        },
        "quick": {"optim": {"epochs": 3}},
    }
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    assert main(["--config", str(cfg), "--out", str(out), "--quick"]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["method"] for r in rows] == ["none", "dissect:memory"]
    none, dis = rows
    # same epochs: selection trains half as many samples at r = 0.5
    assert int(none["trained_samples"]) == 2 * int(dis["trained_samples"]) == 3 * 320
    assert float(dis["noise_auc"]) == float(dis["noise_auc"])  # measured (not NaN) after warm-up
    assert (out / "curves.png").stat().st_size > 10_000
    assert "speedup_vs_none" in (out / "results.md").read_text()
    # the none run logged its evaluations at the same per-epoch cadence (1/r more steps)
    cfg_none = yaml.safe_load((out / "runs" / "none" / "config.yaml").read_text())
    assert cfg_none["eval"]["every_steps"] == 20


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_overhead_benchmark(tmp_path):
    from benchmarks.overhead import main

    out = tmp_path / "overhead.md"
    assert (
        main(
            [
                "--worlds",
                "2",
                "--super-batch",
                "40,80",
                "--reps",
                "2",
                "--image-elems",
                "48",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = out.read_text()
    assert text.count("\n| 2 |") == 2 and "MB" in text


@pytest.mark.timeout(180)
def test_throughput_benchmark_cpu(tmp_path):
    from benchmarks.throughput import main

    out = tmp_path / "thr.json"
    assert (
        main(
            [
                "--batch",
                "8",
                "--ratio",
                "0.5",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--methods",
                "none@B,none@b,dissect:memory",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())["results"]
    assert [r["loaded_batch"] for r in res] == [16, 8, 16] and res[2]["train_batch"] == 8
    assert all(r["step_s"] > 0 for r in res)
    ratio = res[1]["step_s"] / res[0]["step_s"]
    assert (
        f"step(b) / step(B) = {ratio:.3f} against b / B = 0.500"
        in out.with_suffix(".md").read_text()
    )


def test_throughput_keeps_what_it_measured_when_cut_short(tmp_path, monkeypatch):
    # the GPU script runs each benchmark under a time limit: methods done before it hits are kept
    import benchmarks.throughput as thr

    def bench(method, args, dist):
        if method == "dissect:ema":
            raise KeyboardInterrupt  # stands in for the limit's signal
        return {
            "method": method,
            "train_batch": 8,
            "loaded_batch": 16,
            "world": 1,
            "step_s": 0.5,
            "scored_per_s": 32.0,
            "trained_per_s": 16.0,
        }

    monkeypatch.setattr(thr, "bench_method", bench)
    out = tmp_path / "thr.json"
    with pytest.raises(KeyboardInterrupt):
        thr.main(["--methods", "none@B,dissect:memory,dissect:ema", "--out", str(out)])
    res = json.loads(out.read_text())["results"]
    assert [r["method"] for r in res] == ["none@B", "dissect:memory"]
    assert "| dissect:memory |" in out.with_suffix(".md").read_text()


def test_digits_dataset_for_the_external_check(tmp_path):
    # a second dataset for the selection benchmarks: disjoint train/val images, injected noise
    # recorded per sample, zero-shot files beside val
    from benchmarks.digits import build
    from data_prep.tario import iter_samples

    build(tmp_path, noise=0.4)

    def rows(split):
        out = []
        for shard in sorted((tmp_path / split).glob("*.tar")):
            for s in iter_samples(shard):
                out.append((json.loads(s["json"]), s["png"], s["txt"].decode()))
        return out

    train, val, clean = rows("train"), rows("val"), rows("train_clean")
    assert (len(train), len(val)) == (1497, 300)
    assert not {png for _, png, _ in train} & {png for _, png, _ in val}
    noisy = [(m, t) for m, _, t in train if m["noisy"]]
    assert len(noisy) == round(0.4 * 1497)
    names = (tmp_path / "val" / "classnames.txt").read_text().split()
    # a noisy caption names another digit than the image shows; clean ones name the right one
    assert all(names[m["label"]] not in t for m, t in noisy)
    assert all(names[m["label"]] in t for m, _, t in clean)
