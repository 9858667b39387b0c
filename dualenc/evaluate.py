"""The retrieval evaluation job behind `dualenc eval`: embeddings in, metrics.json + report.md + report.html out.

    dualenc eval --checkpoint runs/pseudo/ --shards 'toy/test-*.tar' --text-key gt.txt --out reports/pseudo/
    dualenc eval --embeddings emb/ --out reports/emb/
    dualenc eval --benchmark msrvtt-1ka --videos MSRVTT/videos --annotations MSRVTT_JSFUSION_test.csv \\
        --checkpoint runs/pseudo/ --out reports/msrvtt/

With a checkpoint the videos and texts are embedded first (into ``OUT/embeddings/``, the `dualenc embed`
format, so a later run can start from them). Ranks are exact (`dualenc.retrieval.evaluate`); FAISS
serves the top-5 of the example queries and, with ``--index ivf|hnsw``, the approximate-index report.
Everything a reader needs to reproduce the numbers goes into ``metrics.json["protocol"]``: the shards and
their content hash, the frame sampling rule, the text key, the index, the model and checkpoint hash, the
metric definitions and the command line.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dualenc.retrieval import CAPTION_PROTOCOLS, INDEX_TYPES, TEXT_TO_VIDEO, VIDEO_TO_TEXT, Embeddings, \
    directions, evaluate, load_embeddings, search

THUMB_FRAMES = 3  # first, middle and last sampled frame side by side: enough to see which way a clip runs
THUMB_HEIGHT = 64
NEGATIVE_PAIRS = 20_000  # random non-matching (text, video) pairs for the similarity histogram


@dataclass
class EvalConfig:
    """What `run_eval` evaluates and how; every problem is reported at once on construction."""

    out: str
    """Report directory: metrics.json, report.md, report.html, thumbs/, embeddings/."""
    checkpoint: str | None = None
    """A `dualenc train` run or checkpoint directory; needs ``shards`` or ``benchmark``."""
    shards: list[str] | None = None
    """Shard pattern(s) to embed with ``checkpoint``."""
    text_key: list[str] = field(default_factory=lambda: ["txt"])
    """Text member(s) of the shards; several texts per video are allowed (a ``.json`` member holds a list)."""
    embeddings: str | None = None
    """A `dualenc embed` directory to evaluate as it is (no model needed)."""
    benchmark: str | None = None
    """A standard layout (`data_specs.benchmarks`): msrvtt-1ka, msvd, didemo; needs videos, annotations, checkpoint."""
    videos: str | None = None
    """The benchmark's video directory."""
    annotations: str | None = None
    """The benchmark's annotation file (or directory, for MSVD)."""
    captions: str | None = None
    """'all' (every caption a query) or 'first' (single-caption protocol); default: the benchmark's, else 'all'."""
    index: str = "flat"
    """flat (exact) or ivf / hnsw, whose top-k is then compared with exact search."""
    nlist: int | None = None
    """IVF lists (default about 4 sqrt(N))."""
    nprobe: int | None = None
    """IVF lists visited per query (default nlist / 8)."""
    ef_search: int | None = None
    """HNSW search depth."""
    frames: int | None = None
    """Frames per clip when embedding (default: the model's)."""
    batch_size: int = 32
    workers: int = 2
    """Decode worker processes when embedding."""
    device: str = "cpu"
    resamples: int = 1000
    """Bootstrap resamples of the 95% intervals (0: none)."""
    seed: int = 0
    """Seed of the bootstrap, the example queries and the negative pairs."""
    examples: int = 8
    """Example text->video queries shown with their top-5 clips."""
    label: str | None = None
    """Name of this run in side-by-side reports (default: the directory name)."""
    max_block_mb: float = 512
    """Memory cap of one block of scores."""
    command: str | None = None
    """The command line, recorded in the protocol."""

    def __post_init__(self) -> None:
        problems = []
        sources = [name for name, given in (("--embeddings", self.embeddings), ("--benchmark", self.benchmark),
                                            ("--shards", self.shards)) if given]
        if len(sources) != 1:
            problems.append("give exactly one of --checkpoint with --shards, --checkpoint with --benchmark, or "
                            f"--embeddings (got {', '.join(sources) or 'none'})")
        if (self.shards or self.benchmark) and not self.checkpoint:
            problems.append(f"{sources[0]} needs --checkpoint (a model to embed with)")
        if self.embeddings and self.checkpoint:
            problems.append("--embeddings are evaluated as they are: drop --checkpoint")
        if self.benchmark and not (self.videos and self.annotations):
            problems.append("--benchmark needs --videos DIR and --annotations FILE")
        if (self.videos or self.annotations) and not self.benchmark:
            problems.append("--videos/--annotations go with --benchmark")
        if self.captions is not None and self.captions not in CAPTION_PROTOCOLS:
            problems.append(f"--captions must be one of {', '.join(CAPTION_PROTOCOLS)}, got {self.captions!r}")
        if self.index not in INDEX_TYPES:
            problems.append(f"--index must be one of {', '.join(INDEX_TYPES)}, got {self.index!r}")
        for name in ("batch_size", "examples", "resamples"):
            if getattr(self, name) < (1 if name == "batch_size" else 0):
                problems.append(f"--{name.replace('_', '-')} must be >= {1 if name == 'batch_size' else 0}")
        if self.frames is not None and self.frames < 1:
            problems.append("--frames must be >= 1")
        if isinstance(self.shards, str):
            self.shards = [self.shards]
        if isinstance(self.text_key, str):
            self.text_key = [self.text_key]
        if problems:
            raise ValueError("invalid evaluation settings:\n  " + "\n  ".join(problems))

    def index_options(self) -> dict:
        names = {"nlist": self.nlist, "nprobe": self.nprobe, "ef_search": self.ef_search}
        return {k: v for k, v in names.items() if v is not None}


