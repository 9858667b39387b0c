"""How well a checkpoint's frozen visual tokens tell a one-event toy clip's action: a trained probe.

Usage: python bench/visual_probe.py --model STAGE1 [--frames 8] [--train 6000] [--epochs 40] [--no-position]
           [--adapt 'DIR/adapt-*.tar'] [--test 'DIR/test-*.tar'] [--out bench/results/visual_probe.json]

The vision side (tower, merger and any temporal adapter) encodes the one-event clips of the adapt
split (training) and of the test split (the first 1000 clips' one-event ones), as the language stage
sees them. A two-layer transformer with a [CLS] token (width = the tokens', 4 heads, learned position
per token unless --no-position) learns the event's action from them; its test accuracy, overall and per
action, every 5 epochs, says what the tokens hold for a reader of about the language model's size,
apart from how well the language stage learns to say it. Not a ceiling: a language stage trained on
more clips can read more (README, Benchmarks).
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

WORK = ROOT / "bench" / "work" / "captioner"


def encode_one_event(cap, pattern: str, frames: int, limit: int, scan: int = 0):
    """[clips, tokens, dim] visual tokens of the one-event clips among the samples, and their action ids."""
    import torch

    from captioner.adapter import video_input
    from captioner.toy_metrics import parse_caption
    from captioner.train import frozen_features
    from data_specs.toyworld import ACTIONS
    from engine.decode import Sampling, decode_video
    from engine.shards import ErrorCollector, read_samples, read_text, video_member

    encode = frozen_features(cap.model, cap.device)
    xs, ys, batch, labels = [], [], [], []

    def flush():
        if batch:
            xs.extend(encode("video", torch.cat([b[0] for b in batch]), torch.cat([b[1] for b in batch])))
            ys.extend(labels)
            batch.clear()
            labels.clear()

    for n, sample in enumerate(read_samples(pattern, handler=ErrorCollector())):
        if scan and n >= scan:
            break
        events = parse_caption(read_text(sample, "gt.txt") or "")
        if not events or len(events) != 1:
            continue
        clip = decode_video(sample[video_member(sample)], Sampling.uniform(frames), backend="av").frames
        enc = cap.processor.video_processor(videos=[video_input(clip, cap.frame_repeat)], return_tensors="pt",
                                            do_sample_frames=False)
        batch.append((enc["pixel_values_videos"], enc["video_grid_thw"]))
        labels.append(ACTIONS.index(events[0].action))
        if len(batch) == 32:
            flush()
        if limit and len(ys) + len(labels) >= limit:
            break
    flush()
    return torch.stack(xs), torch.tensor(ys)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a checkpoint with a vision side (e.g. a stage-1 directory)")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--adapt", default=str(WORK / "toy-pretrain16000-adapt12000-test200-compositional200"
                                           / "adapt-*.tar"), help="training clips (the full preset's adapt split)")
    ap.add_argument("--test", default=str(WORK / "toy-test1000" / "test-*.tar"),
                    help="test clips (engine synth --split test --n 1000 --seed 0)")
    ap.add_argument("--train", type=int, default=6000, help="one-event training clips")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--no-position", action="store_true", help="no learned position per token")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "visual_probe.json"))
    args = ap.parse_args(argv)

    import torch
    from torch import nn

    from captioner.load import load_captioner
    from data_specs.toyworld import ACTIONS

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    cap = load_captioner(args.model, backend="hf", device="cpu")
    t0 = time.perf_counter()
    x_train, y_train = encode_one_event(cap, args.adapt, args.frames, args.train)
    x_test, y_test = encode_one_event(cap, args.test, args.frames, 0, scan=1000)
    encode_s = time.perf_counter() - t0
    mean, std = x_train.mean((0, 1)), x_train.std((0, 1)) + 1e-5
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    tokens, dim = x_train.shape[1:]

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(tokens, dim), requires_grad=not args.no_position)
            self.cls = nn.Parameter(torch.zeros(1, 1, dim))
            layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, 0.1, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2)
            self.head = nn.Linear(dim, len(ACTIONS))

        def forward(self, x):
            x = torch.cat([self.cls.expand(len(x), -1, -1), x + self.pos], 1)
            return self.head(self.encoder(x)[:, 0])

    probe = Probe()
    opt = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], 1e-3, weight_decay=0.01)
    curve = []
    for epoch in range(1, args.epochs + 1):
        probe.train()
        order = torch.randperm(len(x_train))
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            loss = nn.functional.cross_entropy(probe(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % 5 == 0 or epoch == args.epochs:
            probe.eval()
            with torch.no_grad():
                pred, seen = probe(x_test).argmax(1), probe(x_train[:1000]).argmax(1)
            point = {"epoch": epoch, "train": round((seen == y_train[:1000]).float().mean().item(), 4),
                     "test": round((pred == y_test).float().mean().item(), 4),
                     "test_by_action": {ACTIONS[a]: round((pred[y_test == a] == a).float().mean().item(), 3)
                                        for a in range(len(ACTIONS)) if (y_test == a).any()}}
            curve.append(point)
            print(point, flush=True)
    last = curve[-3:]  # the test accuracy moves by ~0.02 from one point to the next: the mean of the last three
    result = {"benchmark": "visual_probe", "command": "python bench/visual_probe.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "model": args.model, "frames": args.frames,
        "train_clips": len(y_train), "test_clips": len(y_test), "tokens": tokens, "position": not args.no_position,
        "encode_s": round(encode_s, 1), "test_last3_mean": round(sum(p["test"] for p in last) / len(last), 4),
        "curve": curve}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", args.out, "test (mean of the last three points):", result["test_last3_mean"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
