"""Lets torchvision's pure-Python parts import when its compiled ops cannot load.

The only torchvision 0.28.0 wheel on PyPI is CUDA-linked. On a CPU-only torch
its `_C` library fails to load, and `torchvision/_meta_registrations.py` then
dies registering fake kernels for `torchvision::nms` and `torchvision::qnms`,
operators that only `_C` would have defined. open_clip, timm and the
transformers Qwen2-VL video processor all import torchvision, so all of them
would fail with `RuntimeError: operator torchvision::nms does not exist`.

`install()` puts a finder on `sys.meta_path` that runs once, right before
torchvision is first imported: if `_C` loads, nothing else happens; if not, the
two operator schemas are declared so the registrations succeed. The transforms
and models then work; `torchvision.ops` and `torchvision.io` do not, and this
project never relies on them. Importing torch is deferred until torchvision is
actually wanted, so light commands (`engine synth`) do not pay for it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # holds the torch.library.Library alive; None where not needed
_done = False


def _declare_ops_if_needed() -> None:
    global _library, _done
    if _done:
        return
    _done = True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    import torch

    finder = importlib.machinery.FileFinder(
        spec.submodule_search_locations[0],
        (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
    )
    ext = finder.find_spec("_C")
    if ext is not None:
        try:
            torch.ops.load_library(ext.origin)  # torchvision loads it again: a no-op
            return
        except (OSError, ImportError, RuntimeError):
            pass
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)


class _BeforeTorchvision:
    """A meta-path finder that finds nothing; it only runs the fix first."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(_FINDER)
            _declare_ops_if_needed()
        return None


_FINDER = _BeforeTorchvision()


def install() -> None:
    """Arms the fix; idempotent. Runs it at once if torchvision is already imported."""
    if "torchvision" in sys.modules or _done:
        return
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def torchvision_ops_available() -> bool:
    """True when torchvision's compiled ops (nms, roi_align, video io) are usable."""
    import torchvision.extension

    return bool(torchvision.extension._has_ops())
