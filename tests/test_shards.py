"""Shard URLs, the reader against webdataset's own, and the atomic writer's commit protocol."""

from __future__ import annotations

import json

import pytest
import webdataset as wds

from data_specs import ErrorRow, ShardStats
from engine.errors import MemberError
from engine.shards import (
    ErrorCollector, ShardBusy, ShardWriter, expand_urls, ledger_path, read_samples, read_stats, stats_path,
)


def _write(out, name, keys, fail=()):
    with ShardWriter(out, name) as w:
        for k in keys:
            w.write({"__key__": k, "txt": f"caption of {k}", "bin": bytes([1, 2, 3])})
        for k in fail:
            w.fail(MemberError("bad-json", "broken", url=str(out / name), key=k))
        return w.commit(config_hash="abc", tool="test")


def test_expand_urls_braces_globs_and_file_urls(tmp_path):
    for i in range(3):
        _write(tmp_path, f"pool-{i:05d}.tar", [f"k{i}"])
    assert expand_urls(str(tmp_path / "pool-{00000..00002}.tar")) == [str(tmp_path / f"pool-{i:05d}.tar")
                                                                      for i in range(3)]
    assert expand_urls(str(tmp_path / "pool-*.tar")) == expand_urls(str(tmp_path / "pool-{00000..00002}.tar"))
    file_urls = expand_urls(f"file://{tmp_path}/pool-*.tar")
    assert len(file_urls) == 3 and all(u.startswith("file://") for u in file_urls)
    assert [s["__key__"] for s in read_samples(file_urls)] == ["k0", "k1", "k2"]
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        expand_urls(str(tmp_path / "nothing-*.tar"))


def test_reader_matches_webdataset_on_good_shards(tmp_path):
    _write(tmp_path, "a.tar", ["s0", "s1", "s2"])
    ours = list(read_samples(str(tmp_path / "a.tar")))
    theirs = list(wds.WebDataset(str(tmp_path / "a.tar"), shardshuffle=False))
    assert [s["__key__"] for s in ours] == [s["__key__"] for s in theirs]
    for a, b in zip(ours, theirs):
        assert {k: v for k, v in a.items() if not k.startswith("__")} == \
               {k: v for k, v in b.items() if not k.startswith("__")}


def test_commit_writes_tar_then_ledger_then_stats(tmp_path):
    stats = _write(tmp_path, "pool-00007.tar", ["a", "b"], fail=["c"])
    assert (tmp_path / "pool-00007.tar").exists()
    assert stats_path(tmp_path, "pool-00007.tar").name == "pool-00007_stats.json"
    assert read_stats(tmp_path, "pool-00007.tar") == stats
    assert (stats.n_input, stats.n_ok, stats.n_failed, stats.failures_by_reason) == (3, 2, 1, {"bad-json": 1})
    rows = [ErrorRow.model_validate_json(line) for line in ledger_path(tmp_path, "pool-00007.tar").read_text()
            .splitlines()]
    assert [(r.key, r.stage, r.reason) for r in rows] == [("c", "parse", "bad-json")]
    # marker written last: its mtime is not older than the shard's
    assert stats_path(tmp_path, "pool-00007.tar").stat().st_mtime_ns >= (tmp_path / "pool-00007.tar").stat().st_mtime_ns
    assert not list(tmp_path.glob(".*.tmp"))


def test_an_interrupted_writer_leaves_no_visible_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "pool-00001.tar") as w:
            w.write({"__key__": "a", "txt": "x"})
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    assert read_stats(tmp_path, "pool-00001.tar") is None


def test_a_second_writer_of_a_shard_being_written_is_refused_and_the_first_commits_whole(tmp_path):
    first = ShardWriter(tmp_path, "pool-00000.tar")
    first.write({"__key__": "a", "txt": "from the first writer"})
    with pytest.raises(ShardBusy, match="pool-00000.tar: another process is writing this shard"):
        ShardWriter(tmp_path, "pool-00000.tar")  # its own open file: flock treats it as another process
    first.write({"__key__": "b", "txt": "still the first"})
    first.commit(config_hash="abc", tool="test")
    assert [s["__key__"] for s in read_samples(str(tmp_path / "pool-00000.tar"))] == ["a", "b"]
    _write(tmp_path, "pool-00000.tar", ["c"])  # once committed, the shard can be rewritten
    assert [s["__key__"] for s in read_samples(str(tmp_path / "pool-00000.tar"))] == ["c"]
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, "pool-00001.tar"):
        raise RuntimeError("killed")
    _write(tmp_path, "pool-00001.tar", ["d"])  # an aborted writer lets go too
    assert not list(tmp_path.glob(".*"))


def test_writer_rejects_keys_with_dots(tmp_path):
    with ShardWriter(tmp_path, "x.tar") as w, pytest.raises(ValueError, match="no dot"):
        w.write({"__key__": "a.b", "txt": "x"})


def test_error_collector_counts_by_reason(tmp_path):
    (tmp_path / "empty.tar").write_bytes(b"")
    errors = ErrorCollector()
    assert list(read_samples(str(tmp_path / "empty.tar"), handler=errors)) == []
    assert errors.by_reason() == {"empty-shard": 1}
    assert str(tmp_path / "empty.tar") in str(errors.errors[0])


def test_stats_schema_round_trips():
    s = ShardStats(shard="a.tar", n_input=1, n_ok=1, n_failed=0, config_hash="h", tool="t")
    assert ShardStats.model_validate(json.loads(s.model_dump_json())) == s
