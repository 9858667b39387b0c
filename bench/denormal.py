"""Captioner training steps with denormal floats flushed to zero on the CPU, and without.

Usage: python bench/denormal.py [--work bench/work/captioner] [--rounds 2] [--steps image=400 ...]
                                [--out bench/results/denormal.json]

x86 CPUs compute with denormal floats (nonzero magnitudes below ~1.2e-38 in float32) in microcode, tens to
hundreds of cycles an operation. The toy visual stage meets them in its backward pass through the temporal
adapter's Conv3d (29 ms of a 146 ms step in a profile, unflushed). `captioner.train.train` therefore runs
each stage inside `flushing_denormals` (``TrainConfig.flush_denormals``, ``--no-flush-denormals`` to turn
it off).

This benchmark runs three stages of the full preset's chain as `bench/captioner_toy.py` trained them, each
from the checkpoint it starts from there (the text-stage checkpoint for the image stage, the base for stage 1,
stage 1 for the language stage), on a slice of the same shards, with the preset's settings except the step
count, once flushed and once not, in fresh processes; ``--rounds`` rounds in which the two take turns, so load
from elsewhere hits both alike. It records ms per optimizer step (the training loop's wall time over its
steps; one torch thread) per stage and round, their medians, the ratio off / on, and each run's last loss
(the two must land close: flushing changes only magnitudes below 1e-38).

It needs the checkpoints of a full-preset run: `python bench/captioner_toy.py --preset full --segments 3` writes
them under ``--work`` (``--run`` names the run's directory there).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = "toy-pretrain16000-adapt12000-test200-compositional200"
STEPS = {"image": 400, "visual": 150, "language": 600}


def stage_runs(work: Path, run: str, base: str | None = None) -> dict[str, dict]:
    """Per stage: the checkpoint it starts from, its shards and its settings in the full preset."""
    from captioner.cli import PRESETS

    data, chain = work / DATA, work / run
    base_dir = Path(base) if base else chain / "base"
    starts = {"image": base_dir / "lm", "visual": base_dir, "language": chain / "stage1"}
    shards = {"image": data / "pretrain-00000.tar", "visual": data / "adapt-00000.tar",
              "language": data / "adapt-00000.tar"}
    out = {}
    for stage, start in starts.items():
        if not (start / "config.json").is_file():
            raise SystemExit(f"{start}: no checkpoint; run `python bench/captioner_toy.py --preset full --segments 3` "
                             f"first, or name its run directory with --run")
        out[stage] = {"model": str(start), "shards": str(shards[stage]), **PRESETS["full"][stage]}
    return out


def child(spec: dict) -> dict:
    """One stage's run in this process: ms per step and the last loss."""
    import torch

    from captioner.train import TrainConfig, train

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(out=tmp, max_samples=spec.pop("max_samples"), warmup=20, **spec)
        summary = train(cfg, progress=False)
    return {"ms_per_step": round(1000 * summary["seconds"] / cfg.steps, 2), "loss": round(summary["loss"], 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(ROOT / "bench" / "work" / "captioner"))
    ap.add_argument("--run", default="full", help="the full-preset run's directory under --work")
    ap.add_argument("--base", help="the base it started from (default: its base/; captioner_toy.py --base runs "
                    "keep it elsewhere)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", action="append", default=[], metavar="STAGE=N",
                    help=f"optimizer steps per run of a stage (default: {STEPS})")
    ap.add_argument("--max-samples", type=int, default=300, help="clips (or frames) each run prepares")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "denormal.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    steps = dict(STEPS)
    for item in args.steps:
        stage, _, n = item.partition("=")
        if stage not in steps or not n.isdigit():
            raise SystemExit(f"--steps takes STAGE=N with STAGE among {', '.join(steps)}, got {item!r}")
        steps[stage] = int(n)
    runs = stage_runs(Path(args.work), args.run, args.base)
    results: dict[str, dict[str, list]] = {s: {"on": [], "off": [], "loss_on": [], "loss_off": []} for s in runs}
    for r in range(args.rounds):
        for stage, spec in runs.items():
            for flush in ((True, False) if r % 2 == 0 else (False, True)):
                spec_r = {**spec, "stage": stage, "steps": steps[stage], "max_samples": args.max_samples,
                          "flush_denormals": flush}
                done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec_r)], check=True,
                                      capture_output=True, text=True, cwd=ROOT)
                got = json.loads(done.stdout.strip().splitlines()[-1])
                key = "on" if flush else "off"
                results[stage][key].append(got["ms_per_step"])
                results[stage][f"loss_{key}"].append(got["loss"])
                print(f"round {r + 1} {stage:8s} flush {key:3s}: {got['ms_per_step']:.1f} ms/step, loss {got['loss']}",
                      flush=True)
    summary = {stage: {"ms_per_step_on": statistics.median(v["on"]), "ms_per_step_off": statistics.median(v["off"]),
                       "speedup": round(statistics.median(v["off"]) / statistics.median(v["on"]), 3),
                       "rounds": v} for stage, v in results.items()}
    report = {"benchmark": "denormal", "command": "python bench/denormal.py " + " ".join(argv or sys.argv[1:]),
              "runs": {s: {**spec, "steps": steps[s]} for s, spec in runs.items()},
              "max_samples": args.max_samples, "rounds": args.rounds, "torch_threads": 1,
              "machine": {"platform": platform.platform(), "processor": platform.processor()},
              "stages": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    for stage, v in summary.items():
        print(f"{stage:8s} {v['ms_per_step_off']:.1f} -> {v['ms_per_step_on']:.1f} ms/step: {v['speedup']}x")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
