"""Dual-encoder training end to end on toy shards: the loss falls, kill-and-resume matches, DDP runs, embed writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dualenc.cli import main
from dualenc.train import TrainConfig, latest_checkpoint, load_model, train
from engine.synth import SynthConfig, synth


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_de")
    synth(SynthConfig(split="adapt", n=48, seed=4, shard_size=12), out, progress=False)
    return out


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def _cfg(shards, out, **kw) -> TrainConfig:
    base = dict(shards=str(shards / "adapt-*.tar"), out=str(out), text_key="gt.txt", temporal="transformer",
                frames=4, batch_size=8, steps=120, lr=2e-3, warmup=10, workers=2, shuffle_buffer=32, log_every=1,
                save_every=40, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_falls_and_a_killed_run_resumes_on_the_same_curve(shards, tmp_path):
    full = train(_cfg(shards, tmp_path / "full"), progress=False)
    assert full["step"] == 120
    curve = _losses(tmp_path / "full")
    assert np.mean(curve[-10:]) < 0.6 * np.mean(curve[:10]), (curve[:10], curve[-10:])

    cut = train(_cfg(shards, tmp_path / "cut", stop_at=50), progress=False)
    assert cut["step"] == 50 and latest_checkpoint(tmp_path / "cut").name == "step_000050"
    train(_cfg(shards, tmp_path / "cut", resume="latest"), progress=False)
    resumed = _losses(tmp_path / "cut")
    assert len(resumed) == 120
    assert np.allclose(resumed, curve, rtol=1e-4, atol=1e-5), [(a, b) for a, b in zip(resumed, curve) if
                                                                abs(a - b) > 1e-4][:3]
    a = load_model(tmp_path / "full").state_dict()
    b = load_model(tmp_path / "cut").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_ddp_with_two_gloo_processes(shards, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "dualenc", "train", "--shards", str(shards / "adapt-*.tar"), "--out", str(tmp_path / "ddp"),
           "--text-key", "gt.txt", "--frames", "4", "--batch-size", "4", "--steps", "6", "--workers", "0",
           "--warmup", "1", "--quiet"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    state = json.loads((latest_checkpoint(tmp_path / "ddp") / "state.json").read_text())
    assert state["step"] == 6 and state["finished"]


def test_embed_writes_normalised_embeddings_and_keys(shards, tmp_path):
    train(_cfg(shards, tmp_path / "run", steps=4, save_every=0, workers=0), progress=False)
    assert main(["embed", "--checkpoint", str(tmp_path / "run"), "--shards", str(shards / "adapt-0000[01].tar"),
                 "--text-key", "gt.txt", "txt", "--out", str(tmp_path / "emb"), "--quiet"]) == 0
    v, t = np.load(tmp_path / "emb" / "video.npy"), np.load(tmp_path / "emb" / "text.npy")
    vk = (tmp_path / "emb" / "video_keys.txt").read_text().split()
    tk = (tmp_path / "emb" / "text_keys.txt").read_text().split()
    assert v.dtype == np.float32 and v.shape == (24, 64) and len(vk) == 24 == len(set(vk))
    assert t.shape == (48, 64) and len(tk) == 48 and set(tk) == set(vk)  # two texts per video
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5) and np.allclose(np.linalg.norm(t, axis=1), 1,
                                                                                 atol=1e-5)


def test_train_config_names_a_bad_hard_negatives_value(tmp_path):
    with pytest.raises(ValueError, match="--hard-negatives must be one of none, twins"):
        TrainConfig(shards="x.tar", out=str(tmp_path), hard_negatives="hardest")
