"""The video-text dual encoder: an open_clip image-text model whose image tower encodes every frame,
and a temporal head that makes one video embedding.

    from dualenc import create_model, list_models
    model = create_model("toy-vit", temporal="vidla")
    v = model.encode_video(frames)          # uint8 [B, T, H, W, 3] or float [B, T, 3, H, W] -> [B, D], L2-normalised
    t = model.encode_text(["the red circle moves left."])

Architectures are data: one JSON per model in ``dualenc/model_configs/``. A config names an open_clip
model (``"clip": {"name": "ViT-B-32"}``) or a custom tower config (``"clip": {"custom": {...}}``, which
may use timm image towers and Hugging Face text towers), the temporal head, the frame size and the
number of frames.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import data_specs  # noqa: F401  - arms the torchvision fix before open_clip imports it
from dualenc.temporal import create_head

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _configs() -> dict[str, dict]:
    out = {}
    for f in resources.files("dualenc").joinpath("model_configs").iterdir():
        if f.name.endswith(".json"):
            out[f.name[:-5]] = json.loads(f.read_text())
    return out


def list_models() -> list[str]:
    """Names of the dual-encoder configs shipped in dualenc/model_configs/."""
    return sorted(_configs())


def get_model_config(name: str) -> dict:
    """The config of ``name`` (a copy).

    Raises:
        ValueError: unknown name, listing the valid ones.
    """
    configs = _configs()
    if name not in configs:
        raise ValueError(f"unknown dual-encoder model {name!r}; valid: {', '.join(sorted(configs))}")
    return copy.deepcopy(configs[name])


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = _merge(dict(base.get(k) or {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


class VideoTextModel(nn.Module):
    """An open_clip model + a temporal head. ``forward`` returns what open_clip's ClipLoss expects."""

    def __init__(self, config: dict, clip: nn.Module, tokenizer: Any):
        super().__init__()
        self.config = config
        self.clip = clip
        self.tokenizer = tokenizer
        self.embed_dim = int(config["embed_dim"])
        head = dict(config.get("temporal") or {"type": "mean"})
        self.temporal = create_head(head.pop("type"), self.embed_dim, **head)
        self.image_size = int(config.get("image_size", 224))
        self.register_buffer("mean", torch.tensor(config.get("mean", CLIP_MEAN)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.get("std", CLIP_STD)).view(1, 3, 1, 1), persistent=False)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def preprocess(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 [B, T, H, W, 3] (as decoded) -> normalised float [B*T, 3, S, S] at the tower's size."""
        x = torch.as_tensor(frames)
        if x.dtype == torch.uint8:
            x = x.permute(0, 1, 4, 2, 3).float().div_(255)
        b, t = x.shape[:2]
        x = x.reshape(b * t, *x.shape[2:]).to(self.mean.device)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return (x - self.mean) / self.std

    def frame_features(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Per-frame embeddings [B, T, D] from the image tower."""
        b, t = frames.shape[:2]
        return self.clip.encode_image(self.preprocess(frames)).reshape(b, t, -1)

    def encode_video(self, frames: torch.Tensor | np.ndarray, normalize: bool = True) -> torch.Tensor:
        v = self.temporal(self.frame_features(frames))
        return F.normalize(v, dim=-1) if normalize else v

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.mean.device)

    def encode_text(self, texts: list[str] | torch.Tensor, normalize: bool = True) -> torch.Tensor:
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        return self.clip.encode_text(tokens, normalize=normalize)

    def forward(self, frames: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image_features": self.encode_video(frames), "text_features": self.encode_text(tokens),
                "logit_scale": self.clip.logit_scale.exp()}

    def lock(self, image: bool = False, text: bool = False) -> None:
        """LiT-style locking: frozen towers keep their weights (the temporal head always trains)."""
        if image:
            for p in self.clip.visual.parameters():
                p.requires_grad_(False)
        if text:
            text_tower = getattr(self.clip, "text", None)
            modules = [text_tower] if text_tower is not None else [
                getattr(self.clip, n) for n in ("transformer", "token_embedding", "ln_final") if hasattr(self.clip, n)]
            for m in modules:
                for p in m.parameters():
                    p.requires_grad_(False)
            for n in ("positional_embedding", "text_projection"):
                p = getattr(self.clip, n, None)
                if isinstance(p, nn.Parameter):
                    p.requires_grad_(False)


def create_model(name: str, temporal: str | None = None, pretrained: str | None = None,
                 pretrained_image: str | None = None, pretrained_text: str | None = None,
                 **overrides: Any) -> VideoTextModel:
    """Builds a dual encoder from its config, with optional overrides.

    Args:
        name: a name from `list_models()`.
        temporal: 'mean', 'transformer' or 'vidla' (overrides the config's head type).
        pretrained: an open_clip checkpoint file for the whole image-text model (or an open_clip
            pretrained tag for named models, fetched only where a hub is reachable).
        pretrained_image: a local file of image-tower weights (timm / open_clip state dict).
        pretrained_text: a local directory of a Hugging Face text model (for ``hf_model_name`` towers).
        **overrides: merged into the config (nested dicts merge), e.g. ``frames=16``.

    Raises:
        ValueError: unknown name or head.
    """
    cfg = _merge(get_model_config(name), overrides)
    if temporal is not None:
        cfg["temporal"] = {"type": temporal, **{k: v for k, v in (cfg.get("temporal") or {}).items() if k != "type"}}
    if pretrained_text and "custom" in cfg["clip"]:
        text_cfg = cfg["clip"]["custom"]["text_cfg"]
        text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = str(pretrained_text)
    return build_model(cfg, pretrained=pretrained, pretrained_image=pretrained_image,
                       pretrained_text=bool(pretrained_text))


def build_model(cfg: dict, pretrained: str | None = None, pretrained_image: str | None = None,
                pretrained_text: bool = False) -> VideoTextModel:
    """Builds a dual encoder from a resolved config (as `create_model` makes, or a checkpoint records).

    Args:
        pretrained_text: load a Hugging Face text tower's own weights (else only its architecture:
            a checkpoint's weights follow).
    """
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    cfg = copy.deepcopy(cfg)
    clip_cfg = cfg["clip"]
    if "name" in clip_cfg:
        model = open_clip.create_model(clip_cfg["name"], pretrained=pretrained or clip_cfg.get("pretrained"))
        tokenizer = open_clip.get_tokenizer(clip_cfg["name"])
        cfg.setdefault("embed_dim", model.text_projection.shape[1] if hasattr(model, "text_projection")
                       else model.visual.output_dim)
    else:
        custom = copy.deepcopy(clip_cfg["custom"])
        text_cfg = custom["text_cfg"]
        if text_cfg.get("hf_model_name"):
            text_cfg["hf_model_pretrained"] = pretrained_text
            model = open_clip.CustomTextCLIP(**custom)
            tokenizer = HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=text_cfg.get("context_length", 32))
        else:
            model = open_clip.CLIP(**custom)
            tokenizer = open_clip.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))
        cfg.setdefault("embed_dim", custom["embed_dim"])
        if pretrained:
            open_clip.load_checkpoint(model, pretrained)
    if pretrained_image:
        _load_image_tower(model.visual, pretrained_image)
    return VideoTextModel(cfg, model, tokenizer)


def _load_image_tower(visual: nn.Module, path: str | Path) -> None:
    """Loads a local state dict into the image tower (a timm tower's trunk, or the tower itself).

    Raises:
        ValueError: when the file's keys do not fit the tower (names a few of them).
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    target = getattr(visual, "trunk", visual)
    own = target.state_dict()
    if not set(state) & set(own):
        state = _remap_by_position(state, own, path)
    missing, unexpected = target.load_state_dict(state, strict=False)
    classifier = {k for k in unexpected if k.startswith(("classifier.", "fc.", "head."))}
    if (set(unexpected) - classifier) or [k for k in missing if not k.startswith(("classifier.", "fc.", "head."))]:
        raise ValueError(f"{path}: weights do not fit the image tower (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(set(unexpected) - classifier)[:3]})")


def _remap_by_position(state: dict, own: dict, path: str | Path) -> dict:
    """Renames a state dict written with another implementation's names (e.g. EfficientNet-PyTorch's
    ``_blocks.3._expand_conv`` for timm's ``blocks.1.1.conv_pw``) by position, checking every shape.

    Raises:
        ValueError: when the tensors do not line up one to one.
    """
    theirs = [(k, v) for k, v in state.items() if not k.startswith(("_fc.", "classifier.", "fc."))]
    ours = [(k, v) for k, v in own.items() if not k.startswith(("classifier.", "fc.", "head."))]
    if len(theirs) != len(ours) or any(a.shape != b.shape for (_, a), (_, b) in zip(theirs, ours)):
        bad = next(((ka, kb) for (ka, a), (kb, b) in zip(theirs, ours) if a.shape != b.shape), None)
        raise ValueError(f"{path}: its {len(theirs)} tensors do not line up with the tower's {len(ours)} "
                         f"(first mismatch: {bad})")
    return {kb: a for (_, a), (kb, _) in zip(theirs, ours)}
