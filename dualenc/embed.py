"""Embeddings of every video and text of some shards, in the format retrieval evaluation reads.

    dualenc embed --checkpoint runs/vidla/ --shards 'toy/test-*.tar' --text-key gt.txt --out emb/

writes ``emb/video.npy`` (float32, L2-normalised, one row per video), ``emb/video_keys.txt`` (one key
per line, same order), ``emb/text.npy`` and ``emb/text_keys.txt`` (the video key each text belongs
to; with several ``--text-key`` members, or a ``.json`` member holding a list of captions, several
texts share a key), ``emb/texts.jsonl`` (each text and its key, same order), ``emb/errors.jsonl`` for
samples that could not be embedded (key, stage, reason), and ``emb/embed.json`` (counts, text keys,
frame sampling, the shards read, and the checkpoint when the caller records it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from dualenc.model import VideoTextModel


def _texts(sample: dict, key: str) -> list[str]:
    """The texts of one member: a ``.json`` member holds a JSON list of captions, any other one a single text."""
    from engine.errors import MemberError
    from engine.shards import read_json, read_text

    if key.endswith(".json"):
        value = read_json(sample, key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            raise MemberError("bad-captions", f"member {key!r} must hold a JSON list of strings",
                              url=sample.get("__url__"), key=sample.get("__key__"))
        return [t.strip() for t in value if t.strip()]
    text = read_text(sample, key)
    return [text.strip()] if text and text.strip() else []


def _clips(samples: Iterable[dict], text_keys: Sequence[str], frames: int, errors: list,
           workers: int = 2) -> Iterator[tuple[str, np.ndarray, list[str]]]:
    from engine.decode import Sampling
    from engine.decode_pool import DecodePool
    from engine.errors import SampleError
    from dualenc.data import FRAMES_MEMBER, load_frames_npy
    from engine.shards import video_member

    window: list = []
    with DecodePool(workers=max(1, workers)) as pool:
        def drain(limit: int) -> Iterator:
            while len(window) > limit:
                key, texts, item = window.pop(0)
                try:
                    arr = item.result().frames if hasattr(item, "result") else item
                except SampleError as exc:
                    errors.append(exc.to_row())
                    continue
                yield key, arr, texts

        for sample in samples:
            key = sample["__key__"]
            try:
                texts = [t for k in text_keys for t in _texts(sample, k)]
                if FRAMES_MEMBER in sample:  # a frame cache: checked like the trainer checks it, never unpickled
                    item = load_frames_npy(sample[FRAMES_MEMBER], sample.get("__url__"), key)
                else:
                    item = pool.submit(sample[video_member(sample)], Sampling.uniform(frames), "av")
            except SampleError as exc:
                errors.append(exc.located(url=sample.get("__url__"), key=key).to_row())
                continue
            window.append((key, texts, item))
            yield from drain(4 * max(1, workers))
        yield from drain(0)


@torch.no_grad()
def embed(model: VideoTextModel, shards: str | Sequence[str] | None, out: str | Path,
          text_keys: Sequence[str] = ("txt",), frames: int = 8, batch_size: int = 32, workers: int = 2,
          device: str = "cpu", progress: bool = True, samples: Iterable[dict] | None = None,
          provenance: dict | None = None) -> dict:
    """Embeds every clip and text of the shards; see the module docstring for the files written.

    Args:
        model: the dual encoder.
        shards: shard pattern(s); or None with ``samples``.
        out: output directory.
        text_keys: text members; a member ending in ``.json`` holds a JSON list of captions.
        frames: frames sampled uniformly per clip (a ``frames.npy`` member is used as it is).
        samples: webdataset-style sample dicts to embed instead of reading ``shards`` (e.g. a benchmark's
            videos, see `dualenc.benchmarks`).
        provenance: extra fields recorded in ``embed.json`` (e.g. the checkpoint and its hash).

    Returns:
        The summary written to ``embed.json``: counts (videos, texts, errors), text keys, frames, sampling
        rule, the shards read, and ``provenance``.
    """
    from tqdm import tqdm

    from engine.decode import SAMPLING_VERSION
    from engine.shards import ErrorCollector, expand_urls, read_samples

    if (shards is None) == (samples is None):
        raise ValueError("embed takes shards or samples, not both or neither")
    collector = ErrorCollector()
    urls = expand_urls(shards) if shards is not None else []
    if shards is not None and not urls:
        raise FileNotFoundError(f"no shard matches {shards!r}")
    source = read_samples(urls, handler=collector) if shards is not None else samples

    model.eval().to(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    errors: list = []
    v_rows, v_keys, t_rows, t_keys, t_strings = [], [], [], [], []
    pending: list[tuple[str, np.ndarray, list[str]]] = []
    bar = tqdm(desc="embed", unit="clip", disable=not progress)

    def flush() -> None:
        if not pending:
            return
        stack = torch.from_numpy(np.stack([a for _, a, _ in pending]))
        v_rows.append(model.encode_video(stack.to(device)).float().cpu().numpy())
        v_keys.extend(k for k, _, _ in pending)
        texts = [(k, t) for k, _, ts in pending for t in ts]
        if texts:
            t_rows.append(model.encode_text([t for _, t in texts]).float().cpu().numpy())
            t_keys.extend(k for k, _ in texts)
            t_strings.extend(texts)
        bar.update(len(pending))
        pending.clear()

    for key, arr, texts in _clips(source, text_keys, frames, errors, workers):
        if pending and arr.shape != pending[0][1].shape:
            flush()  # clips of another size: a batch holds one shape
        pending.append((key, arr, texts))
        if len(pending) >= batch_size:
            flush()
    flush()
    bar.close()
    errors.extend(e.to_row() for e in collector.errors)
    dim = model.embed_dim
    np.save(out / "video.npy", np.concatenate(v_rows) if v_rows else np.zeros((0, dim), np.float32))
    np.save(out / "text.npy", np.concatenate(t_rows) if t_rows else np.zeros((0, dim), np.float32))
    (out / "video_keys.txt").write_text("".join(k + "\n" for k in v_keys))
    (out / "text_keys.txt").write_text("".join(k + "\n" for k in t_keys))
    (out / "texts.jsonl").write_text("".join(json.dumps({"key": k, "text": t}) + "\n" for k, t in t_strings))
    (out / "errors.jsonl").write_text("".join(r.model_dump_json() + "\n" for r in errors))
    summary = {"videos": len(v_keys), "texts": len(t_keys), "errors": len(errors), "text_keys": list(text_keys),
               "frames": frames, "sampling": f"uniform-{frames}@v{SAMPLING_VERSION}", "decoder": "av",
               "shards": urls, **(provenance or {})}
    (out / "embed.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
