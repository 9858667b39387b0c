"""The dual encoder's data pipeline: batch shapes, deterministic order, exact resume, rank splits, bad samples, frame cache."""

from __future__ import annotations

import io
import itertools
import logging

import numpy as np
import pytest
import torch

import dualenc.data as data_mod
from dualenc.data import (
    DataConfig, Share, assign_shards, cache_config_hash, cache_frames, load_frames, make_loader,
)
from engine.errors import DecodeError
from engine.shards import ShardWriter, iter_shard, read_samples, read_stats
from engine.synth import SynthConfig, synth

N_TOY = 24  # 4 shards of 6 samples


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """4 toy shards (24 clips of 8 frames, 56x56) and each sample's txt and gt.txt."""
    out = tmp_path_factory.mktemp("dualenc_toy")
    synth(SynthConfig(split="test", n=N_TOY, seed=0, shard_size=6, frames=8, size=56), out, progress=False)
    texts = {s["__key__"]: {k: s[k].decode() for k in ("txt", "gt.txt")} for s in read_samples(str(out / "test-*.tar"))}
    assert len(texts) == N_TOY
    return out, str(out / "test-*.tar"), texts


@pytest.fixture(scope="module")
def bad_shards(toy, tmp_path_factory):
    """A shard with 3 good clips, one undecodable video, one without txt, one with non-UTF-8 txt; and a non-tar."""
    out = tmp_path_factory.mktemp("dualenc_bad")
    good = list(itertools.islice(read_samples(str(toy[0] / "test-00000.tar")), 3))
    with ShardWriter(out, "bad-00000.tar") as w:
        for i, s in enumerate(good):
            w.write({"__key__": f"copy{i}", "mp4": s["mp4"], "txt": s["txt"], "gt.txt": s["gt.txt"]})
        w.write({"__key__": "badvideo", "mp4": b"this is not a video at all" * 8, "txt": "a video that is not"})
        w.write({"__key__": "notext", "mp4": good[0]["mp4"], "gt.txt": "only a ground truth"})
        w.write({"__key__": "badutf8", "mp4": good[0]["mp4"], "txt": b"\xff\xfe broken"})
        w.commit(config_hash="test", tool="test")
    (out / "junk-00000.tar").write_bytes(b"\x00garbage, not a tar" * 10)
    return out


def _cfg(pattern, **kw) -> DataConfig:
    return DataConfig(shards=pattern, **{"frames": 4, "batch_size": 4, "workers": 0, "shuffle_buffer": 8, **kw})


def _take(cfg, n, **kw) -> list[dict]:
    it = make_loader(cfg, **kw)
    try:
        return list(itertools.islice(it, n))
    finally:
        it.close()  # stops DataLoader workers


def _keys(batches) -> list[list[str]]:
    return [b["keys"] for b in batches]


def _by_epoch(batches) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for b in batches:
        out.setdefault(b["epoch"], []).extend(b["keys"])
    return out


# --------------------------------------------------------------------------- config and split

def test_config_names_every_bad_flag():
    with pytest.raises(ValueError) as err:
        DataConfig(shards=[], text_key="", frames=0, batch_size=0, workers=-1, shuffle_buffer=-1, seed=-1,
                   decode_backend="ffmpeg", size=-2, hard_negatives="hardest")
    msg = str(err.value)
    for flag in ("--shards", "--text-key", "--frames", "--batch-size", "--workers", "--shuffle-buffer", "--seed",
                 "--decode-backend", "--size", "--hard-negatives"):
        assert flag in msg
    with pytest.raises(ValueError, match="rank"):
        make_loader(DataConfig(shards="x.tar"), rank=2, world_size=2)


