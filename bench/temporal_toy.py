"""Text->video retrieval of the three temporal heads on the toy world, overall and on time-reversed pairs.

Usage: python bench/temporal_toy.py [--steps 600] [--hard-negatives none|twins] [--work bench/work/temporal]

Trains `toy-vit` with the `mean`, `transformer` and `vidla` heads alike (same data, seed, steps, data
options) on the adapt split's gt.txt (from the frame cache), embeds the `test` split (from its frame
cache: the same frames as decoding), and writes bench/results/temporal_toy.json:
text->video R@1 over the whole test gallery, and pair accuracy on the time-reversed pairs (the
forward caption must score its own clip above the same frames played backwards; an exact tie counts
as half, i.e. chance). Mean pooling sees the same set of frames both ways, so it sits at 0.5.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dualenc.data import cache_frames  # noqa: E402
from dualenc.embed import embed  # noqa: E402
from dualenc.train import TrainConfig, load_model, train  # noqa: E402
from engine.synth import SynthConfig, synth  # noqa: E402


def retrieval(emb: Path) -> dict:
    v, t = np.load(emb / "video.npy"), np.load(emb / "text.npy")
    vk = (emb / "video_keys.txt").read_text().split()
    tk = (emb / "text_keys.txt").read_text().split()
    col = {k: i for i, k in enumerate(vk)}
    sims = t @ v.T
    target = np.array([col[k] for k in tk])
    pos = sims[np.arange(len(tk)), target]
    rank = (sims > pos[:, None]).sum(1) + (sims == pos[:, None]).sum(1) - 1  # ties count against
    pairs, ties = [], 0
    for i, k in enumerate(tk):
        twin = k[:-4] if k.endswith("-rev") else k + "-rev"
        if twin in col:
            a, b = sims[i, col[k]], sims[i, col[twin]]
            ties += a == b
            pairs.append(1.0 if a > b else 0.5 if a == b else 0.0)
    return {"text_to_video_R@1": round(float((rank == 0).mean()), 4),
            "text_to_video_R@5": round(float((rank < 5).mean()), 4),
            "reversed_pair_accuracy": round(float(np.mean(pairs)), 4), "reversed_pairs": len(pairs),
            "reversed_pair_ties": int(ties), "gallery": len(vk), "queries": len(tk)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)  # ~2 min per head on 2 idle CPU cores, up to ~6x more when shared
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--hard-negatives", choices=["none", "twins"], default="none",
                    help="twins: a clip and its time-reversed twin share a batch (DataConfig.hard_negatives)")
    ap.add_argument("--work", default=str(ROOT / "bench" / "work" / "temporal"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "temporal_toy.json"))
    args = ap.parse_args(argv)
    work = Path(args.work)
    synth(SynthConfig(split="adapt", n=2000, seed=0), work / "toy", progress=False)
    synth(SynthConfig(split="test", n=400, seed=0), work / "toy", progress=False)
    cache_frames(str(work / "toy" / "adapt-*.tar"), work / "cache", frames=args.frames, progress=False)
    cache_frames(str(work / "toy" / "test-*.tar"), work / "cache_test", frames=args.frames, text_keys=("gt.txt",),
                 progress=False)
    result = {"benchmark": "temporal_toy", "command": "python bench/temporal_toy.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "model": "toy-vit", "train_split": "adapt (2000, gt.txt)",
        "test_split": "test (400)", "steps": args.steps, "batch_size": args.batch_size, "frames": args.frames,
        "lr": 1e-3, "warmup": 50, "hard_negatives": args.hard_negatives, "seed": 0,
        "machine": platform.platform(), "torch_threads": torch.get_num_threads(),
        "chance": {"reversed_pair_accuracy": 0.5, "text_to_video_R@1": "1/gallery"}, "heads": {}}
    for head in ("mean", "transformer", "vidla"):
        name = f"{head}-{args.hard_negatives}-{args.steps}steps-b{args.batch_size}-f{args.frames}"
        run = work / "runs" / name  # keyed by the settings: resume="latest" must never pick up another config
        t0 = time.perf_counter()
        summary = train(TrainConfig(shards=str(work / "cache" / "adapt-*.tar"), out=str(run), text_key="gt.txt",
                                    temporal=head, frames=args.frames, batch_size=args.batch_size,
                                    steps=args.steps, lr=1e-3, warmup=50, workers=1, save_every=0,
                                    hard_negatives=args.hard_negatives, resume="latest", seed=0), progress=False)
        embed(load_model(run), str(work / "cache_test" / "test-*.tar"), work / "emb" / name, text_keys=("gt.txt",),
              frames=args.frames, progress=False)
        result["heads"][head] = {**retrieval(work / "emb" / name), "train_seconds": round(time.perf_counter() - t0, 1),
                                 "final_loss": summary.get("loss")}
        print(head, result["heads"][head], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
