"""The bad-input error shared by data preparation and the manifest reader."""

from __future__ import annotations


class DataPrepError(ValueError):
    """Bad user input (missing file or column, empty list, folder without shards, ...).

    The CLI prints its message as one line and exits non-zero; library callers can catch it.
    """