@pytest.mark.parametrize("n_urls", [1, 2, 3, 5, 8])
def test_assign_shards_partitions_every_epoch(n_urls):
    urls = [f"s{i}.tar" for i in range(n_urls)]
    samples_per_shard = 7
    for world, workers in [(1, 1), (1, 3), (2, 2), (3, 2)]:
        for epoch in range(3):
            seen = []
            for rank in range(world):
                for w in range(workers):
                    share = assign_shards(urls, seed=1, epoch=epoch, rank=rank, world_size=world, worker=w,
                                          workers=workers)
                    assert share.urls, "every stream gets data"
                    seen += [(u, i) for u in share.urls for i in range(samples_per_shard)
                             if i % share.every == share.offset]
            assert sorted(seen) == sorted((u, i) for u in urls for i in range(samples_per_shard))
    # enough shards: rank r takes urls[r::world], its worker w takes [w::W] of those (in the epoch's order)
    a = assign_shards(urls, seed=1, epoch=0, rank=1, world_size=2, worker=1, workers=2)
    if n_urls >= 4:
        order = [urls[i] for i in np.random.default_rng([1, 0]).permutation(n_urls)]
        assert a == Share(tuple(order[1::2][1::2]))


# --------------------------------------------------------------------------- batches

def test_batches_shapes_dtypes_and_chosen_text(toy):
    _, pattern, texts = toy
    for text_key in ("txt", "gt.txt"):
        for b in _take(_cfg(pattern, text_key=text_key), 3):
            assert b["frames"].dtype == torch.uint8 and tuple(b["frames"].shape) == (4, 4, 56, 56, 3)
            assert b["texts"] == [texts[k][text_key].strip() for k in b["keys"]]
            assert b["skipped"] == {}
    b = _take(_cfg(pattern, size=32), 1)[0]
    assert tuple(b["frames"].shape) == (4, 4, 32, 32, 3)


def test_same_config_same_batches_and_every_sample_once_per_epoch(toy):
    _, pattern, _ = toy
    cfg = _cfg(pattern)
    a, b = _take(cfg, 10), _take(cfg, 10)
    assert _keys(a) == _keys(b)
    assert all(torch.equal(x["frames"], y["frames"]) for x, y in zip(a, b))
    assert [x["batch"] for x in a] == list(range(10))
    epochs = _by_epoch(a)
    assert set(epochs) == {0, 1}  # 6 batches per epoch: the run crosses a boundary
    assert sorted(epochs[0]) == sorted(toy[2])  # 24 samples, batches of 4: nothing dropped, none twice
    assert len(set(epochs[1])) == len(epochs[1])
    assert epochs[1] != epochs[0][:len(epochs[1])], "a new epoch reshuffles"
    other = _take(_cfg(pattern, seed=1), 6)
    assert _keys(other) != _keys(a[:6]) and sorted(_by_epoch(other)[0]) == sorted(epochs[0])


def test_resume_in_process_skips_without_decoding(toy, monkeypatch):
    _, pattern, _ = toy
    cfg = _cfg(pattern)
    full = _take(cfg, 10)
    calls = []
    real = data_mod.decode_video

    def counting(data, *args, **kw):
        calls.append(len(data))
        return real(data, *args, **kw)

    monkeypatch.setattr(data_mod, "decode_video", counting)
    resumed = _take(cfg, 5, start_batch=5)
    assert _keys(resumed) == _keys(full[5:]) and [b["batch"] for b in resumed] == list(range(5, 10))
    assert all(torch.equal(x["frames"], y["frames"]) for x, y in zip(resumed, full[5:]))
    assert len(calls) == 5 * cfg.batch_size, "the 5 skipped batches were not decoded"


