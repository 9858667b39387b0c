"""Retrieval evaluation speed and memory: `dualenc.retrieval.evaluate` against a bare NumPy reference.

Usage: nice -n 10 python bench/eval.py [--sizes 10000 100000 1000000] [--queries 10000] [--queries-1m 10000]
                                       [--repeats 3] [--argsort-max 100000] [--out bench/results/eval.json]

For each gallery size N it makes N random unit vectors of dim 512 (the videos) and Q queries (the
captions), caption i being video p_i plus noise (cosine about 0.24, so ranks spread), one caption per
video. Then, each in a FRESH subprocess (ru_maxrss only grows, so a shared process would report the
largest size's peak everywhere), it times:

- ours: `Embeddings(...)` (validation: key map, finiteness) + `evaluate(emb, resamples=1000)`, i.e. exact
  ranks of both directions, R@1/5/10, MdR, MnR and 1000-resample bootstrap intervals;
- numpy: the same ranks and point metrics written plainly: per block of queries ``s = q_block @ g.T``,
  ``pos = s[row, positive]``, ``rank = (s >= pos[:, None]).sum(1)`` (ties against, as ours), text->video
  (Q x N) and video->text (Q captioned videos x Q captions), blocks of the same number of rows as ours
  (the same 512 MiB cap), then R@K/MdR/MnR; no validation, no bootstrap;
- argsort (galleries up to --argsort-max): the textbook version of the same, each block's rows sorted with
  ``np.argsort(-s)`` and the positive's position read off.

Both run ``--repeats`` times in their subprocess (one time for N >= 1M); the best time counts, and the
order alternates between sizes. It records the times, the ratio ours / numpy (goal <= 1.5), peak RSS and
the RSS once the arrays exist (the difference is what the evaluation itself holds), and the metrics of
both. Where they disagree (float32 rounding can order two scores a few 1e-8 apart either way, and a 1M
gallery holds such pairs), a further subprocess ranks again the queries the two rank apart, in float64 against the whole
gallery, and records how many there are, by how much they differ, and whether ours are the float64 ranks.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dualenc.retrieval import Embeddings, Positives, block_rows, evaluate, exact_ranks  # noqa: E402

DIM = 512
BLOCK_MB = 512  # ours' default max_block_mb, given to both


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_data(n: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gallery, queries, positives): unit vectors, made a slice at a time so no float64 copy of 2 GiB exists."""
    rng = np.random.default_rng(seed)
    g = np.empty((n, DIM), np.float32)
    for s in range(0, n, 65536):
        block = rng.standard_normal((min(65536, n - s), DIM), dtype=np.float32)
        g[s:s + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    pos = np.sort(rng.choice(n, size=queries, replace=False))
    q = g[pos] + rng.standard_normal((queries, DIM), dtype=np.float32) * np.float32(4 / np.sqrt(DIM))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    assert g.dtype == q.dtype == np.float32  # a float64 scalar would make q float64 (NEP 50) and the reference slow
    return g, q, pos


def _count_ranks(sims: np.ndarray, positive: np.ndarray) -> np.ndarray:
    p = sims[np.arange(len(sims)), positive]
    return (sims >= p[:, None]).sum(1)


def _argsort_ranks(sims: np.ndarray, positive: np.ndarray) -> np.ndarray:
    # the textbook way: sort every row, find the positive's position (a stable sort on -score puts a tied
    # negative that comes earlier in the gallery first; ties are measure zero on this data)
    order = np.argsort(-sims, axis=1, kind="stable")
    return np.argmax(order == positive[:, None], axis=1) + 1


def _directions(g: np.ndarray, q: np.ndarray, pos: np.ndarray):
    """(name, queries, gallery, each query's positive) of both directions. text->video: caption i's positive
    is video pos[i]; video->text: the captioned videos (pos is sorted, so video pos[i] is query i), caption i
    being video pos[i]'s one caption."""
    return (("text_to_video", q, g, pos), ("video_to_text", g[pos], q, np.arange(len(q))))


def _reference_ranks(queries: np.ndarray, gallery: np.ndarray, positive: np.ndarray,
                     how: str = "count") -> np.ndarray:
    """float32 ranks written the way one would by hand, in the same blocks as ours (equal memory, equal gemm
    shapes)."""
    rank_of = _count_ranks if how == "count" else _argsort_ranks
    rows = block_rows(len(gallery), BLOCK_MB)
    out = np.empty(len(queries), np.int64)
    for s in range(0, len(queries), rows):
        out[s:s + rows] = rank_of(queries[s:s + rows] @ gallery.T, positive[s:s + rows])
    return out


def numpy_reference(g: np.ndarray, q: np.ndarray, pos: np.ndarray, how: str = "count") -> dict:
    """Both directions' ranks and point metrics, written the way one would by hand."""
    metrics = {}
    for name, queries, gallery, positive in _directions(g, q, pos):
        r = _reference_ranks(queries, gallery, positive, how)
        metrics.update({f"{name}_R@{k}": float(np.mean(r <= k)) for k in (1, 5, 10)})
        metrics[f"{name}_MdR"] = float(np.median(r))
        metrics[f"{name}_MnR"] = float(np.mean(r))
    return metrics


def float64_check(n: int, queries: int) -> dict:
    """Each direction's queries that ours and the float32 reference rank apart, ranked again in float64
    against the whole gallery: whether ours are those ranks (ours compares near ties in float64)."""
    out = {}
    for name, qs, gallery, positive in _directions(*make_data(n, queries)):
        ours = exact_ranks(qs, gallery, Positives.one_each(positive), max_block_mb=BLOCK_MB)
        ref = _reference_ranks(qs, gallery, positive)
        apart = np.flatnonzero(ours != ref)
        q64, p_apart = qs[apart].astype(np.float64), positive[apart]
        pos64 = np.einsum("ij,ij->i", q64, gallery[p_apart].astype(np.float64))
        f64 = np.ones(len(apart), np.int64)  # the positive, not scored again: gemm and einsum sum in other orders
        step = 65536  # float64 a slice of the gallery at a time
        for s in range(0, len(gallery), step):
            at_least = q64 @ gallery[s:s + step].astype(np.float64).T >= pos64[:, None]
            mine = np.flatnonzero((p_apart >= s) & (p_apart < s + step))
            at_least[mine, p_apart[mine] - s] = False
            f64 += at_least.sum(1)
        out[name] = {"queries_ranked_apart": int(len(apart)),
                     "largest_difference": int(np.abs(ours[apart] - ref[apart]).max()) if len(apart) else 0,
                     "ours_are_the_float64_ranks": bool(np.array_equal(ours[apart], f64)),
                     "float32_reference_is_the_float64_rank": int(np.sum(ref[apart] == f64))}
    return out


def one(n: int, queries: int, method: str, repeats: int) -> dict:
    """Runs one method on one size in this process; returns times, memory and metrics."""
    g, q, pos = make_data(n, queries)
    keys = [f"v{i:07d}" for i in range(n)]
    text_keys = [keys[i] for i in pos]
    base = rss_mb()
    times, metrics, parts = [], {}, {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        if method == "ours":
            res = evaluate(Embeddings(g, keys, q, text_keys), resamples=1000, max_block_mb=BLOCK_MB)
            parts = res["seconds"]
            metrics = {k: v for k, v in res.items() if isinstance(v, float)}
        else:
            metrics = numpy_reference(g, q, pos, "argsort" if method == "argsort" else "count")
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": [round(t, 3) for t in times], "best_s": round(min(times), 3),
            "ours_seconds_by_direction": parts or None, "rss_with_data_mb": round(base, 1),
            "peak_rss_mb": round(peak, 1), "eval_extra_mb": round(peak - base, 1), "metrics": metrics}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("numpy", "faiss-cpu"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--queries-1m", type=int, default=10_000, help="queries for galleries of 1M and more")
    ap.add_argument("--repeats", type=int, default=3, help="per method below 1M (1M and more: 1)")
    ap.add_argument("--argsort-max", type=int, default=100_000,
                    help="largest gallery also timed against matmul + argsort (sorting 1M-wide rows takes long)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval.json"))
    ap.add_argument("--one", nargs=4, metavar=("N", "QUERIES", "METHOD", "REPEATS"), help=argparse.SUPPRESS)
    ap.add_argument("--check", nargs=2, type=int, metavar=("N", "QUERIES"),
                    help="only rank again in float64 the queries that ours and numpy rank apart on this size (what "
                    "the bench runs where their metrics disagree), printed as JSON")
    args = ap.parse_args(argv)
    if args.check:
        print(json.dumps(float64_check(*args.check)))
        return 0
    if args.one:
        n, nq, method, reps = args.one
        print(json.dumps(one(int(n), int(nq), method, int(reps))))
        return 0

    results = []
    for i, n in enumerate(args.sizes):
        nq = args.queries_1m if n >= 1_000_000 else args.queries
        reps = 1 if n >= 1_000_000 else args.repeats
        row: dict = {"gallery": n, "queries": nq, "dim": DIM, "repeats": reps}
        if nq != args.queries:
            row["note"] = f"queries reduced from {args.queries} to {nq} for this size"
        methods = ["ours", "numpy"] if i % 2 == 0 else ["numpy", "ours"]
        if n <= args.argsort_max:
            methods.append("argsort")
        for method in methods:
            proc = subprocess.run([sys.executable, __file__, "--one", str(n), str(nq), method, str(reps)],
                                  capture_output=True, text=True, check=True)
            row[method] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(n, method, row[method]["best_s"], "s", row[method]["peak_rss_mb"], "MB peak", flush=True)
        m_ours, m_ref = row["ours"].pop("metrics"), row["numpy"].pop("metrics")
        row["metrics_agree"] = all(m_ours[k] == v for k, v in m_ref.items())
        row["metrics"] = m_ref
        if not row["metrics_agree"]:
            row["metrics_ours"] = {k: m_ours[k] for k in m_ref}
            proc = subprocess.run([sys.executable, __file__, "--check", str(n), str(nq)],
                                  capture_output=True, text=True, check=True)
            row["float64_check"] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(n, "ranked apart:", row["float64_check"], flush=True)
        row["ratio_ours_over_numpy"] = round(row["ours"]["best_s"] / row["numpy"]["best_s"], 3)
        if "argsort" in row:
            m_sort = row["argsort"].pop("metrics")
            row["argsort_metrics_agree"] = all(m_sort[k] == v for k, v in m_ref.items())
            row["ratio_ours_over_argsort"] = round(row["ours"]["best_s"] / row["argsort"]["best_s"], 3)
        results.append(row)

    out = {
        "benchmark": "eval",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/eval.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "what": {
            "ours": "Embeddings(...) validation + dualenc.retrieval.evaluate(emb, resamples=1000, max_block_mb=512): "
                    "exact ranks of text->video (Q x N) and video->text (Q x Q), R@1/5/10, MdR, MnR, and "
                    "bootstrap 95% intervals of every R@K",
            "numpy": "the same ranks written plainly: per block of queries s = q_block @ g.T (a fresh array), "
                     "pos = s[row, positive], rank = (s >= pos[:, None]).sum(1), the same block rows as ours; "
                     "then R@K/MdR/MnR with np.mean/np.median; no validation, no bootstrap",
            "data": "N random unit vectors of dim 512 (videos); Q captions, caption i = normalise(video p_i + "
                    "4 * N(0, I/512)), one caption per video",
            "argsort": "the textbook reference: the same blocks, s = q_block @ g.T, order = argsort(-s, stable), "
                       "rank = position of the positive in order; galleries up to --argsort-max only",
            "timing": "wall clock, best of `repeats` in one subprocess per (size, method); data making excluded",
            "memory": "ru_maxrss of that subprocess (peak_rss_mb); rss_with_data_mb is VmRSS once the arrays and "
                      "keys exist; eval_extra_mb the difference",
            "float64_check": "only where the metrics disagree: per direction, the queries ours and numpy rank "
                             "apart, ranked again against the whole gallery in float64",
            "goal": "ratio_ours_over_numpy <= 1.5 (the stricter of the two references; the issue names matmul + "
                    "argsort, ratio_ours_over_argsort)",
        },
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "cpus_usable": len(os.sched_getaffinity(0)), "nice": os.nice(0)},
        "versions": versions(),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps([{k: r.get(k) for k in ("gallery", "queries", "ratio_ours_over_numpy", "ratio_ours_over_argsort",
                                             "metrics_agree")}
                      for r in results]), f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
