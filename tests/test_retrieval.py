"""Retrieval evaluation: exact ranks against a brute-force reference with planted ties, metrics, protocols, FAISS."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dualenc.retrieval import (
    Embeddings, Positives, bootstrap_ci, create_index, directions, evaluate, exact_ranks, load_embeddings,
    rank_metrics, retrieval_ranks, search, topk_overlap,
)

# --------------------------------------------------------------------------- the brute-force reference


def reference_ranks(queries: np.ndarray, gallery: np.ndarray, positives: list[set[int]]) -> np.ndarray:
    """Full float64 score matrix, a stable sort by score, ties broken so that negatives come first."""
    scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
    ranks = []
    for i, pos in enumerate(positives):
        is_pos = np.zeros(len(gallery), bool)
        is_pos[list(pos)] = True
        order = np.lexsort((is_pos, -scores[i]))  # last key first: by score descending, then negatives first
        ranks.append(int(np.flatnonzero(is_pos[order])[0]) + 1)
    return np.array(ranks)


def reference_metrics(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    n = len(ranks)
    out = {f"{prefix}_R@{k}": sum(1 for r in ranks if r <= k) / n for k in (1, 5, 10)}
    s = sorted(ranks)
    out[f"{prefix}_MdR"] = float(s[n // 2]) if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    out[f"{prefix}_MnR"] = sum(ranks) / n
    return out


def quantised(x: np.ndarray) -> np.ndarray:
    """Values in {-2, ..., 2} / 4: every product and sum of 16 of them is exact in float32, so any summation
    order gives the same score and the planted ties are real ties."""
    return (np.clip(np.round(x * 2), -2, 2) / 4).astype(np.float32)


@pytest.fixture(scope="module")
def tied() -> Embeddings:
    """60 videos (4 pairs of identical rows, 3 without captions), 1-4 captions each, texts shuffled."""
    rng = np.random.default_rng(7)
    video = quantised(rng.standard_normal((60, 16)))
    for a, b in ((1, 2), (10, 11), (20, 40), (33, 34)):
        video[b] = video[a]
    keys = [f"clip{i:03d}" for i in range(60)]
    owners = [i for i in range(57) for _ in range(1 + i % 4)]  # clips 57-59 have no caption
    text = quantised(video[owners] + rng.standard_normal((len(owners), 16)) * 0.9)
    order = rng.permutation(len(owners))
    return Embeddings(video, keys, text[order], [keys[owners[i]] for i in order])


def test_the_fixture_really_plants_ties(tied):
    s = tied.text @ tied.video.T
    own = s[np.arange(len(s)), tied.text_video]
    tied_negatives = (s == own[:, None]).sum(1) - 1
    assert (tied_negatives > 0).sum() >= 20  # plenty of queries whose positive ties a negative


# --------------------------------------------------------------------------- exact ranks

def test_hand_computed_ties_count_against_the_model():
    video = np.array([[1, 0], [1, 0], [0, 1], [-1, 0]], np.float32)  # clip1 duplicates clip0; clip3 has no text
    text = np.array([[1, 0], [0, 1], [0.5, 0.5], [0.5, 0.5]], np.float32)
    emb = Embeddings(video, ["c0", "c1", "c2", "c3"], text, ["c0", "c2", "c1", "c2"])
    ranks = retrieval_ranks(emb)
    # t2v: text0 ties its clip0 with clip1 -> 2; text1 -> 1; text2 ties all of c0,c1,c2 -> 3; text3 (c2) -> 3
    assert ranks["text_to_video"].tolist() == [2, 1, 3, 3]
    # v2t (queries c0, c1, c2): c0's own text0 scores 1, best -> 1; c1's own text2 scores .5 below text0's 1 and
    # tied with text3 -> 3; c2's own texts score 1 and .5, best 1 -> 1
    assert ranks["video_to_text"].tolist() == [1, 3, 1]


def test_text_to_video_ranks_equal_the_reference_with_planted_ties(tied):
    expected = reference_ranks(tied.text, tied.video, [{v} for v in tied.text_video])
    for block_mb in (512, 1e-3, 0.004):  # one block; one query per block; blocks of a few queries
        got = exact_ranks(tied.text, tied.video, Positives.one_each(tied.text_video), max_block_mb=block_mb)
        np.testing.assert_array_equal(got, expected)
    assert retrieval_ranks(tied)["text_to_video"].tolist() == expected.tolist()


def test_video_to_text_ranks_equal_the_reference_with_planted_ties(tied):
    videos = sorted(set(tied.text_video.tolist()))
    own = [{i for i, v in enumerate(tied.text_video) if v == vid} for vid in videos]
    expected = reference_ranks(tied.video[videos], tied.text, own)
    for block_mb in (512, 1e-3, 0.003):
        np.testing.assert_array_equal(retrieval_ranks(tied, max_block_mb=block_mb)["video_to_text"], expected)


def test_continuous_embeddings_match_a_float32_reference():
    rng = np.random.default_rng(1)
    g = rng.standard_normal((500, 32)).astype(np.float32)
    q = (g[:300] + rng.standard_normal((300, 32)).astype(np.float32))
    expected = reference_ranks(q, g, [{i} for i in range(300)])
    np.testing.assert_array_equal(exact_ranks(q, g, Positives.one_each(np.arange(300)), max_block_mb=0.01),
                                  expected)


def test_identical_videos_tie_even_one_query_at_a_time():
    # BLAS rounds a gallery vector by where it sits: one query row alone (gemv), a few (OpenBLAS's small-matrix
    # path), and on AMD EPYC (AVX2) any block round the last rows of a small gallery differently: a video's twin
    # placed there stopped tying until near ties were compared again in float64
    rng = np.random.default_rng(0)
    g = rng.standard_normal((67, 512)).astype(np.float32)
    g[-3:] = g[:3]
    q = g[[0, 1, 2] * 30] + rng.standard_normal((90, 512)).astype(np.float32)
    pos = Positives.one_each([0, 1, 2] * 30)
    one_at_a_time = exact_ranks(q, g, pos, max_block_mb=1e-4)
    assert one_at_a_time.min() == 2  # the twin always ties, so always ranks above
    np.testing.assert_array_equal(one_at_a_time, exact_ranks(q, g, pos))


def test_metrics_equal_the_reference_in_both_directions(tied):
    videos = sorted(set(tied.text_video.tolist()))
    t2v = reference_ranks(tied.text, tied.video, [{v} for v in tied.text_video])
    v2t = reference_ranks(tied.video[videos], tied.text,
                          [{i for i, v in enumerate(tied.text_video) if v == vid} for vid in videos])
    got = evaluate(tied, resamples=0)
    expected = {**reference_metrics(t2v, "text_to_video"), **reference_metrics(v2t, "video_to_text")}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    p = got["protocol"]
    assert p["queries"] == {"text_to_video": len(tied.text_keys), "video_to_text": 57}
    assert p["gallery"] == {"text_to_video": 60, "video_to_text": len(tied.text_keys)}
    assert p["videos_without_text"] == 3 and p["captions"] == "all"
    assert {"rank", "R@K", "MdR", "MnR", "text_to_video", "video_to_text"} <= set(p["definitions"])
    json.dumps(got)  # what a CLI writes as metrics.json


def test_single_caption_protocol_uses_the_first_caption_of_each_video(tied):
    first: dict[str, int] = {}
    for i, key in enumerate(tied.text_keys):
        first.setdefault(key, i)
    rows = sorted(first.values())
    single = Embeddings(tied.video, tied.video_keys, tied.text[rows], [tied.text_keys[i] for i in rows])
    got = evaluate(tied, captions="first", resamples=0)
    assert got["protocol"]["queries"] == {"text_to_video": 57, "video_to_text": 57}
    t2v = reference_ranks(single.text, single.video, [{v} for v in single.text_video])
    videos = sorted(set(single.text_video.tolist()))
    v2t = reference_ranks(single.video[videos], single.text,
                          [{i for i, v in enumerate(single.text_video) if v == vid} for vid in videos])
    expected = {**reference_metrics(t2v, "text_to_video"), **reference_metrics(v2t, "video_to_text")}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["text_to_video_R@1"] != evaluate(tied, resamples=0)["text_to_video_R@1"]  # the protocol matters
    with pytest.raises(ValueError, match="valid: all, first"):
        evaluate(tied, captions="one")


def test_positives_are_checked():
    q = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="no positive"):
        exact_ranks(q, q, Positives(np.array([0, 1, 1, 2]), np.array([0, 2])))
    with pytest.raises(ValueError, match="twice"):
        exact_ranks(q[:1], q, Positives(np.array([0, 2]), np.array([1, 1])))
    with pytest.raises(ValueError, match="NaN"):
        exact_ranks(np.full((3, 3), np.nan, np.float32), q, Positives.one_each([0, 1, 2]))


# --------------------------------------------------------------------------- metrics and intervals

def test_bootstrap_interval_is_seeded_and_close_to_the_binomial_interval():
    ranks = np.array([1] * 120 + [7] * 80 + [50] * 200)  # R@1 .3, R@5 .3, R@10 .5 over 400 queries
    ci = bootstrap_ci(ranks, resamples=2000, seed=3, prefix="t")
    assert ci == bootstrap_ci(ranks, resamples=2000, seed=3, prefix="t")
    assert ci != bootstrap_ci(ranks, resamples=2000, seed=4, prefix="t")
    for key, p in (("t_R@1", 0.3), ("t_R@10", 0.5)):
        half = 1.96 * np.sqrt(p * (1 - p) / 400)
        assert ci[key][0] == pytest.approx(p - half, abs=0.012) and ci[key][1] == pytest.approx(p + half, abs=0.012)
    assert bootstrap_ci(np.ones(50, int), resamples=100) == {f"R@{k}": [1.0, 1.0] for k in (1, 5, 10)}
    assert rank_metrics(ranks, prefix="t")["t_MdR"] == 28.5  # the mean of the middle two, 7 and 50


def test_evaluate_reports_intervals_around_each_recall(tied):
    got = evaluate(tied, resamples=200, seed=0)
    assert set(got["ci95"]) == {f"{d}_R@{k}" for d in ("text_to_video", "video_to_text") for k in (1, 5, 10)}
    for key, (lo, hi) in got["ci95"].items():
        assert lo <= got[key] <= hi and hi - lo > 0


# --------------------------------------------------------------------------- loading

def write_embeddings(path, video, video_keys, text, text_keys):
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "video.npy", video)
    np.save(path / "text.npy", text)
    (path / "video_keys.txt").write_text("".join(k + "\n" for k in video_keys))
    (path / "text_keys.txt").write_text("".join(k + "\n" for k in text_keys))
    return path


def test_load_embeddings_round_trip(tmp_path, tied):
    d = write_embeddings(tmp_path / "emb", tied.video, tied.video_keys, tied.text, tied.text_keys)
    (d / "embed.json").write_text(json.dumps({"text_keys": ["gt.txt"]}))
    emb = load_embeddings(d)
    np.testing.assert_array_equal(emb.text_video, tied.text_video)
    assert emb.video_keys == tied.video_keys and emb.dim == 16
    assert evaluate(emb, resamples=0)["protocol"]["text_key"] == ["gt.txt"]


def test_load_embeddings_names_the_files_of_every_problem(tmp_path):
    v = np.eye(4, dtype=np.float32)
    d = write_embeddings(tmp_path / "bad", v, ["a", "b", "c"], np.ones((2, 3), np.float32), ["a", "zz", "b"])
    with pytest.raises(ValueError) as err:
        load_embeddings(d)
    msg = str(err.value)
    assert f"{d}/video.npy has 4 rows but {d}/video_keys.txt has 3 keys" in msg
    assert f"{d}/text.npy has 2 rows but {d}/text_keys.txt has 3 keys" in msg
    assert f"{d}/text.npy has dim 3 but {d}/video.npy has dim 4" in msg
    assert f"{d}/text_keys.txt: 1 text key(s) have no video in {d}/video_keys.txt, e.g. 'zz' (line 2)" in msg

    d = write_embeddings(tmp_path / "dup", v, ["a", "b", "a", "c"], np.full((1, 4), np.nan, np.float32), ["a"])
    with pytest.raises(ValueError, match=r"(?s)text.npy: contains NaN.*video_keys.txt: duplicate key 'a' on lines 1 "
                                         r"and 3"):
        load_embeddings(d)

    (d / "text_keys.txt").unlink()
    with pytest.raises(FileNotFoundError, match="text_keys.txt"):
        load_embeddings(d)
    with pytest.raises(ValueError, match=r"^invalid embeddings:\n  video.npy: expected a 2-D"):
        Embeddings(np.ones(3, np.float32), ["a"], np.ones((1, 3), np.float32), ["a"])


# --------------------------------------------------------------------------- FAISS

@pytest.fixture(scope="module")
def clustered():
    """2000 unit vectors around 40 centres, and 300 queries near them: IVF lists see real clusters."""
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((40, 32))
    g = centres[rng.integers(0, 40, 2000)] + 0.5 * rng.standard_normal((2000, 32))
    g = (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float32)
    q = g[:300] + 0.3 * rng.standard_normal((300, 32)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True), g


def test_flat_search_equals_brute_force(clustered):
    q, g = clustered
    scores, ids = search(q, g, 10, chunk=64)
    s = q.astype(np.float64) @ g.astype(np.float64).T
    np.testing.assert_array_equal(ids, np.argsort(-s, axis=1, kind="stable")[:, :10])
    np.testing.assert_allclose(scores, np.take_along_axis(s, ids, 1), atol=1e-5)
    assert search(q[:2], g[:4], 10)[1].shape == (2, 4)
    with pytest.raises(ValueError, match="valid: flat, ivf, hnsw"):
        create_index(g, "lsh")


def test_approximate_index_recall_is_reported(clustered):
    q, g = clustered
    exact = search(q, g, 10)[1]
    full = create_index(g, "ivf", nlist=16, nprobe=16)
    assert topk_overlap(search(q, full, 10)[1], exact) == 1.0  # every list probed: exact
    weak = topk_overlap(search(q, g, 10, "ivf", nlist=32, nprobe=1)[1], exact)
    assert 0.2 < weak < 0.99

    vid_keys = [f"v{i}" for i in range(len(g))]
    emb = Embeddings(g, vid_keys, q, vid_keys[:300])
    got = evaluate(emb, index="ivf", index_options={"nlist": 32, "nprobe": 1}, resamples=0)
    a = got["approximate"]
    assert a["index"] == "ivf" and a["options"] == {"nlist": 32, "nprobe": 1}
    assert a["text_to_video_recall@10_vs_exact"] == pytest.approx(weak)
    assert 0 < a["video_to_text_recall@10_vs_exact"] <= 1
    assert a["text_to_video_R@10"] <= got["text_to_video_R@10"]  # a missed neighbour can only lose a hit
    hnsw = evaluate(emb, index="hnsw", resamples=0)["approximate"]
    assert 0.9 <= hnsw["text_to_video_recall@10_vs_exact"] <= 1
    for key in ("text_to_video_R@1", "text_to_video_MdR"):  # ranks stay exact whatever the index
        assert got[key] == evaluate(emb, resamples=0)[key]


def test_directions_index_the_right_rows(tied):
    d = directions(tied)
    t2v, v2t = d["text_to_video"], d["video_to_text"]
    assert len(t2v.queries) == len(tied.text_keys) and len(t2v.gallery) == 60
    for i, vid in enumerate(v2t.queries):
        own = v2t.positives.cols[v2t.positives.offsets[i]:v2t.positives.offsets[i + 1]]
        assert {tied.text_keys[v2t.gallery[j]] for j in own} == {tied.video_keys[vid]}


@pytest.mark.gpu
@pytest.mark.skipif(not hasattr(__import__("faiss"), "StandardGpuResources") or
                    __import__("faiss").get_num_gpus() == 0, reason="needs faiss-gpu and a GPU")
def test_gpu_flat_search_matches_cpu(clustered):
    q, g = clustered
    np.testing.assert_array_equal(search(q, g, 10, gpu=True)[1], search(q, g, 10, gpu=False)[1])
