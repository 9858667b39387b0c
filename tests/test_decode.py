"""Frame sampling rules, limits, backends, and the decode pool's timeout and crash isolation."""

from __future__ import annotations

import time

import numpy as np
import pytest

from engine.decode import DecodeLimits, Sampling, decode_video, installed_backends
from engine.decode_pool import DecodePool
from engine.errors import BackendUnavailable, DecodeError, DecodeTimeout
from engine.synth import SynthConfig, encode_h264, render, sample_clip
from tests import hang


@pytest.fixture(scope="module")
def clip_bytes():
    clip = sample_clip(SynthConfig(split="test", n=1, seed=4), 0)
    return encode_h264(render(clip), clip.fps)


def test_uniform_sampling_takes_segment_centres():
    assert Sampling.uniform(4).resolve(16, 8.0) == [2, 6, 9, 13]
    assert Sampling.uniform(8).resolve(300, 30.0) == [18, 56, 93, 131, 168, 206, 243, 281]
    assert Sampling.uniform(8).resolve(3, 8.0) == [0, 0, 0, 1, 1, 2, 2, 2]  # short clips repeat frames
    assert Sampling.at_fps(2).resolve(16, 8.0) == [0, 4, 8, 12]
    assert Sampling.at_fps(30, max_frames=4).resolve(16, 8.0) == [2, 6, 10, 14]
    assert Sampling.at([0, 5, 99]).resolve(16, 8.0) == [0, 5, 15]  # clamped to what exists


def test_uniform_sampling_of_a_reversed_clip_takes_the_reversed_frames():
    for frames in range(1, 70):
        for n in (1, 2, 3, 4, 6, 8, 16):
            if n % 2 and frames % 2 == 0:
                continue  # an odd count of an even clip has no middle frame to mirror onto itself
            idx = Sampling.uniform(n).resolve(frames, 8.0)
            assert sorted(idx) == sorted(frames - 1 - i for i in idx), (frames, n, idx)


@pytest.mark.parametrize("kwargs", [{}, {"n": 0}, {"n": 2, "fps": 1.0}, {"indices": ()}, {"fps": -1.0}])
def test_bad_sampling_is_rejected(kwargs):
    with pytest.raises(ValueError, match="Sampling"):
        Sampling(**kwargs)


@pytest.mark.parametrize("backend", installed_backends())
def test_each_backend_returns_frames_indices_and_timestamps(clip_bytes, backend):
    out = decode_video(clip_bytes, Sampling.uniform(4), backend=backend)
    assert out.frames.shape == (4, 112, 112, 3) and out.frames.dtype == np.uint8
    assert out.indices == [2, 6, 9, 13] and out.num_frames == 16 and out.backend == backend
    assert out.timestamps == pytest.approx([i / 8.0 for i in out.indices], abs=1e-3)


def test_auto_picks_an_installed_backend(clip_bytes):
    assert decode_video(clip_bytes, Sampling.uniform(2)).backend in installed_backends()


def test_missing_backend_names_how_to_install(clip_bytes):
    if "torchcodec" in installed_backends():
        pytest.skip("torchcodec is installed here")
    with pytest.raises(BackendUnavailable, match="torchcodec"):
        decode_video(clip_bytes, backend="torchcodec")
    with pytest.raises(ValueError, match="valid: auto"):
        decode_video(clip_bytes, backend="opencv")


def test_large_frames_are_downscaled_within_max_pixels(clip_bytes):
    out = decode_video(clip_bytes, Sampling.uniform(2), backend="av", limits=DecodeLimits(max_pixels=56 * 56))
    h, w = out.frames.shape[1:3]
    assert h * w <= 56 * 56 and out.source_size == (112, 112) and "downscaled" in out.notes[0]
    with pytest.raises(DecodeError, match="frame-too-large"):
        decode_video(clip_bytes, limits=DecodeLimits(max_input_pixels=100 * 100))
    with pytest.raises(DecodeError, match="too-long"):
        decode_video(clip_bytes, limits=DecodeLimits(max_duration_s=1.0))


def test_frames_are_pyavs_own_conversion_at_either_size(clip_bytes):
    import io

    import av

    with av.open(io.BytesIO(clip_bytes)) as c:
        frames = list(c.decode(video=0))
    small = {"width": 56, "height": 56, "format": "rgb24", "interpolation": "AREA"}
    # one kept converter serves sizes in turn: each result is what a fresh one makes of that frame
    for limits, want in ((DecodeLimits(), lambda f: f.to_ndarray(format="rgb24")),
                         (DecodeLimits(max_pixels=56 * 56), lambda f: f.reformat(**small).to_ndarray()),
                         (DecodeLimits(), lambda f: f.to_ndarray(format="rgb24"))):
        out = decode_video(clip_bytes, Sampling.uniform(4), backend="av", limits=limits)
        assert np.array_equal(out.frames, np.stack([want(frames[i]) for i in out.indices]))


def test_pool_kills_a_decode_that_holds_the_gil_and_keeps_going(clip_bytes):
    with DecodePool(workers=1, fn=hang.hold_gil_forever) as pool:
        t0 = time.monotonic()
        with pytest.raises(DecodeTimeout, match="timeout"):
            pool.decode(clip_bytes, timeout=1.0)
        assert time.monotonic() - t0 < 20
        assert pool.restarts == 1
    with DecodePool(workers=2) as pool:  # a healthy pool decodes many clips concurrently
        futures = [pool.submit(clip_bytes, Sampling.uniform(2), timeout=30) for _ in range(6)]
        assert all(f.result().frames.shape == (2, 112, 112, 3) for f in futures)


def test_pool_survives_a_worker_crash(clip_bytes):
    with DecodePool(workers=1, fn=hang.crash) as pool:
        with pytest.raises(DecodeError, match="decoder-crashed"):
            pool.decode(clip_bytes, timeout=30)
    with DecodePool(workers=1, fn=hang.echo_len) as pool:
        assert pool.decode(clip_bytes, timeout=30) == len(clip_bytes)


def test_decode_video_timeout_runs_in_a_worker(clip_bytes):
    out = decode_video(clip_bytes, Sampling.uniform(3), backend="av", timeout=30)
    assert out.indices == [2, 8, 13]
