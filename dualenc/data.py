"""Training batches of the video-text dual encoder from WebDataset shards: deterministic, resumable, fault-tolerant.

    from dualenc.data import DataConfig, cache_frames, make_loader

    cfg = DataConfig(shards="toy/test-*.tar", text_key="gt.txt", frames=8, batch_size=32, workers=2)
    for step, batch in enumerate(make_loader(cfg, start_batch=resume_at, rank=rank, world_size=world)):
        batch["frames"]   # torch.uint8 [B, T, H, W, 3]
        batch["texts"]    # list[str], stripped
        batch["keys"], batch["epoch"], batch["batch"], batch["skipped"]
        resume_at = batch["batch"] + 1          # what a checkpoint stores

    cache_frames("toy/test-*.tar", "toy_frames/", frames=8)   # decode once; then point --shards there

How the order is made (a pure function of the config, the rank and the world size):

* Streams. ``W = max(1, workers)`` streams per rank, ``N = world_size * W`` in all; stream
  ``(rank r, worker w)`` has the id ``s = r + world_size * w``. Each epoch the URL list is permuted
  with ``default_rng([seed, epoch])`` (the same on every rank); rank ``r`` takes ``urls[r::world_size]``
  and worker ``w`` every ``W``-th of those, i.e. ``urls[s::N]``. With fewer shards than streams,
  samples are split instead, so that no stream is left without data: stream ``s`` reads shard
  ``urls[s % U]`` and keeps every ``m``-th sample of it (``m`` streams share that shard). See
  `assign_shards`.
* Within a stream: the shards' samples, then a cheap check that needs no decode (the text member
  and a video or ``frames.npy`` member are there), then a shuffle buffer seeded with
  ``(seed, epoch, rank, worker)``, then raw batches of ``batch_size``; the incomplete last batch of a
  stream's epoch is dropped. Only then are frames decoded (or loaded from ``frames.npy``).
  With ``hard_negatives="twins"`` a clip and its time-reversed twin (``KEY``, ``KEY-rev``), when they
  come one after the other, pass the shuffle buffer as one unit (see `twin_units`).
* Global index: stream ``w`` makes the rank's batches ``w, w + W, w + 2W, ...`` (its ``j``-th raw
  batch, counted across epochs, is batch ``j * W + w``). The DataLoader (``batch_size=None``,
  ``in_order=True``) hands them out round-robin, so the rank sees batches 0, 1, 2, ... in order.

Resume: ``make_loader(cfg, start_batch=b)`` yields exactly what ``make_loader(cfg)`` yields from batch
``b`` on. Each stream re-reads its raw samples (no decoding) and drops its raw batches whose index is
below ``b``; DataLoader worker ``i`` plays stream ``(i + b) % W``, so the round-robin starts with the
stream that owns batch ``b``. The cost of resuming is reading (not decoding) the skipped part of the
data, earlier epochs included. The sequence depends on every field of `DataConfig`, ``workers``
included: resume with the same configuration.

Bad samples never stop the loader. A read error or a missing/empty/non-UTF-8 text member drops the
sample before batching (so it never takes a slot). A sample whose video fails to decode is found only
after its batch was formed: its slot is refilled with another sample of the same batch (a repeated
key in ``keys``), so every batch keeps exactly ``batch_size`` rows and DDP ``all_gather`` shapes
match. A batch whose samples all fail is not yielded; its index is skipped, so checkpoints should
store ``batch["batch"] + 1`` (the same as the number of steps taken unless a whole batch failed).
Each bad sample is logged once (logger ``dualenc.data``, with shard, key and reason), and every batch
carries ``skipped``: reason -> count of skips so far by this rank (summed over its workers; a sample
that is bad in every epoch counts once per epoch). `cache_frames` finds decode failures once, ahead of
training, and leaves them out of the cache.

DDP and epochs: every rank's loader is infinite, so ranks never run out of batches at different
steps and no collective hangs. Ranks (and workers) can hold different numbers of samples per epoch
(shards of different sizes, bad samples), so near an epoch boundary one stream may already be in
epoch ``e + 1`` while another finishes ``e``: ``epoch`` is the epoch of the stream that made the batch,
and within one stream's epoch every sample appears at most once.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import itertools
import json
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib import format as npy_format
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from engine.decode import BACKENDS, Sampling, decode_video, installed_backends
from engine.errors import BackendUnavailable, DecodeError, MemberError, SampleError
from engine.shards import ErrorCollector, ShardWriter, expand_urls, iter_shard, read_stats, read_text, video_member

log = logging.getLogger("dualenc.data")

FRAMES_MEMBER = "frames.npy"
"""The frame cache's member: ``np.save`` of uint8 [T, H, W, 3], never pickled."""

