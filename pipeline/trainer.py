"""The training loop: load super-batch -> select -> step -> log -> evaluate -> checkpoint.

    plan = plan_run(cfg, init_distributed(cfg.deepspeed.timeout_s))  # the one set-up per start
    result = plan.stored_result if plan.finished else Trainer(cfg, plan).train()

All ranks run the same loop (same step count per epoch, same collectives); rank 0 writes the
run directory: config.yaml, ds_config.json, metrics.jsonl, tb/, checkpoints/, selection/,
eval.json and model.pt (the final weights, loadable by open_clip).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import checkpoint as ckpt
from pipeline.collectives import all_reduce_sum
from pipeline.config import Config, ConfigError, save_config
from pipeline.data import (
    SKIP_REASONS,
    EpochPlan,
    StreamSpec,
    count_samples,
    expand_shards,
    make_loader,
    max_uid,
    zeroshot_meta,
)
from pipeline.dist import DistInfo, barrier, broadcast_object
from pipeline.engine import Engine, write_ds_config
from pipeline.evaluate import describe, evaluate_sets
from pipeline.loss import WeightedClipLoss
from pipeline.metrics import make_sink, truncate_metrics_after
from pipeline.model import build_model, check_model_name
from pipeline.selection import Selector
from pipeline.selection import diagnostics as diag


class TrainingError(RuntimeError):
    """The run cannot go on (too many bad steps, too much bad data); the message says why."""


def validate_paths(cfg: Config) -> list[str]:
    """Checks that need the filesystem, before any process group or model exists."""
    check_model_name(cfg.model.name)
    if not cfg.data.train:
        raise ConfigError(
            "data.train is empty: give the train shards (a directory or brace pattern)"
        )
    try:
        urls = expand_shards(cfg.data.train)
    except ConfigError as err:
        raise ConfigError(f"data.train: {err}") from None
    for name, spec in (("data.val", cfg.data.val), ("data.val_retrieval", cfg.data.val_retrieval)):
        if spec:
            try:
                expand_shards(spec)
            except ConfigError as err:
                raise ConfigError(f"{name}: {err}") from None
    if cfg.data.val:
        try:
            zeroshot_meta(cfg.data.val)  # raises on a malformed templates.txt
        except ConfigError as err:
            raise ConfigError(f"data.val: {err}") from None
    return urls


def resolve_resume(cfg: Config, dist: DistInfo) -> tuple[Path, str] | None:
    """Where the job resumes, decided once: rank 0 resolves ``checkpoint.resume`` and every rank
    gets its answer (or its error), so ranks starting a moment apart never disagree."""
    where, err = None, None
    if dist.is_main:
        try:
            where = ckpt.resolve(cfg.checkpoint.resume, Path(cfg.run.dir) / "checkpoints")
        except ConfigError as e:
            err = str(e)
    where, err = broadcast_object((where, err))
    if err:
        raise ConfigError(err)
    return where


class TrainState:
    """Counters and the data position; everything the loop needs to continue after a resume."""

    def __init__(self) -> None:
        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.samples_seen = 0
        self.samples_trained = 0
        self.raw_pos: dict[int, int] = {}  # logical worker -> raw samples consumed this epoch
        self.bad_steps = 0  # steps in a row that trained nothing (non-finite loss)
        self.skipped: dict[str, int] = {}  # skip reason -> samples, summed over ranks

    def advance(self, seen: int, trained: int) -> None:
        """One step done: ``seen`` samples loaded (all ranks), ``trained`` of them trained on
        (0: a non-finite loss skipped backward/step, one more bad step in a row)."""
        self.step += 1
        self.step_in_epoch += 1
        self.samples_seen += seen
        self.samples_trained += trained
        self.bad_steps = 0 if trained else self.bad_steps + 1

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        self.raw_pos = {}

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, sd: dict) -> None:
        for k, v in sd.items():
            setattr(self, k, v)
        self.raw_pos = {int(k): v for k, v in self.raw_pos.items()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class StepRunner:
    """One training step on a loaded super-batch: select -> forward -> loss -> backward/step.

    Separate from the loop so benchmarks time exactly what training runs. It keeps no counters:
    the caller says which step and epoch this is, and advances its own `TrainState`.
    """

    def __init__(
        self,
        cfg: Config,
        dist: DistInfo,
        model: torch.nn.Module,
        total_steps: int,
        store_size: int,
        steps_per_epoch: int,
    ):
        self.cfg, self.dist = cfg, dist
        self.engine = Engine(cfg, model, total_steps)
        self.loss_fn = WeightedClipLoss(dist.rank, dist.world_size)
        self.selector: Selector | None = None
        if cfg.selection.method != "none":
            self.selector = Selector(cfg, self.engine, dist, store_size, steps_per_epoch)

    def step(self, batch: dict, step: int, epoch: int) -> dict:
        """The step's metrics; ``train/skipped_nonfinite`` among them when a non-finite loss (on
        any rank) skipped backward/step on every rank."""
        W = self.dist.world_size
        metrics: dict = {}
        if self.selector is not None:
            batch, sel_stats = self.selector.select(batch, step, epoch)
            metrics.update(sel_stats)
        t0 = time.perf_counter()
        img, txt, scale = self.engine.forward(batch["images"], batch["tokens"])
        loss = self.loss_fn(img, txt, scale, batch.get("weight"))  # weights: InfoBatch
        # every rank must agree to skip, or the collectives in backward would hang; the trained
        # pairs' agreement (clean vs noisy: memorisation) rides in the same all-reduce
        pairs = diag.train_pair_sums(img, txt, batch)
        finite = torch.isfinite(loss.detach()).float().reshape(1).to(pairs.device)
        summed = all_reduce_sum(torch.cat([finite, pairs])).cpu()
        ok = int(summed[0].item()) == W
        metrics.update(diag.train_pair_stats(summed[1:]))
        if ok:
            self.engine.backward_step(loss)
        else:
            metrics["train/skipped_nonfinite"] = 1.0
        if self.engine.device.type == "cuda":
            torch.cuda.synchronize()
        metrics["perf/train_s"] = time.perf_counter() - t0
        if self.selector is not None:
            self.selector.after_step(step)
        # one device-to-host copy for both values
        loss_v, scale_v = torch.stack([loss.detach().float(), scale.detach().float()]).tolist()
        metrics.update(loss=loss_v, logit_scale=scale_v)
        return metrics


@dataclass(frozen=True)
class RunPlan:
    """What every rank of the job agrees on before anything is built.

    One resume decision per job: rank 0 resolves ``checkpoint.resume`` and broadcasts it, so
    ranks starting a moment apart (while another rewrites a checkpoint) can never disagree.
    ``dist``: the process group the plan was made in (set up once per start, in train.main).
    """

    dist: DistInfo
    urls: list[str]  # the train shards
    samples: int  # per epoch
    steps_per_epoch: int
    total_steps: int
    resume_from: tuple[Path, str] | None  # (checkpoints dir, tag), or None: a fresh start
    stored_result: dict | None  # eval.json of a run already at its last step, else None
    saved_world: int | None = None  # ranks that wrote resume_from (None: a fresh start)

    @property
    def world_changed(self) -> bool:
        return self.saved_world is not None and self.saved_world != self.dist.world_size

    @property
    def resume_step(self) -> int | None:
        return ckpt.step_of(self.resume_from[1]) if self.resume_from else None

    @property
    def finished(self) -> bool:
        return self.stored_result is not None


def plan_run(cfg: Config, dist: DistInfo) -> RunPlan:
    """Epoch geometry (every rank loads B = b / r samples a step) and where the job starts."""
    urls = validate_paths(cfg)
    B, W = cfg.super_batch_size, dist.world_size
    samples = cfg.data.samples_per_epoch or count_samples(urls)
    steps_per_epoch = samples // (W * B)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"an epoch of {samples} samples is less than one global super-batch "
            f"({W} ranks x {B}); lower data.batch_size or raise selection.ratio"
        )
    total = math.ceil(cfg.optim.epochs * steps_per_epoch)
    total_steps = min(total, cfg.optim.max_steps) if cfg.optim.max_steps else total
    run_dir = Path(cfg.run.dir)
    where = resolve_resume(cfg, dist)
    saved_world = ckpt.saved_world(where[0] / where[1]) if where else None
    if saved_world not in (None, W):
        total_steps = _steps_after_world_change(
            cfg, where[0] / where[1], saved_world, W, steps_per_epoch
        )
    # a run whose last checkpoint is its last step and that wrote its result is not rebuilt
    step = ckpt.step_of(where[1]) if where else None
    result, weights = run_dir / "eval.json", run_dir / "model.pt"
    stored = None
    if step is not None and step >= total_steps and result.is_file() and weights.is_file():
        stored = json.loads(result.read_text())
    return RunPlan(dist, urls, samples, steps_per_epoch, total_steps, where, stored, saved_world)


def _steps_after_world_change(
    cfg: Config, step_dir: Path, old_world: int, world: int, steps_per_epoch: int
) -> int:
    """The run's last step when it continues on ``world`` ranks from a checkpoint of
    ``old_world``: the step counter (and the learning-rate schedule) carries over, and the
    optim.epochs still to go take this world's steps per epoch (its global batch differs)."""
    c = ckpt.saved_counters(step_dir)
    in_epoch = c["step_in_epoch"] * old_world // world  # as elastic.restart_epoch rescales it
    left = math.ceil((cfg.optim.epochs - c["epoch"]) * steps_per_epoch) - in_epoch
    total = c["step"] + max(left, 0)
    return min(total, cfg.optim.max_steps) if cfg.optim.max_steps else total