def test_workers_deterministic_and_resumable(toy):
    _, pattern, keys = toy
    cfg = _cfg(pattern, workers=2)
    a, b = _take(cfg, 10), _take(cfg, 10)
    assert _keys(a) == _keys(b) and [x["batch"] for x in a] == list(range(10))
    # each worker reads 2 of the 4 shards: 3 batches per epoch each, batches 0-5 are epoch 0
    assert [x["worker"] for x in a] == [0, 1] * 5 and [x["epoch"] for x in a] == [0] * 6 + [1] * 4
    assert sorted(_by_epoch(a)[0]) == sorted(keys)
    resumed = _take(cfg, 5, start_batch=5)  # odd: the round-robin must start at worker 1
    assert _keys(resumed) == _keys(a[5:]) and [x["batch"] for x in resumed] == list(range(5, 10))
    assert all(torch.equal(x["frames"], y["frames"]) for x, y in zip(resumed, a[5:]))


def test_ranks_see_disjoint_samples(toy):
    out, pattern, keys = toy
    per_rank = [_by_epoch(_take(_cfg(pattern), 3, rank=r, world_size=2))[0] for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(keys)
    # one shard for two ranks: samples are split instead of shards, so each rank still gets some
    one = str(out / "test-00001.tar")
    halves = [_take(_cfg(one, batch_size=3, shuffle_buffer=0), 1, rank=r, world_size=2)[0]["keys"] for r in range(2)]
    assert not set(halves[0]) & set(halves[1]) and len(set(halves[0] + halves[1])) == 6


def test_twin_hard_negatives_keep_each_pair_together_deterministically_and_resumably(toy):
    out, pattern, keys = toy
    stored = [[s["__key__"] for s in read_samples(str(shard))] for shard in sorted(out.glob("test-*.tar"))]
    pairs = {(k[:-4], k) for shard in stored for k in shard if k.endswith("-rev") and k[:-4] in shard}
    assert len(pairs) >= 3, stored  # the fixture has time-reversed twins stored side by side

    def split_pairs(batches) -> int:
        order = [k for b in batches for k in b["keys"]]
        return sum(abs(order.index(a) - order.index(b)) != 1 for a, b in pairs)

    cfg = _cfg(pattern, hard_negatives="twins")
    a = _take(cfg, 6)  # epoch 0: 24 samples, none dropped
    assert sorted(_by_epoch(a)[0]) == sorted(keys) and split_pairs(a) == 0
    assert split_pairs(_take(_cfg(pattern), 6)) > 0, "without the option the shuffle separates twins"
    assert _keys(_take(cfg, 10)) == _keys(_take(cfg, 10)[:10])
    full = _take(cfg, 10)
    resumed = _take(cfg, 5, start_batch=5)
    assert _keys(resumed) == _keys(full[5:]) and [b["batch"] for b in resumed] == list(range(5, 10))
    assert all(torch.equal(x["frames"], y["frames"]) for x, y in zip(resumed, full[5:]))


def test_too_little_data_for_a_batch_says_which_flag(toy):
    with pytest.raises(ValueError, match="--batch-size"):
        _take(_cfg(str(toy[0] / "test-00000.tar"), batch_size=7), 1)


# --------------------------------------------------------------------------- bad input

def test_bad_samples_are_skipped_counted_and_logged_once(toy, bad_shards, caplog):
    _, pattern, _ = toy
    shards = [pattern, str(bad_shards / "bad-00000.tar"), str(bad_shards / "junk-00000.tar")]
    cfg = _cfg(shards)
    with caplog.at_level(logging.WARNING, logger="dualenc.data"):
        batches = _take(cfg, 14)  # 24 + 3 copies + the bad video pass the cheap checks: 7 batches per epoch
    assert [b["epoch"] for b in batches] == [0] * 7 + [1] * 7
    assert batches[-1]["skipped"] == {"not-a-video": 2, "missing-text": 2, "bad-utf8": 2, "not-a-tar": 2}
    for b in batches:
        assert tuple(b["frames"].shape) == (4, 4, 56, 56, 3) and len(b["keys"]) == 4
        assert not {"badvideo", "notext", "badutf8"} & set(b["keys"])
    # the bad video's slot was refilled with another sample of its batch: one repeat per epoch
    for epoch_keys in _by_epoch(batches).values():
        assert len(epoch_keys) - len(set(epoch_keys)) == 1
    logged = [r.getMessage() for r in caplog.records]
    for key, reason in [("badvideo", "not-a-video"), ("notext", "missing-text"), ("badutf8", "bad-utf8")]:
        lines = [m for m in logged if f"'{key}'" in m]
        assert len(lines) == 1 and reason in lines[0] and "bad-00000.tar" in lines[0]


def test_frames_npy_is_never_unpickled():
    def sample(arr, allow_pickle=False):
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=allow_pickle)
        return {"__key__": "k", "__url__": "u.tar", "frames.npy": buf.getvalue()}

    with pytest.raises(DecodeError, match="bad-frames-npy"):
        load_frames(sample(np.array([{"a": 1}], dtype=object), allow_pickle=True), 1)
    truncated = sample(np.zeros((2, 4, 4, 3), np.uint8))
    truncated["frames.npy"] = truncated["frames.npy"][:-5]
    with pytest.raises(DecodeError, match="bad-frames-npy"):
        load_frames(truncated, 2)
    with pytest.raises(DecodeError, match="frames-mismatch"):
        load_frames(sample(np.zeros((3, 4, 4, 3), np.uint8)), 2)
    assert load_frames(sample(np.ones((2, 4, 4, 3), np.uint8)), 2, size=2).shape == (2, 2, 2, 3)
    a = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    for stored in (a, np.asfortranarray(a)):  # read without a copy, in either memory order
        assert np.array_equal(load_frames(sample(stored), 2), a)


