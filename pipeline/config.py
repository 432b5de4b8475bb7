"""Run configuration: a tree of typed dataclasses, loaded from defaults, then YAML, then overrides.

    cfg = load_config("configs/tiny-cpu.yaml", ["optim.lr=1e-3", "selection.method=dissect"])

Every section validates itself in ``__post_init__``; ``Config.__post_init__`` checks what spans
sections. Any mistake raises ``ConfigError`` (a ``ValueError``) with one line naming the field
and what is allowed, before any work starts. ``save_config`` writes the resolved tree back.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml

from pipeline.selection.names import SELECTION_METHODS


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message is one line naming the field."""


def _check(ok: bool, name: str, allowed: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {allowed}, got {got!r}")


BALANCE_MODES = ("none", "clusters")
HISTORY_SOURCES = ("memory", "snapshot", "ema", "score_ema")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class RunConfig:
    name: str = "run"
    dir: str = ""  # default: runs/<name>
    seed: int = 0
    stop_after_steps: int = 0  # > 0: checkpoint and exit at this step, as if preempted

    def __post_init__(self):
        _check(
            self.stop_after_steps >= 0,
            "run.stop_after_steps",
            "a non-negative integer",
            self.stop_after_steps,
        )
        _check(
            bool(self.name) and "/" not in self.name,
            "run.name",
            "a non-empty name without '/'",
            self.name,
        )
        _check(self.seed >= 0, "run.seed", "a non-negative integer", self.seed)
        if not self.dir:
            self.dir = str(Path("runs") / self.name)


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # shard specs, brace-expanded; dirs allowed
    val: str = ""  # zero-shot / retrieval val shards (dir with classnames.txt for zero-shot)
    val_retrieval: str = ""  # optional second val set evaluated by retrieval only
    batch_size: int = 32  # per-rank train batch b
    val_batch_size: int = 256
    workers: int = 2
    resampled: bool = False
    samples_per_epoch: int = 0  # 0: from the manifest (or a pass over the shards)
    shuffle_buffer: int = 2000
    max_skip_frac: float = 0.05  # stop the run when more than this fraction is undecodable
    max_val_samples: int = 0  # 0: the whole val set

    def __post_init__(self):
        if isinstance(self.train, str):
            self.train = [self.train] if self.train else []
        _check(self.batch_size > 0, "data.batch_size", "a positive integer", self.batch_size)
        _check(
            self.val_batch_size > 0,
            "data.val_batch_size",
            "a positive integer",
            self.val_batch_size,
        )
        _check(self.workers >= 0, "data.workers", "a non-negative integer", self.workers)
        _check(
            self.samples_per_epoch >= 0,
            "data.samples_per_epoch",
            "a non-negative integer",
            self.samples_per_epoch,
        )
        _check(
            self.shuffle_buffer >= 0,
            "data.shuffle_buffer",
            "a non-negative integer",
            self.shuffle_buffer,
        )
        _check(
            0.0 <= self.max_skip_frac <= 1.0, "data.max_skip_frac", "in [0, 1]", self.max_skip_frac
        )
        _check(
            self.max_val_samples >= 0,
            "data.max_val_samples",
            "a non-negative integer",
            self.max_val_samples,
        )


@dataclass
class ModelConfig:
    name: str = "tiny-vit"  # any open_clip model name or a config under configs/models/
    # every forward through the engine (training, eval, ZeRO-3 scoring) cuts text at the
    # batch's longest caption: exact for open_clip's causal, argmax-pooled text towers; other
    # models are left as they are (the lean scoring path: selection.score_trim_tokens)
    trim_text: bool = True

    def __post_init__(self):
        _check(bool(self.name), "model.name", "an open_clip model name", self.name)


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 0
    epochs: float = 1.0
    max_steps: int = 0  # stop early when > 0
    grad_clip: float = 1.0  # 0 disables clipping
    max_bad_steps: int = 5  # non-finite losses in a row before the run stops

    def __post_init__(self):
        _check(self.lr > 0, "optim.lr", "a positive number", self.lr)
        _check(
            self.weight_decay >= 0, "optim.weight_decay", "a non-negative number", self.weight_decay
        )
        _check(0 <= self.beta1 < 1, "optim.beta1", "in [0, 1)", self.beta1)
        _check(0 <= self.beta2 < 1, "optim.beta2", "in [0, 1)", self.beta2)
        _check(self.eps > 0, "optim.eps", "a positive number", self.eps)
        _check(
            self.warmup_steps >= 0,
            "optim.warmup_steps",
            "a non-negative integer",
            self.warmup_steps,
        )
        _check(self.epochs > 0, "optim.epochs", "a positive number", self.epochs)
        _check(self.max_steps >= 0, "optim.max_steps", "a non-negative integer", self.max_steps)
        _check(self.grad_clip >= 0, "optim.grad_clip", "a non-negative number", self.grad_clip)
        _check(
            self.max_bad_steps > 0, "optim.max_bad_steps", "a positive integer", self.max_bad_steps
        )


@dataclass
class SelectionConfig:
    method: str = "none"
    ratio: float = 0.2  # r: train batch b out of a super-batch of b / r per rank
    history: str = "memory"  # dissect, dissect_z: memory | snapshot | ema | score_ema
    warmup_epochs: float = 0.0  # random r-fraction kept (memory store written) during warm-up
    warmup_steps: int = 0  # alternative to warmup_epochs; the larger of the two applies
    ema_momentum: float = 0.999  # history=ema: weight EMA momentum
    score_momentum: float = 0.9  # history=score_ema: per-sample h <- m h + (1-m) s
    score_chunk: int = 512  # samples per no-grad scoring forward (bounds memory)
    store_size: int = 0  # score store entries (max uid + 1); 0: from the train manifest
    log_samples: bool = True  # per-sample (uid, s, h, d, kept) parquet under selection/
    grid_every_steps: int = 0  # image grid of the most-rejected pairs in TensorBoard; 0: off
    balance: str = "none"  # none | clusters: each caption cluster keeps its share of the kept set
    clusters: int = 16  # balance=clusters: K online k-means centroids of text features
    # filter_random filters only while the loss mixture's running separation (Ashman's D)
    # exceeds split_min_d (0: always); the running mean has momentum split_momentum
    split_min_d: float = 2.5
    split_momentum: float = 0.9
    # filter_visits, swap_mean: per-sample mean over visits v <- m v + (1-m) x (of the loss's
    # z, of swap_rank)
    visit_momentum: float = 0.75
    # the rules of issue 19 (filter_soft, gsc, margin_trend, filter_2d, infobatch): see
    # pipeline/selection/rules.py. Whether to filter is a BIC test (no threshold to set).
    soft_gamma: float = 1.0  # kept set drawn by Gumbel top-k in proportion to P(clean)^gamma
    min_cluster_rows: int = 8  # a cluster with fewer rows is standardised with global statistics
    same_caption_cos: float = 0.995  # text-feature cosine at which two captions are the same
    margin_momentum: float = 0.75  # margin_trend: per-sample running level and trend of the margin
    gsc_temperature: float = 0.1  # gsc: softmax temperature of the similarity rows (0: the model's)
    # the scoring forward only (current and historical model; training is untouched):
    score_patch_dropout: float = 0.0  # share of image patches dropped per image (FLIP)
    score_image_size: int = 0  # score at this image size (position embeddings interpolated)
    score_trim_tokens: bool = True  # text cut at the chunk's longest caption (exact)
    score_lean: bool = True  # call the towers directly under inference mode (ZeRO 0-2)

    def __post_init__(self):
        _check(
            self.method in SELECTION_METHODS,
            "selection.method",
            f"one of {SELECTION_METHODS}",
            self.method,
        )
        _check(0 < self.ratio <= 1, "selection.ratio", "in (0, 1]", self.ratio)
        _check(
            self.history in HISTORY_SOURCES,
            "selection.history",
            f"one of {HISTORY_SOURCES}",
            self.history,
        )
        _check(
            self.warmup_epochs >= 0,
            "selection.warmup_epochs",
            "a non-negative number",
            self.warmup_epochs,
        )
        _check(
            self.warmup_steps >= 0,
            "selection.warmup_steps",
            "a non-negative integer",
            self.warmup_steps,
        )
        _check(0 <= self.ema_momentum < 1, "selection.ema_momentum", "in [0, 1)", self.ema_momentum)
        _check(
            0 <= self.score_momentum < 1,
            "selection.score_momentum",
            "in [0, 1)",
            self.score_momentum,
        )
        _check(
            self.score_chunk > 0, "selection.score_chunk", "a positive integer", self.score_chunk
        )
        _check(
            self.store_size >= 0, "selection.store_size", "a non-negative integer", self.store_size
        )
        _check(
            self.grid_every_steps >= 0,
            "selection.grid_every_steps",
            "a non-negative integer",
            self.grid_every_steps,
        )
        _check(
            self.balance in BALANCE_MODES,
            "selection.balance",
            f"one of {BALANCE_MODES}",
            self.balance,
        )
        _check(self.clusters >= 1, "selection.clusters", "a positive integer", self.clusters)
        _check(
            self.split_min_d >= 0,
            "selection.split_min_d",
            "a non-negative number (0: always filter)",
            self.split_min_d,
        )
        _check(
            0 <= self.split_momentum < 1,
            "selection.split_momentum",
            "in [0, 1)",
            self.split_momentum,
        )
        _check(
            0 <= self.visit_momentum < 1,
            "selection.visit_momentum",
            "in [0, 1)",
            self.visit_momentum,
        )
        _check(self.soft_gamma > 0, "selection.soft_gamma", "a positive number", self.soft_gamma)
        _check(
            self.min_cluster_rows >= 2,
            "selection.min_cluster_rows",
            "an integer >= 2",
            self.min_cluster_rows,
        )
        _check(
            0 < self.same_caption_cos <= 1,
            "selection.same_caption_cos",
            "in (0, 1]",
            self.same_caption_cos,
        )
        _check(
            0 <= self.margin_momentum < 1,
            "selection.margin_momentum",
            "in [0, 1)",
            self.margin_momentum,
        )
        _check(
            self.gsc_temperature >= 0,
            "selection.gsc_temperature",
            "a non-negative number (0: the model's own 1 / logit_scale)",
            self.gsc_temperature,
        )
        _check(
            0 <= self.score_patch_dropout < 1,
            "selection.score_patch_dropout",
            "in [0, 1)",
            self.score_patch_dropout,
        )
        _check(
            self.score_image_size >= 0,
            "selection.score_image_size",
            "a non-negative integer (0: the model's size)",
            self.score_image_size,
        )
        _check(
            self.balance == "none" or self.method != "none",
            "selection.balance",
            "none when selection.method is none (nothing is selected)",
            self.balance,
        )


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    precision: str = "fp32"
    timeout_s: int = 600  # collective timeout: a dead rank ends the job within this bound
    torch_adam: bool = True  # torch's AdamW: no 85 s JIT build of DeepSpeed's CPU Adam
    fused_adam: bool = True  # with torch_adam: torch's fused AdamW kernel (CPU and CUDA)
    # torch.compile backend for the model's forward through the engine ("" off; "inductor" is
    # torch's default compiler): compiled on the first steps, it serves training and eval
    compile: str = ""

    def __post_init__(self):
        _check(
            self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "0, 1, 2 or 3", self.zero_stage
        )
        _check(
            self.precision in PRECISIONS,
            "deepspeed.precision",
            f"one of {PRECISIONS}",
            self.precision,
        )
        _check(self.timeout_s > 0, "deepspeed.timeout_s", "a positive integer", self.timeout_s)


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only at the end
    keep: int = 3  # newest complete checkpoints kept; 0 keeps all
    resume: str = ""  # "" | latest | path to a checkpoint dir

    def __post_init__(self):
        _check(
            self.every_steps >= 0,
            "checkpoint.every_steps",
            "a non-negative integer",
            self.every_steps,
        )
        _check(self.keep >= 0, "checkpoint.keep", "a non-negative integer", self.keep)


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0: only at the end
    at_end: bool = True

    def __post_init__(self):
        _check(
            self.every_steps >= 0, "eval.every_steps", "a non-negative integer", self.every_steps
        )


@dataclass
class LogConfig:
    every_steps: int = 10
    tensorboard: bool = True
    progress: bool = (
        True  # rank 0: a progress bar on a terminal, else a line every progress_every_s
    )
    progress_every_s: float = 30.0  # seconds between progress lines when not on a terminal

    def __post_init__(self):
        _check(self.every_steps > 0, "log.every_steps", "a positive integer", self.every_steps)
        _check(
            self.progress_every_s > 0,
            "log.progress_every_s",
            "a positive number of seconds",
            self.progress_every_s,
        )


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self):
        sel = self.selection
        if sel.method != "none":
            # the super-batch b / r must be a whole number of samples
            sb = self.data.batch_size / sel.ratio
            _check(
                abs(sb - round(sb)) < 1e-6,
                "data.batch_size / selection.ratio",
                "a whole number (the per-rank super-batch)",
                sb,
            )

    @property
    def super_batch_size(self) -> int:
        """Samples each rank loads per step: b / r with selection, b without."""
        if self.selection.method == "none":
            return self.data.batch_size
        return int(round(self.data.batch_size / self.selection.ratio))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check (and mildly coerce: int -> float, scalar -> list) a YAML value to a field type."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in get_args(tp):
            try:
                return _coerce(value, arm, name)
            except ConfigError:
                continue
        raise ConfigError(f"{name} must be {tp}, got {value!r}")
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # YAML reads .inf/.nan as floats; no field means them (optim.epochs=.inf overflows)
            if not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
            try:
                f = float(value)
            except ValueError:
                f = None
            if f is not None and math.isfinite(f):
                return f
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is type(None):
        if value is None:
            return None
    raise ConfigError(f"{name} must be of type {_type_name(tp)}, got {value!r}")


def _build(cls: type, raw: dict, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(
                f"unknown config key {full!r}; allowed here: {', '.join(sorted(names))}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or " " in key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> Config:
    """Defaults, then the YAML file, then ``key=value`` overrides; validated as a whole."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            first = str(err).splitlines()[0]
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {first}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
    raw = _merge(raw, parse_overrides(overrides or []))
    return _build(Config, raw, "")


def config_from_dict(raw: dict) -> Config:
    return _build(Config, raw, "")


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