TWIN_SUFFIX = "-rev"
"""The key suffix of a clip's time-reversed twin (`engine.synth`): ``KEY`` and ``KEY-rev``."""

HARD_NEGATIVES = ("none", "twins")
"""Values of `DataConfig.hard_negatives`."""

MAX_FAILED_BATCHES = 64
"""Consecutive batches without one good sample after which the loader gives up: the data or the
configuration is wrong (every video undecodable, ``frames.npy`` made with another ``--frames``)."""


# --------------------------------------------------------------------------- configuration

@dataclass
class DataConfig:
    """What `make_loader` reads and how it batches; every field shapes the batch sequence."""

    shards: str | list[str]
    """Shard patterns: brace ranges, globs, fsspec URLs (`engine.shards.expand_urls`)."""
    text_key: str = "txt"
    """The member that holds the text: txt (alt-text), gt.txt, alt.txt, or any other member."""
    frames: int = 8
    """Uniformly sampled frames per clip (must match a frame cache's)."""
    batch_size: int = 32
    """Samples per batch, per rank."""
    workers: int = 2
    """DataLoader worker processes (0: decode in this process, as one stream)."""
    shuffle_buffer: int = 256
    """Raw samples held for shuffling (0: no sample shuffle); the shard order is shuffled every epoch anyway."""
    seed: int = 0
    """Seeds the shard order and the shuffle buffers, together with the epoch, rank and worker."""
    decode_backend: str = "av"
    """'av', 'decord', 'torchcodec' or 'auto' (see `engine.decode`)."""
    size: int = 0
    """If > 0, frames are resized to size x size (antialiased bilinear) after decoding."""
    hard_negatives: str = "none"
    """'none', or 'twins': keep a clip and its time-reversed twin (``KEY`` and ``KEY-rev``, next to each
    other in a shard, as `engine synth` writes them) together through the shuffle buffer, so they share a
    batch (unless a batch boundary falls between them) and the contrastive loss can only separate them
    by frame order. The shuffle buffer then holds ``shuffle_buffer`` units (a pair or a single clip)."""

    def __post_init__(self) -> None:
        problems = []
        shards = [self.shards] if isinstance(self.shards, str) else self.shards
        if not isinstance(shards, (list, tuple)) or not shards or not all(
                isinstance(s, str) and s.strip() for s in shards):
            problems.append(f"--shards must be one or more non-empty patterns, got {self.shards!r}")
        if not isinstance(self.text_key, str) or not self.text_key or self.text_key.startswith("__"):
            problems.append(f"--text-key must name a member such as txt or gt.txt, got {self.text_key!r}")
        elif self.text_key == FRAMES_MEMBER:
            problems.append(f"--text-key can not be {FRAMES_MEMBER}, the frame cache's member")
        if self.frames < 1:
            problems.append(f"--frames must be >= 1, got {self.frames}")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            problems.append(f"--workers must be >= 0, got {self.workers}")
        if self.shuffle_buffer < 0:
            problems.append(f"--shuffle-buffer must be >= 0, got {self.shuffle_buffer}")
        if self.seed < 0:
            problems.append(f"--seed must be >= 0 (it seeds numpy's SeedSequence), got {self.seed}")
        if self.decode_backend not in ("auto", *BACKENDS):
            problems.append(f"--decode-backend must be one of auto, {', '.join(BACKENDS)}, got {self.decode_backend!r}")
        if self.size < 0:
            problems.append(f"--size must be >= 0 (0: keep the decoded size), got {self.size}")
        if self.hard_negatives not in HARD_NEGATIVES:
            problems.append(f"--hard-negatives must be one of {', '.join(HARD_NEGATIVES)}, got {self.hard_negatives!r}")
        if problems:
            raise ValueError("; ".join(problems))


