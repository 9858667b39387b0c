"""A bad-input corpus built on the fly: hostile samples mixed into good toy-world shards.

Every builder here writes plain ``tarfile`` archives (members named ``KEY.EXT``)
so that broken archives can be made too; nothing is downloaded or stored in the
repository. Good samples come from the toy world (`engine.synth`).

    corpus = build_corpus(tmp_path)
    corpus.urls                  # shards to read, in order
    corpus.expected              # {(url, key): Expected(cls, stage, reason)} for every bad key
    corpus.good                  # {(url, key)} that must decode
    corpus.written               # {(url, key)} present in the files (good | bad must equal it)

The cases (see `tests/test_bad_input.py` for what each must yield):
zero-byte video, truncated mp4 (no moov), random bytes, an HTML page, a sample
without video, a 1x4000 video, a 7680x4320 video (good: downscaled), an mp4 whose
mdat is garbage, non-UTF-8 text, invalid JSON, a dotted key, a ``../`` member
name, pickles in ``.pyd``/``.pth`` members (never unpickled), a tar cut inside a
member's data, an empty tar and a zero-byte tar.
"""

from __future__ import annotations

import functools
import io
import struct
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from engine.errors import DecodeError, MemberError, SampleError, ShardReadError
from engine.synth import SynthConfig, encode_h264, generate_samples

SHARD_KEY = "<shard>"

HTML_PAGE = (b"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>404 Not Found</title></head>\n"
             b"<body><h1>Not Found</h1><p>The requested URL /videos/clip.mp4 was not found.</p></body></html>\n")

RANDOM_SEED = 7  # np.random.default_rng(7).bytes(...) is not misprobed as any container (see the tests)


# --------------------------------------------------------------------------- good samples

@functools.lru_cache(maxsize=None)
def _good(n: int, seed: int) -> tuple[dict, ...]:
    out = []
    for s in generate_samples(SynthConfig(split="test", n=n, seed=seed)):
        out.append({k: (v.encode("utf-8") if isinstance(v, str) and k != "__key__" else v) for k, v in s.items()})
    return tuple(out)


def good_samples(n: int = 6, seed: int = 1) -> list[dict]:
    """Toy-world samples (``__key__`` plus bytes members), copied so callers may edit them."""
    return [dict(s) for s in _good(n, seed)]


def members(sample: dict, key: str | None = None) -> list[tuple[str, bytes]]:
    """``KEY.EXT`` tar members of a sample dict (``__``-prefixed fields are skipped)."""
    key = key or sample["__key__"]
    return [(f"{key}.{ext}", data if isinstance(data, bytes) else str(data).encode("utf-8"))
            for ext, data in sample.items() if not ext.startswith("__")]


# --------------------------------------------------------------------------- bad video bytes

def mp4_boxes(data: bytes) -> list[tuple[bytes, int, int]]:
    """Top-level MP4 boxes as (type, offset, size): 4-byte big-endian size + 4-byte type each."""
    out, i = [], 0
    while i + 8 <= len(data):
        size, typ = struct.unpack(">I4s", data[i:i + 8])
        if size == 1:  # 64-bit largesize follows the type
            size = struct.unpack(">Q", data[i + 8:i + 16])[0]
        elif size == 0:  # box extends to the end of the file
            size = len(data) - i
        if size < 8:
            raise ValueError(f"bad MP4 box size {size} at offset {i}")
        out.append((typ, i, size))
        i += size
    return out


def truncated_mp4(data: bytes, frac: float = 0.4) -> bytes:
    """The first ``frac`` of a clip: the toy mp4 keeps its moov (the index) at the end, so this has none."""
    types = [t for t, _, _ in mp4_boxes(data)]
    assert types[-1] == b"moov", f"expected moov last, got boxes {types}"
    cut = data[:int(len(data) * frac)]
    assert b"moov" not in cut
    return cut


def garbage_mdat(data: bytes, seed: int = 0) -> bytes:
    """The clip with its mdat payload overwritten by random bytes; ftyp and moov (the index) stay intact."""
    out = bytearray(data)
    boxes = mp4_boxes(data)
    hits = [(off, size) for typ, off, size in boxes if typ == b"mdat"]
    assert len(hits) == 1, f"expected one mdat box, got {boxes}"
    off, size = hits[0]
    out[off + 8:off + size] = np.random.default_rng(seed).bytes(size - 8)
    assert len(out) == len(data) and [b[0] for b in mp4_boxes(bytes(out))] == [b[0] for b in boxes]
    return bytes(out)


