"""Bad input, mixed into good shards: every bad sample is a typed error naming shard, key and reason,
and every good sample around it still comes through.

The corpus is built on the fly (`tests.badcorpus`); nothing hostile is stored in the repository.
"""

from __future__ import annotations

import ast
import pickle
import re
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest

from engine.decode import DecodeLimits, Sampling, decode_video
from engine.decode_pool import DecodePool
from engine.errors import DecodeError, MemberError, SampleError, ShardReadError
from engine.shards import ErrorCollector, iter_shard, read_json, read_samples, read_text, video_member
from tests import badcorpus as bc

BACKENDS = ["av", "auto"]  # 'auto' tries decord first when it is installed, then falls back to PyAV
SHARD_KEY = bc.SHARD_KEY


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> bc.Corpus:
    return bc.build_corpus(tmp_path_factory.mktemp("badcorpus"))


def _read(url: str) -> tuple[dict[str, dict], ErrorCollector]:
    errors = ErrorCollector()
    samples = {s["__key__"]: s for s in iter_shard(url, handler=errors)}
    return samples, errors


def _assert_names(exc: SampleError, url: str, key: str) -> None:
    assert exc.url == url and exc.key == key, (exc.url, exc.key, str(exc))
    assert url in str(exc) and repr(key) in str(exc), str(exc)
    row = exc.to_row()
    assert (row.url, row.key, row.stage, row.reason) == (url, key, exc.stage, exc.reason)


def _shard(tmp_path: Path, *bad: tuple[str, bytes], name: str = "s-00000.tar") -> tuple[str, list[str]]:
    """A shard with ``bad`` members between two good samples; returns its URL and the good keys."""
    good = bc.good_samples(2, seed=1)
    items = bc.members(good[0]) + list(bad) + bc.members(good[1])
    return bc.write_tar(tmp_path / name, items), [s["__key__"] for s in good]


# =========================================================================== the whole path

def test_mixed_corpus_full_path(corpus):
    """Reader -> members -> decode pool, as the engine runs it: every error typed and located, nothing lost."""
    errors = ErrorCollector()
    read: dict[tuple[str, str], dict] = {}
    decoded = {}
    with DecodePool(workers=2) as pool:
        pending = []
        for sample in read_samples(corpus.urls, handler=errors):
            url, key = sample["__url__"], sample["__key__"]
            assert (url, key) not in read, f"sample {key!r} of {url} yielded twice"
            read[(url, key)] = sample
            try:
                ext = video_member(sample)
                read_text(sample, "txt")
                read_json(sample, "json")
            except MemberError as exc:
                errors(exc)
                continue
            pending.append((url, key, pool.submit(sample[ext], Sampling.uniform(4))))
        for url, key, future in pending:
            try:
                decoded[(url, key)] = future.result(timeout=120)
            except DecodeError as exc:
                errors(exc.located(url=url, key=key))

    by_key: dict[tuple[str, str], list[SampleError]] = defaultdict(list)
    for exc in errors.errors:
        by_key[(exc.url, exc.key)].append(exc)
    got = {k: [(type(e).__name__, e.stage, e.reason) for e in v] for k, v in by_key.items()}
    want = {k: [(e.cls.__name__, e.stage, e.reason)] for k, e in corpus.expected.items()}
    assert got == want  # every bad key (and shard row) exactly once, with its class, stage and reason

    for (url, key), [exc] in by_key.items():
        assert isinstance(exc, corpus.expected[(url, key)].cls)
        _assert_names(exc, url, key)

    assert set(decoded) == corpus.good, "every good sample decodes"
    assert not corpus.good & corpus.bad
    assert corpus.good | corpus.bad == corpus.written, "nothing written is lost without a report"

    for (url, key), frames in decoded.items():
        assert frames.frames.dtype.name == "uint8" and frames.frames.ndim == 4
        assert len(frames.indices) == 4 and frames.frames.shape[0] == 4 and frames.frames.shape[-1] == 3
        if key == corpus.huge_key:
            _, h, w, _ = frames.frames.shape
            assert frames.source_size == (7680, 4320)
            assert w * h <= DecodeLimits().max_pixels and (w, h) == (1280, 720)
            assert any("downscaled" in n for n in frames.notes), frames.notes
        else:
            assert frames.frames.shape[1:3] == (112, 112) and frames.notes == []

    pickled = read[(corpus.mixed_url, corpus.pickled_key)]
    assert {ext: pickled[ext] for ext in corpus.pickled} == corpus.pickled  # raw bytes, never unpickled
    assert not corpus.sentinel.exists()
    assert not corpus.outside.exists()


