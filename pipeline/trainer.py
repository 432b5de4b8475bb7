"""The training loop: load super-batch -> select -> step -> log -> evaluate -> checkpoint.

    trainer = Trainer(cfg)
    trainer.train()

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
from pathlib import Path

import numpy as np
import torch
from open_clip import ClipLoss

from pipeline import checkpoint as ckpt
from pipeline.collectives import all_reduce_sum
from pipeline.config import Config, ConfigError, save_config
from pipeline.data import (
    EpochPlan,
    StreamSpec,
    count_samples,
    expand_shards,
    make_loader,
    max_uid,
    zeroshot_meta,
)
from pipeline.dist import barrier, init_distributed
from pipeline.engine import Engine, write_ds_config
from pipeline.evaluate import evaluate_sets
from pipeline.metrics import make_sink, truncate_metrics_after
from pipeline.model import build_model, check_model_name
from pipeline.selection import Selector

# reasons a sample is skipped (pipeline/data/loader.py); summed over ranks every step
SKIP_REASONS = ("no_image", "no_json", "bad_json", "bad_uid", "empty_caption", "bad_image",
                "unreadable_tar", "truncated_tar")


class TrainingError(RuntimeError):
    """The run cannot go on (too many bad steps, too much bad data); the message says why."""


def validate_paths(cfg: Config) -> list[str]:
    """Checks that need the filesystem, before any process group or model exists."""
    check_model_name(cfg.model.name)
    if not cfg.data.train:
        raise ConfigError("data.train is empty: give the train shards (a directory or brace pattern)")
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
    ckpt.resolve(cfg.checkpoint.resume, Path(cfg.run.dir) / "checkpoints")  # a bad path fails here
    return urls


class TrainState:
    """Counters and the data position; everything the loop needs to continue after a resume."""

    def __init__(self) -> None:
        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.samples_seen = 0
        self.samples_trained = 0
        self.raw_pos: dict[int, int] = {}  # logical worker -> raw samples consumed this epoch
        self.bad_steps = 0
        self.skipped: dict[str, int] = {}

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

    Separate from the loop so benchmarks time exactly what training runs.
    """

    def __init__(self, cfg: Config, dist, model: torch.nn.Module, total_steps: int,
                 store_size: int, steps_per_epoch: int):
        self.cfg, self.dist = cfg, dist
        self.engine = Engine(cfg, model, total_steps)
        self.loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=dist.rank,
                                world_size=dist.world_size)
        self.selector = None
        if cfg.selection.method != "none":
            self.selector = Selector(cfg, self.engine, dist, store_size, steps_per_epoch)

    def step(self, batch: dict, s: TrainState) -> dict:
        W = self.dist.world_size
        metrics: dict = {}
        if self.selector is not None:
            batch, sel_stats = self.selector.select(batch, s.step, s.epoch)
            metrics.update(sel_stats)
        t0 = time.perf_counter()
        img, txt, scale = self.engine.forward(batch["images"], batch["tokens"])
        loss = self.loss_fn(img, txt, scale)
        # every rank must agree to skip, or the collectives in backward would hang
        ok = int(all_reduce_sum(torch.isfinite(loss.detach()).float().reshape(1)).item()) == W
        if ok:
            self.engine.backward_step(loss)
        else:
            metrics["train/skipped_nonfinite"] = 1.0
        if self.engine.device.type == "cuda":
            torch.cuda.synchronize()
        metrics["perf/train_s"] = time.perf_counter() - t0
        if self.selector is not None:
            self.selector.after_step(s.step)
        s.step += 1
        s.step_in_epoch += 1
        s.samples_seen += W * self.cfg.super_batch_size
        s.samples_trained += W * self.cfg.data.batch_size if ok else 0
        metrics.update(loss=float(loss.detach().float().item()),
                       logit_scale=float(scale.detach().float().item()))
        return metrics


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        urls = validate_paths(cfg)
        self.dist = init_distributed(cfg.deepspeed.timeout_s)
        d, W = self.dist, self.dist.world_size
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"

        seed_everything(cfg.run.seed)  # same model init on every rank
        bundle = build_model(cfg.model.name, seed=cfg.run.seed)
        self.bundle = bundle
        seed_everything(cfg.run.seed * 7919 + d.rank)

        # epoch geometry: every rank loads B = b / r samples per step
        self.B = cfg.super_batch_size
        samples = cfg.data.samples_per_epoch or count_samples(urls)
        self.steps_per_epoch = samples // (W * self.B)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"an epoch of {samples} samples is less than one global super-batch "
                f"({W} ranks x {self.B}); lower data.batch_size or raise selection.ratio"
            )
        total = math.ceil(cfg.optim.epochs * self.steps_per_epoch)
        self.total_steps = min(total, cfg.optim.max_steps) if cfg.optim.max_steps else total
        self.spec = StreamSpec(
            urls=urls, batch_size=self.B, preprocess=bundle.preprocess_train, tokenizer=bundle.tokenizer,
            seed=cfg.run.seed, rank=d.rank, world=W, nworkers=cfg.data.workers,
            resampled=cfg.data.resampled, shuffle_buffer=cfg.data.shuffle_buffer,
        )

        store_size = cfg.selection.store_size or ((max_uid(urls) or samples - 1) + 1)
        self.stepper = StepRunner(cfg, d, bundle.model, self.total_steps, store_size, self.steps_per_epoch)
        self.engine, self.selector = self.stepper.engine, self.stepper.selector
        self.state = TrainState()

        if d.is_main:
            for sub in ("checkpoints", "selection"):
                (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            write_ds_config(self.engine, self.run_dir / "ds_config.json")
        barrier()
        self.sink = make_sink(self.run_dir, d.is_main, cfg.log.tensorboard)
        self._maybe_resume()

    # --- resume / checkpoint ------------------------------------------------------------------------

    def _states(self) -> dict:
        st = {"train_state": self.state}
        if self.selector is not None:
            st["selector"] = self.selector
        return st

    def _maybe_resume(self) -> None:
        where = ckpt.resolve(self.cfg.checkpoint.resume, self.ckpt_dir)
        if where is None:
            return
        sd = ckpt.load(self.engine, where, self.dist)
        self.state.load_state_dict(sd["train_state"])
        if self.selector is not None:
            self.selector.load_state_dict(sd.get("selector") or {})
        ckpt.set_rng_state(sd["rng"])
        if self.dist.is_main:  # rows a killed run logged after this checkpoint are replayed now
            truncate_metrics_after(self.run_dir, self.state.step)
        self._print(f"resumed from {where[0] / where[1]} at step {self.state.step}")

    def save_checkpoint(self) -> None:
        ckpt.save(self.engine, self.ckpt_dir, self.state.step, self._states(), self.dist,
                  self.cfg.checkpoint.keep)

    # --- the loop -----------------------------------------------------------------------------------

    def _print(self, msg: str) -> None:
        if self.dist.is_main:
            print(msg, file=sys.stderr, flush=True)

    def _epoch_loader(self):
        s = self.state
        plan = EpochPlan(epoch=s.epoch, steps=self.steps_per_epoch, start_step=s.step_in_epoch,
                         raw_pos=dict(s.raw_pos))
        return make_loader(self.spec, plan)

    def train(self) -> dict:
        cfg, s = self.cfg, self.state
        bar = self._progress()
        self.engine.train()
        while s.step < self.total_steps:
            t_data = time.perf_counter()
            for batch in self._epoch_loader():
                data_s = time.perf_counter() - t_data
                self._account_data(batch)
                metrics = self.train_step(batch)
                metrics["perf/data_s"] = data_s
                self._after_step(metrics, bar)
                if s.step >= self.total_steps:
                    break
                if s.step == cfg.run.stop_after_steps:
                    self.save_checkpoint()
                    self._print(f"stopping at step {s.step} (run.stop_after_steps); resume with "
                                "checkpoint.resume=latest")
                    self.sink.close()
                    return {"step": s.step, "stopped": True}
                t_data = time.perf_counter()
            else:  # the epoch's loader is exhausted
                s.epoch += 1
                s.step_in_epoch = 0
                s.raw_pos = {}
                continue
            break
        if bar is not None:
            bar.close()
        return self.finish()

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

    def train_step(self, batch: dict) -> dict:
        s = self.state
        metrics = self.stepper.step(batch, s)
        if metrics.get("train/skipped_nonfinite"):
            s.bad_steps += 1
            if s.bad_steps >= self.cfg.optim.max_bad_steps:
                raise TrainingError(
                    f"{s.bad_steps} non-finite losses in a row at step {s.step}; the last good "
                    f"checkpoint is {ckpt.latest_tag(self.ckpt_dir)}; lower optim.lr or check the data"
                )
        else:
            s.bad_steps = 0
        return metrics

    def _after_step(self, metrics: dict, bar) -> None:
        cfg, s = self.cfg, self.state
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", ep=s.epoch)
        last = s.step >= self.total_steps
        if s.step % cfg.log.every_steps == 0 or last or s.step == 1:
            self.log(metrics)
        if cfg.eval.every_steps and s.step % cfg.eval.every_steps == 0 and not last:
            self.evaluate()
        if cfg.checkpoint.every_steps and s.step % cfg.checkpoint.every_steps == 0 and not last:
            self.save_checkpoint()

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
        if self.selector is not None and self.dist.is_main:
            for tag, vals in self.selector.histograms().items():
                self.sink.histogram(tag, vals, s.step)
            self._flush_selection_log()
        every = self.cfg.selection.grid_every_steps
        if self.selector is not None and every and s.step % every == 0 and self.dist.is_main:
            grid = self.selector.rejected_grid()
            if grid is not None:
                self.sink.image("select/most_rejected", grid[0], s.step)
                self.sink.text("select/most_rejected_captions", "\n\n".join(grid[1]), s.step)

    def _flush_selection_log(self) -> None:
        rows = self.selector.log_rows
        if not rows:
            return
        import pandas as pd

        df = pd.DataFrame({k: np.concatenate([r[k] for r in rows]) for k in rows[0]})
        df.to_parquet(self.run_dir / "selection" / f"part-{self.state.step:08d}.parquet", index=False)
        rows.clear()

    def evaluate(self) -> dict:
        cfg = self.cfg
        if not (cfg.data.val or cfg.data.val_retrieval):
            return {}
        self.engine.train(False)

        def encode(images, tokens):
            img, txt, _ = self.engine.forward(images, tokens)
            return img, txt

        metrics = evaluate_sets(encode, self.bundle.tokenizer, self.bundle.preprocess_val, cfg.data.val,
                                cfg.data.val_retrieval, cfg.data.val_batch_size, cfg.data.max_val_samples,
                                device=self.engine.device)
        self.engine.train(True)
        self.sink.log({"epoch": self.state.epoch + self.state.step_in_epoch / self.steps_per_epoch,
                       "samples_seen": self.state.samples_seen,
                       "samples_trained": self.state.samples_trained,
                       "time_s": time.time() - self._t_start, **metrics}, self.state.step)
        rounded = {k: round(v, 4) for k, v in metrics.items()}
        self._print(f"eval @ step {self.state.step}: {json.dumps(rounded)}")
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

    def _progress(self):
        self._t_start = time.time()
        if not (self.dist.is_main and self.cfg.log.progress and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.state.step, desc="train", dynamic_ncols=True)
