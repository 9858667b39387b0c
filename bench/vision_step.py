"""Step time of the stages that train the vision side (visual adaptation, the image stage): transformers'
Qwen2-VL vision tower as it runs without flash attention vs the same tower sped up by
`captioner.fast_vision.speed_up_vision`.

Usage: python bench/vision_step.py [--steps 10] [--repeats 3] [--batch 16] [--config qwen2-vl-tiny]
                                   [--threads 1] [--out bench/results/vision_step.json]

A tiny Qwen2-VL is built from its config (`captioner.tiny.build_tiny`; random weights: speed does not
depend on them) with a temporal adapter, twice with the same parameters; one of them is sped up. Each
times full optimizer steps (forward, backward, AdamW) of the visual stage (vision side trained, language
model frozen) on one batch of toy `adapt` clips at 4 and at 8 frames, and of the image stage (everything
trained) on one batch of `pretrain` frames, ``--repeats`` rounds in which the two take turns so that load
from elsewhere hits both alike. Recorded: the median ms per step of each, the ratio, and the first step's
loss each way (they must agree: the same computation, summed in another order).
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
    ap.add_argument("--batch", type=int, default=16, help="clips or frames per batch (the presets' batch size)")
    ap.add_argument("--config", default="qwen2-vl-tiny")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vision_step.json"))
    args = ap.parse_args(argv)

    import torch
    import transformers
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from captioner.adapter import adapter_of, attach_adapter
    from captioner.fast_vision import speed_up_vision
    from captioner.tiny import build_tiny
    from captioner.train import TrainConfig, _to, answer_loss, apply_freezing, build_examples, collate, mrope_positions
    from engine.synth import SynthConfig, synth

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "toy"
        synth(SynthConfig(split="adapt", n=args.batch, seed=0), data, progress=False)
        synth(SynthConfig(split="pretrain", n=args.batch, seed=0), data, progress=False)
        tiny = build_tiny(Path(tmp) / "tiny", vocab_from=str(data / "*.tar"), name=args.config)
        processor = AutoProcessor.from_pretrained(tiny)
        pad = processor.tokenizer.pad_token_id

        def model_for(stage: str, fast: bool, state: dict | None):
            model = AutoModelForImageTextToText.from_pretrained(tiny, dtype=torch.float32)
            attach_adapter(model)
            if state is None:
                for p in adapter_of(model).up.parameters():  # a trained-looking adapter: not the identity
                    torch.nn.init.normal_(p, std=0.05)
            else:
                model.load_state_dict(state)
            if fast:
                speed_up_vision(model)
            model = apply_freezing(model, TrainConfig(stage=stage, model=str(tiny), shards="", out=tmp,
                                                      temporal_adapter=True))
            return model.train()

        cases = {}  # name: (stage, batch)
        for frames in (4, 8):
            cfg = TrainConfig(stage="visual", model=str(tiny), shards=str(data / "adapt-*.tar"), out=tmp,
                              frames=frames, temporal_adapter=True)
            examples, _ = build_examples(cfg, processor, progress=False)
            cases[f"visual_{frames}_frames"] = ("visual", examples[:args.batch])
        cfg = TrainConfig(stage="image", model=str(tiny), shards=str(data / "pretrain-*.tar"), out=tmp)
        examples, _ = build_examples(cfg, processor, progress=False)
        cases["image"] = ("image", [e for e in examples if e.media == "image"][:args.batch])

        ms, rounds, first_loss, grid = {}, {}, {}, {}
        for name, (stage, batch) in cases.items():
            plain = model_for(stage, False, None)
            start = {k: v.detach().clone() for k, v in plain.state_dict().items()}
            models = {"transformers": plain, "sped_up": model_for(stage, True, start)}
            positions = mrope_positions(plain)
            for e in batch:
                e.position_ids = positions(e.input_ids, e.mm_token_type_ids, e.media, e.grid_thw)
            inputs = collate(batch, pad)
            grid[name] = [int(x) for x in batch[0].grid_thw[0]]
            optimizers = {w: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                          for w, m in models.items()}
            first_loss[name] = {}
            for way, model in models.items():
                with torch.no_grad():
                    first_loss[name][way] = answer_loss(model, _to(inputs, "cpu")).item()

            def run(way: str, n: int) -> float:
                model, optimizer = models[way], optimizers[way]
                t = time.perf_counter()
                for _ in range(n):
                    optimizer.zero_grad(set_to_none=True)
                    answer_loss(model, _to(inputs, "cpu")).backward()
                    optimizer.step()
                return (time.perf_counter() - t) / n * 1000

            for way in models:
                run(way, 2)  # warm-up
            times: dict[str, list[float]] = {w: [] for w in models}
            for r in range(args.repeats):
                for way in (list(models) if r % 2 == 0 else list(models)[::-1]):
                    times[way].append(run(way, args.steps))
            ms[name] = {w: round(statistics.median(t), 2) for w, t in times.items()}
            rounds[name] = {w: [round(x, 2) for x in t] for w, t in times.items()}
            print(name, ms[name], flush=True)

    for name, losses in first_loss.items():
        a, b = losses["transformers"], losses["sped_up"]
        if abs(a - b) > 1e-4 * abs(a):
            raise SystemExit(f"{name}: the sped-up tower's loss {b} is not transformers' {a}")
    result = {
        "benchmark": "vision_step",
        "command": "python bench/vision_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": args.config, "batch": args.batch, "steps_per_round": args.steps, "repeats": args.repeats,
        "grid_thw": grid,
        "ms_per_step": ms, "ms_per_step_rounds": rounds,
        "speedup": {n: round(v["transformers"] / v["sped_up"], 3) for n, v in ms.items()},
        "first_step_loss": first_loss,
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "torch_threads": torch.get_num_threads()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("ms_per_step", "speedup")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
