"""The `dualenc` command: list architectures, train a video-text dual encoder, embed shards.

    dualenc models
    dualenc train --shards 'toy/adapt-*.tar' --text-key gt.txt --model toy-vit --temporal vidla --out runs/v/
    dualenc embed --checkpoint runs/v/ --shards 'toy/test-*.tar' --text-key gt.txt --out emb/

`main(argv)` returns an exit code (tests call it); `run()` is the console entry point.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from dualenc import __version__


def _models(args: argparse.Namespace) -> int:
    from dualenc.model import get_model_config, list_models

    for name in list_models():
        cfg = get_model_config(name)
        print(f"{name:<16} {cfg.get('description', '')}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from dualenc.train import TrainConfig, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    summary = train(cfg, progress=not args.quiet)
    if summary.get("skipped") == "already finished":
        print(f"{cfg.out} already finished {summary['step']} steps")
        return 0
    val = summary.get("val") or {}
    print(f"trained {summary['step']} steps, last loss {summary['loss']:.4f}"
          + (f", val text_to_video_R@1 {val['text_to_video_R@1']:.3f}" if val else "") + f" -> {cfg.out}")
    return 0


def _embed(args: argparse.Namespace) -> int:
    from dualenc.embed import embed
    from dualenc.train import load_model

    model = load_model(args.checkpoint, device=args.device)
    frames = args.frames or int(model.config.get("frames", 8))
    s = embed(model, args.shards, args.out, text_keys=args.text_key, frames=frames, batch_size=args.batch_size,
              workers=args.workers, device=args.device, progress=not args.quiet)
    print(f"embedded {s['videos']} videos and {s['texts']} texts ({s['errors']} errors) -> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="dualenc", formatter_class=fmt, description=(
        "pseudocap's video-text dual encoder: open_clip towers with temporal heads, trained from shards."))
    parser.add_argument("--version", action="version", version=f"pseudocap dualenc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the dual-encoder architectures (dualenc/model_configs/)")
    p.set_defaults(func=_models)

    p = sub.add_parser("train", formatter_class=fmt, help="contrastive training from shards (torchrun for DDP)",
                       description="Train a dual encoder with open_clip's ClipLoss on video shards with a text "
                       "member. Run under torchrun for DDP. Checkpoints go to OUT/checkpoints/ and OUT/latest.")
    p.add_argument("--shards", required=True, help="training shard pattern(s)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--val-shards", help="validation shards (loss and text->video R@1)")
    p.add_argument("--text-key", default="txt", help="text member: txt, gt.txt, alt.txt, ...")
    p.add_argument("--model", default="toy-vit", help="architecture (see `dualenc models`)")
    p.add_argument("--temporal", choices=["mean", "transformer", "vidla"], help="temporal head (default: the config's)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--shuffle-buffer", type=int, default=256)
    p.add_argument("--pretrained", help="open_clip checkpoint file (or tag where a hub is reachable)")
    p.add_argument("--pretrained-image", help="local image-tower weights (timm/open_clip state dict)")
    p.add_argument("--pretrained-text", help="local Hugging Face text-model directory")
    p.add_argument("--lock-image", action="store_true", help="freeze the image tower (LiT)")
    p.add_argument("--lock-text", action="store_true", help="freeze the text tower")
    p.add_argument("--val-every", type=int, default=0)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--resume", help="'latest' or a checkpoint directory")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_train)

    p = sub.add_parser("embed", formatter_class=fmt, help="embed the videos and texts of shards",
                       description="Write EMB/video.npy, video_keys.txt, text.npy, text_keys.txt (float32, "
                       "L2-normalised) for retrieval evaluation.")
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    p.add_argument("--shards", required=True, nargs="+")
    p.add_argument("--text-key", nargs="+", default=["txt"], help="text member(s); several share the video key")
    p.add_argument("--out", required=True)
    p.add_argument("--frames", type=int, help="frames per clip (default: the model's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="decode worker processes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_embed)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"dualenc {args.command}: {exc}", file=sys.stderr)
        return 2


def run() -> None:
    sys.exit(main())
