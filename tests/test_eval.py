"""`dualenc eval` and `dualenc report` end to end: a tiny trained checkpoint on toy shards, a benchmark layout."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest

from dualenc.cli import main
from dualenc.retrieval import evaluate, load_embeddings
from dualenc.train import TrainConfig, latest_checkpoint, train
from engine.shards import read_samples


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def run(toy_test_shards, tmp_path_factory):
    _, shards, _ = toy_test_shards
    out = tmp_path_factory.mktemp("eval_run")
    train(TrainConfig(shards=str(shards / "test-*.tar"), out=str(out), text_key="gt.txt", frames=4, batch_size=8,
                      steps=6, warmup=1, workers=0, save_every=0, seed=0), progress=False)
    return out


@pytest.fixture(scope="module")
def report(run, toy_test_shards, tmp_path_factory):
    _, shards, _ = toy_test_shards
    out = tmp_path_factory.mktemp("eval_report") / "toy-gt"
    rc = main(["eval", "--checkpoint", str(run), "--shards", str(shards / "test-*.tar"), "--text-key", "gt.txt",
               "--out", str(out), "--examples", "4", "--resamples", "200", "--quiet"])
    assert rc == 0
    return out


def test_eval_writes_metrics_the_reports_and_the_protocol(report, run, toy_test_shards):
    _, shards, paths = toy_test_shards
    m = json.loads((report / "metrics.json").read_text())
    for d in ("text_to_video", "video_to_text"):
        for k in ("R@1", "R@5", "R@10", "MdR", "MnR"):
            assert f"{d}_{k}" in m
        lo, hi = m["ci95"][f"{d}_R@5"]
        assert lo <= m[f"{d}_R@5"] <= hi
    p = m["protocol"]
    assert p["shards"] == [str(x) for x in sorted(paths)]
    assert [f["sha256"] for f in p["shard_files"]] == [_sha(x) for x in sorted(paths)]
    assert p["checkpoint_sha256"] == _sha(latest_checkpoint(run) / "model.safetensors")
    assert p["model"] == "toy-vit" and p["frames"] == 4 and p["sampling"].startswith("uniform-4")
    assert p["text_key"] == ["gt.txt"] and p["index"] == "flat" and p["captions"] == "all"
    assert p["command"].startswith("dualenc eval --checkpoint") and "R@K" in p["definitions"]
    assert p["videos"] == 40 and p["texts"] == 40
    # the numbers are those of the embeddings it wrote, recomputed from scratch
    again = evaluate(load_embeddings(report / "embeddings"), resamples=0)
    assert all(m[k] == again[k] for k in again if k.startswith(("text_to_video_", "video_to_text_")))
    assert (report / "report.md").read_text().count("text_to_video") >= 1
    assert (report / "report.html").stat().st_size > 10_000


def test_plot_data_follow_from_the_ranks(report):
    m = json.loads((report / "metrics.json").read_text())
    curve = m["curves"]["text_to_video"]
    assert curve["k"][0] == 1 and curve["k"][-1] == 40 and curve["recall"][-1] == 1.0
    assert curve["recall"][0] == m["text_to_video_R@1"] and np.all(np.diff(curve["recall"]) >= 0)
    assert sum(m["rank_histogram"]["text_to_video"]["counts"]) == 40
    sim = m["similarity"]
    assert sum(sim["positive"]["counts"]) == 40 and sim["negative"]["pairs"] > 1000


def test_examples_show_the_caption_its_top5_and_a_thumbnail_strip(report, toy_test_shards):
    _, shards, _ = toy_test_shards
    gt = {s["__key__"]: s["gt.txt"].decode().strip() for s in read_samples(str(shards / "test-*.tar"))}
    m = json.loads((report / "metrics.json").read_text())
    assert len(m["examples"]) == 4
    for ex in m["examples"]:
        assert ex["query"] == gt[ex["query_key"]] and len(ex["top"]) == 5
        scores = [t["score"] for t in ex["top"]]
        assert scores == sorted(scores, reverse=True)
        assert any(t["correct"] for t in ex["top"]) == (ex["rank"] <= 5)
        for t in ex["top"]:
            assert t["thumb"] and (report / t["thumb"]).is_file()
    from PIL import Image

    strip = Image.open(report / m["examples"][0]["top"][0]["thumb"])
    assert strip.height == 64 and strip.width == 3 * 64  # three square toy frames side by side


def test_eval_from_the_embeddings_gives_the_same_numbers(report, tmp_path):
    assert main(["eval", "--embeddings", str(report / "embeddings"), "--out", str(tmp_path / "r"),
                 "--resamples", "200", "--quiet"]) == 0
    a = json.loads((report / "metrics.json").read_text())
    b = json.loads((tmp_path / "r" / "metrics.json").read_text())
    keys = [k for k in a if k.startswith(("text_to_video_", "video_to_text_"))]
    assert [a[k] for k in keys] == [b[k] for k in keys] and a["ci95"] == b["ci95"]
    assert b["protocol"]["checkpoint_sha256"] == a["protocol"]["checkpoint_sha256"]
    assert b["protocol"]["shards_sha256"] == a["protocol"]["shards_sha256"]


def test_approximate_index_reports_its_recall_against_exact(report, tmp_path):
    assert main(["eval", "--embeddings", str(report / "embeddings"), "--out", str(tmp_path / "r"), "--index", "hnsw",
                 "--resamples", "0", "--quiet"]) == 0
    approx = json.loads((tmp_path / "r" / "metrics.json").read_text())["approximate"]
    assert approx["index"] == "hnsw" and 0.9 <= approx["text_to_video_recall@10_vs_exact"] <= 1.0


def test_msrvtt_layout_is_evaluated_with_the_single_caption_protocol(run, toy_test_shards, tmp_path):
    _, shards, _ = toy_test_shards
    videos = tmp_path / "videos"
    videos.mkdir()
    rows = []
    for i, s in enumerate(list(read_samples(str(shards / "test-00000.tar")))[:6]):
        (videos / f"video{7000 + i}.mp4").write_bytes(s["mp4"])
        rows.append({"key": f"ret{i}", "vid_key": f"msr{7000 + i}", "video_id": f"video{7000 + i}",
                     "sentence": s["gt.txt"].decode().strip()})
    ann = tmp_path / "MSRVTT_JSFUSION_test.csv"
    with ann.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["key", "vid_key", "video_id", "sentence"])
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "msrvtt"
    assert main(["eval", "--benchmark", "msrvtt-1ka", "--videos", str(videos), "--annotations", str(ann),
                 "--checkpoint", str(run), "--out", str(out), "--resamples", "0", "--examples", "2",
                 "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    p = m["protocol"]
    assert p["benchmark"] == "msrvtt-1ka" and p["captions"] == "first" and p["annotations_sha256"] == _sha(ann)
    assert p["queries"] == {"text_to_video": 6, "video_to_text": 6}
    assert all(t["thumb"] for ex in m["examples"] for t in ex["top"])


def test_report_puts_runs_side_by_side(report, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["eval", "--embeddings", str(report / "embeddings"), "--out", str(other), "--label", "again",
                 "--resamples", "0", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["report", "--runs", str(report), str(other), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert "toy-gt" in printed and "again" in printed and "t2v R@1" in printed
    cmp = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert cmp["labels"] == ["toy-gt", "again"]
    assert (tmp_path / "cmp" / "report.html").is_file()


@pytest.mark.parametrize("argv, says", [
    (["eval", "--out", "x"], "exactly one of"),
    (["eval", "--shards", "a.tar", "--out", "x"], "needs --checkpoint"),
    (["eval", "--embeddings", "nowhere", "--out", "{tmp}/x"], "nowhere"),
    (["eval", "--benchmark", "msvd", "--checkpoint", "r", "--out", "x"], "--videos DIR and --annotations"),
])
def test_eval_errors_name_the_problem(argv, says, tmp_path, capsys):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    assert says in capsys.readouterr().err