# --------------------------------------------------------------------------- provenance

def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a local file or fsspec URL, read in chunks."""
    import fsspec

    h = hashlib.sha256()
    with fsspec.open(str(path), "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def shards_fingerprint(urls: Sequence[str]) -> dict:
    """Each shard's sha256 and one hash over the (name, sha256) list: equal iff the same data in the same files."""
    files = [{"shard": os.path.basename(u), "sha256": sha256_file(u)} for u in urls]
    overall = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"shards": list(urls), "shards_sha256": overall, "shard_files": files}


def checkpoint_info(checkpoint: str | Path) -> dict:
    """The checkpoint directory actually used, its weights' sha256, the model and what it was trained on."""
    from dualenc.train import resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    state = json.loads((path / "state.json").read_text())
    run = state.get("run_config", {})
    return {"checkpoint": str(path), "checkpoint_sha256": sha256_file(path / "model.safetensors"),
            "model": run.get("model"), "temporal": (state.get("model_config", {}).get("temporal") or {}).get("type"),
            "step": state.get("step"), "trained_on": {"shards": run.get("shards"), "text_key": run.get("text_key")}}


# --------------------------------------------------------------------------- what the plots read

def recall_curve(ranks: np.ndarray, gallery: int, points: int = 40) -> dict:
    """R@K at about ``points`` log-spaced K from 1 to the gallery size."""
    ks = np.unique(np.round(np.logspace(0, np.log10(max(gallery, 1)), points)).astype(np.int64))
    hits = np.sort(ranks)
    return {"k": ks.tolist(), "recall": (np.searchsorted(hits, ks, side="right") / len(ranks)).round(6).tolist()}


def rank_histogram(ranks: np.ndarray) -> dict:
    """Counts of ranks in log-spaced bins [1, 2), [2, 3), [3, 5), [5, 9), ... up to the largest rank."""
    top = int(ranks.max())
    edges = [1, 2] + [2 ** k + 1 for k in range(1, max(1, int(np.ceil(np.log2(max(top, 2))))) + 1)]
    edges = sorted(set(e for e in edges if e <= top + 1) | {top + 1})
    counts, _ = np.histogram(ranks, bins=np.asarray(edges, dtype=np.float64) - 0.5)
    return {"bin_edges": edges, "counts": counts.tolist()}


def similarity_histograms(emb: Embeddings, texts: np.ndarray, seed: int, bins: int = 40) -> dict:
    """Scores of matching (text, its video) pairs against random non-matching pairs, on shared bins."""
    rng = np.random.default_rng(seed)
    owner = emb.text_video[texts]
    pos = np.einsum("ij,ij->i", emb.text[texts], emb.video[owner])
    n = min(NEGATIVE_PAIRS, len(texts) * max(len(emb.video_keys) - 1, 0))
    neg = np.zeros(0, np.float32)
    if n:
        t = rng.integers(0, len(texts), n)
        v = rng.integers(0, len(emb.video_keys), n)
        keep = v != owner[t]
        neg = np.einsum("ij,ij->i", emb.text[texts[t[keep]]], emb.video[v[keep]])
    both = np.concatenate([pos, neg])
    edges = np.linspace(float(both.min()), float(both.max()) + 1e-6, bins + 1)
    return {side: {"bin_edges": edges.round(6).tolist(), "counts": np.histogram(x, edges)[0].tolist(),
                   "mean": round(float(x.mean()), 6) if len(x) else None, "pairs": int(len(x))}
            for side, x in (("positive", pos), ("negative", neg))}


