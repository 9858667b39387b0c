"""Shared fixtures: small toy-world shards made once per session."""

from __future__ import annotations

import pytest

from engine.synth import SynthConfig, synth


@pytest.fixture(scope="session")
def toy_test_shards(tmp_path_factory):
    """Two shards of the `test` split (40 samples, 16 frames of 112x112 each)."""
    out = tmp_path_factory.mktemp("toy")
    cfg = SynthConfig(split="test", n=40, seed=3, shard_size=24)
    paths = synth(cfg, out, progress=False)
    return cfg, out, paths
