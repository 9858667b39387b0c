"""Retrieval evaluation: exact ranks of the positives, R@K / MdR / MnR with bootstrap CIs, and FAISS search.

    emb = load_embeddings("emb/")                       # written by `dualenc embed`
    metrics = evaluate(emb)                             # both directions, every caption
    metrics = evaluate(emb, captions="first")           # single-caption protocol (MSR-VTT 1k-A style)
    metrics = evaluate(emb, index="ivf")                # plus what an approximate index loses

Ranks are exact and computed in blocks of queries (``q_block @ gallery.T`` in float32, never more than
``max_block_mb`` of scores at once). A query's rank is 1 + the number of gallery items that are not its
positives and score >= its best positive: a negative tied with the positive ranks above it, so ties
never flatter the model. Scores within float32's rounding bound of a query's best positive are compared
again in float64, one vector at a time, so that identical videos tie whatever BLAS kernel scored them.
FAISS only serves top-k search (`search`) and the approximate-index report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from dualenc import __version__

TEXT_TO_VIDEO = "text_to_video"
VIDEO_TO_TEXT = "video_to_text"
DIRECTIONS = (TEXT_TO_VIDEO, VIDEO_TO_TEXT)
DEFAULT_KS = (1, 5, 10)
INDEX_TYPES = ("flat", "ivf", "hnsw")
CAPTION_PROTOCOLS = ("all", "first")
FILES = ("video.npy", "video_keys.txt", "text.npy", "text_keys.txt")

DEFINITIONS = {
    "score": "inner product of the float32 embeddings (cosine similarity when they are L2-normalised)",
    "rank": "1 + the number of gallery items that are not positives of the query and score >= the query's best "
            "positive; a negative tied with the positive ranks above it (ties count against the model)",
    TEXT_TO_VIDEO: "each caption in use is a query; gallery: every video (those without captions too); "
                   "positive: the caption's video",
    VIDEO_TO_TEXT: "each video with at least one caption in use is a query; gallery: the captions in use; "
                   "positives: the video's own captions; its rank is that of its best-ranked own caption",
    "R@K": "fraction (0..1) of queries whose rank is <= K",
    "MdR": "median rank (the mean of the two middle ranks for an even number of queries)",
    "MnR": "mean rank",
    "ci95": "95% percentile bootstrap interval of each R@K: the queries resampled with replacement "
            "(numpy default_rng(seed).integers), quantiles 0.025 and 0.975 with linear interpolation",
}
CAPTION_DEFINITIONS = {
    "all": "every caption of every video",
    "first": "one caption per video: the first of its captions in text.npy order (single-caption protocol, "
             "as in MSR-VTT 1k-A)",
}


# --------------------------------------------------------------------------- embeddings

@dataclass
class Embeddings:
    """Video and text embeddings plus the video each text belongs to (the files `dualenc embed` writes).

    Validated on construction: every problem is collected and raised at once, naming the file when
    ``source`` (the directory) is set.
    """

    video: np.ndarray
    """(videos, dim) float; one row per video."""
    video_keys: list[str]
    """The key of each row of ``video``; unique."""
    text: np.ndarray
    """(texts, dim) float, same dim as ``video``."""
    text_keys: list[str]
    """The video key each row of ``text`` belongs to; several texts may share a key."""
    source: str | None = None
    """Directory the arrays came from; only names the files in error messages."""
    meta: dict = field(default_factory=dict)
    """``embed.json`` when present (counts, the text keys embedded)."""
    text_video: np.ndarray = field(init=False, repr=False)
    """Row in ``video`` of each text's video (derived)."""

    def __post_init__(self) -> None:
        name = {f: (f"{self.source}/{f}" if self.source else f) for f in FILES}
        problems: list[str] = []
        self.video_keys, self.text_keys = list(self.video_keys), list(self.text_keys)
        arrays = {}
        for attr, fname in (("video", "video.npy"), ("text", "text.npy")):
            arr = np.asarray(getattr(self, attr))
            if arr.ndim != 2:
                problems.append(f"{name[fname]}: expected a 2-D array (rows x dim), got shape {arr.shape}")
            elif not np.issubdtype(arr.dtype, np.floating):
                problems.append(f"{name[fname]}: expected floating-point embeddings, got dtype {arr.dtype}")
            else:
                arr = np.ascontiguousarray(arr, dtype=np.float32)
                # a float64 sum is finite iff every float32 element is, and allocates no copy
                if not np.isfinite(arr.sum(dtype=np.float64)):
                    problems.append(f"{name[fname]}: contains NaN or infinite values")
                arrays[attr] = arr
            setattr(self, attr, arr)
        for attr, fname, keys in (("video", "video_keys.txt", self.video_keys),
                                  ("text", "text_keys.txt", self.text_keys)):
            rows = getattr(self, attr).shape[0] if getattr(self, attr).ndim >= 1 else 0
            npy = f"{attr}.npy"
            if rows != len(keys):
                problems.append(f"{name[npy]} has {rows} rows but {name[fname]} has {len(keys)} keys")
        if len(arrays) == 2 and self.video.shape[1] != self.text.shape[1]:
            problems.append(f"{name['text.npy']} has dim {self.text.shape[1]} but {name['video.npy']} has dim "
                            f"{self.video.shape[1]}")
        index: dict[str, int] = {}
        for i, key in enumerate(self.video_keys):
            if not key:
                problems.append(f"{name['video_keys.txt']}: empty key on line {i + 1}")
            elif key in index:
                problems.append(f"{name['video_keys.txt']}: duplicate key {key!r} on lines {index[key] + 1} "
                                f"and {i + 1}")
            else:
                index[key] = i
        missing = [(i, k) for i, k in enumerate(self.text_keys) if k not in index]
        if missing:
            shown = ", ".join(f"{k!r} (line {i + 1})" for i, k in missing[:3])
            problems.append(f"{name['text_keys.txt']}: {len(missing)} text key(s) have no video in "
                            f"{name['video_keys.txt']}, e.g. {shown}")
        if problems:
            raise ValueError("invalid embeddings:\n  " + "\n  ".join(problems))
        self.text_video = np.fromiter((index[k] for k in self.text_keys), np.int64, len(self.text_keys))

    @property
    def dim(self) -> int:
        return int(self.video.shape[1])


