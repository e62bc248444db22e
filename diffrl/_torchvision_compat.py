"""Lets the PyPI torchvision wheel import on a CPU-only torch (docs/install.md).

torchvision 0.28.0 from PyPI is built for CUDA: on a CPU torch its compiled ops (`torchvision/_C.so`) fail to load,
and `import torchvision` then stops at `torch.library.register_fake("torchvision::nms")` with "operator
torchvision::nms does not exist". transformers imports torchvision whenever it is installed, so every CLIP reward
would fail. Defining the schemas of the two ops that torchvision registers fake kernels for unconditionally (`nms`,
`qnms`) lets the import finish; nothing in diffrl calls them (a call would raise "no kernel").

`install()` puts a finder first on `sys.meta_path` that applies the fix just before torchvision is first looked up,
so `import diffrl` itself imports nothing heavy. Verified: import torchvision and transformers' CLIPProcessor with
torch 2.13.0+cpu and torchvision 0.28.0 (tests/test_torchvision_compat.py).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

_OP_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_libraries = []  # the torch.library.Library owning our definitions; the definitions vanish if it is collected


class _BeforeTorchvision:
    """A meta-path finder that finds nothing itself: it prepares torch the first time torchvision is looked up."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec("torchvision")   # the real finders, now that this one is gone
            if spec is not None:
                define_missing_ops(spec.submodule_search_locations or [])
        return None


def install() -> None:
    """Apply the fix before torchvision's first import (idempotent, cheap: imports nothing)."""
    if "torchvision" in sys.modules or any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _BeforeTorchvision())


def define_missing_ops(torchvision_dirs: list[str]) -> None:
    """On a CPU torch, define torchvision::nms/qnms unless torchvision's own compiled ops provide them."""
    import torch

    if torch.version.cuda is not None or torch.version.hip is not None:
        return
    # A CPU-built torchvision (download.pytorch.org/whl/cpu) loads fine and defines the ops itself; loading it now,
    # before defining anything, avoids a duplicate definition when torchvision loads it again (a no-op then).
    _load_compiled_ops(torchvision_dirs)
    for name, schema in _OP_SCHEMAS.items():
        if not hasattr(torch.ops.torchvision, name):
            if not _libraries:
                _libraries.append(torch.library.Library("torchvision", "FRAGMENT"))
            _libraries[0].define(schema)


def _load_compiled_ops(torchvision_dirs: list[str]) -> None:
    import torch

    for directory in torchvision_dirs:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(directory, "_C" + suffix)
            if os.path.isfile(path):
                try:
                    torch.ops.load_library(path)
                except OSError:  # built against CUDA libraries this machine lacks: the case the fix is for
                    pass
                return