def random_bytes(n: int = 4096, seed: int = RANDOM_SEED) -> bytes:
    return np.random.default_rng(seed).bytes(n)


def thin_video(width: int = 1, height: int = 4000, n_frames: int = 2) -> bytes:
    """A ``width`` x ``height`` AVI of uncompressed RGB frames (H.264 4:2:0 can not be 1 px wide)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="avi") as container:
        stream = container.add_stream("rawvideo", rate=1)
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
        for k in range(n_frames):
            frame = np.full((height, width, 3), 60 + 40 * k, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return buf.getvalue()


@functools.lru_cache(maxsize=None)
def huge_video(n_frames: int = 1) -> bytes:
    """A 7680x4320 H.264 mp4 (``n_frames`` flat frames at 1 fps); encoding takes about a second."""
    frames = np.empty((n_frames, 4320, 7680, 3), np.uint8)
    for k in range(n_frames):
        frames[k] = (90 + 30 * k, 120, 150)
    return encode_h264(frames, fps=1)


def pickle_payload(path: str | Path) -> bytes:
    """Pickle opcodes that, if unpickled, call ``builtins.open(path, 'w')`` and so create ``path``.

    Protocol 0 by hand: GLOBAL builtins.open, MARK, two STRINGs, TUPLE, REDUCE, STOP.
    """
    p = str(path)
    assert "'" not in p and "\n" not in p
    return b"cbuiltins\nopen\n(S'" + p.encode() + b"'\nS'w'\ntR."


# --------------------------------------------------------------------------- tars

def write_tar(path: str | Path, items: list[tuple[str, bytes]]) -> str:
    """Writes members in order with ``tarfile`` (any name, even unsafe ones); returns the path as a str."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def member_offsets(path: str | Path) -> list[tarfile.TarInfo]:
    """The TarInfos of a complete tar (``offset`` = header, ``offset_data`` = data)."""
    with tarfile.open(path, "r:") as tf:
        return tf.getmembers()


# --------------------------------------------------------------------------- the corpus

@dataclass(frozen=True)
class Expected:
    """What a bad key must yield: an error of class ``cls`` at ``stage`` with ``reason``."""

    cls: type[SampleError]
    stage: str
    reason: str


@dataclass
class Corpus:
    urls: list[str]
    expected: dict[tuple[str, str], Expected] = field(default_factory=dict)  # bad keys (and shard rows)
    good: set[tuple[str, str]] = field(default_factory=set)
    written: set[tuple[str, str]] = field(default_factory=set)  # keys whose bytes are in the files
    sentinel: Path | None = None  # a file that must never exist (the pickles would create it)
    pickled: dict[str, bytes] = field(default_factory=dict)  # ext -> raw bytes of the pickle members
    pickled_key: str = "pickled"
    huge_key: str = "huge-8k"
    mixed_url: str = ""
    truncated_url: str = ""
    outside: Path | None = None  # where '../evil.mp4' would land if extracted

    @property
    def bad(self) -> set[tuple[str, str]]:
        return {k for k in self.expected if k[1] != SHARD_KEY}


