"""Shard listing, webdataset stages and per-rank super-batch loaders."""

from pipeline.data.loader import (  # noqa: F401
    SKIP_REASONS,
    EpochPlan,
    ShardStream,
    SkipSample,
    StreamSpec,
    make_eval_loader,
    make_loader,
)
from pipeline.data.shards import count_samples, expand_shards, max_uid, zeroshot_meta  # noqa: F401
