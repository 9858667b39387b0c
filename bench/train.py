"""Data-loading efficiency of the dual-encoder trainer: reading shards vs the same steps on tensors in memory.

Usage: python bench/train.py [--steps 60] [--batch-size 32] [--workers 1] [--repeats 3]

Writes bench/results/train.json: samples/s of the full trainer (`dualenc.train.train`) reading
(a) video shards, decoding every epoch, and (b) the frame cache (`cache_frames`: frames.npy shards),
against (c) the same model, optimizer and loss stepping on batches already in memory; the ratios
b/c and a/c (the data-loading efficiency; goal >= 0.9 with the frame cache) and peak RSS.
All three run in this one process tree, one after another, ``--repeats`` rounds of the three; the
medians give the ratios (on a shared 2-core machine one round's ratio moves by +-0.05).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dualenc.data import DataConfig, cache_frames, make_loader  # noqa: E402
from dualenc.model import create_model  # noqa: E402
from dualenc.train import TrainConfig, param_groups, train  # noqa: E402
from engine.synth import SynthConfig, synth  # noqa: E402


def in_memory(cfg: TrainConfig, warm: int) -> float:
    """samples/s of the bare steps on pre-loaded batches (same model, optimizer, loss)."""
    from open_clip.loss import ClipLoss

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, temporal=cfg.temporal, frames=cfg.frames).train()
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    loader = make_loader(DataConfig(shards=cfg.shards, text_key=cfg.text_key, frames=cfg.frames,
                                    batch_size=cfg.batch_size, workers=0, shuffle_buffer=0))
    batches = [next(loader) for _ in range(8)]
    tokens = [model.tokenize(b["texts"]) for b in batches]
    loss_fn = ClipLoss()
    t0 = None
    for i in range(cfg.steps + warm):
        if i == warm:
            t0 = time.perf_counter()
        b = i % len(batches)
        out = model(batches[b]["frames"], tokens[b])
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
    return cfg.steps * cfg.batch_size / (time.perf_counter() - t0)


def through_trainer(cfg: TrainConfig, warm: int) -> float:
    """samples/s of `train` after ``warm`` steps (loader start-up excluded), from its own metrics."""
    train(TrainConfig(**{**cfg.__dict__, "steps": warm + cfg.steps, "log_every": 1, "save_every": 0}),
          progress=False)
    rows = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in rows if "samples_per_s" in r}
    a, b = by_step[warm], by_step[warm + cfg.steps]
    t_a = a["step"] * cfg.batch_size / a["samples_per_s"]
    t_b = b["step"] * cfg.batch_size / b["samples_per_s"]
    return cfg.steps * cfg.batch_size / (t_b - t_a)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warm", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=str(ROOT / "bench" / "work" / "train"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "train.json"))
    args = ap.parse_args(argv)
    work = Path(args.work)
    synth(SynthConfig(split="adapt", n=1000, seed=0), work / "toy", progress=False)
    cache_frames(str(work / "toy" / "adapt-*.tar"), work / "cache", frames=args.frames, progress=False)
    common = dict(text_key="gt.txt", temporal="transformer", frames=args.frames, batch_size=args.batch_size,
                  steps=args.steps, workers=args.workers, seed=0)
    rounds: dict[str, list[float]] = {"video_shards": [], "frame_cache": [], "in_memory": []}
    for _ in range(args.repeats):
        for name, shards in (("video_shards", work / "toy"), ("frame_cache", work / "cache")):
            run = work / "runs" / name
            if run.exists():
                shutil.rmtree(run)
            rounds[name].append(round(through_trainer(TrainConfig(shards=str(shards / "adapt-*.tar"), out=str(run),
                                                                  **common), args.warm), 2))
            print(name, rounds[name][-1], flush=True)
        mem = TrainConfig(shards=str(work / "cache" / "adapt-*.tar"), out=str(work / "runs" / "mem"), **common)
        rounds["in_memory"].append(round(in_memory(mem, args.warm), 2))
        print("in_memory", rounds["in_memory"][-1], flush=True)
    results = {name: round(statistics.median(v), 2) for name, v in rounds.items()}
    peak_mb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    out = {"benchmark": "train", "command": "python bench/train.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "model": "toy-vit + transformer head",
        "batch_size": args.batch_size, "frames": args.frames, "steps_timed": args.steps, "warmup_steps": args.warm,
        "loader_workers": args.workers, "torch_threads": torch.get_num_threads(), "machine": platform.platform(),
        "repeats": args.repeats, "samples_per_s": results, "samples_per_s_per_round": rounds,
        "efficiency": {"frame_cache_vs_in_memory": round(results["frame_cache"] / results["in_memory"], 3),
                       "video_shards_vs_in_memory": round(results["video_shards"] / results["in_memory"], 3)},
        "peak_rss_mb": round(peak_mb, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["efficiency"]), f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
