"""The `engine` command: toy-world shards and a look at what shards hold.

    engine synth --out toy/ --split test --n 1000 --seed 0
    engine decode --shards 'toy/test-*.tar' --frames 8 --limit 5

`main(argv)` returns an exit code (tests call it); `run()` is the console entry point.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from engine import __version__


def _synth(args: argparse.Namespace) -> int:
    from engine.synth import SynthConfig, committed, synth

    try:
        cfg = SynthConfig(split=args.split, n=args.n, seed=args.seed, frames=args.frames, size=args.size,
                          fps=args.fps, shard_size=args.shard_size, reverse_frac=args.reverse_frac)
    except ValueError as exc:
        print(f"engine synth: {exc}", file=sys.stderr)
        return 2
    if committed(cfg, args.out):
        print(f"{args.out}: {cfg.split} shards of this exact configuration are already complete; reusing them")
        return 0
    paths = synth(cfg, args.out, progress=not args.quiet)
    print(f"wrote {cfg.n} {cfg.split} samples in {len(paths)} shard(s): {paths[0]}"
          + (f" .. {paths[-1].name}" if len(paths) > 1 else ""))
    return 0


def _decode(args: argparse.Namespace) -> int:
    import io

    import numpy as np
    from PIL import Image

    from data_specs import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
    from engine.decode import DecodeLimits, Sampling
    from engine.decode_pool import DecodePool
    from engine.errors import SampleError
    from engine.shards import ErrorCollector, read_samples, read_text, video_member

    errors = ErrorCollector()
    limits = DecodeLimits(max_pixels=args.max_pixels)
    n_ok = 0
    with DecodePool(workers=args.workers, default_timeout=args.timeout) as pool:
        pending = []
        for sample in read_samples(args.shards, handler=errors):
            key = sample["__key__"]
            try:
                ext = video_member(sample, VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)
                gt = read_text(sample, "gt.txt") or read_text(sample, "txt") or ""
            except SampleError as exc:
                errors(exc)
                continue
            if ext in IMAGE_EXTENSIONS:
                img = np.asarray(Image.open(io.BytesIO(sample[ext])).convert("RGB"))
                print(f"{key:<28} image {img.shape[1]}x{img.shape[0]}  {gt}")
                n_ok += 1
            else:
                pending.append((sample, ext, gt, pool.submit(sample[ext], Sampling.uniform(args.frames),
                                                              args.backend, limits)))
            if args.limit and n_ok + len(pending) + len(errors.errors) >= args.limit:
                break
        for sample, ext, gt, future in pending:
            try:
                fr = future.result()
            except SampleError as exc:
                errors(exc.located(url=sample["__url__"], key=sample["__key__"]))
                continue
            h, w = fr.frames.shape[1:3]
            print(f"{sample['__key__']:<28} {len(fr.indices)} frames {w}x{h} of {fr.num_frames} "
                  f"(indices {fr.indices[0]}..{fr.indices[-1]}, {fr.backend})  {gt}")
            n_ok += 1
    for exc in errors.errors:
        print(f"error: {exc}", file=sys.stderr)
    print(f"{n_ok} sample(s) decoded, {len(errors.errors)} error(s)"
          + (f" {errors.by_reason()}" if errors.errors else ""))
    return 0 if n_ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="engine", description="pseudocap's data engine: shards in, shards out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pseudocap engine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write toy-world shards of real H.264 clips with ground truth",
                       description="Write DIR/{split}-NNNNN.tar shards of the toy world: mp4 (H.264), json "
                       "(scene graph), txt (web-like alt-text), gt.txt (ground-truth caption), qa.json "
                       "(instruction pairs). The pretrain split holds single PNG frames with static captions. "
                       "Same arguments give byte-identical shards.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--split", required=True, choices=["pretrain", "adapt", "pool", "test", "compositional"])
    p.add_argument("--n", type=int, required=True, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=16, help="frames per clip")
    p.add_argument("--size", type=int, default=112, help="frame width and height in pixels (multiple of 28 "
                   "suits Qwen2-VL)")
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    p.add_argument("--reverse-frac", type=float, default=0.5, help="share of clips that get a time-reversed twin")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_synth)

    p = sub.add_parser("decode", help="decode sampled frames of shards' videos and print what came out",
                       description="Read shards, decode N uniformly sampled frames of every video (in worker "
                       "processes, with a timeout), and print a line per sample with its caption. Bad samples "
                       "are reported with shard, key and reason; the rest still come through.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shards", required=True, nargs="+", help="shard patterns: braces, globs, fsspec URLs")
    p.add_argument("--frames", type=int, default=8, help="uniformly sampled frames per clip")
    p.add_argument("--backend", default="auto", choices=["auto", "av", "decord", "torchcodec"])
    p.add_argument("--limit", type=int, default=0, help="stop after this many samples (0: all)")
    p.add_argument("--workers", type=int, default=2, help="decode worker processes")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per clip before its decode is killed")
    p.add_argument("--max-pixels", type=int, default=1280 * 720, help="larger frames are downscaled")
    p.set_defaults(func=_decode)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FileNotFoundError as exc:
        print(f"engine {args.command}: {exc}", file=sys.stderr)
        return 2


def run() -> None:
    sys.exit(main())