def _read_keys(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    keys = text.split("\n")
    if keys and keys[-1] == "":
        keys.pop()  # the file ends with a newline
    return [k.rstrip("\r") for k in keys]


def load_embeddings(path: str | Path) -> Embeddings:
    """Reads the directory `dualenc embed` writes (see `dualenc.embed`).

    Args:
        path: directory holding video.npy, video_keys.txt, text.npy, text_keys.txt (and optionally embed.json).

    Returns:
        The validated `Embeddings`.

    Raises:
        FileNotFoundError: naming every missing file.
        ValueError: naming the file(s) of every inconsistency (shapes, counts, duplicate video keys, text keys
            without a video, NaN).
    """
    path = Path(path)
    missing = [str(path / f) for f in FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError("missing embedding file(s): " + ", ".join(missing))
    meta_path = path / "embed.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return Embeddings(video=np.load(path / "video.npy", allow_pickle=False),
                      video_keys=_read_keys(path / "video_keys.txt"),
                      text=np.load(path / "text.npy", allow_pickle=False),
                      text_keys=_read_keys(path / "text_keys.txt"), source=str(path), meta=meta)


# --------------------------------------------------------------------------- exact ranks

class Positives(NamedTuple):
    """The positives of each query in CSR form: query ``i``'s are gallery rows ``cols[offsets[i]:offsets[i+1]]``."""

    offsets: np.ndarray
    cols: np.ndarray

    @classmethod
    def one_each(cls, cols: Sequence[int] | np.ndarray) -> Positives:
        """One positive per query: query ``i``'s is gallery row ``cols[i]``."""
        cols = np.asarray(cols, np.int64)
        return cls(np.arange(len(cols) + 1, dtype=np.int64), cols)

    @classmethod
    def from_query_ids(cls, query_of_positive: np.ndarray, cols: np.ndarray, n_queries: int) -> Positives:
        """Builds the CSR form from (query, gallery row) pairs given in any order."""
        query_of_positive, cols = np.asarray(query_of_positive, np.int64), np.asarray(cols, np.int64)
        order = np.argsort(query_of_positive, kind="stable")
        counts = np.bincount(query_of_positive, minlength=n_queries)
        return cls(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), cols[order])


