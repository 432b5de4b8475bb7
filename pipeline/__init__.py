"""CLIP pretraining on DeepSpeed with DISSect online sample selection.

Importing the package is cheap (no torch): entry points parse and validate their arguments
before the heavy imports, so ``--help`` and a config error answer at once. It does two things:

- sets the process environment defaults in one place (`dissect_common.env`, shared with
  `data_prep`), before any library that reads them is imported;
- arms the torchvision compatibility step (`pipeline._compat`), which runs only when
  torchvision is first imported (directly, or through open_clip).
"""

from dissect_common import env
from pipeline import _compat

env.set_defaults()
_compat.install()