def pick_examples(ranks: np.ndarray, n: int, seed: int) -> list[int]:
    """``n`` query positions, seeded: half among the hits (rank 1) and half among the misses, when both exist,
    so the gallery shows what the model gets wrong as well as right; in query order."""
    rng = np.random.default_rng(seed)
    hits, misses = np.flatnonzero(ranks == 1), np.flatnonzero(ranks > 1)
    take_miss = min(len(misses), max(n - len(hits), n // 2))
    take_hit = min(len(hits), n - take_miss)
    chosen = np.concatenate([rng.choice(hits, take_hit, replace=False), rng.choice(misses, take_miss, replace=False)])
    return sorted(int(i) for i in chosen)


def example_queries(emb: Embeddings, texts: np.ndarray, ranks: np.ndarray, n: int, seed: int,
                    top: int = 5) -> list[dict]:
    """Text->video examples: the caption, its rank and its top-``top`` clips (FAISS flat search)."""
    if not n:
        return []
    picks = pick_examples(ranks, n, seed)
    rows = texts[picks]
    scores, ids = search(emb.text[rows], emb.video, top)
    text_of = _text_strings(emb)
    out = []
    for j, (row, pick) in enumerate(zip(rows, picks)):
        own = emb.video_keys[emb.text_video[row]]
        out.append({"direction": TEXT_TO_VIDEO, "query": text_of[row] if text_of else None, "query_key": own,
                    "rank": int(ranks[pick]),
                    "top": [{"key": emb.video_keys[i], "score": round(float(s), 4), "correct": emb.video_keys[i] == own,
                             "thumb": None} for s, i in zip(scores[j], ids[j])]})
    return out


def _text_strings(emb: Embeddings) -> list[str] | None:
    """The caption strings, when the embedding directory kept them (``texts.jsonl``)."""
    path = Path(emb.source) / "texts.jsonl" if emb.source else None
    if path is None or not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines] if len(lines) == len(emb.text_keys) else None


# --------------------------------------------------------------------------- thumbnails

def _thumb_frames(sample: dict) -> np.ndarray:
    from dualenc.data import FRAMES_MEMBER, load_frames_npy
    from engine.decode import Sampling, decode_video
    from engine.shards import video_member

    if FRAMES_MEMBER in sample:
        frames = load_frames_npy(sample[FRAMES_MEMBER], sample.get("__url__"), sample.get("__key__"))
        pick = np.unique(np.linspace(0, len(frames) - 1, THUMB_FRAMES).round().astype(int))
        return frames[pick]
    return decode_video(sample[video_member(sample)], Sampling.uniform(THUMB_FRAMES), backend="av").frames


def write_thumbnails(samples: Iterable[dict], keys: set[str], out_dir: Path) -> dict[str, str]:
    """A strip of `THUMB_FRAMES` frames per wanted clip as ``out_dir/KEY.jpg``; stops once every key is found.

    Returns:
        ``{key: file name}`` of the thumbnails made; a clip that cannot be decoded gets none (the report says so).
    """
    from PIL import Image

    from engine.errors import SampleError

    out_dir.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}
    for sample in samples:
        key = sample["__key__"]
        if key not in keys or key in made:
            continue
        try:
            frames = _thumb_frames(sample)
        except SampleError:
            continue
        h, w = frames.shape[1:3]
        width = max(1, round(w * THUMB_HEIGHT / h))
        strip = np.concatenate([np.asarray(Image.fromarray(f).resize((width, THUMB_HEIGHT), Image.BILINEAR))
                                for f in frames], axis=1)
        name = f"{key}.jpg"
        Image.fromarray(strip).save(out_dir / name, quality=88)
        made[key] = name
        if len(made) == len(keys):
            break
    return made


# --------------------------------------------------------------------------- the job

