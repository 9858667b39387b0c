"""pseudocap's data contracts: typed schemas every stage agrees on, with JSON Schema export.

Importing any pseudocap package imports this one first, which arms the torchvision
compatibility fix (see `data_specs.torch_compat`) before anything can import torchvision.
"""

from data_specs import torch_compat as _torch_compat

_torch_compat.install()

from data_specs.base import Spec, SpecError, validate  # noqa: E402
from data_specs.records import (  # noqa: E402
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    CaptionRecord,
    ErrorRow,
    GenerationParams,
    InputSample,
    Provenance,
    ShardStats,
)
from data_specs.toyworld import ObjectState, ToyClip, ToyEvent, ToyObject  # noqa: E402

SCHEMAS: dict[str, type[Spec]] = {
    "input_sample": InputSample,
    "caption_record": CaptionRecord,
    "shard_stats": ShardStats,
    "error_row": ErrorRow,
    "toy_clip": ToyClip,
}
"""Every exported schema by its stable name (the file name of its JSON Schema)."""

__version__ = "0.1.0"

__all__ = [
    "SCHEMAS", "Spec", "SpecError", "validate", "VIDEO_EXTENSIONS", "IMAGE_EXTENSIONS",
    "CaptionRecord", "ErrorRow", "GenerationParams", "InputSample", "Provenance", "ShardStats",
    "ObjectState", "ToyClip", "ToyEvent", "ToyObject",
]