# --------------------------------------------------------------------------- shard assignment

@dataclass(frozen=True)
class Share:
    """What one stream reads in one epoch: these shards, keeping sample ``i`` of each if ``i % every == offset``."""

    urls: tuple[str, ...]
    every: int = 1
    offset: int = 0


def assign_shards(urls: Sequence[str], *, seed: int, epoch: int, rank: int, world_size: int,
                  worker: int, workers: int) -> Share:
    """The share of stream (``rank``, ``worker``) in ``epoch``.

    The URL list is permuted with ``default_rng([seed, epoch])``; rank ``r`` takes ``urls[r::world_size]``
    and worker ``w`` takes ``[w::workers]`` of those. With fewer shards than streams, each stream reads
    one shard and keeps every ``m``-th of its samples (``m`` streams share it), so no stream is empty.

    Args:
        urls: all shard URLs, in a fixed order.
        seed, epoch: seed the permutation.
        rank, world_size: this process's place in DDP.
        worker, workers: this stream's place among the rank's streams (``workers >= 1``).

    Returns:
        The `Share`; the shares of all streams of an epoch partition the samples.
    """
    n_urls, n_streams = len(urls), world_size * workers
    order = [urls[i] for i in np.random.default_rng([seed, epoch]).permutation(n_urls)]
    stream = rank + world_size * worker
    if n_urls >= n_streams:
        return Share(tuple(order[stream::n_streams]))
    first = stream % n_urls
    sharers = (n_streams - 1 - first) // n_urls + 1
    return Share((order[first],), every=sharers, offset=stream // n_urls)


# --------------------------------------------------------------------------- frames

def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 [T, H, W, 3] -> [T, size, size, 3], antialiased bilinear (PIL); unchanged if already that size."""
    if frames.shape[1:3] == (size, size):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.Resampling.BILINEAR)) for f in frames])


def load_frames_npy(data: bytes, url: str | None, key: str | None) -> np.ndarray:
    """The uint8 [T, H, W, 3] array in ``frames.npy`` bytes; the header is checked before anything is allocated.

    The array is a read-only view of ``data`` (no copy: the loader's batch stacking is the one copy).
    """
    def bad(why: str) -> DecodeError:
        return DecodeError("bad-frames-npy", f"{FRAMES_MEMBER}: {why}", url=url, key=key)

    buf = io.BytesIO(data)
    try:
        version = npy_format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(buf)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(buf)
        else:
            raise bad(f"unsupported .npy version {version}")
    except ValueError as exc:
        raise bad(str(exc)) from None
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise bad(f"holds {dtype} {shape}, not uint8 [T, H, W, 3]")
    if int(np.prod(shape)) != len(data) - buf.tell():
        raise bad(f"the header says {shape} but {len(data) - buf.tell()} bytes follow it")
    # a uint8 header (checked above) can not describe pickled objects: the payload is raw bytes
    return np.frombuffer(data, dtype=np.uint8, offset=buf.tell()).reshape(shape, order="F" if fortran else "C")


def load_frames(sample: dict[str, Any], frames: int, backend: str = "av", size: int = 0) -> np.ndarray:
    """A sample's uint8 frames [T, H, W, 3]: from ``frames.npy`` if present, else decoded from its video.

    Args:
        sample: a webdataset-style sample (``__key__``, ``__url__``, members).
        frames: frames to sample uniformly (a cached array must hold exactly this many).
        backend: the decode backend.
        size: if > 0, the frames are resized to size x size (`resize_frames`).

    Raises:
        SampleError: a `DecodeError` ('not-a-video', 'bad-frames-npy', 'frames-mismatch', ...) or a
            `MemberError` ('no-video-member'), naming shard and key.
        BackendUnavailable: the backend is not installed.
    """
    url, key = sample.get("__url__"), sample.get("__key__")
    if FRAMES_MEMBER in sample:
        arr = load_frames_npy(sample[FRAMES_MEMBER], url, key)
        if arr.shape[0] != frames:
            raise DecodeError("frames-mismatch", f"{FRAMES_MEMBER} holds {arr.shape[0]} frames; --frames is {frames}",
                              url=url, key=key)
    else:
        ext = video_member(sample)
        try:
            arr = decode_video(sample[ext], Sampling.uniform(frames), backend=backend).frames
        except SampleError as exc:
            raise exc.located(url=url, key=key)
        except BackendUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - a decoder's surprise on one hostile file is that sample's error
            raise DecodeError("decoder-error", f"{type(exc).__name__}: {exc}", url=url, key=key) from None
    return resize_frames(arr, size) if size else arr


# --------------------------------------------------------------------------- stream stages

class SkipLog:
    """The error handler of one stream: counts every skip by reason, logs each bad sample once."""

    def __init__(self, where: str):
        self.where = where
        self.counts: Counter[str] = Counter()
        self._logged: set[tuple[str | None, str | None, str]] = set()

    def __call__(self, exc: SampleError) -> bool:
        self.counts[exc.reason] += 1
        ident = (exc.url, exc.key, exc.reason)
        if ident not in self._logged:
            self._logged.add(ident)
            log.warning("%s: skipping: %s", self.where, exc)
        return True


def shard_samples(share: Share, handler: SkipLog) -> Iterator[dict[str, Any]]:
    """The raw samples of a share, shard after shard, each shard's in its stored order."""
    for url in share.urls:
        for i, sample in enumerate(iter_shard(url, handler)):
            if i % share.every == share.offset:
                yield sample


def with_text(samples: Iterable[dict[str, Any]], text_key: str, handler: SkipLog) -> Iterator[dict[str, Any]]:
    """Samples that have a non-empty text and a frame source, with the stripped text as ``__text__``.

    Only member names and the text are looked at: this check is cheap, so skipped batches run it too.
    """
    for sample in samples:
        url, key = sample["__url__"], sample["__key__"]
        try:
            text = read_text(sample, text_key)
            if text is None:
                members = sorted(k for k in sample if not k.startswith("__"))
                raise MemberError("missing-text", f"no {text_key!r} member; members are {members}", url=url, key=key)
            text = text.strip()
            if not text:
                raise MemberError("empty-text", f"member {text_key!r} is blank", url=url, key=key)
            if FRAMES_MEMBER not in sample:
                video_member(sample)
        except SampleError as exc:
            handler(exc)
            continue
        sample["__text__"] = text
        yield sample


def shuffled(samples: Iterable[Any], bufsize: int, rng: np.random.Generator) -> Iterator[Any]:
    """A shuffle buffer of ``bufsize`` items (webdataset's): each new item swaps out a random held one."""
    if bufsize <= 1:
        yield from samples
        return
    buf: list[Any] = []
    for sample in samples:
        if len(buf) < bufsize:
            buf.append(sample)
            continue
        i = int(rng.integers(bufsize))
        yield buf[i]
        buf[i] = sample
    for i in rng.permutation(len(buf)):
        yield buf[i]


def twin_stem(key: str) -> str:
    """The key of the forward clip of a pair: ``KEY-rev`` -> ``KEY``; any other key is its own stem."""
    return key[:-len(TWIN_SUFFIX)] if key.endswith(TWIN_SUFFIX) else key


def twin_units(samples: Iterable[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Groups consecutive samples with the same `twin_stem` into one list (a pair, or a lone clip).

    Only neighbours are grouped: this stage holds one sample back, never a table of keys, so twins
    stored apart (or split between streams by `assign_shards`) stay apart.
    """
    unit: list[dict[str, Any]] = []
    for sample in samples:
        if unit and twin_stem(sample["__key__"]) != twin_stem(unit[0]["__key__"]):
            yield unit
            unit = []
        unit.append(sample)
    if unit:
        yield unit


def flattened(units: Iterable[list[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    """The samples of the units, in order: the inverse of `twin_units` (after the shuffle)."""
    for unit in units:
        yield from unit


def batched(samples: Iterable[dict[str, Any]], n: int) -> Iterator[list[dict[str, Any]]]:
    """Lists of ``n`` samples; an incomplete last list is dropped."""
    batch: list[dict[str, Any]] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == n:
            yield batch
            batch = []


# --------------------------------------------------------------------------- the dataset

class VideoTextBatches(IterableDataset):
    """Whole batches of one rank, made by one stream per DataLoader worker (picklable; spawn-safe).

    Iterated in a DataLoader worker, it plays stream ``(worker id + start_batch) % num_workers``;
    iterated directly, it is the rank's only stream. See the module docstring for the order.
    """

    def __init__(self, urls: Sequence[str], cfg: DataConfig, rank: int = 0, world_size: int = 1,
                 start_batch: int = 0):
        super().__init__()
        self.urls, self.cfg = list(urls), cfg
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is None:
            return self.stream(0, 1)
        return self.stream((info.id + self.start_batch) % info.num_workers, info.num_workers)

    def stream(self, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        """Batches ``worker, worker + workers, ...`` of this rank, forever, from ``start_batch`` on.

        Yields:
            Batch dicts; a batch whose samples all failed comes as ``frames=None`` (the caller drops it).

        Raises:
            ValueError: a whole epoch of this stream forms no batch (too little data for the
                batch size and the number of ranks and workers).
        """
        cfg, where = self.cfg, f"rank {self.rank} worker {worker}"
        skips = SkipLog(where)
        made = 0  # raw batches this stream formed, over all epochs
        for epoch in itertools.count():
            share = assign_shards(self.urls, seed=cfg.seed, epoch=epoch, rank=self.rank,
                                  world_size=self.world_size, worker=worker, workers=workers)
            rng = np.random.default_rng([cfg.seed, epoch, self.rank, worker])
            samples = with_text(shard_samples(share, skips), cfg.text_key, skips)
            if cfg.hard_negatives == "twins":
                samples = flattened(shuffled(twin_units(samples), cfg.shuffle_buffer, rng))
            else:
                samples = shuffled(samples, cfg.shuffle_buffer, rng)
            formed = 0
            for raw in batched(samples, cfg.batch_size):
                index = made * workers + worker
                made += 1
                formed += 1
                if index >= self.start_batch:  # below it: skipped raw, never decoded
                    yield self._assemble(raw, epoch, index, worker, skips)
            if formed == 0:
                raise ValueError(
                    f"{where}: epoch {epoch} formed no batch of --batch-size {cfg.batch_size} from "
                    f"{len(share.urls)} shard(s) (skipped so far: {dict(skips.counts)}); use a smaller "
                    f"--batch-size, fewer --workers or ranks, or more data")

    def _assemble(self, raw: list[dict[str, Any]], epoch: int, index: int, worker: int,
                  skips: SkipLog) -> dict[str, Any]:
        """Decodes a raw batch; failed slots are refilled with the batch's good samples, in turn."""
        cfg = self.cfg
        got: list[tuple[dict[str, Any], np.ndarray] | None] = []
        for sample in raw:
            try:
                got.append((sample, load_frames(sample, cfg.frames, cfg.decode_backend, cfg.size)))
            except SampleError as exc:
                skips(exc)
                got.append(None)
        if not cfg.size:  # frames of different sizes can not stack: keep the batch's most common size
            shapes = Counter(g[1].shape for g in got if g is not None)
            if len(shapes) > 1:
                keep = shapes.most_common(1)[0][0]
                for i, g in enumerate(got):
                    if g is not None and g[1].shape != keep:
                        skips(DecodeError("frame-size-mismatch", f"frames {g[1].shape[1:3]} in a batch of "
                                          f"{keep[1:3]}; set --size to resize", url=g[0]["__url__"],
                                          key=g[0]["__key__"]))
                        got[i] = None
        good = [g for g in got if g is not None]
        out: dict[str, Any] = {"epoch": epoch, "batch": index, "worker": worker, "skipped": dict(skips.counts)}
        if not good:
            return {**out, "frames": None, "texts": [], "keys": []}
        refill = itertools.cycle(good)
        rows = [g if g is not None else next(refill) for g in got]
        return {**out, "frames": _stack([f for _, f in rows]),
                "texts": [s["__text__"] for s, _ in rows], "keys": [s["__key__"] for s, _ in rows]}


def _stack(arrays: list[np.ndarray]) -> torch.Tensor:
    """The batch tensor; in a DataLoader worker it is stacked straight into shared memory, as torch's
    ``default_collate`` does, else sending it to the main process copies it there once more."""
    shape = (len(arrays), *arrays[0].shape)
    if get_worker_info() is None:
        return torch.from_numpy(np.stack(arrays))
    out = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(math.prod(shape)), 0, shape)
    np.stack(arrays, out=out.numpy())
    return out


def _as_is(item: Any) -> Any:
    """The DataLoader's collate_fn: workers already made whole batches (module-level: picklable)."""
    return item


def _finish_queue_feeders() -> None:
    """Lets a worker's queue feeder thread finish sending before the interpreter finalizes.

    When a loader is closed early, torch's worker loop cancels the join of its result queue and
    exits; if the feeder thread is still pickling a prefetched tensor (inside torch's C++
    ``THPStorage_shareFd``), finalization kills it mid-call and the worker dies with
    "terminate called without an active exception" (SIGABRT), which the main process then
    reports while shutting the workers down. Waiting here, in an atexit hook (before finalization),
    avoids that.
    """
    for thread in threading.enumerate():
        if thread.name == "QueueFeederThread" and thread is not threading.current_thread():
            thread.join(timeout=5.0)


def _worker_init(worker_id: int) -> None:
    """The DataLoader's worker_init_fn (module-level: picklable)."""
    atexit.register(_finish_queue_feeders)


def make_loader(cfg: DataConfig, start_batch: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[dict]:
    """Batches of this rank, forever, from batch ``start_batch`` on.

    Args:
        cfg: the data configuration.
        start_batch: the first batch to yield (a checkpoint's ``batch["batch"] + 1``); the ones
            before it are skipped on raw samples, without decoding.
        rank, world_size: this process's place in DDP (ranks read disjoint data within an epoch).

    Returns:
        An iterator of dicts: ``frames`` (torch.uint8 [B, T, H, W, 3]), ``texts`` (list[str]),
        ``keys`` (list[str]), ``epoch`` (of the stream that made it), ``batch`` (global index),
        ``worker`` (the stream), ``skipped`` (reason -> skips so far on this rank).

    Raises:
        ValueError: a bad rank, world size or start batch; patterns that match no shard.
        FileNotFoundError: a glob matched nothing.
        BackendUnavailable: ``cfg.decode_backend`` is not installed.
        RuntimeError: (while iterating) `MAX_FAILED_BATCHES` batches in a row had no good sample.
    """
    problems = []
    if world_size < 1:
        problems.append(f"world_size must be >= 1, got {world_size}")
    elif not 0 <= rank < world_size:
        problems.append(f"rank must be within [0, {world_size}), got {rank}")
    if start_batch < 0:
        problems.append(f"start_batch must be >= 0, got {start_batch}")
    if problems:
        raise ValueError("; ".join(problems))
    if cfg.decode_backend != "auto" and cfg.decode_backend not in installed_backends():
        raise BackendUnavailable(f"--decode-backend {cfg.decode_backend!r} is not installed here "
                                 f"(installed: {', '.join(installed_backends())})")
    urls = expand_urls(cfg.shards)
    if not urls:
        raise ValueError(f"--shards {cfg.shards!r} names no shard")
    return _batches(VideoTextBatches(urls, cfg, rank, world_size, start_batch), cfg.workers)


def _batches(dataset: VideoTextBatches, workers: int) -> Iterator[dict]:
    """Runs the streams (in-process or in DataLoader workers) and adds up the skip counts."""
    if workers == 0:
        source: Iterable[dict] = dataset
    else:
        # in_order: batches come round-robin from the workers, which is what the global index assumes
        source = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_as_is,
                            multiprocessing_context="spawn", persistent_workers=False, in_order=True,
                            worker_init_fn=_worker_init)
    by_worker: dict[int, dict[str, int]] = {}
    failed_in_a_row = 0
    for item in source:
        by_worker[item["worker"]] = item["skipped"]
        total: Counter[str] = Counter()
        for counts in by_worker.values():
            total.update(counts)
        item["skipped"] = dict(total)
        if item["frames"] is None:
            failed_in_a_row += 1
            if failed_in_a_row >= MAX_FAILED_BATCHES:
                raise RuntimeError(f"{failed_in_a_row} batches in a row held no usable sample (last: batch "
                                   f"{item['batch']}); skipped so far: {item['skipped']}")
            continue
        failed_in_a_row = 0
        yield item


# --------------------------------------------------------------------------- frame cache

def cache_config_hash(frames: int, size: int, text_keys: Sequence[str], backend: str) -> str:
    """The config hash of a frame cache: what decides its content (frames, size, text members, decoder)."""
    from engine.decode import SAMPLING_VERSION

    spec = {"frames": frames, "size": size, "text_keys": list(text_keys), "backend": backend, "format": 1,
            "sampling": SAMPLING_VERSION}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _CacheJob:
    url: str
    out_dir: str
    name: str
    frames: int
    size: int
    text_keys: tuple[str, ...]
    backend: str
    config_hash: str


def _shard_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _npy_bytes(frames: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(frames), allow_pickle=False)
    return buf.getvalue()


def _cache_shard(job: _CacheJob) -> bool:
    """Writes one derived shard; False if the input shard could not be opened (nothing committed)."""
    from dualenc import __version__

    t0 = time.perf_counter()
    read_errors = ErrorCollector()
    skips = SkipLog(f"cache_frames {job.name}")
    with ShardWriter(job.out_dir, job.name) as writer:
        for sample in iter_shard(job.url, read_errors):
            key = sample["__key__"]
            try:
                frames = load_frames(sample, job.frames, job.backend, job.size)
            except SampleError as exc:
                skips(exc)
                writer.fail(exc)
                continue
            out = {"__key__": key, FRAMES_MEMBER: _npy_bytes(frames)}
            out.update({k: sample[k] for k in job.text_keys if k in sample})
            if "json" in sample:
                out["json"] = sample["json"]
            try:
                writer.write(out)
            except ValueError as exc:  # e.g. a key with a dot in a directory part: ShardWriter refuses it
                error = MemberError("unwritable-key", str(exc), url=job.url, key=key)
                skips(error)
                writer.fail(error)
        for exc in read_errors.errors:
            skips(exc)
            writer.fail(exc)
        if any(e.reason == "unreadable-shard" for e in read_errors.errors):
            return False  # maybe transient: leave it uncommitted, for the next run
        seconds = time.perf_counter() - t0
        writer.commit(config_hash=job.config_hash, tool=f"dualenc cache_frames {__version__}", source=job.url,
                      seconds={"total": round(seconds, 3)},
                      clips_per_s=round(len(writer.keys) / seconds, 3) if seconds > 0 else None)
    return True


def cache_frames(shards: str | Sequence[str], out_dir: str | Path, frames: int = 8, size: int = 0, workers: int = 1,
                 text_keys: Sequence[str] = ("txt", "gt.txt", "alt.txt"), progress: bool = True,
                 backend: str = "av") -> list[Path]:
    """Decodes every clip once and writes derived shards that hold its sampled frames instead of the video.

    For each input shard, ``out_dir`` gets a shard of the same name with ``frames.npy`` (uint8
    [frames, H, W, 3]), the ``text_keys`` members that exist and ``json`` if present; samples that fail
    to decode are left out and recorded in the shard's error ledger. Shards whose stats marker already
    carries this configuration's hash are not redone, so an interrupted run resumes. A loader whose
    ``frames``/``size`` match (and ``decode_backend`` equals ``backend``) gives the same frames from the
    cache as from the videos.

    Args:
        shards: shard patterns (`engine.shards.expand_urls`); their file names must be distinct.
        out_dir: where the derived shards go.
        frames: uniformly sampled frames per clip.
        size: if > 0, frames are resized to size x size before they are stored.
        workers: shards processed at once, in spawned processes when > 1.
        text_keys: text members to carry over.
        progress: show a progress bar.
        backend: the decode backend (part of the config hash: other decoders can give other pixels).

    Returns:
        The derived shard paths, in the order of the input shards.

    Raises:
        ValueError: bad arguments, or two input shards with the same file name.
        RuntimeError: input shards that could not be opened (named); the others are committed,
            and a re-run retries only those.
    """
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp

    from tqdm import tqdm

    problems = []
    if frames < 1:
        problems.append(f"--frames must be >= 1, got {frames}")
    if size < 0:
        problems.append(f"--size must be >= 0, got {size}")
    if workers < 1:
        problems.append(f"--workers must be >= 1, got {workers}")
    if isinstance(text_keys, str) or not text_keys or FRAMES_MEMBER in text_keys:
        problems.append(f"--text-keys must be a list of member names, got {text_keys!r}")
    if backend not in ("auto", *BACKENDS):
        problems.append(f"--decode-backend must be one of auto, {', '.join(BACKENDS)}, got {backend!r}")
    if problems:
        raise ValueError("; ".join(problems))
    urls = expand_urls(shards)
    names = [_shard_name(u) for u in urls]
    clashes = sorted(n for n, c in Counter(names).items() if c > 1)
    if clashes:
        raise ValueError(f"input shards share file names {clashes}: their caches would overwrite each other")
    out = Path(out_dir)
    digest = cache_config_hash(frames, size, text_keys, backend)
    jobs = []
    for url, name in zip(urls, names):
        stats = read_stats(out, name)
        if stats is None or stats.config_hash != digest:
            jobs.append(_CacheJob(url, str(out), name, frames, size, tuple(text_keys), backend, digest))
    bar = tqdm(total=len(urls), initial=len(urls) - len(jobs), desc="cache frames", unit="shard",
               disable=not progress)
    failed: list[str] = []
    try:
        if workers == 1 or len(jobs) <= 1:
            results: Iterable[bool] = map(_cache_shard, jobs)
            for job, ok in zip(jobs, results):
                failed += [] if ok else [job.url]
                bar.update(1)
        else:
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as pool:
                for job, ok in zip(jobs, pool.map(_cache_shard, jobs)):
                    failed += [] if ok else [job.url]
                    bar.update(1)
    finally:
        bar.close()
    if failed:
        raise RuntimeError(f"could not open {len(failed)} input shard(s): {failed}; the other caches are "
                           f"committed, re-run to retry these")
    return [out / name for name in names]
