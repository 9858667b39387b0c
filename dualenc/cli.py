"""The `dualenc` command: list architectures, train a video-text dual encoder, embed, evaluate, report.

    dualenc models
    dualenc train --shards 'toy/adapt-*.tar' --text-key gt.txt --model toy-vit --temporal vidla --out runs/v/
    dualenc embed --checkpoint runs/v/ --shards 'toy/test-*.tar' --text-key gt.txt --out emb/
    dualenc eval --checkpoint runs/v/ --shards 'toy/test-*.tar' --text-key gt.txt --out reports/v/
    dualenc report --runs reports/alt reports/pseudo --out reports/compare/

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


def _r1_table(rows: list[tuple[str, dict]]) -> str:
    """A plain-text table of R@1/R@5/MdR of both directions, one row per run."""
    cols = [("t2v R@1", "text_to_video_R@1"), ("t2v R@5", "text_to_video_R@5"), ("t2v MdR", "text_to_video_MdR"),
            ("v2t R@1", "video_to_text_R@1"), ("v2t R@5", "video_to_text_R@5"), ("v2t MdR", "video_to_text_MdR")]
    width = max([len("run")] + [len(label) for label, _ in rows])
    lines = [f"{'run':<{width}}  " + "  ".join(f"{c:>8}" for c, _ in cols)]
    for label, m in rows:
        cells = [f"{100 * m[k]:7.1f}%" if "R@" in k else f"{m[k]:8.1f}" for _, k in cols]
        lines.append(f"{label:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def _eval(args: argparse.Namespace) -> int:
    import shlex

    from dualenc.evaluate import EvalConfig, run_eval

    fields = {f.name for f in dataclasses.fields(EvalConfig)}
    cfg = EvalConfig(**{k: v for k, v in vars(args).items() if k in fields - {"command"}},
                     command=" ".join(shlex.quote(a) for a in ["dualenc", *args.argv]))
    metrics = run_eval(cfg, progress=not args.quiet)
    print(_r1_table([(metrics["label"], metrics)]))
    print(f"report: {cfg.out}/report.html  ({cfg.out}/report.md, {cfg.out}/metrics.json)")
    return 0


def _report(args: argparse.Namespace) -> int:
    import json

    from dualenc.report import compare_reports

    paths = compare_reports(args.runs, args.out, labels=args.labels)
    summary = json.loads(paths["json"].read_text())
    metrics = summary["metrics"]
    rows = [(label, {k: values[i] for k, values in metrics.items()}) for i, label in enumerate(summary["labels"])]
    for warning in summary["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(_r1_table(rows))
    print(f"report: {paths['html']}  ({paths['md']})")
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
    p.add_argument("--hard-negatives", choices=["none", "twins"], default="none",
                   help="twins: a clip and its time-reversed twin (KEY-rev) share a batch, so the loss "
                   "rewards frame order")
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

    p = sub.add_parser("eval", formatter_class=fmt, help="retrieval evaluation: metrics.json, report.md, report.html",
                       description="Exact text->video and video->text retrieval (R@1/5/10, median and mean rank, "
                       "bootstrap 95% intervals; ties count against the model) of a checkpoint on shards or a "
                       "standard benchmark, or of embeddings from `dualenc embed`. Writes OUT/metrics.json (with "
                       "the full protocol), OUT/report.md and a self-contained OUT/report.html with plots and "
                       "example queries.")
    src = p.add_argument_group("what to evaluate: --checkpoint with --shards or --benchmark, or --embeddings")
    src.add_argument("--checkpoint", help="run directory or checkpoint directory")
    src.add_argument("--shards", nargs="+", help="shard pattern(s) to embed and evaluate")
    src.add_argument("--text-key", nargs="+", default=["txt"],
                     help="text member(s); several captions per video are fine (a .json member holds a list)")
    src.add_argument("--embeddings", help="a `dualenc embed` output directory")
    src.add_argument("--benchmark", choices=["msrvtt-1ka", "msvd", "didemo"], help="a standard benchmark layout")
    src.add_argument("--videos", help="the benchmark's video directory")
    src.add_argument("--annotations", help="the benchmark's annotation file (MSVD: its directory)")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--captions", choices=["all", "first"],
                   help="all: every caption is a query; first: single-caption protocol (default: the "
                   "benchmark's, else all)")
    p.add_argument("--index", choices=["flat", "ivf", "hnsw"], default="flat",
                   help="flat is exact; ivf/hnsw also report their recall against exact search")
    p.add_argument("--nlist", type=int, help="IVF lists (default about 4 sqrt(N))")
    p.add_argument("--nprobe", type=int, help="IVF lists visited per query (default nlist/8)")
    p.add_argument("--ef-search", type=int, help="HNSW search depth")
    p.add_argument("--frames", type=int, help="frames per clip (default: the model's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="decode worker processes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (0: no intervals)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--examples", type=int, default=8, help="example queries shown with their top-5 clips")
    p.add_argument("--label", help="the run's name in side-by-side reports (default: OUT's name)")
    p.add_argument("--max-block-mb", type=float, default=512, help="memory cap of one block of scores")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_eval)

    p = sub.add_parser("report", formatter_class=fmt, help="put evaluation reports side by side",
                       description="One table and overlaid recall@K curves of several `dualenc eval` reports "
                       "(e.g. dual encoders trained on alt-text, per-frame captions and pseudo-captions).")
    p.add_argument("--runs", nargs="+", required=True, help="report directories written by `dualenc eval`")
    p.add_argument("--labels", nargs="+", help="names of the runs (default: each report's label)")
    p.add_argument("--out", required=True, help="output directory: report.md, report.html, comparison.json")
    p.set_defaults(func=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"dualenc {args.command}: {exc}", file=sys.stderr)
        return 2


def run() -> None:
    sys.exit(main())
