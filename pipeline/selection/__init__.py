"""Online sample selection: methods, historical sources, sharded store, global top-k."""

from pipeline.selection.selector import Selector  # noqa: F401
