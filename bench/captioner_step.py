"""Language-stage step time of the captioner: the frozen vision side run every step vs once per clip, logits
at every position vs at the supervised ones only, and each clip's instruction pairs apart vs packed.

Usage: python bench/captioner_step.py [--steps 20] [--repeats 3] [--frames 4] [--clips 3]
                                      [--config qwen2-vl-tiny] [--threads 1] [--out bench/results/captioner_step.json]

In the language stage (stage 2 of arXiv 2401.06129) the vision tower, its merger and any
temporal adapter are frozen, so what they make of a clip never changes. `captioner.train`
therefore runs them once per clip while it prepares the examples (``precompute_features``)
and feeds their output to the model as ``mm_encoder_outputs``; it also keeps each example's M-RoPE
positions and projects only the supervised positions onto the vocabulary (`captioner.train.answer_loss`).
This benchmark builds a tiny Qwen2-VL from its config (`captioner.tiny.build_tiny`; random weights, speed does not depend
on them) with a temporal adapter, makes 64 toy `adapt` clips, prepares the language stage's
examples each way and times full optimizer steps (forward, backward, AdamW) on the same
batch, ``--repeats`` rounds in which the ways take turns, so load from elsewhere
hits all alike:

- ``per_step``: pixels through the frozen vision side, the model's own loss (logits everywhere);
- ``precomputed``: visual tokens computed once, the model's own loss;
- ``answer_logits``: visual tokens and M-RoPE positions computed once, logits at supervised positions only
  (what `captioner.train` runs by default);
- ``packed``: the same, each clip's pairs packed in one sequence (`captioner.train.pack_pairs`, ``--pack``).

Every way runs the instruction pairs of the same ``--clips`` clips (15 pairs for the default 3).

It records the median ms per step of each, their ratios, the loss of the first step each way (they must
agree), the bytes a prepared clip keeps (pixels vs visual tokens) and the one-off cost of precomputing, per
clip.
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
    ap.add_argument("--steps", type=int, default=20, help="timed steps per way per round")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--clips", type=int, default=3, help="clips in the batch: every way runs their instruction "
                    "pairs (3 toy clips hold 15)")
    ap.add_argument("--config", default="qwen2-vl-tiny")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "captioner_step.json"))
    args = ap.parse_args(argv)

    import torch
    import transformers
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from captioner.adapter import attach_adapter
    from captioner.tiny import build_tiny
    from captioner.train import (TrainConfig, _to, answer_loss, apply_freezing, build_examples, collate,
                                 frozen_features, mrope_positions)
    from engine.synth import SynthConfig, synth

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "toy"
        synth(SynthConfig(split="adapt", n=64, seed=0), data, progress=False)
        tiny = build_tiny(Path(tmp) / "tiny", vocab_from=str(data / "adapt-*.tar"), name=args.config)
        processor = AutoProcessor.from_pretrained(tiny)
        model = AutoModelForImageTextToText.from_pretrained(tiny, dtype=torch.float32)
        for p in attach_adapter(model).up.parameters():  # a trained-looking adapter: not the identity
            torch.nn.init.normal_(p, std=0.05)
        cfg = TrainConfig(stage="language", model=str(tiny), shards=str(data / "adapt-*.tar"), out=tmp,
                          frames=args.frames)
        model = apply_freezing(model, cfg)
        model.train()
        t0 = time.perf_counter()
        plain, _ = build_examples(cfg, processor, progress=False)
        prep_plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        cached, report = build_examples(cfg, processor, progress=False, features=frozen_features(model, "cpu"))
        prep_cached = time.perf_counter() - t0
        t0 = time.perf_counter()
        placed, _ = build_examples(cfg, processor, progress=False, features=frozen_features(model, "cpu"),
                                   positions=mrope_positions(model))
        prep_placed = time.perf_counter() - t0
        cfg.pack = True
        packed, _ = build_examples(cfg, processor, progress=False, features=frozen_features(model, "cpu"),
                                   positions=mrope_positions(model))
        clips = packed[:args.clips]
        n = sum(e.pairs for e in clips)  # every way runs these instruction pairs
        pad = processor.tokenizer.pad_token_id
        batches = {"per_step": collate(plain[:n], pad), "precomputed": collate(cached[:n], pad),
                   "answer_logits": collate(placed[:n], pad), "packed": collate(clips, pad)}
        loss_of = {"per_step": lambda b: model(**b).loss, "precomputed": lambda b: model(**b).loss,
                   "answer_logits": lambda b: answer_loss(model, b), "packed": lambda b: answer_loss(model, b)}
        params = [p for p in model.parameters() if p.requires_grad]
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        first_loss = {}
        for way, batch in batches.items():
            model.load_state_dict(start)
            with torch.no_grad():
                first_loss[way] = loss_of[way](_to(batch, "cpu")).item()
        optimizer = torch.optim.AdamW(params, lr=1e-4)

        def run(way: str, n: int) -> float:
            batch = batches[way]
            t = time.perf_counter()
            for _ in range(n):
                optimizer.zero_grad(set_to_none=True)
                loss_of[way](_to(batch, "cpu")).backward()
                optimizer.step()
            return (time.perf_counter() - t) / n * 1000

        for way in batches:
            run(way, 3)  # warm-up
        times: dict[str, list[float]] = {w: [] for w in batches}
        for r in range(args.repeats):
            for way in (list(batches) if r % 2 == 0 else list(batches)[::-1]):
                times[way].append(run(way, args.steps))
        ms = {w: statistics.median(t) for w, t in times.items()}
        clip_bytes = {"pixels": plain[0].pixels.numel() * plain[0].pixels.element_size(),
                      "visual_tokens": cached[0].features.numel() * cached[0].features.element_size()}
        result = {
            "benchmark": "captioner_step",
            "command": "python bench/captioner_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "config": args.config, "frames": args.frames, "pairs_per_batch": n, "clips_per_batch": len(clips),
            "steps_per_round": args.steps, "repeats": args.repeats,
            "tokens_per_batch": {w: int(b["attention_mask"].sum()) for w, b in batches.items()},
            "seq_len": {w: int(b["input_ids"].shape[1]) for w, b in batches.items()},
            "ms_per_step": {w: round(v, 2) for w, v in ms.items()},
            "ms_per_step_rounds": {w: [round(x, 2) for x in t] for w, t in times.items()},
            "speedup": round(ms["per_step"] / ms["precomputed"], 3),
            "speedup_answer_logits_over_precomputed": round(ms["precomputed"] / ms["answer_logits"], 3),
            "speedup_answer_logits_over_per_step": round(ms["per_step"] / ms["answer_logits"], 3),
            "speedup_packed_over_precomputed": round(ms["precomputed"] / ms["packed"], 3),
            "first_step_loss": first_loss,
            "bytes_per_clip": clip_bytes,
            "prepare_s_per_clip": {"per_step": round(prep_plain / report["samples"], 4),
                                   "precomputed": round(prep_cached / report["samples"], 4),
                                   "answer_logits": round(prep_placed / report["samples"], 4)},
            "machine": {"platform": platform.platform(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "torch_threads": torch.get_num_threads()},
        }
    if any(abs(v - first_loss["per_step"]) > 1e-4 * abs(first_loss["per_step"]) for v in first_loss.values()):
        raise SystemExit(f"the ways disagree on the loss: {first_loss}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("ms_per_step", "speedup", "speedup_answer_logits_over_precomputed",
                                             "speedup_packed_over_precomputed", "first_step_loss")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