def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _embed(cfg: EvalConfig, out: Path, progress: bool) -> tuple[Embeddings, dict, Iterator | None]:
    """Embeds with the checkpoint; returns the embeddings, protocol fields and a way to re-read the samples."""
    from dualenc.embed import embed
    from dualenc.train import load_model
    from engine.shards import ErrorCollector, expand_urls, read_samples

    info = checkpoint_info(cfg.checkpoint)
    model = load_model(info["checkpoint"], device=cfg.device)
    frames = cfg.frames or int(model.config.get("frames", 8))
    emb_dir = out / "embeddings"
    kw = dict(frames=frames, batch_size=cfg.batch_size, workers=cfg.workers, device=cfg.device, progress=progress)
    if cfg.benchmark:
        from dualenc.benchmarks import iter_samples, load_benchmark

        bench = load_benchmark(cfg.benchmark, cfg.videos, cfg.annotations)
        meta = {"benchmark": cfg.benchmark, "videos_dir": cfg.videos, "annotations": cfg.annotations,
                "annotations_sha256": sha256_file(cfg.annotations) if Path(cfg.annotations).is_file() else None,
                "missing_videos": len(bench.missing), "warnings": bench.warnings}
        summary = embed(model, None, emb_dir, text_keys=("captions.json",), samples=iter_samples(bench),
                        provenance=info, **kw)

        def again() -> Iterator[dict]:
            return iter_samples(bench)
    else:
        urls = expand_urls(cfg.shards)
        if not urls:
            raise FileNotFoundError(f"no shard matches {cfg.shards}")
        meta = shards_fingerprint(urls)
        summary = embed(model, urls, emb_dir, text_keys=cfg.text_key, provenance=info, **kw)

        def again() -> Iterator[dict]:
            return read_samples(urls, handler=ErrorCollector())
    protocol = {**meta, **info, "frames": frames, "sampling": summary["sampling"], "decoder": summary["decoder"],
                "embed_errors": summary["errors"]}
    return load_embeddings(emb_dir), protocol, again


def run_eval(cfg: EvalConfig, progress: bool = True) -> dict:
    """Embeds when needed, evaluates both directions exactly, and writes the report directory.

    Returns:
        The metrics written to ``OUT/metrics.json`` (see `dualenc.retrieval.evaluate`, plus ``curves``,
        ``rank_histogram``, ``similarity``, ``examples`` and ``label``).

    Raises:
        FileNotFoundError: missing embeddings, checkpoint, shards, videos or annotations.
        ValueError: inconsistent embeddings, a malformed benchmark annotation, nothing to evaluate.
    """
    from dualenc.report import write_report
    from engine.shards import ErrorCollector, read_samples

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.embeddings:
        emb = load_embeddings(cfg.embeddings)
        protocol = {k: emb.meta[k] for k in ("frames", "sampling", "decoder", "checkpoint", "checkpoint_sha256",
                                              "model", "temporal", "trained_on") if k in emb.meta}
        urls = [u for u in emb.meta.get("shards") or [] if Path(u).is_file()]
        if urls:
            protocol.update(shards_fingerprint(urls))

        def again() -> Iterator[dict] | None:
            return read_samples(urls, handler=ErrorCollector()) if urls else None
    else:
        emb, protocol, again = _embed(cfg, out, progress)
    captions = cfg.captions or (_benchmark_captions(cfg.benchmark) if cfg.benchmark else "all")

    ranks: dict[str, np.ndarray] = {}
    metrics = evaluate(emb, captions=captions, index=cfg.index, index_options=cfg.index_options(),
                       resamples=cfg.resamples, seed=cfg.seed, max_block_mb=cfg.max_block_mb,
                       text_key=emb.meta.get("text_keys") or cfg.text_key, ranks_out=ranks)
    metrics["protocol"].update(protocol)
    metrics["protocol"]["command"] = cfg.command
    metrics["protocol"]["eval_config"] = {k: v for k, v in asdict(cfg).items() if k != "command"}
    dirs = directions(emb, captions)
    texts = dirs[TEXT_TO_VIDEO].queries
    metrics["curves"] = {name: recall_curve(ranks[name], len(dirs[name].gallery)) for name in (TEXT_TO_VIDEO,
                                                                                            VIDEO_TO_TEXT)}
    metrics["rank_histogram"] = {name: rank_histogram(r) for name, r in ranks.items()}
    metrics["similarity"] = similarity_histograms(emb, texts, cfg.seed)
    metrics["examples"] = example_queries(emb, texts, ranks[TEXT_TO_VIDEO], min(cfg.examples, len(texts)), cfg.seed)
    metrics["label"] = cfg.label or out.resolve().name
    metrics["thumbnails"] = (f"Each clip: {THUMB_FRAMES} uniformly sampled frames, left to right in time; the "
                             "green frame is the query's own clip.")
    wanted = {t["key"] for ex in metrics["examples"] for t in ex["top"]}
    samples = again() if wanted else None
    if samples is not None:
        made = write_thumbnails(samples, wanted, out / "thumbs")
        for ex in metrics["examples"]:
            for t in ex["top"]:
                t["thumb"] = f"thumbs/{made[t['key']]}" if t["key"] in made else None
    _write_json(out / "metrics.json", metrics)
    write_report(out, metrics)
    return metrics


def _benchmark_captions(name: str) -> str:
    from data_specs.benchmarks import get_benchmark

    return get_benchmark(name).captions
