"""`engine caption` end to end on a tiny Qwen2-VL: the output contract, resume, bad input, hangs, kills, memory.

Every test runs the real pipeline (reader thread, decode worker processes, batched
`generate`, atomic shard commit) on toy-world shards made on the fly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from data_specs import CaptionRecord, ShardStats
from engine.caption import CaptionJob, ConfigMismatch
from engine.cli import main as engine_main
from engine.executors import run_caption
from engine.shards import iter_shard, ledger_path, read_stats
from engine.synth import SynthConfig, synth
from engine.verify import summarize, verify
from tests import badcorpus as bc
from tests.hang import HANG_MARKER

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(frames=4, batch_size=4, max_new_tokens=8, decode_workers=2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A tiny Qwen2-VL with loud random weights (greedy captions differ from clip to clip), saved to disk."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from captioner.tiny import build_tiny

    src = build_tiny(tmp_path_factory.mktemp("tiny-src"), layers=2, width=64)
    model = AutoModelForImageTextToText.from_pretrained(src)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    out = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(src).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def pool_shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("pool")
    synth(SynthConfig(split="pool", n=14, seed=5, shard_size=5), out, progress=False)
    return str(out / "pool-*.tar")


@pytest.fixture(scope="module")
def reference(model_dir, pool_shards, tmp_path_factory) -> Path:
    """An uninterrupted run: what every resumed or re-run job must reproduce."""
    out = tmp_path_factory.mktemp("ref")
    run_caption(CaptionJob(model=model_dir, **SMALL), pool_shards, out, progress=False)
    return out


def _outputs(out: Path) -> dict[str, dict[str, dict]]:
    """{shard name: {key: members}} of every output shard (members as bytes)."""
    return {p.name: {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")}
                     for s in iter_shard(str(p))} for p in sorted(out.glob("*.tar"))}


def _comparable(out: Path) -> dict[str, dict[str, dict]]:
    """`_outputs` without what legitimately differs between runs: the measured latency."""
    result = _outputs(out)
    for shard in result.values():
        for members in shard.values():
            record = json.loads(members["caption.json"])
            record["provenance"].pop("latency_s")
            members["caption.json"] = record
    return result


def _captions(out: Path) -> dict[str, str]:
    return {k: m["txt"].decode() for shard in _outputs(out).values() for k, m in shard.items()}


def _ledger(out: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(out.glob("*.errors.jsonl")) for line in p.read_text().splitlines()]


# =========================================================================== the output contract

def test_output_keeps_every_input_member_and_adds_caption_and_provenance(reference, pool_shards, model_dir):
    inputs = {Path(u).name: {s["__key__"]: s for s in iter_shard(u)} for u in sorted(Path(pool_shards).parent.glob(
        "pool-*.tar")) for u in [str(u)]}
    outputs = _outputs(reference)
    assert sorted(outputs) == sorted(inputs), "output shards map 1:1 to input shards, same names"
    texts = set()
    for name, samples in outputs.items():
        assert list(samples) == list(inputs[name]), "same keys, same order"
        for key, out in samples.items():
            src = inputs[name][key]
            for ext in ("mp4", "json", "gt.txt", "qa.json"):
                assert out[ext] == src[ext], f"{name}/{key}: member {ext} changed"
            assert out["alt.txt"] == src["txt"], "the former txt moves to alt.txt"
            record = CaptionRecord.model_validate_json(out["caption.json"])
            assert out["txt"].decode() == record.text and record.kind == "pseudo"
            prov = record.provenance
            assert prov.model_id == model_dir and prov.weights_hash and prov.backend == "hf"
            assert prov.prompt_id == "caption-video-v1" and prov.prompt_hash
            assert len(prov.frame_indices) == 4 and prov.decoder == "av" and prov.sampling.startswith("uniform-4@")
            assert prov.generation.max_new_tokens == 8 and not prov.generation.do_sample
            assert prov.input_tokens > 0 and 0 < prov.output_tokens <= 8
            assert prov.finish_reason in ("stop", "length") and prov.latency_s >= 0 and prov.engine_version
            texts.add(record.text)
        stats = read_stats(reference, name)
        assert (stats.n_input, stats.n_ok, stats.n_failed) == (len(samples), len(samples), 0)
        assert stats.source.endswith(name) and stats.config_hash and stats.clips_per_s > 0
        assert {"read", "decode", "decode_wait", "caption", "write", "total"} <= set(stats.seconds)
        assert ledger_path(reference, name).read_text() == ""
    assert len(texts) > 3, "captions depend on the clip"
    assert verify(pool_shards, reference).ok
    job = json.loads((reference / "engine_job.json").read_text())
    assert job["job"]["model"] == model_dir and job["config_hash"] == stats.config_hash


def test_batch_size_does_not_change_greedy_captions(reference, pool_shards, model_dir, tmp_path):
    run_caption(CaptionJob(model=model_dir, **(SMALL | {"batch_size": 1, "decode_workers": 1})), pool_shards,
                tmp_path, progress=False)
    assert _captions(tmp_path) == _captions(reference)


def test_rerun_skips_committed_shards_and_refuses_another_configuration(reference, pool_shards, model_dir, tmp_path):
    out = tmp_path / "o"
    job = CaptionJob(model=model_dir, **SMALL)
    first = run_caption(job, pool_shards, out, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run_caption(CaptionJob(model=model_dir, **(SMALL | {"decode_workers": 1, "batch_size": 2})),
                        pool_shards, out, progress=False)
    assert again.written == [] and sorted(again.skipped) == sorted(s.shard for s in first.written)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before, "a finished job touches nothing"
    with pytest.raises(ConfigMismatch, match="--recaption-if-changed"):
        run_caption(CaptionJob(model=model_dir, **(SMALL | {"max_new_tokens": 4})), pool_shards, out, progress=False)


def test_recaption_if_changed_redoes_only_samples_whose_provenance_differs(reference, pool_shards, model_dir,
                                                                            tmp_path):
    out = tmp_path / "o"
    run_caption(CaptionJob(model=model_dir, **SMALL), pool_shards, out, progress=False)
    # Make two samples of one shard look captioned by an older prompt, and the shard by an older job.
    name = sorted(p.name for p in out.glob("*.tar"))[0]
    samples = list(iter_shard(str(out / name)))
    stale = [samples[0]["__key__"], samples[2]["__key__"]]
    with tarfile.open(out / name, "w") as tar:
        for s in samples:
            members = {k: v for k, v in s.items() if not k.startswith("__")}
            if s["__key__"] in stale:
                record = CaptionRecord.model_validate_json(members["caption.json"])
                record.provenance.prompt_hash = "0000000000000000"
                members["caption.json"] = record.model_dump_json().encode()
                members["txt"] = b"an old caption"
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, __import__("io").BytesIO(data))
    stats = read_stats(out, name)
    (out / f"{name[:-4]}_stats.json").write_text(stats.model_copy(update={"config_hash": "older"}).model_dump_json())

    with pytest.raises(ConfigMismatch):
        run_caption(CaptionJob(model=model_dir, **SMALL), pool_shards, out, progress=False)
    result = run_caption(CaptionJob(model=model_dir, **SMALL), pool_shards, out, progress=False,
                         recaption_if_changed=True)
    assert [s.shard for s in result.written] == [name], "only the shard of another configuration is redone"
    assert result.written[0].n_reused == len(samples) - 2
    assert _captions(out) == _captions(reference), "the stale samples got this job's captions back"
    assert verify(pool_shards, out).ok


def test_per_frame_baseline_captions_the_middle_frame(pool_shards, model_dir, tmp_path):
    run_caption(CaptionJob(model=model_dir, **(SMALL | {"frames": 1})), pool_shards, tmp_path, progress=False)
    for shard in _outputs(tmp_path).values():
        for out in shard.values():
            record = CaptionRecord.model_validate_json(out["caption.json"])
            assert record.kind == "frame" and record.provenance.prompt_id == "caption-frame-v1"
            assert len(record.provenance.frame_indices) == 1
    with pytest.raises(ValueError, match="image prompt"):
        CaptionJob(model=model_dir, frames=1, prompt="caption-video-v1")


# =========================================================================== bad input and faults

def test_bad_input_corpus_every_good_sample_captioned_every_bad_one_in_the_ledger(model_dir, tmp_path):
    (tmp_path / "corpus").mkdir()
    corpus = bc.build_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    run_caption(CaptionJob(model=model_dir, **SMALL), corpus.urls, out, progress=False)
    captioned = {(url, s["__key__"]) for url in corpus.urls
                 for s in iter_shard(str(out / Path(url).name), handler=lambda e: e.reason == "empty-shard")}
    assert captioned == corpus.good, "every good sample is captioned, nothing else"
    rows = {(r["url"], r["key"]): (r["stage"], r["reason"]) for r in _ledger(out)}
    assert rows == {k: (e.stage, e.reason) for k, e in corpus.expected.items()}, "every bad one, with its reason"
    report = verify(corpus.urls, out)
    assert report.ok, report.problems


def _marked_shards(tmp_path: Path, marked: set[str]) -> str:
    """Toy shards where the videos of ``marked`` keys end with HANG_MARKER (see tests/hang.py)."""
    src = tmp_path / "src"
    synth(SynthConfig(split="pool", n=8, seed=6, shard_size=4), src, progress=False)
    dst = tmp_path / "in"
    dst.mkdir()
    for p in sorted(src.glob("pool-*.tar")):
        items = []
        for s in iter_shard(str(p)):
            if s["__key__"] in marked:
                s["mp4"] = s["mp4"] + HANG_MARKER
            items += bc.members(s)
        bc.write_tar(dst / p.name, items)
    return str(dst / "pool-*.tar")


def test_a_hanging_decode_is_timed_out_and_the_rest_flow(model_dir, tmp_path):
    shards = _marked_shards(tmp_path, {"pool-000001"})
    out = tmp_path / "out"
    job = CaptionJob(model=model_dir, decode_fn="tests.hang:hang_on_marker", decode_timeout=4, **SMALL)
    run_caption(job, shards, out, progress=False)
    assert [(r["key"], r["stage"], r["reason"]) for r in _ledger(out)] == [("pool-000001", "decode", "timeout")]
    assert "pool-000001" not in _captions(out) and len(_captions(out)) == 7
    assert verify(shards, out).ok


def test_retry_failed_reruns_only_the_ledger(model_dir, tmp_path, monkeypatch):
    flag = tmp_path / "storage-is-flaky"
    flag.touch()
    monkeypatch.setenv("PSEUDOCAP_TEST_FLAG", str(flag))
    shards = _marked_shards(tmp_path, {"pool-000002", "pool-000005"})
    out = tmp_path / "out"
    job = CaptionJob(model=model_dir, decode_fn="tests.hang:fail_while_flagged", **SMALL)
    assert engine_main(["caption", "--config", _write(tmp_path / "job.json", job.to_dict()), "--shards", shards,
                        "--out", str(out), "--quiet"]) == 0
    assert sorted(r["key"] for r in _ledger(out)) == ["pool-000002", "pool-000005"]
    before = _captions(out)
    flag.unlink()  # the storage recovered
    assert engine_main(["retry-failed", str(out), "--quiet"]) == 0
    assert _ledger(out) == []
    after = _captions(out)
    assert set(after) == set(before) | {"pool-000002", "pool-000005"}
    assert all(after[k] == v for k, v in before.items())
    assert sum(s.n_reused for s in map(lambda p: ShardStats.model_validate_json(p.read_text()),
                                       out.glob("*_stats.json"))) == 6, "the 6 good outputs were carried over"
    assert verify(shards, out).ok


def _write(path: Path, data: dict) -> str:
    path.write_text(json.dumps(data))
    return str(path)


# One run after another, each resuming the previous one's mess and then killed at the next point (NAME@N: the
# Nth time the point is passed). Shards hold 5, 5 and 4 samples in batches of 4, so the kills walk through all
# three shards: mid-shard, before and after the tar's rename, after the ledger, before the stats marker.
CRASH_POINTS = ["shard:after-batch@2", "commit:before-rename@1", "commit:after-rename@1", "commit:after-ledger@2",
                "shard:before-commit@1", "commit:after-rename@2", "shard:after-batch@1"]


def _cli(out: Path, shards: str, model: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PSEUDOCAP_CRASH_AT=crash_at or "")
    args = [sys.executable, "-m", "engine", "caption", "--shards", shards, "--out", str(out), "--model", model,
            "--quiet"] + [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_kill_9_at_six_points_then_resume_equals_an_uninterrupted_run(reference, pool_shards, model_dir, tmp_path):
    out = tmp_path / "out"
    for point in CRASH_POINTS:
        proc = _cli(out, pool_shards, model_dir, crash_at=point)
        assert proc.returncode == -9, f"{point}: expected SIGKILL, got {proc.returncode}: {proc.stderr[-2000:]}"
        for visible in out.glob("[!.]*.tar"):  # never a partial shard under its real name
            list(iter_shard(str(visible)))  # raises on a truncated tar
        for stats in out.glob("*_stats.json"):  # a marker always describes the tar beside it
            s = ShardStats.model_validate_json(stats.read_text())
            assert len(list(iter_shard(str(out / s.shard)))) == s.n_ok
    proc = _cli(out, pool_shards, model_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = verify(pool_shards, out)
    assert report.ok, report.problems
    assert _comparable(out) == _comparable(reference), "same shards, keys, members and captions as an uninterrupted run"
    assert not list(out.glob(".*.tmp")), "no temporary file left behind"


@pytest.mark.slow
def test_kill_at_a_random_moment_then_resume(reference, pool_shards, model_dir, tmp_path):
    import random
    import time

    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = [sys.executable, "-m", "engine", "caption", "--shards", pool_shards, "--out", str(out), "--model",
            model_dir, "--quiet"] + [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    rng = random.Random(0)
    for _ in range(1):
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(4.0, 9.0))  # model load is ~4 s: land somewhere in the captioning
        proc.kill()
        proc.wait()
    assert subprocess.run(args, env=env, capture_output=True, timeout=300).returncode == 0
    assert verify(pool_shards, out).ok
    assert _comparable(out) == _comparable(reference)


def test_verify_catches_a_lost_and_a_duplicated_key(reference, pool_shards, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(reference, out)
    name = sorted(p.name for p in out.glob("*.tar"))[0]
    samples = list(iter_shard(str(out / name)))
    lost = samples[1]["__key__"]
    with tarfile.open(out / name, "w") as tar:
        for s in samples:
            if s["__key__"] == lost:
                continue
            for ext, data in s.items():
                if not ext.startswith("__"):
                    info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, __import__("io").BytesIO(data))
    ledger_path(out, name).write_text(json.dumps({"key": samples[0]["__key__"], "stage": "decode",
                                                  "reason": "x"}) + "\n")
    assert engine_main(["verify", "--inputs", pool_shards, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert lost in err and "neither output nor ledger" in err
    assert "both in the output and in the ledger" in err


def test_stats_command_table_and_json(reference, capsys):
    assert engine_main(["stats", str(reference)]) == 0
    table = capsys.readouterr().out
    assert "captioned" in table and "caption" in table and "clips/s" in table
    assert engine_main(["stats", str(reference), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["n_ok"] == 14 and data["n_failed"] == 0 and data["shards"] == 3
    assert data == summarize(reference)


def test_cli_errors_are_clear(tmp_path, model_dir, capsys):
    assert engine_main(["caption", "--shards", str(tmp_path / "none-*.tar"), "--out", str(tmp_path / "o"),
                        "--model", model_dir]) == 2
    assert "no shard matches" in capsys.readouterr().err
    assert engine_main(["caption", "--shards", "x.tar", "--out", "o", "--model", model_dir, "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_memory_stays_bounded_over_ten_times_the_samples(model_dir, tmp_path):
    """Peak RSS of the captioning process over 10x the samples stays within 1.2x of the peak over 1x."""
    script = ("import resource, sys; from engine.caption import CaptionJob; from engine.executors import run_caption;"
              "run_caption(CaptionJob(model=sys.argv[1], frames=4, batch_size=4, max_new_tokens=8), sys.argv[2], "
              "sys.argv[3], progress=False); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    peaks = {}
    for n in (12, 120):
        src = tmp_path / f"in{n}"
        synth(SynthConfig(split="pool", n=n, seed=8, shard_size=12), src, progress=False)
        proc = subprocess.run([sys.executable, "-c", script, model_dir, str(src / "pool-*.tar"), str(tmp_path / f"o{n}")],
                              env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[n] = int(proc.stdout.split()[-1])
    assert peaks[120] <= 1.2 * peaks[12], peaks


# =========================================================================== Ray

@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    ray = pytest.importorskip("ray")
    once = tmp_path_factory.mktemp("ray") / "crashed-once"
    # The actors inherit this environment: the first actor to finish a batch dies, once.
    os.environ.update(PSEUDOCAP_CRASH_AT="shard:after-batch@1", PSEUDOCAP_CRASH_ONCE=str(once),
                      PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    finally:
        for k in ("PSEUDOCAP_CRASH_AT", "PSEUDOCAP_CRASH_ONCE"):
            os.environ.pop(k)
    yield once
    ray.shutdown()


@pytest.mark.slow
def test_ray_executor_replaces_a_dead_actor_and_writes_what_local_writes(local_ray, reference, pool_shards,
                                                                         model_dir, tmp_path):
    out = tmp_path / "out"
    result = run_caption(CaptionJob(model=model_dir, **SMALL), pool_shards, out, executor="ray", progress=False,
                         actors=2, cpus_per_actor=1)
    assert local_ray.exists(), "an actor was killed mid-shard"
    assert sorted(s.shard for s in result.written) == sorted(_outputs(reference))
    assert verify(pool_shards, out).ok
    assert _comparable(out) == _comparable(reference), "same outputs as --executor local"
    assert not list(out.glob(".*.tmp"))
