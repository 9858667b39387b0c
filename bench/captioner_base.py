"""The toy base image VLM (text stage, then image stage) with a shape-naming curve on held-out frames.

    python bench/captioner_base.py NAME [--image-lr 2e-3] [--image-weight 3] [--init-seed 1] [--vision-width 128]
                                        [--vision-lr-scale 4] [--adam-beta2 0.95]
    python bench/captioner_base.py NAME --score CKPT [--score CKPT ...]   # only score existing bases

Trains the full preset's base (1500 text steps at 2e-3, then --image-steps image steps) from a fresh tiny
Qwen2-VL into bench/work/captioner_base/NAME and, at --points checkpoints of the image stage, captions 400
frames of a pretrain split no stage trains on (seed 7) with the frame prompt (`captioner.evaluate.
evaluate_frames`, scored by `toy_metrics.score_static`). Writes bench/results/captioner_base_NAME.json: the
curve against training CPU-minutes (evaluations left out). The full preset's final captioner follows how well
its base names shapes (README), so this is the cheap check of a base recipe.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import captioner  # noqa: E402,F401  - arms the torchvision fix before transformers loads
from captioner.evaluate import evaluate_frames, load_eval_frames  # noqa: E402
from captioner.tiny import TINY_CONFIGS, build_tiny  # noqa: E402
from captioner.train import TrainConfig, train  # noqa: E402
from engine.synth import SynthConfig, synth  # noqa: E402

WORK = ROOT / "bench" / "work"
KEYS = ("shape", "colour", "object_set", "exact")


def cpu_minutes() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return (r.ru_utime + r.ru_stime) / 60


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="run name: bench/work/captioner_base/NAME, bench/results/captioner_base_NAME.json")
    ap.add_argument("--config", default="qwen2-vl-tiny", help="tiny architecture (captioner.tiny.TINY_CONFIGS)")
    ap.add_argument("--vision-width", type=int, help="override the config's vision tower width")
    ap.add_argument("--vision-layers", type=int, help="override the config's vision tower depth")
    ap.add_argument("--init-seed", type=int, default=0, help="seed of the random initial weights")
    ap.add_argument("--seed", type=int, default=0, help="training seed (data order)")
    ap.add_argument("--image-lr", type=float, default=1e-3, help="image stage peak learning rate (preset: 1e-3)")
    ap.add_argument("--image-steps", type=int, default=16000)
    ap.add_argument("--image-weight", type=int, default=1, help="image batches per text batch in the image stage "
                    "(TrainConfig.input_weights; preset: 1)")
    ap.add_argument("--image-wd", type=float, default=0.0, help="image stage weight decay")
    ap.add_argument("--adam-beta2", type=float, default=0.999, help="AdamW's second-moment decay in both stages")
    ap.add_argument("--vision-lr-scale", type=float, default=1.0, help="image stage: the vision side trains at the "
                    "learning rate times this")
    ap.add_argument("--points", type=int, default=4, help="curve points over the image stage")
    ap.add_argument("--score", action="append", default=[], metavar="CKPT",
                    help="only score these checkpoints (repeatable)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    held_out = WORK / "captioner" / "toy-pretrain400-seed7"
    synth(SynthConfig(split="pretrain", n=400, seed=7), held_out, progress=False)
    frames = load_eval_frames(str(held_out / "pretrain-*.tar"))
    result: dict = {"benchmark": "captioner_base",
                    "command": "python bench/captioner_base.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    res = ROOT / "bench" / "results" / f"captioner_base_{args.name}.json"

    def scored(ckpt) -> dict:
        m = evaluate_frames(str(ckpt), frames)["metrics"]
        return {k: round(m[k], 3) for k in KEYS}

    if args.score:
        result["scored"] = []
        for ckpt in args.score:
            result["scored"].append({"checkpoint": ckpt, **scored(ckpt)})
            print(json.dumps(result["scored"][-1]), flush=True)
        res.write_text(json.dumps(result, indent=1) + "\n")
        print("wrote", res)
        return 0

    train_dir = WORK / "captioner" / "toy-pretrain16000-adapt12000-test200-compositional200"  # the full preset's
    synth(SynthConfig(split="pretrain", n=16000, seed=0), train_dir, progress=False)
    data = str(train_dir / "pretrain-*.tar")
    out = WORK / "captioner_base" / args.name
    spec = dict(TINY_CONFIGS[args.config])
    spec.update({k: v for k, v in (("vision_width", args.vision_width), ("vision_layers", args.vision_layers)) if v})
    TINY_CONFIGS["bench-base"] = spec
    if not (out / "init" / "config.json").exists():
        build_tiny(out / "init", vocab_from=data, name="bench-base", seed=args.init_seed)
    curve: list[dict] = []
    c0, eval_cpu = cpu_minutes(), [0.0]

    def point(step: int, ckpt: Path) -> None:
        e0 = cpu_minutes()
        curve.append({"step": step, "cpu_min": round(e0 - c0 - eval_cpu[0], 2), **scored(ckpt)})
        eval_cpu[0] += cpu_minutes() - e0
        print(json.dumps(curve[-1]), flush=True)

    train(TrainConfig(stage="lm", model=str(out / "init"), shards=data, out=str(out / "lm"), steps=1500, lr=2e-3,
                      seed=args.seed, adam_beta2=args.adam_beta2), progress=False)
    summary = train(TrainConfig(stage="image", model=str(out / "lm"), shards=data, out=str(out / "base"),
                                steps=args.image_steps, lr=args.image_lr, seed=args.seed, weight_decay=args.image_wd,
                                vision_lr_scale=args.vision_lr_scale, adam_beta2=args.adam_beta2,
                                input_weights={"image": args.image_weight} if args.image_weight != 1 else {},
                                save_every=args.image_steps // args.points), progress=False, on_checkpoint=point)
    result.update(args=vars(args), spec=spec, curve=curve, image_loss=summary["loss"],
                  train_cpu_min=round(cpu_minutes() - c0 - eval_cpu[0], 2))
    res.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
