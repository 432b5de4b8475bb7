"""Make `import torchvision` work beside the CPU build of torch.

PyPI's torchvision 0.28.0 wheel is compiled against the CUDA build of torch 2.13. Beside the
CPU wheel its C++ extension does not load, so its custom operators (nms, roi_align, ...) are
never registered, and `torchvision/_meta_registrations.py` fails at import with
"operator torchvision::nms does not exist" while registering fake kernels for them.

open_clip needs only torchvision's transforms, which are pure Python. So, *only* on that exact
error, we declare the missing operator schemas (without any kernel: calling one still fails
loudly) and import again. Wherever torchvision imports cleanly this module does nothing.
Import it before anything that imports torchvision or open_clip (pipeline/__init__.py does).
"""

from __future__ import annotations

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


ensure_torchvision()
