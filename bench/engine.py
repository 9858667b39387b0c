"""Overlap efficiency of `engine caption`: end-to-end clips/s against the captioner alone on decoded frames.

Usage: python bench/engine.py [--n 256] [--batch-sizes 1 8 32] [--frames 8] [--layouts shared dedicated] [--repeats 3]

Writes bench/results/engine.json. For each batch size, in one process and one run:
(a) captioner only: `Captioner.caption` over clips already decoded into memory, batch by batch;
(b) end to end: `engine.caption.caption_shards` over the same clips in shards (reader thread,
    decode worker processes, captioning, atomic shard writes), same model and batch size, with the
    model loaded and the decode pool started beforehand (as in a long job).
overlap efficiency = (b) clips/s / (a) clips/s (goal >= 0.9), and (b)'s time split per stage.
The model is a tiny Qwen2-VL with random weights (speed does not depend on weight values); on a
CPU the decode workers and the model share the same cores, which a GPU job does not: with
the ``dedicated`` layout (1 torch thread, 1 decode worker) on 2 cores each gets a core of its own, which is how the
pipeline's overlap (rather than the CPU's sharing) is read; both layouts are measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captioner.interface import Clip  # noqa: E402
from captioner.load import load_captioner  # noqa: E402
from captioner.tiny import build_tiny  # noqa: E402
from engine.caption import CaptionJob, caption_shards, identity_of, plan_shards  # noqa: E402
from engine.decode import decode_video  # noqa: E402
from engine.decode_pool import DecodePool  # noqa: E402
from engine.shards import expand_urls, iter_shard, video_member  # noqa: E402
from engine.synth import SynthConfig, synth  # noqa: E402


def captioner_only(cap, clips: list[Clip], job: CaptionJob) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(clips), job.batch_size):
        cap.caption(clips[i:i + job.batch_size], job.prompt_template, job.generation)
    return len(clips) / (time.perf_counter() - t0)


def end_to_end(cap, pool, job: CaptionJob, urls: list[str], out: Path) -> tuple[float, dict]:
    plans = plan_shards(urls, out, identity_of(job, cap).config_hash).todo
    t0 = time.perf_counter()
    stats = caption_shards(plans, out, job, cap, pool)
    wall = time.perf_counter() - t0
    n = sum(s.n_ok for s in stats)
    split: dict[str, float] = {}
    for s in stats:
        for k, v in s.seconds.items():
            split[k] = round(split.get(k, 0.0) + v, 3)
    return n / wall, split


LAYOUTS = {
    # name: (torch threads, decode workers) on this machine's cores
    "shared": (None, 2),  # torch's default threads (every core) and 2 decode workers: they compete for cores
    "dedicated": (1, 1),  # one core for the model, one for decoding: the model's device is not the decoders'
}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=256, help="clips")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians are reported")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "engine.json"))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    synth(SynthConfig(split="pool", n=args.n, seed=0, shard_size=64), work / "in", progress=False)
    urls = expand_urls(str(work / "in" / "pool-*.tar"))
    model = build_tiny(work / "tiny")
    cap = load_captioner(str(model), backend="hf", device="cpu")
    default_threads = torch.get_num_threads()
    job0 = CaptionJob(model=str(model), frames=args.frames, max_new_tokens=args.max_new_tokens)
    clips = [Clip(s["__key__"], decode_video(s[video_member(s)], job0.sampling).frames)
             for u in urls for s in iter_shard(u)]
    layouts = {}
    for layout in args.layouts:
        threads, workers = LAYOUTS[layout]
        torch.set_num_threads(threads or default_threads)
        results = {}
        with DecodePool(workers=workers) as pool:
            captioner_only(cap, clips[:8], job0)  # warm-up: first-call allocations, thread pools
            pool.decode(next(iter_shard(urls[0]))["mp4"], job0.sampling)
            for bs in args.batch_sizes:
                job = CaptionJob(**(job0.to_dict() | {"batch_size": bs, "decode_workers": workers}))
                only, e2e, splits = [], [], []
                for r in range(args.repeats):  # interleaved, so a burst of load elsewhere hits both alike
                    only.append(captioner_only(cap, clips, job))
                    rate, split = end_to_end(cap, pool, job, urls, work / f"out-{layout}-{bs}-{r}")
                    e2e.append(rate)
                    splits.append(split)
                mid = sorted(range(len(e2e)), key=e2e.__getitem__)[len(e2e) // 2]
                results[str(bs)] = {"captioner_only_clips_per_s": round(statistics.median(only), 2),
                                    "end_to_end_clips_per_s": round(statistics.median(e2e), 2),
                                    "overlap_efficiency": round(statistics.median(e2e) / statistics.median(only), 3),
                                    "overlap_efficiency_per_repeat": [round(e / o, 3) for e, o in zip(e2e, only)],
                                    "time_split_s": splits[mid]}
                print(layout, bs, results[str(bs)], flush=True)
        layouts[layout] = {"torch_threads": torch.get_num_threads(), "decode_workers": workers,
                           "batch_sizes": results}
    body = {
        "benchmark": "engine",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python bench/engine.py " + " ".join(sys.argv[1:]),
        "settings": {"clips": len(clips), "repeats": args.repeats, "frames": args.frames, "size": "112x112",
                     "max_new_tokens": args.max_new_tokens, "model": "captioner.tiny.build_tiny (random weights)",
                     "device": "cpu"},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "definitions": {
            "captioner_only_clips_per_s": "Captioner.caption over clips already decoded in memory",
            "end_to_end_clips_per_s": "caption_shards over the same clips in shards: read + decode (worker "
                                      "processes) + caption + write, model loaded and pool started beforehand",
            "overlap_efficiency": "median end_to_end / median captioner_only over the interleaved repeats "
                                  "(goal >= 0.9)",
            "time_split_s": "of the median end-to-end repeat: per-stage seconds summed over shards; read runs in a thread and decode in worker "
                            "processes, overlapping caption, so stages need not add up to total; decode_wait is "
                            "the time the captioner stood waiting for frames",
            "layouts": {k: f"torch threads {v[0] or 'default'}, decode workers {v[1]}" for k, v in LAYOUTS.items()}},
        "layouts": layouts,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(body, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
