"""The `captioner` command: tiny checkpoints, the toy base model, the two adaptation stages, a quick look.

    captioner tiny --out tiny/ --vocab-from 'toy/pretrain-*.tar'
    captioner pretrain-toy --shards 'toy/pretrain-*.tar' --out base/ [--model tiny/]
    captioner adapt --stage visual --model base/ --shards 'toy/adapt-*.tar' --out stage1/
    captioner adapt --stage language --model stage1/ --shards 'toy/adapt-*.tar' --out stage2/
    captioner generate --model stage2/ --shards 'toy/test-*.tar' --n 8

`main(argv)` returns an exit code (tests call it); `run()` is the console entry point.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from captioner import __version__

PRESETS: dict[str, dict[str, dict]] = {
    # per stage: TrainConfig overrides. 'quick' is the demo's default (the chain in about 6 CPU-minutes); 'full' about
    # 58 (both where they were set: 8.6 and 76 on an AVX2-only AMD EPYC). Its image stage spends three steps in four
    # on frames at lr 2e-3 for 20000 steps; its stage 1 also gives the base's still frames one batch in four (video=3
    # mixes clips and frames when the shards hold both), which keeps the base's shape reading; the language stage runs
    # on precomputed visual tokens, its data with 2000 extra two-event clips, each clip's pairs packed in one
    # sequence, three clips a step. Every full-preset stage runs AdamW with beta2 0.95: at torch's 0.999 the image
    # stage sat 2000-11000 steps (by draw) on a plateau where it names shapes at chance. Both adaptation stages sample
    # 8 frames: at 4 (frames 2, 6, 9, 13 of a 16-frame clip, two Conv3d slices) the end state of a two-event clip's
    # second event is in no sampled frame and its action was named wrong in most two-event clips; at 8 exact rose from
    # 0.787 / 0.741 to 0.855 / 0.81 on 1000 test clips (init seeds 0 / 1), action 0.891 / 0.888 (4 frames: 0.891 /
    # 0.846). Stage 1 7000 steps and the language stage 40000 since training flushes denormals (stage 1 1.24x faster):
    # action 0.898 / 0.905 on those clips, 58.0 / 58.8 CPU-minutes. Measured in bench/results/captioner_toy_full*.json
    # and the log in bench/CAPTIONER_TOY.md (bench/captioner_toy.py makes the data). Over six draws action on those
    # clips is 0.80-0.91, mean 0.87: the base's draw decides it (bench/captioner_draws.py).
    "quick": {"lm": {"steps": 600, "lr": 2e-3}, "image": {"steps": 4000, "lr": 1e-3},
              "visual": {"steps": 1500, "lr": 2e-3, "frames": 4, "temporal_adapter": True},
              "language": {"steps": 2500, "lr": 2e-3, "frames": 4}},
    "full": {"lm": {"steps": 1500, "lr": 2e-3, "adam_beta2": 0.95},
             "image": {"steps": 20000, "lr": 2e-3, "input_weights": {"image": 3}, "adam_beta2": 0.95},
             "visual": {"steps": 7000, "lr": 2e-3, "frames": 8, "temporal_adapter": True,
                        "input_weights": {"video": 3}, "adam_beta2": 0.95},
             "language": {"steps": 40000, "lr": 2e-3, "frames": 8, "batch_size": 3, "pack": True,
                          "adam_beta2": 0.95}},
}


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="quick", choices=list(PRESETS), help="steps, learning rates and frames "
                   "per stage; flags below override them")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--lr", type=float, help="peak learning rate (warm-up, then cosine decay)")
    p.add_argument("--adam-beta2", type=float, help="AdamW's second-moment decay (default: the preset's, else "
                   "0.999, torch's)")
    p.add_argument("--vision-lr-scale", type=float, help="image and visual stages: the vision side's parameters "
                   "train at the learning rate times this (default: the preset's, else 1)")
    p.add_argument("--batch-size", type=int, help="examples per micro-batch (clips with --pack; default: the "
                   "preset's, else 16)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--warmup", type=int, default=20, help="warm-up steps")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: the preset's, else 0)")
    p.add_argument("--frames", type=int, help="frames per clip (uniformly sampled)")
    p.add_argument("--temporal-adapter", action=argparse.BooleanOptionalAction, default=None,
                   help="visual stage: add a space-time adapter on the video tokens (captioner/adapter.py); the "
                   "presets turn it on. vLLM cannot run a checkpoint that has one")
    p.add_argument("--still-frames", action=argparse.BooleanOptionalAction, default=None,
                   help="visual stage, with a new temporal adapter: each sampled frame fills its own temporal patch, "
                   "so every slice of visual tokens is one frame as the image model saw stills (twice the tokens of "
                   "Qwen2-VL's paired frames). The checkpoint records it: the language stage and generation follow")
    p.add_argument("--pixel-branch", type=int, metavar="CHANNELS",
                   help="visual stage, with a new temporal adapter: a small convolutional branch with this many "
                   "channels reads the frames' pixels and feeds the adapter, which then sees each cell's shape, "
                   "size and orientation from slice to slice (captioner/adapter.py; 0: none; default: the "
                   "preset's). The checkpoint records it")
    p.add_argument("--train-vision", metavar="PARTS", help="visual stage: the parts of the vision side that train, "
                   "comma-separated among adapter, merger, tower (patch embedding and blocks); default: all of it. "
                   "'adapter' keeps the image model's tower and merger as they were")
    p.add_argument("--precompute-features", action=argparse.BooleanOptionalAction, default=True,
                   help="language stage: run the frozen vision side once per clip while preparing the examples "
                   "instead of every step (same loss, faster, a few KB per clip instead of its pixels)")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                   help="language stage: a clip's instruction pairs in one sequence, the prompt they share "
                   "(template, visual tokens) once; each pair sees only that and itself, so the loss is the "
                   "same, from about half the tokens. --batch-size then counts clips (default: the preset's)")
    p.add_argument("--task-weight", action="append", default=[], metavar="TYPE=N",
                   help="language stage: use each instruction pair of TYPE (qa.json's \"type\": caption, "
                   "temporal, causal, descriptive) N times per epoch, 0 to leave it out; others once (repeatable; "
                   "overrides the preset's)")
    p.add_argument("--input-weight", action="append", default=[], metavar="KIND=N",
                   help="batches of KIND (video, image, text) per turn of the cycle the kinds of batch take, "
                   "others once; e.g. image=3 spends three image-stage steps in four on frames, one on text "
                   "(repeatable; overrides the preset's)")
    p.add_argument("--threads", type=int, help="torch CPU threads (tiny models train as fast on 1 as on 2)")
    p.add_argument("--flush-denormals", action=argparse.BooleanOptionalAction, default=True,
                   help="compute floats below float32's normal range (~1e-38) as zero on the CPU while training: "
                   "x86 runs them in microcode; the toy visual stage runs 1.24x faster (bench/denormal.py)")
    p.add_argument("--max-samples", type=int, default=0, help="use at most this many samples (0: all)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of full weights")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _config(args: argparse.Namespace, stage: str, model: str, out: str):
    from captioner.train import TrainConfig

    kw = dict(PRESETS[args.preset][stage])
    if stage != "language":  # a preset's packing is its language stage's; --pack on another stage is refused
        kw.pop("pack", None)
    if stage != "visual":  # likewise its frame layout and pixel branch (either flag elsewhere is refused)
        kw.pop("still_frames", None)
        kw.pop("pixel_branch", None)
    for name in ("steps", "lr", "frames", "temporal_adapter", "still_frames", "weight_decay", "batch_size", "pack",
                 "vision_lr_scale", "adam_beta2", "pixel_branch"):
        if getattr(args, name, None) is not None:
            kw[name] = getattr(args, name)
    if stage == "lm":  # pretrain-toy's text stage trains no vision side; its image stage takes the scale
        kw.pop("vision_lr_scale", None)
    if stage != "visual":
        kw.pop("temporal_adapter", None)
        kw.pop("vision_parts", None)
    if getattr(args, "train_vision", None):  # on another stage, TrainConfig refuses it
        kw["vision_parts"] = args.train_vision
    weights = dict(kw.pop("task_weights", {})) if stage == "language" else {}
    weights.update(parse_task_weights(getattr(args, "task_weight", [])))
    if weights:
        kw["task_weights"] = weights
    inputs = dict(kw.pop("input_weights", {}))
    inputs.update(parse_task_weights(getattr(args, "input_weight", []), flag="--input-weight", minimum=1,
                                     example="image=3"))
    if inputs:
        kw["input_weights"] = inputs
    return TrainConfig(stage=stage, model=model, shards=args.shards, out=out,
                       grad_accum=args.grad_accum, warmup=args.warmup, max_samples=args.max_samples, lora=args.lora,
                       lora_rank=args.lora_rank, precompute_features=args.precompute_features, seed=args.seed,
                       flush_denormals=args.flush_denormals,
                       save_every=args.save_every, resume=args.resume, device=args.device,
                       extra={"preset": args.preset}, **kw)


def parse_task_weights(items: list[str], flag: str = "--task-weight", minimum: int = 0,
                       example: str = "caption=2") -> dict[str, int]:
    """``--task-weight TYPE=N`` (or ``--input-weight KIND=N``) flags as {name: N}."""
    weights = {}
    for item in items:
        name, _, n = item.partition("=")
        if not name or not n.isdigit() or int(n) < minimum:
            raise ValueError(f"{flag} {item!r}: expected NAME=N with N a whole number >= {minimum}, e.g. {example}")
        weights[name] = int(n)
    return weights


def _tiny(args: argparse.Namespace) -> int:
    from captioner.tiny import build_tiny

    out = build_tiny(args.out, vocab_from=args.vocab_from, name=args.config, layers=args.layers, width=args.width,
                     vocab_size=args.vocab_size, image_size=args.image_size, seed=args.seed)
    print(f"tiny {args.config} written to {out}")
    return 0


def _set_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def _pretrain_toy(args: argparse.Namespace) -> int:
    from captioner.tiny import build_tiny
    from captioner.train import train

    _set_threads(args)
    out = Path(args.out)
    model = args.model
    if model is None:
        model = str(out / "init")
        if not (Path(model) / "config.json").exists():
            build_tiny(model, vocab_from=args.shards)
    lm_dir = str(out / "lm")
    for stage, src, dst in (("lm", model, lm_dir), ("image", lm_dir, str(out))):
        cfg = _config(args, stage, src, dst)
        if _already_trained(cfg, args.resume):
            continue
        summary = train(cfg, progress=not args.quiet)
        print(f"{stage}: {summary['step']} steps, loss {summary.get('loss', float('nan')):.3f} -> {dst}")
    print(f"base image VLM written to {out}")
    return 0


def _already_trained(cfg, resume: bool) -> bool:
    """True where cfg.out holds this very run, finished (a re-run skips it); an error where it holds another."""
    from captioner.train import config_changes, read_state

    state = read_state(cfg.out)
    if not state or not state.get("finished") or resume:
        return False
    if changed := config_changes(state, cfg):  # a finished checkpoint is not overwritten by another run
        raise ValueError(f"{cfg.stage}: {cfg.out} holds a finished run with other settings ({'; '.join(changed)}); "
                         "re-run with its settings or write to a fresh --out")
    print(f"{cfg.stage}: {cfg.out} is already trained ({state['step']} steps); --resume to extend it")
    return True


def _adapt(args: argparse.Namespace) -> int:
    from captioner.train import train

    _set_threads(args)
    cfg = _config(args, args.stage, args.model, args.out)
    if _already_trained(cfg, args.resume):
        return 0
    summary = train(cfg, progress=not args.quiet)
    print(f"{args.stage} adaptation: {summary['step']} steps, loss {summary.get('loss', float('nan')):.3f} "
          f"-> {args.out}")
    return 0


def _frames_for(model: str, frames: int | None) -> int:
    """--frames, else as many frames as the checkpoint was trained on, else 8."""
    from captioner.train import read_state

    if frames is not None:
        return frames
    state = read_state(model) if Path(model).is_dir() else None
    return state["config"]["frames"] if state else 8


def _generate(args: argparse.Namespace) -> int:
    from captioner.evaluate import caption_clips, load_eval_clips
    from captioner.load import load_captioner

    frames = _frames_for(args.model, args.frames)
    cap = load_captioner(args.model, backend=args.backend, dtype=args.dtype)
    clips, refs = load_eval_clips(args.shards, frames=frames, limit=args.n)
    texts = caption_clips(cap, clips, mode=args.mode, batch_size=args.batch_size)
    for c, t, r in zip(clips, texts, refs):
        print(f"{c.key:<22} {t}" + (f"\n{'':<22} gt: {r}" if r else ""))
    return 0


def _eval_toy(args: argparse.Namespace) -> int:
    import json

    from captioner.evaluate import evaluate_toy, forced_choice_toy, load_eval_clips
    from captioner.load import load_captioner
    from captioner.toy_metrics import score_by_event_count, two_event_misses

    if args.num_beams < 1:
        raise ValueError(f"--num-beams must be >= 1, got {args.num_beams}")
    frames = _frames_for(args.model, args.frames)
    cap = load_captioner(args.model, backend="hf", dtype=args.dtype)
    clips, refs = load_eval_clips(args.shards, frames=frames, limit=args.n)
    if not clips:
        raise ValueError(f"no clip in {args.shards}")
    report = evaluate_toy(cap, None, mode=args.mode, clips=(clips, refs), batch_size=args.batch_size,
                          num_beams=args.num_beams)
    fc = forced_choice_toy(cap, clips, refs, mode=args.mode)
    m = report["metrics"]
    preds = [p for _, p, _ in report["examples"]]
    groups = score_by_event_count(preds, refs)
    decoding = "greedy" if args.num_beams == 1 else f"beam search, {args.num_beams} beams"
    print(f"{args.model} on {len(clips)} clip(s) of {args.shards} ({args.mode}, {frames} frames, {decoding}):")
    print(f"{'generated captions against gt.txt:':<36}{'all':>8}" + "".join(f"{g:>9}" for g in groups))
    for name in ("object", "colour", "action", "direction_within_axis", "event_order", "exact", "parse_rate"):
        cells = [m.get(name)] + [groups[g].get(name) for g in groups]
        print(f"  {name:<34}" + "".join(f"{'-' if v is None else format(v, '.3f'):>{w}}"
                                        for v, w in zip(cells, [8] + [9] * len(groups))))
    print(f"  {'clips':<34}{len(clips):>8}" + "".join(f"{groups[g]['clips']:>9}" for g in groups))
    misses = two_event_misses(preds, refs)
    if misses:
        print("two-event clips, by what went wrong (events aligned by position):")
        print("  " + ", ".join(f"{kind} {n}" for kind, n in misses.items()))
    print("forced choice by likelihood, true caption against its flipped twin (chance 0.5):")
    for name in ("direction", "order"):
        print(f"  {name:<22} {'-' if fc[name] is None else format(fc[name], '.3f')}  (n={fc['n_' + name]})")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": "captioner " + " ".join(sys.argv[1:]), "model": args.model,
                                               "shards": args.shards, "mode": args.mode, "frames": frames,
                                               "num_beams": args.num_beams, "generation": m,
                                               "generation_by_event_count": groups,
                                               "two_event_misses": misses, "forced_choice": fc,
                                               "examples": report["examples"][:20]}, indent=2) + "\n")
    return 0


def _score_toy(args: argparse.Namespace) -> int:
    from captioner.toy_metrics import score
    from engine.shards import ErrorCollector, read_samples, read_text

    preds, refs, keys = [], [], []
    errors = ErrorCollector()
    for sample in read_samples(args.shards, handler=errors):
        pred, ref = read_text(sample, args.text_key), read_text(sample, args.ref_key)
        if pred is None or ref is None:
            continue
        keys.append(sample["__key__"])
        preds.append(pred)
        refs.append(ref)
    if not preds:
        print(f"captioner score-toy: no sample of {args.shards} has both {args.text_key!r} and {args.ref_key!r}",
              file=sys.stderr)
        return 2
    for k, p, r in list(zip(keys, preds, refs))[:args.n]:
        print(f"{k:<22} {p}\n{'':<22} gt: {r}")
    metrics = score(preds, refs)
    print(f"accuracy over {len(preds)} clip(s) ({args.text_key} against {args.ref_key}):")
    for name in ("object", "colour", "action", "direction_within_axis", "event_order", "exact"):
        value = metrics.get(name)
        print(f"  {name:<22} {'-' if value is None else f'{value:.3f}'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="captioner", formatter_class=fmt, description=(
        "pseudocap's captioner: an image VLM adapted to video in two stages (visual adaptation with the "
        "language model frozen, then language adaptation with the vision side frozen)."))
    parser.add_argument("--version", action="version", version=f"pseudocap captioner {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("tiny", formatter_class=fmt, help="build a tiny Qwen2-VL checkpoint offline",
                       description="Build a tiny Qwen2-VL (random weights) with a byte-level BPE tokenizer trained "
                       "offline, saved so that AutoProcessor / AutoModelForImageTextToText load it like a real one.")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-from", help="shard pattern whose text trains the tokenizer (default: the toy grammar)")
    p.add_argument("--config", default="qwen2-vl-tiny", help="tiny architecture name")
    p.add_argument("--layers", type=int, help="depth of language model and vision tower")
    p.add_argument("--width", type=int, help="width of language model and vision tower")
    p.add_argument("--vocab-size", type=int, default=600)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_tiny)

    p = sub.add_parser("pretrain-toy", formatter_class=fmt, help="train the toy base image VLM",
                       description="Train the toy base model: the language model on all caption text of the "
                       "pretrain split (text only), then image-text training on single frames with their static "
                       "captions. The result is an image VLM that has never been shown motion.")
    p.add_argument("--shards", required=True, help="pretrain split shards")
    p.add_argument("--out", required=True)
    p.add_argument("--model", help="checkpoint to start from (default: a new tiny model in OUT/init)")
    _train_args(p)
    p.set_defaults(func=_pretrain_toy)

    p = sub.add_parser("adapt", formatter_class=fmt, help="adapt to video: --stage visual, then --stage language",
                       description="visual: train the vision tower and projector on video-caption pairs (gt.txt), "
                       "language model frozen. language: train the language model on instruction pairs (qa.json, "
                       "captioning included), vision side frozen.")
    p.add_argument("--stage", required=True, choices=["visual", "language"])
    p.add_argument("--model", required=True)
    p.add_argument("--shards", required=True, help="video clips with gt.txt (visual) or qa.json (language). In the "
                   "visual stage, samples with a still image instead of a video (the base's pretrain frames: "
                   "'{adapt-*.tar,pretrain-*.tar}') train as image batches, a rehearsal of the image path; "
                   "--input-weight video=N sets the mix")
    p.add_argument("--out", required=True)
    _train_args(p)
    p.set_defaults(func=_adapt)

    p = sub.add_parser("generate", formatter_class=fmt, help="print captions of a few clips beside gt.txt",
                       description="Caption the first N clips of the shards and print them beside their gt.txt.")
    p.add_argument("--model", required=True)
    p.add_argument("--shards", required=True)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--frames", type=int, help="frames per clip (default: what the checkpoint was trained on, else 8)")
    p.add_argument("--mode", default="video", choices=["video", "middle-frame"])
    p.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=_generate)

    p = sub.add_parser("eval-toy", formatter_class=fmt, help="caption toy-world clips with a checkpoint and score "
                       "them, plus forced-choice direction and order", description="Caption the clips of toy-world "
                       "shards and score the captions per attribute against gt.txt; then, by likelihood, whether "
                       "the model prefers each true caption to its twin with one direction flipped (left/right, "
                       "up/down, grows/shrinks, appears/disappears) or its two events swapped. Forced choice has "
                       "chance 0.5 and also reads a model that cannot say events yet (the base image model).")
    p.add_argument("--model", required=True)
    p.add_argument("--shards", required=True)
    p.add_argument("--n", type=int, default=200, help="clips to evaluate (0: all)")
    p.add_argument("--frames", type=int, help="frames per clip (default: what the checkpoint was trained on, else 8)")
    p.add_argument("--mode", default="video", choices=["video", "middle-frame"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1: greedy, as "
                   "bench/captioner_toy.py scores)")
    p.add_argument("--json", help="also write the metrics and 20 examples to this JSON file")
    p.set_defaults(func=_eval_toy)

    p = sub.add_parser("score-toy", formatter_class=fmt, help="score toy-world captions in shards against gt.txt",
                       description="Read captioned toy-world shards (e.g. `engine caption` output) and print a few "
                       "captions beside their ground truth and the accuracy per attribute (object, colour, action, "
                       "direction within its axis, event order, exact match).")
    p.add_argument("--shards", required=True, nargs="+")
    p.add_argument("--text-key", default="txt", help="member holding the caption to score")
    p.add_argument("--ref-key", default="gt.txt", help="member holding the ground truth")
    p.add_argument("--n", type=int, default=6, help="examples to print")
    p.set_defaults(func=_score_toy)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, ImportError, KeyError) as exc:
        print(f"captioner {args.command}: {exc}", file=sys.stderr)
        return 2


def run() -> None:
    sys.exit(main())