# --------------------------------------------------------------------------- frame cache

def test_cache_frames_matches_decoding_and_resumes(toy, bad_shards, tmp_path, monkeypatch):
    src, pattern, keys = toy
    paths = cache_frames(pattern, tmp_path, frames=4, workers=2, progress=False)
    assert [p.name for p in paths] == [f"test-{i:05d}.tar" for i in range(4)]
    cached = list(read_samples([str(p) for p in paths]))
    assert sorted(s["__key__"] for s in cached) == sorted(keys)
    assert all("frames.npy" in s and "mp4" not in s and {"txt", "gt.txt", "json"} <= set(s) for s in cached)
    assert read_stats(tmp_path, paths[0].name).config_hash == cache_config_hash(4, 0, ("txt", "gt.txt", "alt.txt"),
                                                                               "av")

    from_videos = _take(_cfg(pattern, text_key="gt.txt"), 8)
    calls = []

    def no_decoding(*args, **kw):
        calls.append(1)
        raise AssertionError("decode_video called")

    monkeypatch.setattr(data_mod, "decode_video", no_decoding)  # workers=0: the loader runs in this process
    from_cache = _take(_cfg(str(tmp_path / "test-*.tar"), text_key="gt.txt"), 8)
    assert calls == [], "a loader over the cache never decodes video"
    assert _keys(from_cache) == _keys(from_videos)
    assert [b["texts"] for b in from_cache] == [b["texts"] for b in from_videos]
    assert all(torch.equal(a["frames"], b["frames"]) for a, b in zip(from_cache, from_videos))

    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert cache_frames(pattern, tmp_path, frames=4, progress=False) == paths  # committed: nothing decoded
    assert [p.stat().st_mtime_ns for p in paths] == mtimes and calls == []
    monkeypatch.undo()

    bad = cache_frames(str(bad_shards / "*.tar"), tmp_path / "bad", frames=4, progress=False)
    stats = read_stats(tmp_path / "bad", "bad-00000.tar")
    assert (stats.n_ok, stats.failures_by_reason) == (5, {"not-a-video": 1})  # text is the loader's business
    assert [s["__key__"] for s in iter_shard(str(bad[0]))] == ["copy0", "copy1", "copy2", "notext", "badutf8"]
    assert read_stats(tmp_path / "bad", "junk-00000.tar").failures_by_reason == {"not-a-tar": 1}
