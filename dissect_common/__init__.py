"""The contracts that `data_prep` and `pipeline` share, in one place both import.

- `dissect_common.manifest`: the `manifest.json` format written beside the shards (`data_prep`
  writes it, `pipeline` reads it to size epochs and the score store).
- `dissect_common.env`: the process environment defaults (offline Hugging Face, no update checks,
  the torch extensions cache) that both packages set before any library reads them.
- `dissect_common.errors`: `DataPrepError`, the one-line bad-input error of both.

The arrows point one way: `data_prep` and `pipeline` import this package; it imports neither,
and they do not import each other. Nothing here imports torch.
"""
