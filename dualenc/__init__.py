"""The video-text dual encoder: open_clip towers with temporal heads, training, distillation, retrieval."""

import data_specs as _data_specs  # noqa: F401  - first: arms the torchvision compatibility fix

__version__ = "0.1.0"
