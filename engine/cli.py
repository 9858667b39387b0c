"""The `engine` command: toy-world shards, captioning shards at scale, and checks of what was written.

    engine synth --out toy/ --split pool --n 1000 --seed 0
    engine decode --shards 'toy/test-*.tar' --frames 8 --limit 5
    engine caption --shards 'toy/pool-*.tar' --out captioned/ --model stage2/ --batch-size 16
    engine stats captioned/
    engine verify --inputs 'toy/pool-*.tar' --out captioned/
    engine retry-failed captioned/

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
                          fps=args.fps, shard_size=args.shard_size, reverse_frac=args.reverse_frac,
                          events=args.events)
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


_JOB_FLAGS = ("model", "backend", "prompt", "frames", "batch_size", "max_new_tokens", "num_beams", "do_sample",
              "temperature", "top_p", "seed", "decode_workers", "decode_backend", "decode_timeout", "max_pixels",
              "dtype", "device", "revision")


def _job_from_args(args: argparse.Namespace):
    """The job: defaults, then ``--config FILE`` (JSON), then the flags given on the command line."""
    import json

    from engine.caption import CaptionJob

    data: dict = {}
    if args.config:
        raw = json.loads(open(args.config).read())
        data.update(raw.get("job", raw))  # an earlier run's engine_job.json works as a config too
    data.update({k: getattr(args, k) for k in _JOB_FLAGS if getattr(args, k) is not None})
    if "model" not in data:
        raise ValueError("--model is required (or a --config that names one)")
    return CaptionJob.from_dict(data, source=args.config or "flags")


def _caption(args: argparse.Namespace) -> int:
    from engine.caption import ConfigMismatch
    from engine.executors import run_caption
    from engine.verify import format_summary, summarize

    try:
        job = _job_from_args(args)
        options = {"address": args.ray_address, "actors": args.ray_actors} if args.executor == "ray" else {}
        result = run_caption(job, args.shards, args.out, executor=args.executor, progress=not args.quiet,
                             recaption_if_changed=args.recaption_if_changed, **options)
    except (ValueError, ConfigMismatch, ImportError) as exc:
        print(f"engine caption: {exc}", file=sys.stderr)
        return 2
    if result.skipped:
        print(f"{len(result.skipped)} shard(s) already complete with this configuration ({result.config_hash}); "
              "kept as they are")
    if result.written:
        print(f"captioned {result.n_ok} clip(s) in {len(result.written)} shard(s), {result.n_failed} failed "
              f"(see {args.out}/*.errors.jsonl)")
    if not args.quiet:
        print(format_summary(summarize(args.out)))
    return 0


def _retry_failed(args: argparse.Namespace) -> int:
    from engine.caption import CaptionJob, read_job_file
    from engine.executors import run_caption

    try:
        recorded = read_job_file(args.out)
        data = dict(recorded["job"])
        if args.decode_timeout is not None:
            data["decode_timeout"] = args.decode_timeout
        job = CaptionJob.from_dict(data, source=f"{args.out}/engine_job.json")
        result = run_caption(job, recorded["inputs"], args.out, progress=not args.quiet, retry_failed=True)
    except (ValueError, FileNotFoundError) as exc:
        print(f"engine retry-failed: {exc}", file=sys.stderr)
        return 2
    redone = result.written
    print(f"retried {len(redone)} shard(s) with ledger rows: {sum(s.n_ok - s.n_reused for s in redone)} newly "
          f"captioned, {result.n_failed} still failing")
    return 0


def _stats(args: argparse.Namespace) -> int:
    import json

    from engine.verify import format_summary, summarize

    summary = summarize(args.out)
    if summary["shards"] == 0:
        print(f"engine stats: no *_stats.json in {args.out}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from engine.verify import verify

    report = verify(args.inputs, args.out)
    for p in report.problems:
        print(f"problem: {p}", file=sys.stderr)
    print(f"{report.shards} shard(s): {report.input_keys} input keys, {report.output_keys} in outputs, "
          f"{report.ledger_keys} in ledgers: " + ("OK, every key exactly once" if report.ok else
                                                  f"{len(report.problems)} problem(s)"))
    return 0 if report.ok else 1


def _add_caption_parser(sub, fmt) -> None:
    p = sub.add_parser(
        "caption", formatter_class=fmt, help="caption every clip of video shards with a VLM (resumable)",
        description="Caption every clip of the input shards and write output shards of the same names to --out: "
        "every input member unchanged, the caption as txt (the alt-text moves to alt.txt), caption.json with "
        "provenance; failed keys go to NNNNN.errors.jsonl and NNNNN_stats.json commits the shard. Re-running "
        "skips committed shards and redoes interrupted ones; decoding overlaps captioning.",
        epilog="Examples:\n  engine caption --shards 'toy/pool-*.tar' --out cap/ --model stage2/\n"
        "  engine caption --shards 'web/{00000..00999}.tar' --out cap/ --model Qwen/Qwen2-VL-2B-Instruct "
        "--backend vllm --batch-size 64 --decode-workers 8\n"
        "  engine caption --shards 'toy/pool-*.tar' --out frames/ --model base/ --frames 1   "
        "# per-frame baseline")
    p.add_argument("--shards", required=True, nargs="+", help="input shard patterns: braces, globs, fsspec URLs")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--config", help="a JSON file of job fields (an earlier run's engine_job.json works); flags "
                   "given here override it")
    p.add_argument("--model", help="checkpoint directory or hub id (required unless --config names it)")
    p.add_argument("--backend", choices=["hf", "vllm"], help="captioner backend [hf]")
    p.add_argument("--prompt", help="prompt template id [caption-video-v1; caption-frame-v1 with --frames 1]")
    p.add_argument("--frames", type=int, help="uniformly sampled frames per clip [8]")
    p.add_argument("--batch-size", type=int, help="clips per generate call [16]")
    p.add_argument("--max-new-tokens", type=int, help="[64]")
    p.add_argument("--num-beams", type=int, help="[1: greedy]")
    p.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, help="[1.0] with --do-sample")
    p.add_argument("--top-p", type=float, help="[1.0] with --do-sample")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--decode-workers", type=int, help="decode worker processes [2]")
    p.add_argument("--decode-backend", choices=["auto", "av", "decord", "torchcodec"], help="[auto]")
    p.add_argument("--decode-timeout", type=float, help="seconds per clip before its decode is killed [60]")
    p.add_argument("--max-pixels", type=int, help="larger frames are downscaled [921600 = 1280x720]")
    p.add_argument("--dtype", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16 [auto]")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (hf backend) [auto]")
    p.add_argument("--revision", help="hub revision of --model")
    p.add_argument("--recaption-if-changed", action="store_true",
                   help="update an output written by another configuration: re-caption only samples whose "
                   "provenance (model weights, prompt, generation parameters, sampling) differs")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: this process; ray: one captioner actor per GPU (or per CPU) on a Ray cluster")
    p.add_argument("--ray-address", help="Ray cluster address (default: start or join a local one)")
    p.add_argument("--ray-actors", type=int, help="captioner actors (default: one per GPU, else one per CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=_caption)

    p = sub.add_parser("retry-failed", formatter_class=fmt, help="re-run only the keys in an output's ledgers",
                       description="Re-read the inputs of shards whose ledger has rows and caption only the keys "
                       "that failed, with the job configuration recorded in OUT/engine_job.json; outputs that "
                       "succeeded before are carried over unchanged.")
    p.add_argument("out", help="an `engine caption` output directory")
    p.add_argument("--decode-timeout", type=float, help="override the recorded per-clip decode timeout")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_retry_failed)

    p = sub.add_parser("stats", formatter_class=fmt, help="summary of an output directory's shards",
                       description="Totals, failures by reason, throughput and the time split over the "
                       "directory's committed shards (their *_stats.json).")
    p.add_argument("out", help="an `engine caption` (or synth) output directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_stats)

    p = sub.add_parser("verify", formatter_class=fmt, help="check every input key is in exactly one of output "
                       "or ledger", description="Exit 0 when every input shard is committed, every output shard "
                       "reads whole, and every input key is exactly once in the output or the error ledger.")
    p.add_argument("--inputs", required=True, nargs="+", help="the input shard patterns of the job")
    p.add_argument("--out", required=True, help="the job's output directory")
    p.set_defaults(func=_verify)


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
    p.add_argument("--events", type=int, default=0, choices=[0, 1, 2], help="events per video clip: 0 draws one "
                   "or two (placement retries favour one: about 10%% of clips get two), 1 or 2 fixes the count")
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
    _add_caption_parser(sub, argparse.RawDescriptionHelpFormatter)
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
