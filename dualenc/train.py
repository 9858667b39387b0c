"""Contrastive training of the dual encoder from shards: one process, or torchrun/DDP.

    dualenc train --shards 'toy/adapt-*.tar' --text-key gt.txt --model toy-vit --temporal vidla \
        --frames 8 --batch-size 32 --steps 500 --out runs/vidla/
    torchrun --nproc-per-node 2 -m dualenc train ...        # DDP (gloo on CPU, nccl on GPU)

open_clip's ClipLoss (local loss with gather-with-grad under DDP), AdamW with warm-up and cosine
decay, gradient accumulation, clipping, AMP on GPU. A checkpoint (``RUN/checkpoints/step_NNNNNN/``)
holds ``model.safetensors``, ``state.json`` (model config, run config, step, data position) and
``optimizer.pt`` (optimizer, RNG); it is written under a temporary name, renamed, and then
``RUN/latest`` is pointed at it, so a kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dualenc.model import VideoTextModel, build_model, create_model


@dataclass
class TrainConfig:
    """One training run; every field is a flag of `dualenc train`."""

    shards: str
    out: str
    model: str = "toy-vit"
    temporal: str | None = None  # overrides the config's head: mean | transformer | vidla
    text_key: str = "txt"
    val_shards: str | None = None
    frames: int = 8
    batch_size: int = 32
    steps: int = 1000
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup: int = 50
    grad_accum: int = 1
    grad_clip: float = 1.0
    seed: int = 0
    workers: int = 2
    shuffle_buffer: int = 256
    hard_negatives: str = "none"  # 'twins': a clip and its time-reversed twin share a batch (DataConfig)
    pretrained: str | None = None
    pretrained_image: str | None = None
    pretrained_text: str | None = None
    lock_image: bool = False
    lock_text: bool = False
    val_every: int = 0  # 0: only at the end (when --val-shards is given)
    val_batches: int = 8
    save_every: int = 100
    log_every: int = 10
    resume: str | None = None  # 'latest' or a checkpoint directory
    stop_at: int = 0  # stop (checkpointed) after this step: time-boxed runs, kill-and-resume tests
    device: str = "auto"

    def __post_init__(self) -> None:
        problems = []
        for name in ("frames", "batch_size", "steps", "grad_accum", "log_every", "val_batches"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            problems.append(f"--lr must be > 0, got {self.lr}")
        if self.warmup < 0 or self.save_every < 0 or self.val_every < 0 or self.workers < 0:
            problems.append("--warmup, --save-every, --val-every and --workers must be >= 0")
        if self.temporal not in (None, "mean", "transformer", "vidla"):
            problems.append(f"--temporal must be mean, transformer or vidla, got {self.temporal!r}")
        from dualenc.data import HARD_NEGATIVES

        if self.hard_negatives not in HARD_NEGATIVES:
            problems.append(f"--hard-negatives must be one of {', '.join(HARD_NEGATIVES)}, got {self.hard_negatives!r}")
        if problems:
            raise ValueError("; ".join(problems))


# --------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


# --------------------------------------------------------------------------- schedule, checkpoints

def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on gains, biases, embeddings of positions/tokens and the logit scale (as open_clip)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name or "pos" in name or "token" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def latest_checkpoint(run: str | Path) -> Path | None:
    pointer = Path(run) / "latest"
    if not pointer.exists():
        return None
    path = Path(run) / pointer.read_text().strip()
    return path if (path / "state.json").exists() else None


def save_checkpoint(model: VideoTextModel, optimizer, cfg: TrainConfig, step: int, run: Path,
                    data_position: int) -> Path:
    from safetensors.torch import save_file

    ckpts = run / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    final = ckpts / f"step_{step:06d}"
    tmp = ckpts / f".step_{step:06d}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                "numpy_rng": np.random.get_state(), "python_rng": random.getstate()}, tmp / "optimizer.pt")
    state = {"step": step, "data_position": data_position, "model_config": model.config,
             "run_config": asdict(cfg), "finished": step >= cfg.steps}
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = run / ".latest.tmp"
    pointer.write_text(f"checkpoints/{final.name}\n")
    os.replace(pointer, run / "latest")
    return final


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """The checkpoint directory a run directory's ``latest`` points to, or ``checkpoint`` itself when it is one.

    Raises:
        FileNotFoundError: neither a state.json nor a 'latest' pointer is there.
    """
    path = Path(checkpoint)
    if (path / "state.json").exists():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{checkpoint}: no checkpoint (neither state.json nor a 'latest' pointer)")
    return found


def load_model(checkpoint: str | Path, device: str = "cpu") -> VideoTextModel:
    """A trained dual encoder from a run directory (its latest checkpoint) or a checkpoint directory."""
    from safetensors.torch import load_file

    path = resolve_checkpoint(checkpoint)
    state = json.loads((path / "state.json").read_text())
    model = build_model(state["model_config"])  # the checkpoint re-imposes its architecture
    model.load_state_dict(load_file(str(path / "model.safetensors"), device="cpu"))
    return model.to(device).eval()


# --------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Trains to ``cfg.steps`` optimizer steps (or ``cfg.stop_at``), resuming when asked.

    Returns:
        A summary: final step, last loss, seconds, validation metrics, skipped samples.
    """
    from open_clip.loss import ClipLoss
    from tqdm import tqdm

    from dualenc.data import DataConfig, make_loader

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    dist = init_distributed(device)
    if device == "cuda":
        device = f"cuda:{dist.local_rank}"
    run = Path(cfg.out)
    resume_from = None
    if cfg.resume:
        resume_from = latest_checkpoint(run) if cfg.resume == "latest" else Path(cfg.resume)
    torch.manual_seed(cfg.seed + dist.rank)
    random.seed(cfg.seed + dist.rank)
    np.random.seed(cfg.seed + dist.rank)
    if resume_from is not None:
        model = load_model(resume_from, device="cpu")
        model.train()
    else:
        model = create_model(cfg.model, temporal=cfg.temporal, pretrained=cfg.pretrained,
                             pretrained_image=cfg.pretrained_image, pretrained_text=cfg.pretrained_text,
                             frames=cfg.frames)
    model.lock(image=cfg.lock_image, text=cfg.lock_text)
    model.to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    step, position = 0, 0
    if resume_from is not None:
        state = json.loads((resume_from / "state.json").read_text())
        blob = torch.load(resume_from / "optimizer.pt", weights_only=False)
        optimizer.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["torch_rng"])
        np.random.set_state(blob["numpy_rng"])
        random.setstate(blob["python_rng"])
        step, position = state["step"], state["data_position"]
        if state.get("finished") and step >= cfg.steps:
            return {"step": step, "skipped": "already finished"}
    net = model
    if dist.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=None if device == "cpu" else [dist.local_rank])
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=dist.rank,
                       world_size=dist.world_size)
    data = DataConfig(shards=cfg.shards, text_key=cfg.text_key, frames=cfg.frames, batch_size=cfg.batch_size,
                      workers=cfg.workers, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed,
                      hard_negatives=cfg.hard_negatives)
    # the loader's global batch index, not step * grad_accum: a batch whose samples all failed is skipped
    batches = make_loader(data, start_batch=position, rank=dist.rank, world_size=dist.world_size)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else _nullcontext()
    run.mkdir(parents=True, exist_ok=True)
    metrics_path = run / "metrics.jsonl"
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", disable=not (progress and dist.main))
    t0, seen, last, val = time.perf_counter(), 0, float("nan"), None
    skipped: dict = {}
    end = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps
    while step < end:
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            skipped, position = batch.get("skipped", skipped), batch["batch"] + 1
            tokens = model.tokenize(batch["texts"])
            with amp:
                out = net(batch["frames"].to(device), tokens)
                loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"]) / cfg.grad_accum
            loss.backward()
            total += loss.item()
            seen += len(batch["texts"])
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        with torch.no_grad():
            model.clip.logit_scale.clamp_(0, math.log(100))
        step += 1
        last = total
        elapsed = time.perf_counter() - t0
        bar.set_postfix(loss=f"{last:.3f}", samples_per_s=f"{seen * dist.world_size / elapsed:.1f}")
        bar.update(1)
        if dist.main and (step % cfg.log_every == 0 or step == end):
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": step, "loss": round(last, 6), "lr": lr_at(step - 1, cfg),
                                    "samples_per_s": round(seen * dist.world_size / elapsed, 2),
                                    "skipped": skipped}) + "\n")
        if cfg.val_shards and cfg.val_every and step % cfg.val_every == 0 and dist.main:
            val = validate(model, cfg, device)
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": step, **{f"val_{k}": v for k, v in val.items()}}) + "\n")
        if dist.main and (step == end or (cfg.save_every and step % cfg.save_every == 0)):
            save_checkpoint(model, optimizer, cfg, step, run, position)
    bar.close()
    if cfg.val_shards and dist.main and step == cfg.steps and val is None:
        val = validate(model, cfg, device)
    return {"step": step, "loss": last, "seconds": round(time.perf_counter() - t0, 2), "val": val,
            "skipped": skipped}


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@torch.no_grad()
def validate(model: VideoTextModel, cfg: TrainConfig, device: str) -> dict:
    """Loss and text->video R@1 over the first ``val_batches`` batches of the validation shards."""
    from open_clip.loss import ClipLoss

    from dualenc.data import DataConfig, make_loader

    model.eval()
    data = DataConfig(shards=cfg.val_shards, text_key=cfg.text_key, frames=cfg.frames, batch_size=cfg.batch_size,
                      workers=0, shuffle_buffer=0, seed=0)
    loader = make_loader(data)
    videos, texts, losses = [], [], []
    for _ in range(cfg.val_batches):
        batch = next(loader)
        if batch.get("epoch", 0) > 0:
            break
        v = model.encode_video(batch["frames"].to(device))
        t = model.encode_text(batch["texts"])
        losses.append(float(ClipLoss()(v, t, model.clip.logit_scale.exp())))
        videos.append(v)
        texts.append(t)
    model.train()
    v, t = torch.cat(videos), torch.cat(texts)
    r1 = float((torch.argmax(t @ v.T, dim=1) == torch.arange(len(t), device=t.device)).float().mean())
    return {"loss": round(float(np.mean(losses)), 5), "text_to_video_R@1": round(r1, 4), "n": len(t)}