def test_cli_decode_reports_and_goes_on(corpus, capsys):
    """`engine decode` on the mixed shard: exit 0, a line per good clip, a summary with the error count."""
    from engine.cli import main

    url = corpus.mixed_url
    rc = main(["decode", "--shards", url, "--frames", "4"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    # the CLI reads gt.txt (else txt) but never the json member: 'bad-json' decodes fine there
    cli_bad = {k: e for k, e in corpus.expected.items() if k[0] == url and e.reason != "bad-json"}
    n_ok = len([k for k in corpus.good if k[0] == url]) + 1
    summary = out.strip().splitlines()[-1]
    m = re.fullmatch(r"(\d+) sample\(s\) decoded, (\d+) error\(s\)(?: (\{.*\}))?", summary)
    assert m, summary
    assert (int(m.group(1)), int(m.group(2))) == (n_ok, len(cli_bad)), summary
    by_reason: dict[str, int] = {}
    for e in cli_bad.values():
        by_reason[e.reason] = by_reason.get(e.reason, 0) + 1
    assert ast.literal_eval(m.group(3)) == by_reason
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == len(cli_bad)
    for (_, key), e in cli_bad.items():
        [line] = [line for line in error_lines if f"key {key!r}" in line]
        assert url in line and e.reason in line and f"{e.stage} failed" in line
    assert f"{corpus.huge_key}" in out and "4 frames 1280x720 of 1" in out
    assert not corpus.sentinel.exists()


# =========================================================================== decode cases, one by one

def _decode_error(data: bytes, backend: str, limits: DecodeLimits = DecodeLimits()) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode_video(data, Sampling.uniform(4), backend=backend, limits=limits)
    assert info.value.stage == "decode"
    return info.value


DECODE_CASES = {
    "zero-byte": (lambda: b"", "empty-video"),
    "truncated-mp4": (lambda: bc.truncated_mp4(bc.good_samples(1)[0]["mp4"]), "not-a-video"),
    "random-bytes": (lambda: bc.random_bytes(), "not-a-video"),
    "html-page": (lambda: bc.HTML_PAGE, "not-a-video"),
    "thin-1x4000": (lambda: bc.thin_video(1, 4000), "degenerate-frame-size"),
    "thin-4000x1": (lambda: bc.thin_video(4000, 1), "degenerate-frame-size"),
    "garbage-mdat": (lambda: bc.garbage_mdat(bc.good_samples(1)[0]["mp4"]), "no-decodable-frame"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_case(case, backend):
    make, reason = DECODE_CASES[case]
    exc = _decode_error(make(), backend)
    assert exc.reason == reason, str(exc)


def test_truncated_mp4_has_no_index():
    """The toy mp4 keeps moov at its end: the first 40% is ftyp + part of mdat, which no demuxer opens."""
    clip = bc.good_samples(1)[0]["mp4"]
    assert [t for t, _, _ in bc.mp4_boxes(clip)] == [b"ftyp", b"free", b"mdat", b"moov"]
    exc = _decode_error(bc.truncated_mp4(clip), "av")
    assert exc.reason == "not-a-video" and "no container format recognised" in exc.detail


def test_garbage_mdat_keeps_a_valid_container():
    """The corrupted clip still probes as a 112x112 H.264 stream: only its packets are garbage."""
    from engine.decode import probe

    clip = bc.good_samples(1)[0]["mp4"]
    bad = bc.garbage_mdat(clip)
    p = probe(bad)
    assert (p.width, p.height) == (112, 112)
    assert _decode_error(bad, "av").reason == "no-decodable-frame"


def test_thin_video_is_a_real_video():
    """The 1x4000 clip is valid: with the aspect limit lifted it decodes to 1-px-wide frames."""
    fr = decode_video(bc.thin_video(1, 4000), Sampling.uniform(2), backend="av",
                      limits=DecodeLimits(max_aspect=1e6, max_pixels=10**7))
    assert fr.frames.shape == (2, 4000, 1, 3) and fr.num_frames == 2


def test_random_bytes_are_not_misprobed():
    """The corpus's random blob is rejected as 'not-a-video' (the seed is checked, not assumed)."""
    data = bc.random_bytes()
    assert not data.startswith(b"[")
    assert _decode_error(data, "av").reason == "not-a-video"


def test_random_bytes_misprobed_as_lyrics_are_not_a_video():
    data = bc.random_bytes(seed=289)  # about 1 random blob in 300 starts like an LRC file
    exc = _decode_error(data, "av")
    assert exc.reason == "not-a-video", str(exc)


@pytest.mark.parametrize("backend", BACKENDS)
def test_8k_is_downscaled(backend):
    fr = decode_video(bc.huge_video(1), Sampling.uniform(2), backend=backend)
    _, h, w, _ = fr.frames.shape
    assert w * h <= DecodeLimits().max_pixels
    assert fr.source_size == (7680, 4320)
    assert any("downscaled" in n and "7680x4320" in n for n in fr.notes), fr.notes
    assert abs(w / h - 16 / 9) < 0.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_8k_is_rejected_above_max_input_pixels(backend):
    exc = _decode_error(bc.huge_video(1), backend, DecodeLimits(max_input_pixels=4096 * 2160))
    assert exc.reason == "frame-too-large" and "7680x4320" in exc.detail


def test_decode_pool_errors_are_typed_and_located():
    """Errors cross the worker process boundary typed; `located` adds shard and key."""
    with DecodePool(workers=1) as pool:
        futures = {name: pool.submit(make(), Sampling.uniform(4)) for name, (make, _) in DECODE_CASES.items()}
        for name, future in futures.items():
            with pytest.raises(DecodeError) as info:
                future.result(timeout=60)
            exc = info.value.located(url="s3://bucket/x.tar", key=name)
            assert exc.reason == DECODE_CASES[name][1] and exc.stage == "decode"
            _assert_names(exc, "s3://bucket/x.tar", name)


# =========================================================================== member cases

def _sample(**members) -> dict:
    return {"__key__": "k1", "__url__": "/data/s-00000.tar", **members}


def test_no_video_member():
    with pytest.raises(MemberError) as info:
        video_member(_sample(txt=b"hello", json=b"{}"))
    assert info.value.reason == "no-video-member" and info.value.stage == "parse"
    _assert_names(info.value, "/data/s-00000.tar", "k1")


def test_bad_utf8():
    with pytest.raises(MemberError) as info:
        read_text(_sample(txt=b"\xff\xfe bad"), "txt")
    assert info.value.reason == "bad-utf8" and "byte 0" in info.value.detail
    _assert_names(info.value, "/data/s-00000.tar", "k1")


def test_bad_json():
    with pytest.raises(MemberError) as info:
        read_json(_sample(json=b'{"caption": "unterminated'), "json")
    assert info.value.reason == "bad-json" and "line 1" in info.value.detail
    _assert_names(info.value, "/data/s-00000.tar", "k1")


def test_dotted_key_through_the_reader(tmp_path):
    clip = bc.good_samples(1)[0]["mp4"]
    url, good = _shard(tmp_path, ("clip.v2.mp4", clip), ("clip.v2.json", b"{}"))
    samples, errors = _read(url)
    assert not errors.errors and list(samples) == [good[0], "clip", good[1]]
    assert set(samples["clip"]) >= {"v2.mp4", "v2.json"}
    with pytest.raises(MemberError) as info:
        video_member(samples["clip"])
    assert info.value.reason == "dotted-key" and "'clip.v2'" in info.value.detail
    _assert_names(info.value, url, "clip")


@pytest.mark.parametrize("name", ["../evil.mp4", "sub/../../evil.mp4", "ABS/evil.mp4"])
def test_unsafe_member_name(tmp_path, monkeypatch, name):
    shard_dir = tmp_path / "a" / "b"
    shard_dir.mkdir(parents=True)
    monkeypatch.chdir(shard_dir)  # were a member extracted relative to the cwd, it would land in tmp_path
    if name.startswith("ABS/"):
        name = str(tmp_path / "abs" / "evil.mp4")
    clip = bc.good_samples(1)[0]["mp4"]
    key = name[:-len(".mp4")]
    url, good = _shard(shard_dir, (name, clip), (key + ".json", b"{}"))
    samples, errors = _read(url)
    assert list(samples) == good  # the unsafe sample is not yielded, its neighbours are
    [exc] = errors.errors
    assert isinstance(exc, MemberError) and exc.reason == "unsafe-member-name" and exc.stage == "parse"
    _assert_names(exc, url, key)
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["a", "b", Path(url).name])


def test_pickles_are_never_unpickled(tmp_path):
    # the payload is live: unpickling it does create its file
    control = tmp_path / "control"
    pickle.loads(bc.pickle_payload(control)).close()  # noqa: S301 - our own bytes, to prove they bite
    assert control.exists()

    sentinel = tmp_path / "PWNED"
    payload = bc.pickle_payload(sentinel)
    clip = bc.good_samples(1)[0]["mp4"]
    url, good = _shard(tmp_path, ("pk.mp4", clip), ("pk.pyd", payload), ("pk.pth", payload),
                       ("pk.pickle", payload))
    samples, errors = _read(url)
    assert not errors.errors and list(samples) == [good[0], "pk", good[1]]
    assert samples["pk"]["pyd"] == samples["pk"]["pth"] == samples["pk"]["pickle"] == payload
    assert video_member(samples["pk"]) == "mp4"
    assert not sentinel.exists()


# =========================================================================== broken tars

def _truncated(tmp_path: Path, where) -> tuple[str, list[str]]:
    """A 4-sample shard cut at ``where(infos)``; returns the URL and the keys."""
    samples = bc.good_samples(6, seed=1)[:4]
    keys = [f"t{i}" for i in range(4)]
    full = bc.write_tar(tmp_path / "full.tar", [m for s, k in zip(samples, keys) for m in bc.members(s, k)])
    cut = where(bc.member_offsets(full))
    url = str(tmp_path / "cut-00000.tar")
    Path(url).write_bytes(Path(full).read_bytes()[:cut])
    return url, keys


def _mp4_info(infos, key):
    return next(i for i in infos if i.name == f"{key}.mp4")


def _json_info(infos, key):
    return next(i for i in infos if i.name == f"{key}.json")


@pytest.mark.parametrize("where", ["mp4-data", "json-data", "padding"])
def test_truncated_tar_inside_member_data(tmp_path, where):
    cuts = {
        "mp4-data": lambda infos: _mp4_info(infos, "t2").offset_data + 100,
        "json-data": lambda infos: _json_info(infos, "t2").offset_data + 10,
        # after the member's last byte, inside the zero padding to its 512-byte block
        "padding": lambda infos: _mp4_info(infos, "t2").offset_data + _mp4_info(infos, "t2").size + 1,
    }
    url, keys = _truncated(tmp_path, cuts[where])
    samples, errors = _read(url)
    assert list(samples) == keys[:2]  # every sample before the cut comes through, complete
    assert all({"mp4", "json", "txt", "gt.txt", "qa.json"} <= set(s) for s in samples.values())
    got = [(type(e), e.key, e.stage, e.reason) for e in errors.errors]
    assert got == [(ShardReadError, "t2", "read", "truncated-tar"),
                   (ShardReadError, SHARD_KEY, "read", "truncated-tar")]
    for exc in errors.errors:
        _assert_names(exc, url, exc.key)


@pytest.mark.parametrize("where", ["inside-header", "at-member-boundary", "at-sample-boundary"])
def test_truncated_tar_between_members(tmp_path, where):
    cuts = {
        "inside-header": lambda infos: _json_info(infos, "t2").offset + 100,
        "at-member-boundary": lambda infos: _json_info(infos, "t2").offset,
        "at-sample-boundary": lambda infos: _mp4_info(infos, "t2").offset,
    }
    url, keys = _truncated(tmp_path, cuts[where])
    samples, errors = _read(url)
    assert all({"mp4", "json", "txt", "gt.txt", "qa.json"} <= set(s) for s in samples.values()), \
        {k: sorted(s) for k, s in samples.items() if not k.startswith("__")}
    assert any(e.key == SHARD_KEY and e.reason == "truncated-tar" for e in errors.errors), \
        [str(e) for e in errors.errors]
    if where != "at-sample-boundary":
        assert list(samples) == keys[:2]
        assert [(e.key, e.reason) for e in errors.errors if e.key != SHARD_KEY] == [("t2", "truncated-tar")]


def test_corrupt_header_mid_shard(tmp_path):
    url, keys = _truncated(tmp_path, lambda infos: 1 << 30)  # the whole file
    infos = bc.member_offsets(url)
    data = bytearray(Path(url).read_bytes())
    off = _json_info(infos, "t2").offset
    data[off + 148:off + 156] = b"9999999\0"  # the header's checksum field
    Path(url).write_bytes(bytes(data))
    samples, errors = _read(url)
    assert all({"mp4", "json", "txt", "gt.txt", "qa.json"} <= set(s) for s in samples.values()), \
        {k: sorted(s) for k, s in samples.items() if not k.startswith("__")}
    assert list(samples) == keys[:2]
    assert any(e.key == SHARD_KEY for e in errors.errors), [str(e) for e in errors.errors]


@pytest.mark.parametrize("kind", ["empty-tar", "zero-byte-file"])
def test_empty_shards(tmp_path, kind):
    path = tmp_path / f"{kind}.tar"
    if kind == "empty-tar":
        tarfile.open(path, "w").close()
        assert path.stat().st_size > 0
    else:
        path.write_bytes(b"")
    samples, errors = _read(str(path))
    assert samples == {}
    [exc] = errors.errors
    assert isinstance(exc, ShardReadError) and (exc.key, exc.stage, exc.reason) == (SHARD_KEY, "read", "empty-shard")
    _assert_names(exc, str(path), SHARD_KEY)


def test_not_a_tar(tmp_path):
    path = tmp_path / "page.tar"
    path.write_bytes(bc.HTML_PAGE)
    samples, errors = _read(str(path))
    assert samples == {}
    assert [(e.key, e.reason) for e in errors.errors] == [(SHARD_KEY, "not-a-tar")]


def test_missing_shard_is_an_error_not_a_crash(tmp_path):
    url = str(tmp_path / "missing-00000.tar")
    samples, errors = _read(url)
    assert samples == {}
    [exc] = errors.errors
    assert (exc.key, exc.reason) == (SHARD_KEY, "unreadable-shard")
    _assert_names(exc, url, SHARD_KEY)


def test_reader_default_policy_raises(tmp_path):
    """Without a handler the first bad sample raises (webdataset's reraise policy), after the good ones."""
    url, good = _shard(tmp_path, ("../evil.mp4", b"x"))
    it = iter_shard(url)
    assert next(it)["__key__"] == good[0]
    with pytest.raises(MemberError, match="unsafe-member-name"):
        next(it)

