"""Online sample selection: methods, historical sources, sharded store, global top-k.

``Selector`` is imported on first use, so that ``pipeline.config`` can read the method names
(``pipeline.selection.names``) without importing torch or the selector.
"""


def __getattr__(name: str):
    if name == "Selector":
        from pipeline.selection.selector import Selector

        return Selector
    raise AttributeError(f"module 'pipeline.selection' has no attribute {name!r}")
