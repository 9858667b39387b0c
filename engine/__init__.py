"""Shards in, shards out: the toy world, shard reading and writing, frame decoding, and (soon) captioning jobs."""

import data_specs as _data_specs  # noqa: F401  - first: arms the torchvision compatibility fix

__version__ = "0.1.0"