def mixed_shard_items(tmp: Path, corpus: Corpus) -> list[tuple[str, bytes]]:
    """Good toy samples interleaved with every per-sample bad case; fills ``corpus`` for ``corpus.mixed_url``."""
    url = corpus.mixed_url
    good = good_samples(6, seed=1)
    clip = good[0]["mp4"]
    meta = {"json": good[0]["json"], "txt": good[0]["txt"]}  # valid side members for bad-video samples
    items: list[tuple[str, bytes]] = []

    def add_good(sample: dict, key: str | None = None) -> None:
        key = key or sample["__key__"]
        items.extend(members(sample, key))
        corpus.good.add((url, key))
        corpus.written.add((url, key))

    def add_bad(key: str, sample: dict, cls, stage: str, reason: str) -> None:
        items.extend(members(sample, key))
        corpus.expected[(url, key)] = Expected(cls, stage, reason)
        corpus.written.add((url, key))

    add_good(good[0])
    add_bad("bad-empty-video", {"mp4": b"", **meta}, DecodeError, "decode", "empty-video")
    add_good(good[1])
    add_bad("bad-truncated-mp4", {"mp4": truncated_mp4(clip), **meta}, DecodeError, "decode", "not-a-video")
    add_good(good[2])
    add_bad("bad-random-mp4", {"mp4": random_bytes(), **meta}, DecodeError, "decode", "not-a-video")
    add_bad("bad-html-mp4", {"mp4": HTML_PAGE, **meta}, DecodeError, "decode", "not-a-video")
    add_good(good[3])
    add_bad("bad-no-video", dict(meta), MemberError, "parse", "no-video-member")
    add_bad("bad-thin-avi", {"avi": thin_video(1, 4000), **meta}, DecodeError, "decode", "degenerate-frame-size")
    add_good({"mp4": huge_video(1), **meta}, corpus.huge_key)
    add_bad("bad-garbage-mdat", {"mp4": garbage_mdat(clip), **meta}, DecodeError, "decode", "no-decodable-frame")
    add_good(good[4])
    # no gt.txt here, so `engine decode` (which prefers gt.txt) reads the bad txt too
    add_bad("bad-utf8-txt", {"mp4": clip, "json": meta["json"], "txt": b"\xff\xfe bad"},
            MemberError, "parse", "bad-utf8")
    add_bad("bad-json", {"mp4": clip, "json": b'{"caption": "unterminated', "txt": meta["txt"]},
            MemberError, "parse", "bad-json")
    # a dotted key: webdataset splits at the first dot, so this is key 'clip' with members 'v2.mp4', 'v2.json'
    items += [("clip.v2.mp4", clip), ("clip.v2.json", meta["json"])]
    corpus.expected[(url, "clip")] = Expected(MemberError, "parse", "dotted-key")
    corpus.written.add((url, "clip"))
    # an unsafe member name: key '../evil'
    items += [("../evil.mp4", clip), ("../evil.json", meta["json"])]
    corpus.expected[(url, "../evil")] = Expected(MemberError, "parse", "unsafe-member-name")
    corpus.written.add((url, "../evil"))
    corpus.outside = tmp.parent / "evil.mp4"
    # pickles that would create the sentinel if anything unpickled them; the sample itself is good
    corpus.sentinel = tmp / "PWNED"
    payload = pickle_payload(corpus.sentinel)
    corpus.pickled = {"pyd": payload, "pth": payload}
    add_good({"mp4": clip, **meta, **corpus.pickled}, corpus.pickled_key)
    add_good(good[5])
    return items


def build_corpus(tmp: str | Path) -> Corpus:
    """Writes the mixed shard, a truncated shard, an empty tar and a zero-byte tar under ``tmp``."""
    tmp = Path(tmp)
    corpus = Corpus(urls=[])

    # 1. the mixed shard
    corpus.mixed_url = str(tmp / "mixed-00000.tar")
    write_tar(corpus.mixed_url, mixed_shard_items(tmp, corpus))
    corpus.urls.append(corpus.mixed_url)

    # 2. a shard cut in the middle of the data of the second sample's video member
    full = tmp / "full-00001.tar"
    samples = good_samples(6, seed=1)[:4]
    keys = [f"trunc-{i}" for i in range(len(samples))]
    write_tar(full, [m for s, k in zip(samples, keys) for m in members(s, k)])
    infos = member_offsets(full)
    victim = next(i for i in infos if i.name == f"{keys[1]}.mp4")
    cut = victim.offset_data + victim.size // 2
    url = corpus.truncated_url = str(tmp / "truncated-00001.tar")
    Path(url).write_bytes(full.read_bytes()[:cut])
    full.unlink()
    corpus.urls.append(url)
    corpus.good.add((url, keys[0]))
    corpus.expected[(url, keys[1])] = Expected(ShardReadError, "read", "truncated-tar")
    corpus.expected[(url, SHARD_KEY)] = Expected(ShardReadError, "read", "truncated-tar")
    # keys with a member header before the cut are in the file; the rest is (knowably) lost
    corpus.written |= {(url, i.name.split(".", 1)[0]) for i in infos if i.offset < cut}

    # 3. an empty tar (only the end-of-archive blocks) and 4. a zero-byte file
    empty = tmp / "empty-00002.tar"
    tarfile.open(empty, "w").close()
    zero = tmp / "zero-00003.tar"
    zero.write_bytes(b"")
    for path in (empty, zero):
        corpus.urls.append(str(path))
        corpus.expected[(str(path), SHARD_KEY)] = Expected(ShardReadError, "read", "empty-shard")
    return corpus

