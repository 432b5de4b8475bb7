"""Resume on another world size: the per-rank state of W_old ranks -> this rank's state for W_new.

DeepSpeed reshards the model and optimizer (through a universal checkpoint, see
pipeline.checkpoint); no library reshards the rest of what a rank saves (`state_rank{r}.pt`):

- score stores (memory / snapshot / score_ema source, visit means, a rule's per-sample stores such
  as margin_trend's level and trend, wherever in the selector state they sit): rank r holds uid u
  at slot u // W when u % W == r. Consolidated to one dense [size] tensor, then re-split by uid: every
  uid keeps its value and its known flag.
- historical weights (snapshot / EMA): under ZeRO-3 each rank holds a flat partition of every
  parameter, ceil(numel / W) elements, zero-padded at the end (DeepSpeed's layout); they are
  concatenated, cut to numel, and re-partitioned for W_new. Under ZeRO 0-2 they are replicated
  whole parameters: rank 0's copy is every rank's.
- replicated state (trainer counters, cluster centroids, gate): rank 0's copy.
- the data position: the shard split depends on W, so the interrupted epoch restarts its shard
  order for the new world (`restart_epoch`); see docs for the guarantee.
- RNG: rank r's saved state where that rank existed; a new rank keeps its fresh seed.

Pure functions on state dicts: tested in-process, no DeepSpeed, no process group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

STORE_FIELDS = frozenset({"size", "rank", "world", "value", "known"})  # ScoreStore.state_dict()


def store_paths(sd, path: tuple = ()) -> list[tuple]:
    """Key paths to every sharded ScoreStore state dict nested in a selector state dict, so a
    store that a new rule keeps (at any depth) is resharded without being listed here."""
    if not isinstance(sd, dict):
        return []
    if STORE_FIELDS <= sd.keys():
        return [path]
    return [p for k, v in sd.items() for p in store_paths(v, (*path, k))]


def _get(sd: dict, path: tuple):
    for k in path:
        sd = sd[k]
    return sd


def _with(sd: dict, path: tuple, value) -> dict:
    """A copy of ``sd`` with ``value`` at ``path`` (the dicts along the path are copied)."""
    out = dict(sd)
    out[path[0]] = value if len(path) == 1 else _with(sd[path[0]], path[1:], value)
    return out


def _owned(rank: int, size: int, world: int) -> torch.Tensor:
    """The uids rank ``rank`` of ``world`` holds, by slot: u = slot * world + rank."""
    return torch.arange(rank, max(size, rank), world)


def consolidate_store(shards: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-rank ScoreStore state dicts (rank order, all of one world) -> (value [size], known)."""
    world, size = len(shards), shards[0]["size"]
    value = torch.zeros(size, dtype=torch.float32)
    known = torch.zeros(size, dtype=torch.bool)
    for r, sd in enumerate(shards):
        assert (sd["rank"], sd["world"], sd["size"]) == (r, world, size), (
            "store shards out of order"
        )
        uids = _owned(r, size, world)
        value[uids] = sd["value"][: uids.numel()]
        known[uids] = sd["known"][: uids.numel()]
    return value, known


def split_store(value: torch.Tensor, known: torch.Tensor, rank: int, world: int) -> dict:
    """Rank ``rank``'s ScoreStore state dict for ``world`` ranks, from the dense store."""
    size = value.numel()
    slots = (size + world - 1) // world
    mine = _owned(rank, size, world)
    v = torch.zeros(slots, dtype=torch.float32)
    k = torch.zeros(slots, dtype=torch.bool)
    v[: mine.numel()] = value[mine]
    k[: mine.numel()] = known[mine]
    return {"size": size, "rank": rank, "world": world, "value": v, "known": k}


def consolidate_flat(parts: Sequence[torch.Tensor], numel: int) -> torch.Tensor:
    """ZeRO-3 flat partitions of one parameter (rank order) -> its numel flat elements."""
    return torch.cat([p.flatten() for p in parts])[:numel]


def split_flat(flat: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s ZeRO-3 partition of a flat parameter: ceil(numel / world), zero-padded."""
    n = math.ceil(flat.numel() / world)
    out = torch.zeros(n, dtype=flat.dtype)
    piece = flat[rank * n : (rank + 1) * n]
    out[: piece.numel()] = piece
    return out


def reshard_weights(sds: Sequence[dict], numels: list[int] | None, rank: int, world: int) -> dict:
    """WeightHistory state dicts of the old ranks -> this rank's. ``numels``: every parameter's
    full size under ZeRO-3 (partitioned), None under ZeRO 0-2 (replicated)."""
    first = sds[0]
    if first["shards"] is None or numels is None:
        return first
    if len(first["shards"]) != len(numels):
        raise ValueError(
            f"historical weights in the checkpoint have {len(first['shards'])} parameters, this "
            f"model {len(numels)} (a different model)"
        )
    shards = []
    for i, numel in enumerate(numels):
        flat = consolidate_flat([sd["shards"][i] for sd in sds], numel)
        if flat.numel() != numel:
            raise ValueError(
                f"historical weights: parameter {i} has {flat.numel()} elements in the "
                f"checkpoint, {numel} in this model (a different model)"
            )
        shards.append(split_flat(flat, rank, world))
    return {**first, "shards": shards}


def restart_epoch(train_state: dict, old_world: int, new_world: int) -> dict:
    """Counters carry over; the interrupted epoch restarts its shard order for the new world.

    ``step_in_epoch`` is rescaled so the epoch still ends after about as many samples as it
    holds: steps already taken x old_world / new_world (rounded down: the epoch gives at most
    one new global batch more than it would have). ``raw_pos`` (per-worker position in the old
    split) is dropped: every rank starts its new shard slice from the beginning.
    """
    ts = dict(train_state)
    ts["step_in_epoch"] = ts["step_in_epoch"] * old_world // new_world
    ts["raw_pos"] = {}
    return ts


def reshard_state(
    load: Callable[[int], dict],
    old_world: int,
    rank: int,
    world: int,
    numels: list[int] | None,
) -> dict:
    """This rank's state dict (as checkpoint.load returns it) from the ``old_world`` ranks'
    files; ``load(r)`` reads old rank r's. Each file is read once, and only rank 0's and this
    rank's are held whole."""
    first = load(0)
    mine = first if rank == 0 else load(rank) if rank < old_world else None
    out = {k: v for k, v in first.items() if k not in ("selector", "rng", "train_state")}
    out["train_state"] = restart_epoch(first["train_state"], old_world, world)
    out["rng"] = mine["rng"] if mine is not None else None
    sel = first.get("selector")
    if sel:
        sharded = store_paths(sel)
        partitioned = sel.get("weights") is not None and numels is not None
        stores: dict[tuple, list[dict]] = {p: [] for p in sharded}
        weights: list[dict] = []
        for r in range(old_world if sharded or partitioned else 0):
            theirs = (first if r == 0 else mine if r == rank else load(r))["selector"]
            for p in sharded:
                stores[p].append(_get(theirs, p))
            if partitioned:
                weights.append(theirs["weights"])
        for p in sharded:
            sel = _with(sel, p, split_store(*consolidate_store(stores[p]), rank, world))
        sel = dict(sel)
        if sel.get("weights") is not None:
            sel["weights"] = reshard_weights(weights or [sel["weights"]], numels, rank, world)
        out["selector"] = sel
    return out
