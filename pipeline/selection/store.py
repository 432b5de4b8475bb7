"""Per-sample score store, sharded over ranks by ``uid % W``.

Rank r holds the entries of uids u with u % W == r at slot u // W: a dense float tensor
``value`` and a bool ``known`` (written at least once). After the step's all-gather every rank
sees every (uid, s) of the global super-batch, so owners write their own entries with no
extra traffic; reading h for the G gathered uids is one all-reduce of a [G] vector (owners fill
their entries, zeros elsewhere).
"""

from __future__ import annotations

import torch

from pipeline.collectives import all_reduce_sum


class StoreRangeError(ValueError):
    pass


class ScoreStore:
    def __init__(self, size: int, rank: int, world: int):
        """``size``: number of uids (max uid + 1) across the whole dataset."""
        if size <= 0:
            raise ValueError("score store needs a positive size (max uid + 1)")
        self.size, self.rank, self.world = size, rank, world
        slots = (size + world - 1) // world
        self.value = torch.zeros(slots, dtype=torch.float32)
        self.known = torch.zeros(slots, dtype=torch.bool)

    def _check(self, uid_G: torch.Tensor) -> None:
        if uid_G.numel() and (int(uid_G.min()) < 0 or int(uid_G.max()) >= self.size):
            bad = int(uid_G.max()) if int(uid_G.max()) >= self.size else int(uid_G.min())
            raise StoreRangeError(
                f"uid {bad} is outside the score store [0, {self.size}); the store is sized from "
                f"the train manifest's max_uid; set selection.store_size to at least max uid + 1"
            )

    def _mine(self, uid_G: torch.Tensor) -> torch.Tensor:
        return uid_G % self.world == self.rank

    def write(
        self, uid_G: torch.Tensor, val_G: torch.Tensor, only: torch.Tensor | None = None
    ) -> None:
        """Owners store val for their uids (optionally only where ``only`` is True). No traffic."""
        uid_G = uid_G.cpu()
        self._check(uid_G)
        m = self._mine(uid_G)
        if only is not None:
            m &= only.cpu()
        slots = uid_G[m] // self.world
        self.value[slots] = val_G.detach().float().cpu()[m]
        self.known[slots] = True

    def read(self, uid_G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(value [G], known [G]) for the gathered uids, identical on all ranks. One all-reduce."""
        uid_G = uid_G.cpu()
        self._check(uid_G)
        m = self._mine(uid_G)
        slots = uid_G[m] // self.world
        buf = torch.zeros(2, uid_G.numel(), dtype=torch.float64)
        buf[0, m] = self.value[slots].double()
        buf[1, m] = self.known[slots].double()
        buf = all_reduce_sum(buf)
        return buf[0].float(), buf[1] > 0.5

    def state_dict(self) -> dict:
        return {
            "size": self.size,
            "rank": self.rank,
            "world": self.world,
            "value": self.value.clone(),
            "known": self.known.clone(),
        }

    def load_state_dict(self, sd: dict) -> None:
        if (sd["size"], sd["world"], sd["rank"]) != (self.size, self.world, self.rank):
            raise ValueError(
                f"score store checkpoint is for size={sd['size']} world={sd['world']} "
                f"rank={sd['rank']}, this run has size={self.size} world={self.world} rank={self.rank}"
            )
        self.value.copy_(sd["value"])
        self.known.copy_(sd["known"])