def _check_positives(pos: Positives, n: int, m: int) -> None:
    offsets, cols = np.asarray(pos.offsets), np.asarray(pos.cols)
    if offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != len(cols):
        raise ValueError(f"positives: offsets must have {n + 1} entries from 0 to len(cols)={len(cols)}")
    if n and np.any(np.diff(offsets) < 1):
        raise ValueError(f"positives: query {int(np.argmin(np.diff(offsets)))} has no positive")
    if len(cols) and (cols.min() < 0 or cols.max() >= m):
        raise ValueError(f"positives: gallery rows must lie in [0, {m})")
    query = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
    if len(np.unique(query * m + cols)) != len(cols):
        raise ValueError("positives: a query lists the same gallery row twice")


def _as_f32(x: np.ndarray, what: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array, got shape {x.shape}")
    return x


# More rows per block buy no gemm speed past a few hundred, and fresh pages are not free: on the bench machine
# (a VM) 10k x 10k scores in one 500 MB block took twice as long as in blocks of 2048 rows.
MAX_BLOCK_ROWS = 2048

def block_rows(gallery_size: int, max_block_mb: float = 512, top_k: int = 0) -> int:
    """Query rows per block of the exact rank pass for a gallery of ``gallery_size`` items.

    A block holds its float32 scores and two boolean masks of the comparison (6 bytes a score; 18 with a top-k,
    for argpartition's int64 indices and a negated copy), at most ``max_block_mb`` MiB, and at most
    `MAX_BLOCK_ROWS` rows.
    """
    per_score = 6 + (12 if top_k else 0)
    return int(max(1, min(MAX_BLOCK_ROWS, (max_block_mb * 2**20) // (per_score * max(gallery_size, 1)))))


# Scores come from BLAS in float32, which rounds the same gallery vector differently by where it sits: with one
# query row numpy calls gemv, with a few rows OpenBLAS takes small-matrix paths, and on some x86 CPUs (AMD EPYC,
# AVX2) the gemm kernels themselves round the last columns of a block apart (identical videos then stop tying).
# Blocks of at least 8 rows keep to the gemm kernels; and every score within float32's rounding bound of a
# query's best positive is compared again in float64 (`_exact_scores`), so that twins tie on any BLAS.
_MIN_GEMM_ROWS = 8


def _dot_bound(dim: int) -> float:
    """Relative bound on the rounding of a float32 dot product of ``dim`` terms, in any order (gamma_dim)."""
    u = 2.0 ** -24 * dim
    return u / (1 - u) if u < 1 else float("inf")


def _exact_scores(q: np.ndarray, g: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """float64 scores of (query row, gallery row) pairs, each a sum along one contiguous row: the same vector
    gets the same score wherever it sits (BLAS does not promise that)."""
    return (q[rows].astype(np.float64) * g[cols].astype(np.float64)).sum(axis=1)


def _rank_pass(q: np.ndarray, g: np.ndarray, pos: Positives, max_block_mb: float,
               top_k: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """The one pass over query blocks behind `exact_ranks`; optionally also the exact top-k rows per query."""
    n, m = len(q), len(g)
    k = min(top_k, m)
    rows = min(n, block_rows(m, max_block_mb, top_k=k))
    sims_buf = np.empty((max(rows, _MIN_GEMM_ROWS), m), np.float32)
    mask_buf, near_buf = np.empty((rows, m), np.bool_), np.empty((rows, m), np.bool_)
    offsets, cols = np.asarray(pos.offsets, np.int64), np.asarray(pos.cols, np.int64)
    query_of = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
    ranks = np.empty(n, np.int64)
    top = np.empty((n, k), np.int64) if k else None
    # the window around a query's best positive within which float32 rounding can reorder two scores
    g_norm = float(np.sqrt(np.einsum("ij,ij->i", g, g, dtype=np.float64).max())) if m else 0.0
    q_norm = np.sqrt(np.einsum("ij,ij->i", q, q, dtype=np.float64))
    tols = 2 * _dot_bound(q.shape[1]) * q_norm * g_norm * (1 + 1e-6)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        c = stop - start
        sims, mask = sims_buf[:c], mask_buf[:c]
        if c < _MIN_GEMM_ROWS:  # pad with copies of the last row; see _MIN_GEMM_ROWS
            padded = np.minimum(np.arange(start, start + _MIN_GEMM_ROWS), stop - 1)
            np.matmul(q[padded], g.T, out=sims_buf[:_MIN_GEMM_ROWS])
        else:
            np.matmul(q[start:stop], g.T, out=sims)  # a reused buffer: fresh pages cost as much as the compares
        a, b = offsets[start], offsets[stop]
        local = query_of[a:b] - start
        ps = sims[local, cols[a:b]]
        starts = offsets[start:stop] - a
        best = np.maximum.reduceat(ps, starts)
        # scores at least best - tol: every one that could be at least the best positive in exact terms
        tol = tols[start:stop]
        np.greater_equal(sims, (best - tol).astype(np.float32)[:, None], out=mask)
        # row by row: count_nonzero on a 1-D bool array is several times faster than a reduction along an axis
        at_least = np.fromiter((np.count_nonzero(r) for r in mask), np.int64, c)
        # those within tol of the best positive, and the positives, are compared again in float64
        near = near_buf[:c]
        np.less_equal(sims, (best + tol).astype(np.float32)[:, None], out=near)
        np.logical_and(near, mask, out=near)
        w_row, w_col = np.divmod(np.flatnonzero(near), m)  # 1-D: many times faster than np.nonzero in 2-D
        pos_exact = _exact_scores(q, g, start + local, cols[a:b])
        best64 = np.maximum.reduceat(pos_exact, starts)
        tied_positives = np.add.reduceat((pos_exact >= best64[local]).astype(np.int64), starts)
        below = _exact_scores(q, g, start + w_row, w_col) < best64[w_row]
        at_least -= np.bincount(w_row[below], minlength=c)
        ranks[start:stop] = at_least - tied_positives + 1
        if k:
            part = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < m else np.broadcast_to(np.arange(m), (c, m))
            order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1, kind="stable")
            top[start:stop] = np.take_along_axis(part, order, 1)
    return ranks, top


def exact_ranks(queries: np.ndarray, gallery: np.ndarray, positives: Positives, *,
                max_block_mb: float = 512) -> np.ndarray:
    """Exact 1-based rank of each query's best positive, ties counting against the model.

    ``rank[i] = 1 + #{j not in positives(i) : s(i, j) >= max_{p in positives(i)} s(i, p)}`` with
    ``s = queries @ gallery.T`` of the float32 vectors, computed a block of queries at a time in float32; the
    scores within float32's rounding bound of a query's best positive are compared again in float64, so the
    ranks are those of the exact scores (a float32-only count can be off by one where two scores differ by
    a few 1e-8, which a gallery of 1M random vectors holds: bench/eval.py's float64 check).

    Args:
        queries: (n, dim) float array.
        gallery: (m, dim) float array.
        positives: each query's positive gallery rows (at least one, distinct); see `Positives`.
        max_block_mb: memory cap of one block (its scores and comparison mask), in MiB; a block of a few
            (8) query rows is always allowed.

    Returns:
        (n,) int64 ranks in [1, m - #positives + 1].

    Raises:
        ValueError: on mismatched dims, a query without positives, an out-of-range positive, non-finite inputs.
    """
    q, g = _as_f32(queries, "queries"), _as_f32(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"queries have dim {q.shape[1]} but the gallery has dim {g.shape[1]}")
    for x, what in ((q, "queries"), (g, "gallery")):
        if not np.isfinite(x.sum(dtype=np.float64)):
            raise ValueError(f"{what}: contains NaN or infinite values")
    _check_positives(positives, len(q), len(g))
    return _rank_pass(q, g, positives, max_block_mb)[0]


# --------------------------------------------------------------------------- metrics

def rank_metrics(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS, prefix: str = "") -> dict[str, float]:
    """R@K for each K (a fraction), MdR and MnR of 1-based ranks; keys like ``text_to_video_R@1`` with a prefix.

    Raises:
        ValueError: if there are no ranks.
    """
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("no queries to compute metrics over")
    p = f"{prefix}_" if prefix else ""
    out = {f"{p}R@{k}": float(np.mean(ranks <= k)) for k in ks}
    out[f"{p}MdR"] = float(np.median(ranks))
    out[f"{p}MnR"] = float(np.mean(ranks))
    return out


def bootstrap_ci(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS, *, resamples: int = 1000, seed: int = 0,
                 level: float = 0.95, prefix: str = "") -> dict[str, list[float]]:
    """Percentile bootstrap interval of each R@K, resampling the queries with replacement.

    All R@K share each resample. Deterministic for a given seed.

    Returns:
        ``{"<prefix>_R@K": [low, high]}``.
    """
    ranks = np.asarray(ranks)
    n = ranks.size
    if n == 0:
        raise ValueError("no queries to bootstrap over")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"bootstrap needs resamples >= 1 and 0 < level < 1, got {resamples}, {level}")
    rng = np.random.default_rng(seed)
    hits = [ranks <= k for k in ks]
    stats = np.empty((len(ks), resamples))
    batch = max(1, 2**22 // n)  # about 32 MiB of indices at a time
    for s in range(0, resamples, batch):
        idx = rng.integers(0, n, size=(min(batch, resamples - s), n))
        for j, h in enumerate(hits):
            stats[j, s:s + len(idx)] = h[idx].mean(axis=1)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2], axis=1)
    p = f"{prefix}_" if prefix else ""
    return {f"{p}R@{k}": [float(lo[j]), float(hi[j])] for j, k in enumerate(ks)}


# --------------------------------------------------------------------------- the two directions

class Direction(NamedTuple):
    """One retrieval direction: which rows are the queries, the gallery, and each query's positives."""

    queries: np.ndarray
    """Rows of the query side (texts for text_to_video, videos for video_to_text)."""
    gallery: np.ndarray
    """Rows of the gallery side."""
    positives: Positives
    """Positions in ``gallery`` of each query's positives."""


def caption_rows(emb: Embeddings, captions: Literal["all", "first"] = "all") -> np.ndarray:
    """Rows of ``emb.text`` in use: all of them, or the first of each video (single-caption protocol)."""
    if captions not in CAPTION_PROTOCOLS:
        raise ValueError(f"unknown captions protocol {captions!r}; valid: {', '.join(CAPTION_PROTOCOLS)}")
    if captions == "all":
        return np.arange(len(emb.text_keys), dtype=np.int64)
    _, first = np.unique(emb.text_video, return_index=True)
    return np.sort(first).astype(np.int64)


def directions(emb: Embeddings, captions: Literal["all", "first"] = "all") -> dict[str, Direction]:
    """Queries, gallery and positives of text_to_video and video_to_text (row indices into ``emb``)."""
    texts = caption_rows(emb, captions)
    text_video = emb.text_video[texts]
    t2v = Direction(texts, np.arange(len(emb.video_keys), dtype=np.int64), Positives.one_each(text_video))
    videos = np.unique(text_video)  # only videos with a caption in use can be queries
    query_of = np.searchsorted(videos, text_video)
    v2t = Direction(videos, texts, Positives.from_query_ids(query_of, np.arange(len(texts)), len(videos)))
    return {TEXT_TO_VIDEO: t2v, VIDEO_TO_TEXT: v2t}


def _sides(emb: Embeddings, name: str, d: Direction) -> tuple[np.ndarray, np.ndarray]:
    q_side, g_side = (emb.text, emb.video) if name == TEXT_TO_VIDEO else (emb.video, emb.text)
    # rows are sorted and distinct, so as many rows as the array has means all of them, in order: skip the
    # copy (the common case, and 2 GiB for a gallery of 1M videos)
    return tuple(a if len(rows) == len(a) else a[rows] for a, rows in ((q_side, d.queries), (g_side, d.gallery)))


def retrieval_ranks(emb: Embeddings, captions: Literal["all", "first"] = "all", *,
                    max_block_mb: float = 512) -> dict[str, np.ndarray]:
    """Exact ranks of every query of both directions (the order of `directions`' queries)."""
    out = {}
    for name, d in directions(emb, captions).items():
        q, g = _sides(emb, name, d)
        out[name] = _rank_pass(q, g, d.positives, max_block_mb)[0]
    return out


# --------------------------------------------------------------------------- FAISS

def _faiss():
    try:
        import faiss
    except ImportError as exc:  # a core dependency, but a broken GPU install can lose it
        raise ImportError("FAISS is missing: pip install faiss-cpu (or faiss-gpu, not both)") from exc
    return faiss


def default_nlist(m: int) -> int:
    """IVF lists for m vectors: about 4 sqrt(m), keeping >= 39 training points per list (FAISS's minimum)."""
    return int(max(1, min(round(4 * np.sqrt(m)), m // 39)))


def create_index(gallery: np.ndarray, index: Literal["flat", "ivf", "hnsw"] = "flat", *, nlist: int | None = None,
                 nprobe: int | None = None, hnsw_m: int = 32, ef_construction: int = 80, ef_search: int = 128,
                 gpu: bool | None = None, seed: int = 0):
    """A FAISS inner-product index holding the gallery.

    Args:
        gallery: (m, dim) float array.
        index: ``flat`` (exact, IndexFlatIP), ``ivf`` (IndexIVFFlat: ``nlist`` k-means lists, ``nprobe`` visited
            per query) or ``hnsw`` (IndexHNSWFlat: ``hnsw_m`` links per node, ``ef_construction``,
            ``ef_search``).
        nlist: IVF lists; default `default_nlist`.
        nprobe: IVF lists searched; default nlist / 8 (at least 1).
        gpu: put the index on every GPU; default: when ``faiss.get_num_gpus() > 0``. FAISS has no GPU HNSW,
            so an HNSW index stays on the CPU.
        seed: k-means seed (IVF).

    Raises:
        ValueError: unknown index type (listing the valid ones), or nlist larger than the gallery.
        ImportError: ``gpu=True`` without a GPU build of FAISS.
    """
    faiss = _faiss()
    if index not in INDEX_TYPES:
        raise ValueError(f"unknown index {index!r}; valid: {', '.join(INDEX_TYPES)}")
    g = _as_f32(gallery, "gallery")
    m, d = g.shape
    use_gpu = faiss.get_num_gpus() > 0 if gpu is None else gpu
    if use_gpu and not hasattr(faiss, "StandardGpuResources"):  # faiss-cpu defines index_cpu_to_all_gpus too
        raise ImportError("gpu=True needs the GPU build of FAISS (pip install faiss-gpu in place of faiss-cpu)")
    if index == "flat":
        idx = faiss.IndexFlatIP(d)
    elif index == "ivf":
        nlist = nlist or default_nlist(m)
        if not 1 <= nlist <= m:
            raise ValueError(f"nlist={nlist} must lie in [1, {m}] (the gallery size)")
        idx = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        idx.cp.seed = seed
        idx.cp.max_points_per_centroid = 256  # FAISS's default sample size, stated: the training cost is bounded
        idx.train(g)
        idx.nprobe = min(nlist, nprobe or max(1, nlist // 8))
    else:
        idx = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efConstruction = ef_construction
        idx.hnsw.efSearch = ef_search
    idx.add(g)
    if use_gpu and index != "hnsw":
        nprobe_set = getattr(idx, "nprobe", None)
        idx = faiss.index_cpu_to_all_gpus(idx)
        if nprobe_set is not None:
            faiss.GpuParameterSpace().set_index_parameter(idx, "nprobe", nprobe_set)
    return idx


def search(queries: np.ndarray, gallery, k: int, index: Literal["flat", "ivf", "hnsw"] = "flat", *,
           chunk: int = 4096, **index_options) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner-product search, a chunk of queries at a time.

    Args:
        queries: (n, dim) float array.
        gallery: (m, dim) float array, or a FAISS index already built (then ``index`` and options are unused).
        k: results per query; the returned width is min(k, gallery size).
        index: index type for a gallery array; see `create_index`.
        chunk: queries per FAISS call (bounds the memory of one call's results and distance blocks).
        **index_options: passed to `create_index`.

    Returns:
        (scores, ids): (n, k) float32 scores, best first, and (n, k) int64 gallery rows.
    """
    if k < 1 or chunk < 1:
        raise ValueError(f"k and chunk must be >= 1, got k={k}, chunk={chunk}")
    q = _as_f32(queries, "queries")
    idx = gallery if not isinstance(gallery, np.ndarray) else create_index(gallery, index, **index_options)
    if q.shape[1] != idx.d:
        raise ValueError(f"queries have dim {q.shape[1]} but the index has dim {idx.d}")
    k = min(k, idx.ntotal)
    scores, ids = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
    for s in range(0, len(q), chunk):
        scores[s:s + chunk], ids[s:s + chunk] = idx.search(q[s:s + chunk], k)
    return scores, ids


def topk_overlap(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over queries of |approximate top-k ∩ exact top-k| / k (FAISS's "k-recall@k")."""
    approx_ids, exact_ids = np.asarray(approx_ids), np.asarray(exact_ids)
    if approx_ids.shape != exact_ids.shape or approx_ids.size == 0:
        raise ValueError(f"top-k id arrays must share a non-empty shape, got {approx_ids.shape}, {exact_ids.shape}")
    hit = sum(np.count_nonzero(np.isin(a[a >= 0], e)) for a, e in zip(approx_ids, exact_ids))  # -1: no result
    return float(hit / approx_ids.size)


def _recall_from_top(top: np.ndarray, pos: Positives, ks: Sequence[int]) -> dict[str, float]:
    """R@K read off a top list: the fraction of queries with a positive among the first K results."""
    offsets, cols = pos.offsets, pos.cols
    first = np.full(len(top), np.iinfo(np.int64).max)
    for i, row in enumerate(top):
        where = np.flatnonzero(np.isin(row, cols[offsets[i]:offsets[i + 1]]))
        if where.size:
            first[i] = where[0] + 1
    return {f"R@{k}": float(np.mean(first <= k)) for k in ks if k <= top.shape[1]}


# --------------------------------------------------------------------------- evaluate

def evaluate(emb: Embeddings, *, captions: Literal["all", "first"] = "all", ks: Sequence[int] = DEFAULT_KS,
             index: Literal["flat", "ivf", "hnsw"] = "flat", index_options: dict | None = None,
             approx_k: int = 10, resamples: int = 1000, seed: int = 0, max_block_mb: float = 512,
             text_key: str | Sequence[str] | None = None, ranks_out: dict | None = None) -> dict:
    """Retrieval metrics of both directions, ready to be written as metrics.json.

    Ranks are always exact. With ``index`` ``ivf`` or ``hnsw`` the result also says what that approximate
    index loses: the overlap of its top-``approx_k`` with the exact top-``approx_k`` and the R@K read off its
    results.

    Args:
        emb: the embeddings.
        captions: ``all`` or ``first`` (single-caption protocol); see `CAPTION_DEFINITIONS`.
        ks: the K of R@K.
        index: ``flat`` (exact only) or an approximate index to report on; see `create_index`.
        index_options: passed to `create_index` (nlist, nprobe, hnsw_m, ef_search, gpu, ...).
        approx_k: the depth of the approximate-index comparison.
        resamples: bootstrap resamples (0 skips the intervals).
        seed: bootstrap seed.
        max_block_mb: memory cap of one block of scores (see `exact_ranks`).
        text_key: the text member(s) embedded, for the protocol block; default: ``emb.meta["text_keys"]``.
        ranks_out: when given, filled with each direction's exact ranks (``{direction: (queries,) int64}``, in the
            order of `directions`' queries), so callers that plot them need not rank twice.

    Returns:
        ``{"text_to_video_R@1": ..., "text_to_video_MdR": ..., "video_to_text_MnR": ..., "ci95": {metric: [lo, hi]},
        "protocol": {...}, "approximate": {...} (ivf/hnsw only), "seconds": {...}}``.

    Raises:
        ValueError: no captions or no videos, unknown protocol or index.
    """
    if index not in INDEX_TYPES:
        raise ValueError(f"unknown index {index!r}; valid: {', '.join(INDEX_TYPES)}")
    if not len(emb.video_keys) or not len(emb.text_keys):
        raise ValueError(f"nothing to evaluate: {len(emb.video_keys)} videos, {len(emb.text_keys)} texts")
    if any(k < 1 for k in ks):
        raise ValueError(f"every K must be >= 1, got {list(ks)}")
    dirs = directions(emb, captions)
    metrics: dict = {}
    ci: dict = {}
    seconds: dict = {}
    approximate: dict = {}
    want_top = approx_k if index != "flat" else 0
    for name, d in dirs.items():
        q, g = _sides(emb, name, d)
        t0 = time.perf_counter()
        ranks, exact_top = _rank_pass(q, g, d.positives, max_block_mb, top_k=want_top)
        metrics.update(rank_metrics(ranks, ks, prefix=name))
        if ranks_out is not None:
            ranks_out[name] = ranks
        if resamples:
            ci.update(bootstrap_ci(ranks, ks, resamples=resamples, seed=seed, prefix=name))
        seconds[name] = round(time.perf_counter() - t0, 4)
        if want_top:
            t0 = time.perf_counter()
            idx = create_index(g, index, **(index_options or {}))
            build = time.perf_counter() - t0
            _, approx_top = search(q, idx, approx_k)
            approximate[f"{name}_recall@{approx_k}_vs_exact"] = topk_overlap(approx_top, exact_top)
            approximate.update({f"{name}_{k}": v for k, v in _recall_from_top(approx_top, d.positives, ks).items()})
            approximate[f"{name}_build_s"] = round(build, 4)
            approximate[f"{name}_search_s"] = round(time.perf_counter() - t0 - build, 4)
    text_key = text_key if text_key is not None else emb.meta.get("text_keys")
    norms = np.linalg.norm(emb.video[:1000], axis=1), np.linalg.norm(emb.text[:1000], axis=1)
    used = len(dirs[TEXT_TO_VIDEO].queries)
    protocol = {
        "pseudocap_version": __version__,
        "captions": captions,
        "captions_definition": CAPTION_DEFINITIONS[captions],
        "text_key": text_key,
        "source": emb.source,
        "index": index,
        "ranks": f"exact: float32 query-block @ gallery.T, blocks of at most {max_block_mb} MiB; scores within "
                 "float32 rounding of the best positive compared again in float64",
        "videos": len(emb.video_keys),
        "texts": len(emb.text_keys),
        "texts_used": used,
        "videos_without_text": int(len(emb.video_keys) - len(dirs[VIDEO_TO_TEXT].queries)),
        "queries": {n: int(len(d.queries)) for n, d in dirs.items()},
        "gallery": {n: int(len(d.gallery)) for n, d in dirs.items()},
        "dim": emb.dim,
        "l2_normalised": bool(  # checked on the first 1000 rows of each side
            np.allclose(norms[0], 1, atol=1e-3) and np.allclose(norms[1], 1, atol=1e-3)),
        "ks": list(ks),
        "bootstrap": {"resamples": resamples, "seed": seed, "level": 0.95} if resamples else None,
        "definitions": DEFINITIONS,
    }
    out = {**metrics, "ci95": ci, "protocol": protocol, "seconds": seconds}
    if approximate:
        out["approximate"] = {"index": index, "options": {k: v for k, v in (index_options or {}).items()},
                              "k": approx_k, "definition": (
                                  f"recall@{approx_k}_vs_exact: mean over queries of |approximate top-{approx_k} "
                                  f"∩ exact top-{approx_k}| / {approx_k} (ties at the boundary make the exact set "
                                  "one of several); R@K: fraction of queries with a positive among the index's "
                                  "first K results"), **approximate}
    return out
