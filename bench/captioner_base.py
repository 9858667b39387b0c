"""The toy base image VLM (text stage, then image stage) with a shape-naming curve on held-out frames.

    python bench/captioner_base.py NAME [--image-lr 2e-3] [--init-seed 1] [--vision-width 128]
    python bench/captioner_base.py NAME --score CKPT [--score CKPT ...]   # only score existing bases

Trains the full preset's base (1500 text steps at 2e-3, then --image-steps image steps) from a fresh tiny
Qwen2-VL into bench/work/captioner_base/NAME and, at --points checkpoints of the image stage, captions 400
frames of a pretrain split no stage trains on (seed 7) with the frame prompt. Writes
bench/results/captioner_base_NAME.json: the curve (CPU-minutes of training, evaluations left out; exact, the
first object's shape, the object set). The full preset's final captioner follows how well its base names
shapes (README), so this is the cheap check of a base recipe.
"""
import argparse, io, json, re, resource, sys, numpy as np, torch
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import captioner  # noqa: E402,F401  - arms the torchvision fix before transformers loads
torch.set_num_threads(1)
from PIL import Image
from engine.synth import SynthConfig, synth
from engine.shards import read_samples, read_text
from captioner.load import load_captioner
from captioner.interface import Clip, GenerationParams
from captioner.train import TrainConfig, train
from captioner.tiny import build_tiny, TINY_CONFIGS
from data_specs.prompts import get_prompt
ap = argparse.ArgumentParser()
ap.add_argument("name"); ap.add_argument("--config", default="qwen2-vl-tiny"); ap.add_argument("--vision-width", type=int)
ap.add_argument("--vision-layers", type=int); ap.add_argument("--init-seed", type=int, default=0)
ap.add_argument("--seed", type=int, default=0); ap.add_argument("--image-lr", type=float, default=1e-3)
ap.add_argument("--image-steps", type=int, default=16000); ap.add_argument("--points", type=int, default=4)
ap.add_argument("--image-wd", type=float, default=0.0)
ap.add_argument("--score", action="append", default=[], metavar="CKPT", help="only score these checkpoints (repeatable)")
a = ap.parse_args()
W = ROOT / "bench" / "work" / "captioner"
train_dir = W / "toy-pretrain16000-adapt12000-test200-compositional200"  # the full preset's pretrain split
synth(SynthConfig(split="pretrain", n=16000, seed=0), train_dir, progress=False)
data = str(train_dir / "pretrain-*.tar")
out = ROOT / "bench" / "work" / "captioner_base" / a.name
spec = dict(TINY_CONFIGS[a.config])
if a.vision_width: spec["vision_width"] = a.vision_width
if a.vision_layers: spec["vision_layers"] = a.vision_layers
TINY_CONFIGS["exp"] = spec
if not a.score and not (out / "init" / "config.json").exists():
    build_tiny(out / "init", vocab_from=data, name="exp", seed=a.init_seed)
d = str(W / "toy-pretrain400-seed7")
synth(SynthConfig(split="pretrain", n=400, seed=7), d, progress=False)
clips, refs = [], []
for s in read_samples(d + "/pretrain-*.tar"):
    im = np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB"))
    clips.append(Clip(s["__key__"], np.stack([im, im]))); refs.append(read_text(s, "gt.txt"))
prompt = get_prompt("caption-frame-v1")
pat = re.compile(r"(red|green|blue|yellow) (circle|square|triangle)")
cpu = lambda: (lambda r: (r.ru_utime + r.ru_stime) / 60)(resource.getrusage(resource.RUSAGE_SELF))
curve, c0, ev = [], cpu(), [0.0]
def diag(step, ckpt):
    e0 = cpu(); cap = load_captioner(str(ckpt)); preds = []
    for i in range(0, len(clips), 32):
        preds += [r.text for r in cap.caption(clips[i:i+32], prompt, GenerationParams(max_new_tokens=32))]
    objs = [(pat.findall(p), pat.findall(r)) for p, r in zip(preds, refs)]
    pt = {"step": step, "cpu_min": round(cpu() - c0 - ev[0], 2), "exact": round(float(np.mean([p.strip() == r.strip() for p, r in zip(preds, refs)])), 3),
          "first_shape": round(float(np.mean([bool(x) and x[0][1] == y[0][1] for x, y in objs])), 3),
          "object_set": round(float(np.mean([sorted(x) == sorted(y) for x, y in objs])), 3)}
    ev[0] += cpu() - e0; curve.append(pt); print(json.dumps(pt), flush=True)
if a.score:
    scored = []
    for ckpt in a.score:
        diag(0, ckpt)
        scored.append({"checkpoint": ckpt, **{k: v for k, v in curve.pop().items() if k not in ("step", "cpu_min")}})
    res = ROOT / "bench" / "results" / f"captioner_base_{a.name}.json"
    res.write_text(json.dumps({"benchmark": "captioner_base", "command": "python bench/captioner_base.py "
                               + " ".join(sys.argv[1:]), "scored": scored}, indent=1) + "\n")
    sys.exit(print("wrote", res))
lm = TrainConfig(stage="lm", model=str(out / "init"), shards=data, out=str(out / "lm"), steps=1500, lr=2e-3, seed=a.seed)
train(lm, progress=False)
img = TrainConfig(stage="image", model=str(out / "lm"), shards=data, out=str(out / "base"), steps=a.image_steps, lr=a.image_lr,
                  seed=a.seed, weight_decay=a.image_wd, save_every=a.image_steps // a.points)
s = train(img, progress=False, on_checkpoint=diag)
res = ROOT / "bench" / "results" / f"captioner_base_{a.name}.json"
res.write_text(json.dumps({"benchmark": "captioner_base", "command": "python bench/captioner_base.py " + " ".join(sys.argv[1:]),
                           "args": vars(a), "spec": spec, "curve": curve, "image_loss": s["loss"],
                           "train_cpu_min": round(cpu() - c0 - ev[0], 2)}, indent=1) + "\n")
print("wrote", res)
