"""Make `import torchvision` work beside the CPU build of torch.

PyPI's torchvision 0.28.0 wheel is compiled against the CUDA build of torch 2.13. Beside the
CPU wheel its C++ extension does not load, so its custom operators (nms, roi_align, ...) are
never registered, and `torchvision/_meta_registrations.py` fails at import with
"operator torchvision::nms does not exist" while registering fake kernels for them.

open_clip needs only torchvision's transforms, which are pure Python. So, *only* on that exact
error, we declare the missing operator schemas (without any kernel: calling one still fails
loudly) and import again. Wherever torchvision imports cleanly this does nothing.

When: `import pipeline` calls `install()`, which puts a one-shot finder in front of the import
system. Importing `pipeline` stays cheap (no torch), and the first `import torchvision`
anywhere afterwards (open_clip's, or a user's) goes through `ensure_torchvision()`. Where
torchvision is already imported, `install()` runs the check at once instead.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import re
import sys

_MISSING_OP = re.compile(r"operator torchvision::(\w+) does not exist")
_libs: list = []  # keep the torch.library.Library objects alive, or the schemas vanish


def _forget_torchvision() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def ensure_torchvision() -> None:
    try:
        import torchvision  # noqa: F401

        return
    except RuntimeError as err:
        if not _MISSING_OP.search(str(err)):
            raise
        first_error = err

    import torch

    lib = torch.library.Library("torchvision", "FRAGMENT")
    _libs.append(lib)
    for _ in range(32):  # torchvision registers about a dozen ops; bound the loop anyway
        _forget_torchvision()
        try:
            import torchvision  # noqa: F401

            return
        except RuntimeError as err:
            match = _MISSING_OP.search(str(err))
            if not match:
                raise
            # A placeholder schema: the fake-kernel registration only needs the name to exist.
            lib.define(f"{match.group(1)}(Tensor[] args) -> Tensor")
    raise RuntimeError(f"could not make torchvision importable: {first_error}")


class _FirstImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers the first `import torchvision` by running `ensure_torchvision()`.

    ``create_module`` does the real import (this finder has left ``sys.meta_path`` by then, so
    the ordinary finders load the real package) and hands back the module it produced;
    ``exec_module`` only restores that module's own spec, which the import system overwrote
    with ours.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec):
        if self in sys.meta_path:  # one-shot; a probe (importlib.util.find_spec) leaves it armed
            sys.meta_path.remove(self)
        ensure_torchvision()
        module = sys.modules["torchvision"]
        self._real_spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self._real_spec


def install() -> None:
    if "torchvision" in sys.modules:
        ensure_torchvision()
        return
    if not any(isinstance(f, _FirstImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _FirstImport())
