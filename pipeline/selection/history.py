"""Historical weights (snapshot / EMA), held like the training model's own parameters.

Each rank keeps fp32 tensors shaped like its share of every parameter (Engine.partitions):
under ZeRO-3 the flat local partition, under ZeRO 0-2 the whole replicated parameter. Updates
are elementwise on those tensors, so they need no communication; a historical forward swaps
them into the engine's module (Engine.swapped_weights) and lets ZeRO gather as usual.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # typing only: importing the engine imports deepspeed
    from pipeline.engine import Engine


class WeightHistory:
    def __init__(self, engine: Engine, momentum: float = 0.0):
        self.engine = engine
        self.momentum = momentum
        self.shards: list[torch.Tensor] | None = None  # None until the first snapshot

    @property
    def ready(self) -> bool:
        return self.shards is not None

    @torch.no_grad()
    def snapshot(self) -> None:
        """Copy the current weights (local partitions only)."""
        self.shards = [p.detach().float().clone() for p in self.engine.partitions()]

    @torch.no_grad()
    def ema_update(self) -> None:
        """h <- m h + (1 - m) w, per local partition; initialised to w on first call."""
        if self.shards is None:
            self.snapshot()
            return
        m = self.momentum
        for h, p in zip(self.shards, self.engine.partitions()):
            h.mul_(m).add_(p.detach().float(), alpha=1.0 - m)

    def weights(self):
        """Context manager: the engine's module runs with these weights inside it."""
        assert self.shards is not None, "historical weights used before the first snapshot"
        return self.engine.swapped_weights(self.shards)

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "shards": self.shards}

    def load_state_dict(self, sd: dict) -> None:
        self.momentum = sd["momentum"]
        shards = sd["shards"]
        if shards is not None:
            mine = self.engine.partitions()
            if len(shards) != len(mine) or any(a.shape != b.shape for a, b in zip(shards, mine)):
                raise ValueError(
                    "historical weights in the checkpoint do not match this model's partitions "
                    "(different model or ZeRO stage / world size)"
                )
        self.shards = shards
