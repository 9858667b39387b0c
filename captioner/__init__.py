"""The captioner: an image VLM adapted to video in two stages, with batched generation backends."""

import data_specs as _data_specs  # noqa: F401  - first: arms the torchvision compatibility fix

__version__ = "0.1.0"
