"""Whether a checkpoint's visual tokens of a still frame say which shape it shows: a linear probe.

Usage: python bench/shape_probe.py --model CKPT [--model CKPT ...] [--frames 'DIR/pretrain-*.tar'] [--n 2560]
           [--out bench/results/shape_probe.json]

Takes the one-object frames among the first --n of a pretrain split (their gt.txt reads "a red circle."),
runs each checkpoint's vision side on them (tower and merger: the tokens its language model reads; and the
tower's tokens before the merger) and fits a logistic regression (L2-penalised, L-BFGS) on three quarters
of the frames to tell circle, square and triangle apart, from every token of the frame side by side and
from the tokens' mean and max. Its accuracy on the last quarter says how much shape the image model's
tokens carry for a linear reader, apart from how well its language model learned to name it. A randomly
initialised tower is the floor to compare with. (The default frames are the full preset's training
frames: what the base learned from; `bench/captioner_base.py` scores naming on held-out ones.)

For a checkpoint of the image stage it also reads the stage's metrics.jsonl: the loss on image batches
per 1000 steps and the first 1000 steps whose mean falls below 0.2. The image stage sits on two plateaus,
about 0.47 (the captions' prior) until the model reads colour and about 0.27 (colour read, shape at chance)
until it reads shape; the drop below 0.2 is where a base starts to name shapes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import captioner  # noqa: E402,F401  - arms the torchvision fix before transformers loads
from data_specs.toyworld import SHAPES  # noqa: E402

DEFAULT_FRAMES = ROOT / "bench" / "work" / "captioner" / "toy-pretrain16000-adapt12000-test200-compositional200"


def one_object_frames(pattern: str, n: int):
    """(frames [N, H, W, 3], shape index per frame) of the one-object frames among the first ``n``."""
    import numpy as np

    from captioner.evaluate import load_eval_frames
    from captioner.toy_metrics import static_objects

    clips, refs = load_eval_frames(pattern, limit=n)
    frames, labels = [], []
    for clip, ref in zip(clips, refs):
        objects = static_objects(ref)  # [(colour, shape), ...]
        if len(objects) == 1:
            frames.append(clip.frames[0])
            labels.append(SHAPES.index(objects[0][1]))
    if len(set(labels)) < len(SHAPES):
        raise SystemExit(f"{pattern}: the first {n} frames do not show every shape alone; raise --n")
    return np.stack(frames), np.array(labels)


def visual_tokens(model_dir: str, frames, batch: int = 64):
    """The merger's input and output tokens of each frame: two arrays [frames, tokens, dim]."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, use_safetensors=True).eval()
    visual = model.model.visual
    seen: dict = {}
    hook = visual.merger.register_forward_hook(lambda _m, args, out: seen.update(pre=args[0], post=out))
    pre, post = [], []
    try:
        with torch.no_grad():
            for i in range(0, len(frames), batch):
                chunk = list(frames[i:i + batch])
                inputs = processor.image_processor(images=chunk, return_tensors="pt")
                model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
                pre.append(seen["pre"].reshape(len(chunk), -1, seen["pre"].shape[-1]))
                post.append(seen["post"].reshape(len(chunk), -1, seen["post"].shape[-1]))
    finally:
        hook.remove()
    return torch.cat(pre).numpy(), torch.cat(post).numpy()


def logistic_regression(x, y, classes: int, c: float = 1.0, iters: int = 500):
    """Multinomial logistic regression with an L2 penalty (scikit-learn's objective at C=c: the mean
    cross-entropy plus |W|^2 / (2 c n)), fitted by L-BFGS in torch; returns a predict function."""
    import torch

    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y)
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, tolerance_grad=1e-7, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + (w ** 2).sum() / (2 * c * len(y))
        loss.backward()
        return loss

    opt.step(closure)
    return lambda z: (torch.as_tensor(z, dtype=torch.float64) @ w + b).argmax(1).numpy()


def probe(tokens, labels) -> dict:
    """Train / test accuracy of a logistic regression on all tokens and on their mean and max."""
    import numpy as np

    n = len(labels) * 3 // 4
    out = {}
    for name, x in (("all_tokens", tokens.reshape(len(tokens), -1)),
                    ("mean_max", np.concatenate([tokens.mean(1), tokens.max(1)], 1))):
        mu, sd = x[:n].mean(0), x[:n].std(0) + 1e-6
        x = (x - mu) / sd
        predict = logistic_regression(x[:n], labels[:n], len(SHAPES))
        out[name] = {"train": round(float((predict(x[:n]) == labels[:n]).mean()), 3),
                     "test": round(float((predict(x[n:]) == labels[n:]).mean()), 3)}
    return out


def image_stage_curve(model_dir: str, window: int = 1000, below: float = 0.2) -> dict | None:
    """The image-stage loss on image batches per ``window`` steps, from the checkpoint's metrics.jsonl."""
    path = Path(model_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    sums: dict[int, list[float]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        loss = row.get("loss_by_input", {}).get("image")
        if row.get("stage") == "image" and loss is not None:
            sums.setdefault((row["step"] - 1) // window, []).append(loss)
    if not sums:
        return None
    curve = [[(k + 1) * window, round(sum(v) / len(v), 3)] for k, v in sorted(sums.items())]
    return {"image_loss_per_window": curve, "window": window,
            f"first_window_below_{below}": next((s for s, loss in curve if loss < below), None)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="checkpoint directory (repeatable)")
    ap.add_argument("--frames", default=str(DEFAULT_FRAMES / "pretrain-*.tar"), help="pretrain-split shards")
    ap.add_argument("--n", type=int, default=2560, help="frames to read (the one-object ones are kept)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "shape_probe.json"))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    frames, labels = one_object_frames(args.frames, args.n)
    result = {"benchmark": "shape_probe", "command": "python bench/shape_probe.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "frames": len(labels),
        "test_frames": len(labels) - len(labels) * 3 // 4,
        "chance": round(float(max((labels == k).mean() for k in range(len(SHAPES)))), 3), "models": []}
    for model in args.model:
        t0 = time.perf_counter()
        pre, post = visual_tokens(model, frames)
        row = {"model": model, "merged": probe(post, labels), "before_merger": probe(pre, labels),
               "image_stage": image_stage_curve(model), "seconds": round(time.perf_counter() - t0, 1)}
        result["models"].append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
