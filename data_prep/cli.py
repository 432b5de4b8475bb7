"""`dissect-prep {shard,demo,noise,inspect}`.

Bad input ends with one `dissect-prep: error: ...` line on stderr and exit status 2 (no
traceback); a download run whose shards did not all finish exits 1 after its summary.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep import DataPrepError
from data_prep.shard import ENCODE_QUALITY, MODES, RESIZE_MODES, ShardConfig

EXIT_BAD_INPUT = 2
EXIT_INCOMPLETE = 1


def _comma_list(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends `(default: X)` to each option's help, except where it would say nothing:
    required options, flags, empty or None defaults (their help says what happens instead),
    and help that already names its default."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        # identity, not ==: a default of 0 is worth showing and 0 == False
        nothing = any(action.default is x for x in (None, False, argparse.SUPPRESS))
        if action.required or nothing or action.default == [] or "default" in help_text:
            return help_text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dissect-prep", description=__doc__.splitlines()[0], formatter_class=_HelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{shard,demo,noise,inspect}")
    d = ShardConfig()

    def add_command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=_HelpFormatter
        )

    p = add_command("shard", "download a url list into webdataset shards (img2dataset)")
    p.add_argument(
        "--urls",
        required=True,
        type=Path,
        help="url list: .parquet/.csv/.tsv file or a folder of them",
    )
    p.add_argument(
        "--out", required=True, type=Path, help="output folder for the shards and manifest.json"
    )
    p.add_argument(
        "--input-format",
        choices=("parquet", "csv", "tsv"),
        help="default: from the file extension",
    )
    p.add_argument("--url-col", default=d.url_col, help="url column of the list")
    p.add_argument("--caption-col", default=d.caption_col, help="caption column of the list")
    p.add_argument(
        "--extra-cols",
        type=_comma_list,
        default=[],
        metavar="A,B",
        help="columns carried into each sample's json (uid and label always are)",
    )
    p.add_argument("--image-size", type=int, default=d.image_size, help="pixels")
    p.add_argument(
        "--resize-mode", choices=RESIZE_MODES, default=d.resize_mode, help="img2dataset's"
    )
    p.add_argument(
        "--encode-format",
        choices=tuple(ENCODE_QUALITY),
        default=d.encode_format,
        help="image format in the tar",
    )
    p.add_argument(
        "--encode-quality",
        type=int,
        default=None,
        help="jpg: quality 0..100, webp: quality 1..100, png: zlib compression level 0..9 "
        "(default: " + ", ".join(f"{f} {q}" for f, (_, _, q) in ENCODE_QUALITY.items()) + ")",
    )
    p.add_argument(
        "--samples-per-shard",
        type=int,
        default=d.samples_per_shard,
        help="rows of the list per shard",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=d.processes,
        help="download processes (default: the CPU count, %(default)s here)",
    )
    p.add_argument("--threads", type=int, default=d.threads, help="download threads per process")
    p.add_argument("--timeout", type=float, default=d.timeout, help="seconds per request")
    p.add_argument("--retries", type=int, default=d.retries, help="extra attempts per url")
    p.add_argument(
        "--mode",
        choices=MODES,
        default=d.mode,
        help="incremental: keep finished shards and resume; overwrite: start over",
    )
    p.add_argument(
        "--min-image-size",
        type=int,
        default=d.min_image_size,
        help="drop images whose shorter side is below this (pixels)",
    )
    p.add_argument("--exif", action="store_true", help="store EXIF in the json (off by default)")

    p = add_command("demo", "build the Fashion-MNIST demo shards through img2dataset")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument(
        "--noise",
        default="0",
        metavar="SPEC",
        help="train caption noise (ground truth kept): a rate of swapped captions, or a mix "
        "such as swap=0.2,unrelated=0.1,partial=0.1",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="cap train images (val scales with it) for fast runs (default: all 60000)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of sampling, captions and noise")
    p.add_argument(
        "--kind",
        choices=("single", "mosaic", "web"),
        default="single",
        help="single items with class captions, 2x2 mosaics with near-unique captions, or "
        "web-like: one tinted, sized, placed item per image with a caption unique in its split",
    )
    p.add_argument("--image-size", type=int, default=64, help="pixels")
    p.add_argument(
        "--processes",
        type=int,
        default=None,
        help="download processes (default: 1 for splits under 5000 images, else CPU count)",
    )
    p.add_argument(
        "--fmnist-dir", type=Path, default=None, help="default: /usr/share/datasets/fashion-mnist"
    )
    p.add_argument(
        "--force", action="store_true", help="rebuild even when a complete output exists"
    )

    p = add_command(
        "noise", "copy shards with a fraction of captions made noisy, ground truth kept"
    )
    p.add_argument("--in", dest="src", required=True, type=Path, help="clean shard folder")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument(
        "--kind",
        default="swap",
        metavar="KIND|MIX",
        help="swap (another sample's caption), unrelated (text about nothing in the set) or "
        "partial (one item or attribute wrong), with --rate; or a mix without --rate, such as "
        "swap=0.2,unrelated=0.1,partial=0.1",
    )
    p.add_argument("--rate", type=float, default=None, help="fraction of captions of --kind")
    p.add_argument("--seed", type=int, default=0, help="seed of which samples, donors, words")

    p = add_command("inspect", "counts, labels, noise and example captions of a shard folder")
    p.add_argument("dir", type=Path, help="a shard folder, or a folder of shard folders")
    p.add_argument("--max-shards", type=int, default=None, help="scan only the first N shards")
    p.add_argument("--examples", type=int, default=6, help="example captions shown")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except DataPrepError as err:
        print(f"dissect-prep: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("dissect-prep: interrupted (re-run the same command to resume)", file=sys.stderr)
        return 130


def _shard(args) -> int:
    from data_prep.shard import shard_urls
    from dissect_common.manifest import summary_lines

    config = ShardConfig(
        input_format=args.input_format,
        url_col=args.url_col,
        caption_col=args.caption_col,
        extra_cols=tuple(args.extra_cols),
        image_size=args.image_size,
        resize_mode=args.resize_mode,
        encode_format=args.encode_format,
        encode_quality=args.encode_quality,
        samples_per_shard=args.samples_per_shard,
        processes=args.processes,
        threads=args.threads,
        timeout=args.timeout,
        retries=args.retries,
        mode=args.mode,
        min_image_size=args.min_image_size,
        exif=args.exif,
    )
    manifest = shard_urls(args.urls, args.out, config)
    print("\n".join(summary_lines(manifest, args.out)))
    if not manifest["complete"]:
        print(
            f"dissect-prep: {len(manifest['missing_shards'])} shards did not finish; "
            "re-run the same command to finish them",
            file=sys.stderr,
        )
        return EXIT_INCOMPLETE
    return 0


def _demo(args) -> int:
    from data_prep.demo import build_demo
    from data_prep.fmnist import FMNIST_DIR
    from data_prep.noise import parse_mix

    summary = build_demo(
        args.out,
        noise=parse_mix(args.noise),
        limit=args.limit,
        seed=args.seed,
        kind=args.kind,
        image_size=args.image_size,
        processes=args.processes,
        source_dir=args.fmnist_dir or FMNIST_DIR,
        force=args.force,
    )
    state = "reused" if summary["reused"] else f"built in {summary['built_s']}s"
    print(
        f"demo ({summary['kind']}, noise {summary['noise_spec']}, seed {summary['seed']}) in {args.out}: {state}"
    )
    for name, s in summary["splits"].items():
        noisy = f", {s['noisy']} noisy" if s["noisy"] else ""
        print(
            f"  {name:<11} {s['samples']:>6} samples in {s['shards']:>2} shards{noisy}   {s['spec']}"
        )
    print(
        f"  zero-shot   {summary['zeroshot']}/ (classnames.txt, templates.txt); retrieval {summary['retrieval']}/"
    )
    return 0


def noise_mix(kind: str, rate: float | None) -> dict[str, float]:
    """`noise --kind K --rate R`, or `--kind K1=R1,K2=R2` without --rate."""
    from data_prep.noise import KINDS, parse_mix

    if "=" in kind:
        if rate is not None:
            raise DataPrepError(f"--kind {kind} gives the rates itself; drop --rate")
        return parse_mix(kind)
    if kind not in KINDS:
        raise DataPrepError(f"--kind must be one of {', '.join(KINDS)} or a mix, got {kind!r}")
    if rate is None:
        raise DataPrepError(f"--kind {kind} needs --rate (or give a mix: {kind}=0.2,...)")
    return parse_mix(f"{kind}={rate}")


def _noise(args) -> int:
    from data_prep.noise import inject_noise
    from dissect_common.manifest import summary_lines

    manifest = inject_noise(args.src, args.out, mix=noise_mix(args.kind, args.rate), seed=args.seed)
    print("\n".join(summary_lines(manifest, args.out)))
    return 0


def _inspect(args) -> int:
    from data_prep.inspection import find_shard_dirs, inspect_shards, report_lines

    for folder in find_shard_dirs(args.dir):
        report = inspect_shards(folder, max_shards=args.max_shards, examples=args.examples)
        print("\n".join(report_lines(report)))
    return 0


COMMANDS = {"shard": _shard, "demo": _demo, "noise": _noise, "inspect": _inspect}


if __name__ == "__main__":  # img2dataset spawns workers: keep this guard
    sys.exit(main())
