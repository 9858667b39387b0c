"""Embeddings of every video and text of some shards, in the format retrieval evaluation reads.

    dualenc embed --checkpoint runs/vidla/ --shards 'toy/test-*.tar' --text-key gt.txt --out emb/

writes ``emb/video.npy`` (float32, L2-normalised, one row per video), ``emb/video_keys.txt`` (one key
per line, same order), ``emb/text.npy`` and ``emb/text_keys.txt`` (the video key each text belongs
to; with several ``--text-key`` members, several texts share a key), and ``emb/errors.jsonl`` for
samples that could not be embedded (key, stage, reason).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from dualenc.model import VideoTextModel


def _clips(shards: str | Sequence[str], text_keys: Sequence[str], frames: int, errors: list,
           workers: int = 2) -> Iterator[tuple[str, np.ndarray, list[str]]]:
    from engine.decode import Sampling
    from engine.decode_pool import DecodePool
    from engine.errors import SampleError
    from engine.shards import ErrorCollector, read_samples, read_text, video_member

    collector = ErrorCollector()
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

        for sample in read_samples(shards, handler=collector):
            key = sample["__key__"]
            try:
                texts = [t.strip() for k in text_keys if (t := read_text(sample, k))]
                if "frames.npy" in sample:
                    item = np.load(io.BytesIO(sample["frames.npy"]), allow_pickle=False)
                else:
                    item = pool.submit(sample[video_member(sample)], Sampling.uniform(frames), "av")
            except SampleError as exc:
                errors.append(exc.located(url=sample["__url__"], key=key).to_row())
                continue
            window.append((key, texts, item))
            yield from drain(4 * max(1, workers))
        yield from drain(0)
    errors.extend(e.to_row() for e in collector.errors)


@torch.no_grad()
def embed(model: VideoTextModel, shards: str | Sequence[str], out: str | Path, text_keys: Sequence[str] = ("txt",),
          frames: int = 8, batch_size: int = 32, workers: int = 2, device: str = "cpu",
          progress: bool = True) -> dict:
    """Embeds every clip and text of the shards; see the module docstring for the files written.

    Returns:
        Counts: videos, texts, errors.
    """
    from tqdm import tqdm

    model.eval().to(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    errors: list = []
    v_rows, v_keys, t_rows, t_keys = [], [], [], []
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
        bar.update(len(pending))
        pending.clear()

    for key, arr, texts in _clips(shards, text_keys, frames, errors, workers):
        if pending and arr.shape != pending[0][1].shape:
            flush()  # clips of another size: a batch holds one shape
        pending.append((key, arr, texts))
        if len(pending) >= batch_size:
            flush()
    flush()
    bar.close()
    dim = model.embed_dim
    np.save(out / "video.npy", np.concatenate(v_rows) if v_rows else np.zeros((0, dim), np.float32))
    np.save(out / "text.npy", np.concatenate(t_rows) if t_rows else np.zeros((0, dim), np.float32))
    (out / "video_keys.txt").write_text("".join(k + "\n" for k in v_keys))
    (out / "text_keys.txt").write_text("".join(k + "\n" for k in t_keys))
    (out / "errors.jsonl").write_text("".join(r.model_dump_json() + "\n" for r in errors))
    summary = {"videos": len(v_keys), "texts": len(t_keys), "errors": len(errors), "text_keys": list(text_keys)}
    (out / "embed.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
