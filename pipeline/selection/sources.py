"""Historical sources: where h (the historical correlation) comes from, one class per source.

Shapes: B super-batch rows on this rank, G = W * B gathered rows (rank-major).

Each source owns its state (score store and/or historical weights) and is called at fixed
points of a selection step, the same on every rank (some calls are collectives):

    begin(warm)                       before scoring (snapshot/EMA: first copy of the weights)
    needs_s(warm)                     whether it needs the current s of every row this step
    local_h(scorer, batch, warm)      h_B computed on this rank before the gather, or None
    gathered_h(scorer, batch, g, warm) -> h_G   h over the gathered rows (store reads, memo)
    update(g, warm)                   after the top-k: store writes (owners only, no traffic)
    after_step()                      after the optimizer step (EMA update)
    state_dict() / load_state_dict()  keys "store" / "weights", as checkpoints always held

``NoHistory`` serves methods that do not read h (h = 0 everywhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pipeline.collectives import all_gather_cat
from pipeline.selection.history import WeightHistory
from pipeline.selection.store import ScoreStore

if TYPE_CHECKING:  # typing only: importing the engine imports deepspeed
    from pipeline.engine import Engine


@dataclass
class Gathered:
    """The step's per-row values over the global super-batch, identical on every rank."""

    uid: torch.Tensor  # [G] int64
    s: torch.Tensor  # [G] current correlation (0 where not scored)
    h: torch.Tensor  # [G] historical correlation (0 until a source fills it)
    noisy: torch.Tensor  # [G] bool ground truth: diagnostics and the oracle only
    label: torch.Tensor  # [G] int64, -1 when unknown: diagnostics only
    rank: int
    B: int
    noise_kind: torch.Tensor | None = None  # [G] int64 index into NOISE_KINDS, -1 unknown

    def mine(self) -> slice:
        """This rank's rows in the gathered order."""
        return slice(self.rank * self.B, (self.rank + 1) * self.B)


class NoHistory:
    name = ""

    def begin(self, warm: bool) -> None:
        pass

    def needs_s(self, warm: bool) -> bool:
        return False

    def local_h(self, scorer, batch: dict, warm: bool) -> torch.Tensor | None:
        return None

    def gathered_h(self, scorer, batch: dict, g: Gathered, warm: bool) -> torch.Tensor:
        return g.h

    def update(self, g: Gathered, warm: bool) -> None:
        pass

    def after_step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict) -> None:
        pass


class _StoreSource(NoHistory):
    def __init__(self, store_size: int, rank: int, world: int):
        self.store = ScoreStore(store_size, rank, world)

    def _read_or_s(self, g: Gathered) -> torch.Tensor:
        """Stored h; never-seen samples get the neutral h = s (no warm-up pass over them)."""
        h_G, known_G = self.store.read(g.uid)
        return torch.where(known_G, h_G, g.s)

    def state_dict(self) -> dict:
        return {"store": self.store.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("store") is not None:
            self.store.load_state_dict(sd["store"])


class MemorySource(_StoreSource):
    """The upstream's main method: warm-up writes each sample's s; afterwards the store is read."""

    name = "memory"

    def needs_s(self, warm: bool) -> bool:
        return warm  # the store is written from s during warm-up

    def gathered_h(self, scorer, batch: dict, g: Gathered, warm: bool) -> torch.Tensor:
        return g.h if warm else self._read_or_s(g)

    def update(self, g: Gathered, warm: bool) -> None:
        if warm:
            self.store.write(g.uid, g.s)


class ScoreEmaSource(_StoreSource):
    """Upstream's momentum variant: h <- m h + (1 - m) s after use; h = s at first sight."""

    name = "score_ema"

    def __init__(self, store_size: int, rank: int, world: int, momentum: float):
        super().__init__(store_size, rank, world)
        self.momentum = momentum

    def needs_s(self, warm: bool) -> bool:
        return True

    def gathered_h(self, scorer, batch: dict, g: Gathered, warm: bool) -> torch.Tensor:
        return self._read_or_s(g)

    def update(self, g: Gathered, warm: bool) -> None:
        m = self.momentum
        self.store.write(g.uid, m * g.h + (1 - m) * g.s)


class _WeightSource(NoHistory):
    def __init__(self, engine: Engine, momentum: float = 0.0):
        self.weights = WeightHistory(engine, momentum=momentum)

    def begin(self, warm: bool) -> None:
        if not warm and not self.weights.ready:
            self.weights.snapshot()  # end of warm-up (snapshot) or the first EMA step

    def state_dict(self) -> dict:
        return {"weights": self.weights.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("weights") is not None:
            self.weights.load_state_dict(sd["weights"])


class SnapshotSource(_WeightSource):
    """Weights frozen when warm-up ends; h of a sample is computed the first time it is scored
    after warm-up and memoised in a store (the snapshot never changes: one forward per sample)."""

    name = "snapshot"

    def __init__(self, engine: Engine, store_size: int, rank: int, world: int):
        super().__init__(engine)
        self.store = ScoreStore(store_size, rank, world)

    def gathered_h(self, scorer, batch: dict, g: Gathered, warm: bool) -> torch.Tensor:
        if warm:
            return g.h
        h_G, known_G = self.store.read(g.uid)
        todo_B = torch.nonzero(~known_G[g.mine()]).flatten()
        new_B = torch.zeros(g.B, dtype=torch.float64)
        new_B[todo_B] = scorer.historical_s(batch, todo_B, self.weights).double()
        fresh_B = torch.zeros(g.B, dtype=torch.float64).index_fill_(0, todo_B, 1.0)
        new_G = all_gather_cat(torch.stack([new_B, fresh_B], 1))
        fresh_G = new_G[:, 1] > 0.5
        h_G = torch.where(fresh_G, new_G[:, 0].float(), h_G)
        self.store.write(g.uid, h_G, only=fresh_G)
        return torch.where(known_G | fresh_G, h_G, g.s)

    def state_dict(self) -> dict:
        return {"store": self.store.state_dict(), **super().state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        if sd.get("store") is not None:
            self.store.load_state_dict(sd["store"])


class EmaSource(_WeightSource):
    """An exponential moving average of the weights, evaluated on every row every step: works
    when samples are never revisited, at the cost of a second forward."""

    name = "ema"

    def local_h(self, scorer, batch: dict, warm: bool) -> torch.Tensor | None:
        if warm:
            return None
        return scorer.historical_s(batch, torch.arange(batch["uid"].shape[0]), self.weights)

    def after_step(self) -> None:
        self.weights.ema_update()  # every step, warm-up included: the EMA starts at step 0


def make_source(
    name: str | None,
    engine,
    store_size: int,
    rank: int,
    world: int,
    ema_momentum: float,
    score_momentum: float,
):
    """The source for selection.history (None: the method reads no history)."""
    if name is None:
        return NoHistory()
    if name == "memory":
        return MemorySource(store_size, rank, world)
    if name == "score_ema":
        return ScoreEmaSource(store_size, rank, world, score_momentum)
    if name == "snapshot":
        return SnapshotSource(engine, store_size, rank, world)
    if name == "ema":
        return EmaSource(engine, momentum=ema_momentum)
    raise AssertionError(f"unknown history source {name!r}")  # config validation lists them