class Trainer:
    """All ranks build one from the agreed plan and call ``train()``; see the module docstring."""

    def __init__(self, cfg: Config, plan: RunPlan):
        assert not plan.finished, "a finished run has nothing to train (plan.stored_result)"
        self.cfg = cfg
        self.dist = plan.dist
        d, W = self.dist, self.dist.world_size
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self._t_start = 0.0  # wall clock at the start of train(): metrics' time_s counts from it
        self._last_progress = 0.0  # when _progress_line last printed
        self._bar = None  # rank 0's tqdm bar on a terminal, from the start of train()
        self.start_step = 0  # the step this process started training at (resume)
        self.B = cfg.super_batch_size
        self.steps_per_epoch, self.total_steps = plan.steps_per_epoch, plan.total_steps
        self.saved_step = plan.resume_step  # a complete checkpoint at this step exists
        self.state = TrainState()
        urls, samples = plan.urls, plan.samples

        seed_everything(cfg.run.seed)  # same model init on every rank
        self.bundle = build_model(cfg.model.name, seed=cfg.run.seed)
        seed_everything(cfg.run.seed * 7919 + d.rank)
        self.spec = StreamSpec(
            urls=urls,
            batch_size=self.B,
            preprocess=self.bundle.preprocess_train,
            tokenizer=self.bundle.tokenizer,
            seed=cfg.run.seed,
            rank=d.rank,
            world=W,
            nworkers=cfg.data.workers,
            resampled=cfg.data.resampled,
            shuffle_buffer=cfg.data.shuffle_buffer,
        )
        store_size = cfg.selection.store_size or ((max_uid(urls) or samples - 1) + 1)
        self.stepper = StepRunner(
            cfg, d, self.bundle.model, self.total_steps, store_size, self.steps_per_epoch
        )
        self.engine, self.selector = self.stepper.engine, self.stepper.selector
        self._warn_if_warmup_covers_the_run()

        if d.is_main:
            for sub in ("checkpoints", "selection"):
                (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            write_ds_config(self.engine, self.run_dir / "ds_config.json")
        barrier()
        self.sink = make_sink(self.run_dir, d.is_main, cfg.log.tensorboard)
        if plan.resume_from is not None:
            self._resume(plan)

    # --- resume / checkpoint ------------------------------------------------------------------------

    def _warn_if_warmup_covers_the_run(self) -> None:
        sel = self.selector
        if (
            sel is not None
            and self.cfg.selection.method != "random"
            and sel.warmup_steps >= self.total_steps
        ):
            self._print(
                f"dissect-train: warning: selection warm-up lasts {sel.warmup_steps} steps (the larger of "
                f"selection.warmup_steps and warmup_epochs x {self.steps_per_epoch} steps/epoch) but the run "
                f"has {self.total_steps}: {self.cfg.selection.method} selection never starts, every step "
                "keeps a random fraction"
            )

    def _states(self) -> dict:
        st = {"train_state": self.state}
        if self.selector is not None:
            st["selector"] = self.selector
        return st

    def _resume(self, plan: RunPlan) -> None:
        where = plan.resume_from
        if plan.world_changed:
            self._print(self._world_change_line(plan))
        sd = ckpt.load(self.engine, where, self.dist)
        self.state.load_state_dict(sd["train_state"])
        if self.selector is not None:
            self.selector.load_state_dict(sd.get("selector") or {})
        if sd["rng"] is not None:  # None: a rank the checkpoint did not have keeps its seed
            ckpt.set_rng_state(sd["rng"])
        self.start_step = self.state.step
        if self.dist.is_main:  # what a killed run logged after this checkpoint is replayed now
            truncate_metrics_after(self.run_dir, self.state.step)
            for part in (self.run_dir / "selection").glob("part-*.parquet"):
                if int(part.stem.split("-")[1]) > self.state.step:
                    part.unlink()
        self._print(f"resumed from {where[0] / where[1]} at step {self.state.step}")

    def _world_change_line(self, plan: RunPlan) -> str:
        old, W, b = plan.saved_world, self.dist.world_size, self.cfg.data.batch_size
        how = (
            "model and optimizer through a universal checkpoint"
            if self.engine.partitioned_checkpoint(plan.resume_from[0] / plan.resume_from[1])
            else "model and optimizer as saved (not partitioned)"
        )
        return (
            f"checkpoint from {old} ranks, resuming on {W}: {how}; selection state resharded; "
            "data order restarts within the epoch; global batch "
            f"{old * b} -> {W * b} (data.batch_size={b} is per rank); the learning-rate "
            f"schedule continues at step {plan.resume_step} and ends at step {self.total_steps}"
        )

    def save_checkpoint(self) -> None:
        """Save this step's checkpoint, unless it is the one just saved or resumed from: a complete
        checkpoint is never rewritten (a rewrite first withdraws its COMPLETE marker)."""
        if self.saved_step == self.state.step:
            return
        ckpt.save(
            self.engine,
            self.ckpt_dir,
            self.state.step,
            self._states(),
            self.dist,
            self.cfg.checkpoint.keep,
        )
        self.saved_step = self.state.step

    # --- the loop -----------------------------------------------------------------------------------

    def _print(self, msg: str) -> None:
        if self.dist.is_main:
            print(msg, file=sys.stderr, flush=True)

    def _batches(self):
        """(super-batch, seconds spent loading it) for every remaining step, epoch after epoch."""
        s = self.state
        while s.step < self.total_steps:
            plan = EpochPlan(
                epoch=s.epoch,
                steps=self.steps_per_epoch,
                start_step=s.step_in_epoch,
                raw_pos=dict(s.raw_pos),
            )
            t = time.perf_counter()
            for batch in make_loader(self.spec, plan):
                yield batch, time.perf_counter() - t
                if s.step >= self.total_steps:  # optim.max_steps may end the run mid-epoch
                    return
                t = time.perf_counter()
            s.next_epoch()

    def train(self) -> dict:
        """Every remaining step, then the final evaluation, checkpoint and weights."""
        self._t_start = time.time()
        self._bar = self._progress_bar()
        self.engine.train()
        for batch, data_s in self._batches():
            self._step(batch, data_s)
            if (
                self.state.step == self.cfg.run.stop_after_steps
                and self.state.step < self.total_steps
            ):
                return self._stop()
        if self._bar is not None:
            self._bar.close()
        return self.finish()

    def _step(self, batch: dict, data_s: float) -> None:
        """One step on every rank: load -> select -> forward/loss -> backward/step -> log/eval/save."""
        cfg, s, W = self.cfg, self.state, self.dist.world_size
        self._account_data(batch)  # load: the data position, skipped samples summed over ranks
        # select -> forward/loss -> backward/step
        metrics = self.stepper.step(batch, s.step, s.epoch)
        trained = "train/skipped_nonfinite" not in metrics
        s.advance(seen=W * self.B, trained=W * cfg.data.batch_size if trained else 0)
        if s.bad_steps >= cfg.optim.max_bad_steps:
            raise TrainingError(
                f"{s.bad_steps} non-finite losses in a row at step {s.step}; the last good "
                f"checkpoint is {ckpt.latest_tag(self.ckpt_dir)}; lower optim.lr or check the data"
            )
        metrics["perf/data_s"] = data_s
        self._show_progress(metrics)
        last = s.step >= self.total_steps
        if s.step % cfg.log.every_steps == 0 or last or s.step == 1:
            self.log(metrics)
        if cfg.eval.every_steps and s.step % cfg.eval.every_steps == 0 and not last:
            self.evaluate()
        if cfg.checkpoint.every_steps and s.step % cfg.checkpoint.every_steps == 0 and not last:
            self.save_checkpoint()

    def _stop(self) -> dict:
        """run.stop_after_steps: checkpoint and exit, as a preempted job would."""
        self.save_checkpoint()
        self._print(
            f"stopping at step {self.state.step} (run.stop_after_steps); resume with "
            "checkpoint.resume=latest"
        )
        self.sink.close()
        return {"step": self.state.step, "stopped": True}

    def _account_data(self, batch: dict) -> None:
        """Track the data position and skipped samples; stop when too many are undecodable.

        Skip counts are summed over ranks (one tiny all-reduce a step), so every rank sees the
        same totals and all stop together instead of one rank exiting while the rest hang.
        """
        s = self.state
        s.raw_pos[batch["worker"]] = batch["raw_pos"]
        local = torch.tensor([float(batch["skipped"].get(r, 0)) for r in SKIP_REASONS])
        other = sum(n for r, n in batch["skipped"].items() if r not in SKIP_REASONS)
        total = all_reduce_sum(torch.cat([local, torch.tensor([float(other)])]))
        for reason, n in zip((*SKIP_REASONS, "other"), total.tolist()):
            if n:
                s.skipped[reason] = s.skipped.get(reason, 0) + int(n)
        if s.skipped:
            bad = sum(s.skipped.values())
            frac = bad / max(1, bad + s.samples_seen)
            if frac > self.cfg.data.max_skip_frac and bad >= 20:
                shards = ", ".join(batch.get("bad_shards") or []) or "see data/skipped/* in metrics"
                raise TrainingError(
                    f"{bad} undecodable samples ({frac:.1%} > data.max_skip_frac="
                    f"{self.cfg.data.max_skip_frac}) by reason {s.skipped}; bad shards: {shards}"
                )

    def _show_progress(self, metrics: dict) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{metrics['loss']:.3f}", ep=self.state.epoch)
        else:
            self._progress_line(metrics)

    def log(self, metrics: dict) -> None:
        s, W = self.state, self.dist.world_size
        step_s = sum(v for k, v in metrics.items() if k.startswith("perf/"))
        row = {
            "epoch": s.epoch + s.step_in_epoch / self.steps_per_epoch,
            "samples_seen": s.samples_seen,
            "samples_trained": s.samples_trained,
            "lr": self.engine.lr(),
            "time_s": time.time() - self._t_start,
            "perf/step_s": step_s,
            "perf/samples_per_s": W * self.B / step_s if step_s > 0 else 0.0,
            **metrics,
        }
        row.update({f"data/skipped/{k}": v for k, v in s.skipped.items()})
        self.sink.log(row, s.step)
        if self.selector is not None:
            self.selector.report(self.sink, s.step)

    def evaluate(self) -> dict:
        cfg = self.cfg
        if not (cfg.data.val or cfg.data.val_retrieval):
            return {}
        self.engine.train(False)

        def encode(images, tokens):
            img, txt, _ = self.engine.forward(images, tokens)
            return img, txt

        t0 = time.perf_counter()
        metrics = evaluate_sets(
            encode,
            self.bundle.tokenizer,
            self.bundle.preprocess_val,
            cfg.data.val,
            cfg.data.val_retrieval,
            cfg.data.val_batch_size,
            cfg.data.max_val_samples,
            device=self.engine.device,
        )
        self.engine.train(True)
        self.sink.log(
            {
                "epoch": self.state.epoch + self.state.step_in_epoch / self.steps_per_epoch,
                "samples_seen": self.state.samples_seen,
                "samples_trained": self.state.samples_trained,
                "time_s": time.time() - self._t_start,
                **metrics,
                "perf/eval_s": time.perf_counter() - t0,
            },
            self.state.step,
        )
        self._print(f"eval @ step {self.state.step}: {describe(metrics)}")
        return metrics

    def finish(self) -> dict:
        cfg = self.cfg
        result: dict = {"step": self.state.step}
        if cfg.eval.at_end:
            result.update(self.evaluate())
        self.save_checkpoint()
        state = self.engine.full_state_dict()  # collective under ZeRO-3: every rank joins
        if self.dist.is_main:
            torch.save(state, self.run_dir / "model.pt")
            (self.run_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        self.sink.close()
        barrier()
        return result

    def _progress_bar(self):
        """tqdm on rank 0 when stderr is a terminal; otherwise `_progress_line` logs."""
        if not (self.dist.is_main and self.cfg.log.progress and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.total_steps, initial=self.state.step, desc="train", dynamic_ncols=True
        )

    def _progress_line(self, metrics: dict) -> None:
        """Without a terminal (a log file, CI, SLURM): one line every log.progress_every_s seconds,
        and at the first and last step."""
        s, now = self.state, time.time()
        due = now - self._last_progress >= self.cfg.log.progress_every_s
        if not (self.dist.is_main and self.cfg.log.progress) or not (
            due or s.step in (1, self.total_steps)
        ):
            return
        self._last_progress = now
        step_s = sum(v for k, v in metrics.items() if k.startswith("perf/"))
        rate = self.dist.world_size * self.B / step_s if step_s > 0 else 0.0
        # the ETA uses this run's mean step time (the first step's start-up cost amortises away)
        done = s.step - self.start_step
        eta = (now - self._t_start) / max(done, 1) * (self.total_steps - s.step)
        line = (
            f"step {s.step}/{self.total_steps} ({100 * s.step / self.total_steps:.0f}%) "
            f"epoch {s.epoch} | loss {metrics['loss']:.4f} | {rate:.0f} samples/s | ETA {_hms(eta)}"
        )
        if "select/kept_noisy_frac" in metrics:
            line += f" | kept noisy {metrics['select/kept_noisy_frac']:.3f}"
        self._print(line)


def _hms(seconds: float) -> str:
    m, sec = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"
