"""Caption throughput of batched vs one-by-one generation on CPU with the tiny toy-world captioner.

Usage: python bench/generate.py [--repeats N] [--batch-sizes 1,8,32] [--threads N] [--out bench/results/generate.json]

Builds the tiny Qwen2-VL (`captioner.tiny.build_tiny`, random weights: speed does
not depend on weight values) in a temporary directory, loads it with
``load_captioner(dir, backend="hf", device="cpu")`` and captions toy-world clips
of the `test` split (`engine.synth.render`, 16 frames subsampled evenly to 8,
uint8 [8, 112, 112, 3]) with the prompt ``caption-video-v1`` and
``GenerationParams(max_new_tokens=24)``.

Random weights may emit the end-of-sequence token at any step, which would make
the work per clip (and so the comparison) depend on luck; the benchmark sets
``model.generation_config.min_new_tokens = max_new_tokens`` so every clip, batched
or not, generates exactly 24 new tokens, and checks that every result reports 24
output tokens.

For each batch size B it times ``cap.caption(clips[:B])`` (one batched call) against
B calls of ``cap.caption([clip])`` (one by one): one warm-up of each, then
``--repeats`` rounds in which the two take turns (alternating which goes first),
so load from elsewhere on the machine hits both alike. Times are wall clock of
`Captioner.caption`, processor and token budget included, i.e. what a caller
pays. It records the median and min seconds, clips/s (B / median), the speed-up
of batched over one-by-one, whether both ways gave the same texts, the 1-minute
load average around each batch size (other processes competing for the cores
slow torch's threads down a lot), torch's thread counts, the machine and the
library versions.

Torch runs one intra-op thread by default (``--threads 1``): the tiny model's
operations are too small to gain from more, and on a 2-core machine shared with
other work torch's default (a thread per core) made the same calls up to 20x
slower and the timings swing from run to run (measured: one clip took 0.04 s
with one thread, 0.17 to 0.86 s with two while another process kept a core
busy). ``--threads 0`` keeps torch's default.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from captioner.interface import Captioner, Clip  # noqa: E402
from captioner.load import load_captioner  # noqa: E402
from captioner.tiny import build_tiny  # noqa: E402
from data_specs import GenerationParams  # noqa: E402
from data_specs.prompts import PromptTemplate, get_prompt  # noqa: E402
from engine.synth import SynthConfig, render, sample_clip  # noqa: E402

PROMPT_ID = "caption-video-v1"
MAX_NEW_TOKENS = 24
FRAMES = 8
SPLIT, SEED = "test", 0


def make_clips(n: int) -> list[Clip]:
    """``n`` toy-world clips of the test split, 16 rendered frames subsampled evenly to `FRAMES`."""
    cfg = SynthConfig(split=SPLIT, n=1, seed=SEED)
    clips = []
    for i in range(n):
        frames = render(sample_clip(cfg, i))
        idx = np.linspace(0, len(frames) - 1, FRAMES).round().astype(int)
        clips.append(Clip(f"{SPLIT}-{i:06d}", np.ascontiguousarray(frames[idx])))
    return clips


def time_batch(cap: Captioner, clips: list[Clip], prompt: PromptTemplate, params: GenerationParams,
               repeats: int) -> dict:
    """Times one batched call against one call per clip; a warm-up of each, then interleaved rounds.

    Returns:
        {"batched_s": [...], "sequential_s": [...], "batched": results, "sequential": results}
        (the results are those of the warm-up calls).
    """
    batched = cap.caption(clips, prompt, params)
    sequential = [cap.caption([c], prompt, params)[0] for c in clips]
    times: dict[str, list[float]] = {"batched_s": [], "sequential_s": []}
    for rep in range(repeats):
        order = ("batched_s", "sequential_s") if rep % 2 == 0 else ("sequential_s", "batched_s")
        for way in order:
            t0 = time.perf_counter()
            if way == "batched_s":
                cap.caption(clips, prompt, params)
            else:
                for c in clips:
                    cap.caption([c], prompt, params)
            times[way].append(time.perf_counter() - t0)
    return {**times, "batched": batched, "sequential": sequential}


def _loadavg() -> float | None:
    """The 1-minute load average (other work on the machine skews the timings; it is recorded with them)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "tokenizers", "numpy", "av"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def machine() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "machine": platform.machine(), "processor": cpu,
            "cpu_count": os.cpu_count(), "cpus_usable": usable}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10, help="timed rounds per batch size (after 1 warm-up)")
    ap.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads; 0: torch's default (one per core). Default 1, see the docstring")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "generate.json"))
    args = ap.parse_args(argv)
    try:
        sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if args.repeats < 1 or not sizes or min(sizes) < 1:
        ap.error("--repeats and every batch size must be >= 1")
    if args.threads < 0:
        ap.error("--threads must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    prompt = get_prompt(PROMPT_ID)
    params = GenerationParams(max_new_tokens=MAX_NEW_TOKENS)
    with tempfile.TemporaryDirectory(prefix="pseudocap-tiny-") as tmp:
        t0 = time.perf_counter()
        build_tiny(tmp)
        cap = load_captioner(tmp, backend="hf", device="cpu")
        tiny_cfg = json.loads((Path(tmp) / "pseudocap_tiny.json").read_text())
        build_s = time.perf_counter() - t0
        # Equal work per clip: no early end-of-sequence, every clip generates exactly MAX_NEW_TOKENS.
        cap.model.generation_config.min_new_tokens = MAX_NEW_TOKENS

        t0 = time.perf_counter()
        clips = make_clips(max(sizes))
        prep_s = time.perf_counter() - t0

        results = []
        for b in sizes:
            load_before = _loadavg()
            timed = time_batch(cap, clips[:b], prompt, params, args.repeats)
            med_b, med_s = statistics.median(timed["batched_s"]), statistics.median(timed["sequential_s"])
            all_results = timed["batched"] + timed["sequential"]
            errors = [r.error for r in all_results if r.error]
            results.append({
                "batch_size": b,
                "batched_s": [round(t, 4) for t in timed["batched_s"]],
                "sequential_s": [round(t, 4) for t in timed["sequential_s"]],
                "batched_median_s": round(med_b, 4),
                "sequential_median_s": round(med_s, 4),
                "batched_clips_per_s": round(b / med_b, 2),
                "sequential_clips_per_s": round(b / med_s, 2),
                "speedup": round(med_s / med_b, 3),  # > 1: batching is faster
                "batched_min_s": round(min(timed["batched_s"]), 4),
                "sequential_min_s": round(min(timed["sequential_s"]), 4),
                "speedup_of_min": round(min(timed["sequential_s"]) / min(timed["batched_s"]), 3),
                "loadavg_1min_before_after": [load_before, _loadavg()],
                "output_tokens": sorted({r.output_tokens for r in all_results}),
                "finish_reasons": sorted({r.finish_reason for r in all_results}),
                "input_tokens": sorted({r.input_tokens for r in all_results}),
                "same_texts": sum(x.text == y.text for x, y in zip(timed["batched"], timed["sequential"])),
                "errors": errors,
            })
        equal_work = all(r["output_tokens"] == [MAX_NEW_TOKENS] and not r["errors"] for r in results)

    report = {
        "benchmark": "generate",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python bench/generate.py", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {
            "model": "captioner.tiny.build_tiny (random weights)", "tiny_config": tiny_cfg,
            "backend": "hf", "device": "cpu", "dtype": str(cap.model.dtype).replace("torch.", ""),
            "prompt": PROMPT_ID, "generation": params.model_dump(),
            "min_new_tokens": MAX_NEW_TOKENS,
            "equal_work": "model.generation_config.min_new_tokens = max_new_tokens: the end-of-sequence token is "
                          "suppressed, every clip generates exactly max_new_tokens tokens batched or not",
            "clips": f"toy world, split {SPLIT!r} seed {SEED}, indices 0..{max(sizes) - 1}, "
                     f"16 rendered frames subsampled to {FRAMES}, uint8 [{FRAMES}, 112, 112, 3]",
            "batch_sizes": sizes, "repeats": args.repeats, "warmup": 1,
            "timing": "wall clock of Captioner.caption(): processor, token budget and generate included; batched "
                      "= one call with B clips, sequential = B calls with one clip; rounds interleaved",
        },
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "machine": machine(),
        "versions": versions(),
        "equal_work_verified": equal_work,
        "results": results,
        "build_s": round(build_s, 2),
        "prepare_s": round(prep_s, 2),
        "total_s": round(time.perf_counter() - started, 2),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    m = report["machine"]
    print(f"generate: tiny Qwen2-VL on CPU, {FRAMES} frames 112x112, {MAX_NEW_TOKENS} new tokens per clip "
          f"(forced), {args.repeats} repeats; {report['torch_threads']} torch threads, {m['cpus_usable']} cpus")
    print(f"{'B':>3} {'batched s':>10} {'clips/s':>8} {'one-by-one s':>13} {'clips/s':>8} {'speed-up':>9} "
          f"{'same text':>10}")
    for r in results:
        print(f"{r['batch_size']:>3} {r['batched_median_s']:>10.3f} {r['batched_clips_per_s']:>8.2f} "
              f"{r['sequential_median_s']:>13.3f} {r['sequential_clips_per_s']:>8.2f} {r['speedup']:>9.2f} "
              f"{r['same_texts']:>6}/{r['batch_size']}")
    print(f"equal work verified: {equal_work}; total {report['total_s']:.0f} s -> {out}")
    return 0 if equal_work else 1


if __name__ == "__main__":
    raise SystemExit(main())
