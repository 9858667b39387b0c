"""Step time of the visual stage with the temporal adapter alone vs the adapter with its pixel branch
(`captioner.adapter.PixelBranch`, `--pixel-branch`): what the branch costs a full-preset stage-1 step.

Usage: python bench/pixel_step.py [--steps 10] [--repeats 3] [--batch 16] [--frames 8] [--channels 16]
                                  [--threads 1] [--out bench/results/pixel_step.json]

A tiny Qwen2-VL is built from its config (random weights: speed does not depend on them), sped up as
training runs it (`speed_up_vision`), with denormals flushed as training does. Each way times full
optimizer steps (forward, backward, AdamW; vision side trained, language model frozen) on one batch of
toy `adapt` clips, ``--repeats`` rounds in which the two take turns so that load from elsewhere hits
both alike. Recorded: the median ms per step of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import captioner  # noqa: E402,F401  - arms the torchvision compatibility fix first


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per way per round")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16, help="clips per batch (the full preset's)")
    ap.add_argument("--frames", type=int, default=8, help="frames per clip (the full preset's)")
    ap.add_argument("--channels", type=int, default=16, help="the pixel branch's channels (the full-preset chains "
                    "measured with it ran 16)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "pixel_step.json"))
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from captioner.adapter import adapter_of, attach_adapter
    from captioner.fast_vision import speed_up_vision
    from captioner.tiny import build_tiny
    from captioner.train import (TrainConfig, _to, answer_loss, apply_freezing, build_examples, collate,
                                 flushing_denormals, mrope_positions)
    from engine.synth import SynthConfig, synth

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ways = {"adapter": 0, "adapter_and_pixel_branch": args.channels}
    with tempfile.TemporaryDirectory() as tmp, flushing_denormals(True):
        data = Path(tmp) / "toy"
        synth(SynthConfig(split="adapt", n=args.batch, seed=0), data, progress=False)
        tiny = build_tiny(Path(tmp) / "tiny", vocab_from=str(data / "*.tar"))
        processor = AutoProcessor.from_pretrained(tiny)
        cfg = TrainConfig(stage="visual", model=str(tiny), shards=str(data / "adapt-*.tar"), out=tmp,
                          frames=args.frames, temporal_adapter=True)
        batch, _ = build_examples(cfg, processor, progress=False)
        batch = batch[:args.batch]
        models, optimizers = {}, {}
        for way, channels in ways.items():
            model = AutoModelForImageTextToText.from_pretrained(tiny, dtype=torch.float32)
            attach_adapter(model, pixel_channels=channels)
            for p in adapter_of(model).up.parameters():  # a trained-looking adapter: not the identity
                torch.nn.init.normal_(p, std=0.05)
            speed_up_vision(model)
            models[way] = apply_freezing(model, cfg).train()
            optimizers[way] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        positions = mrope_positions(models["adapter"])
        for e in batch:
            e.position_ids = positions(e.input_ids, e.mm_token_type_ids, e.media, e.grid_thw)
        inputs = _to(collate(batch, processor.tokenizer.pad_token_id), "cpu")

        def run(way: str, n: int) -> float:
            model, optimizer = models[way], optimizers[way]
            t = time.perf_counter()
            for _ in range(n):
                optimizer.zero_grad(set_to_none=True)
                answer_loss(model, inputs).backward()
                optimizer.step()
            return (time.perf_counter() - t) / n * 1000

        for way in ways:
            run(way, 2)  # warm-up
        times: dict[str, list[float]] = {w: [] for w in ways}
        for r in range(args.repeats):
            for way in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
                times[way].append(run(way, args.steps))
                print(way, round(times[way][-1], 1), "ms/step", flush=True)
        grid = [int(x) for x in batch[0].grid_thw[0]]
        params = {w: sum(p.numel() for p in adapter_of(m).parameters()) for w, m in models.items()}

    ms = {w: round(statistics.median(t), 2) for w, t in times.items()}
    result = {
        "benchmark": "pixel_step",
        "command": "python bench/pixel_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "batch": args.batch, "frames": args.frames, "pixel_channels": args.channels, "grid_thw": grid,
        "steps_per_round": args.steps, "repeats": args.repeats, "adapter_parameters": params,
        "ms_per_step": ms, "ms_per_step_rounds": {w: [round(x, 2) for x in t] for w, t in times.items()},
        "cost_ratio": round(ms["adapter_and_pixel_branch"] / ms["adapter"], 3),
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("ms_per_step", "cost_ratio", "adapter_parameters")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
