"""A temporal adapter on the vision side: what changed where, across a video's visual tokens.

Qwen2-VL's vision tower attends within each temporal slice (two frames, through its Conv3d
patch), so motion across slices is left to the language model and its M-RoPE positions; a
tiny model's M-RoPE gives spatial positions almost no rotation, so it can hardly tell where a
token sits. The adapter sits between the tower and the language model, on video tokens only:
a space-time convolution over the merged token grid (neighbouring slices and neighbouring
tokens in one kernel, through a bottleneck), optionally followed by space-time attention
blocks with learned time, row and column embeddings. Each path ends in a zero-initialised
projection, so a new adapter leaves the image model exactly as it was; visual adaptation
(stage 1) trains it with the vision tower while the language model stays frozen, an honest
reading of the paper's "visual adaptation".

On disk the adapter lives beside an untouched Hugging Face checkpoint:

    temporal_adapter.json          its config
    temporal_adapter.safetensors   its weights

so `AutoModelForImageTextToText` still loads the checkpoint (without the adapter), and
`load_captioner` / the trainers attach it with `load_adapter(model, dir)`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

CONFIG_FILE = "temporal_adapter.json"
WEIGHTS_FILE = "temporal_adapter.safetensors"


@dataclass
class AdapterConfig:
    dim: int  # the language model's hidden size (what the vision merger outputs)
    width: int = 0  # the space-time convolution's channels (0: min(dim, 256))
    kernel: tuple[int, int, int] = (3, 3, 3)  # (time, rows, columns) of merged tokens
    layers: int = 0  # space-time attention blocks after the convolution
    heads: int = 4
    mlp_ratio: int = 2
    max_time: int = 64  # temporal slices (frames / 2)
    max_side: int = 128  # merged tokens along one side

    def __post_init__(self) -> None:
        self.kernel = tuple(self.kernel)
        if self.width <= 0:
            self.width = min(self.dim, 256)
        if any(k % 2 == 0 for k in self.kernel):
            raise ValueError(f"adapter kernel {self.kernel} must be odd along every axis")
        if self.layers and self.dim % self.heads:
            raise ValueError(f"adapter width {self.dim} does not split into {self.heads} heads")


class _Block(nn.Module):
    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = nn.MultiheadAttention(cfg.dim, cfg.heads, batch_first=True)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.norm1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        return h + self.mlp(self.norm2(h))


class TemporalAdapter(nn.Module):
    """A space-time convolution (then optional attention) over each video's merged tokens, added back.

    Both paths end in a zero-initialised projection, so a new adapter is the identity.
    """

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.cfg = cfg
        self.down = nn.Linear(cfg.dim, cfg.width)
        self.conv = nn.Conv3d(cfg.width, cfg.width, cfg.kernel, padding=tuple(k // 2 for k in cfg.kernel))
        self.act = nn.GELU()
        self.up = nn.Linear(cfg.width, cfg.dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        if cfg.layers:
            self.time = nn.Embedding(cfg.max_time, cfg.dim)
            self.row = nn.Embedding(cfg.max_side, cfg.dim)
            self.col = nn.Embedding(cfg.max_side, cfg.dim)
            for emb in (self.time, self.row, self.col):
                nn.init.normal_(emb.weight, std=0.02)
            self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
            self.norm = nn.LayerNorm(cfg.dim)
            self.out = nn.Linear(cfg.dim, cfg.dim)
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """tokens: [t*h*w, dim] of one video in (time, row, column) order; grid: merged (t, h, w)."""
        t, h, w = grid
        if t > self.cfg.max_time or max(h, w) > self.cfg.max_side:
            raise ValueError(f"video grid {grid} exceeds the adapter's {self.cfg.max_time} slices / "
                             f"{self.cfg.max_side} tokens a side")
        # what changed where: neighbouring slices and neighbouring tokens in one kernel
        x = self.down(tokens).reshape(t, h, w, -1).permute(3, 0, 1, 2)[None]
        x = self.act(self.conv(x))[0].permute(1, 2, 3, 0).reshape(t * h * w, -1)
        tokens = tokens + self.up(x)
        if not self.cfg.layers:
            return tokens
        dev = tokens.device
        pos = (self.time(torch.arange(t, device=dev))[:, None, None]
               + self.row(torch.arange(h, device=dev))[None, :, None]
               + self.col(torch.arange(w, device=dev))[None, None, :]).reshape(t * h * w, -1)
        x = (tokens + pos.to(tokens.dtype))[None]
        for blk in self.blocks:
            x = blk(x)
        return tokens + self.out(self.norm(x))[0]


def _core(model):
    """The module with ``visual`` and ``get_video_features`` (Qwen2VLModel inside the generation model)."""
    core = getattr(model, "model", model)
    if not hasattr(core, "visual") or not hasattr(core, "get_video_features"):
        raise ValueError(f"{type(model).__name__} has no vision tower with video features to adapt")
    return core


def adapter_of(model) -> TemporalAdapter | None:
    core = getattr(model, "model", model)
    visual = getattr(core, "visual", None)
    return getattr(visual, "temporal_adapter", None) if visual is not None else None


def attach_adapter(model, cfg: AdapterConfig | None = None) -> TemporalAdapter:
    """Adds a (new, identity) adapter to ``model``'s video path; returns it. Idempotent."""
    core = _core(model)
    existing = adapter_of(model)
    if existing is not None:
        return existing
    text_cfg = getattr(model.config, "text_config", model.config)
    cfg = cfg or AdapterConfig(dim=int(text_cfg.hidden_size))
    visual = core.visual
    adapter = TemporalAdapter(cfg).to(next(visual.parameters()).device, next(visual.parameters()).dtype)
    visual.temporal_adapter = adapter  # under 'visual': frozen and trained with the vision side
    merge = int(visual.spatial_merge_size)
    plain = core.get_video_features

    def get_video_features(pixel_values_videos, video_grid_thw=None, **kwargs):
        out = plain(pixel_values_videos, video_grid_thw, **kwargs)
        grids = [(int(t), int(h) // merge, int(w) // merge) for t, h, w in video_grid_thw.tolist()]
        out.pooler_output = tuple(adapter(x, g) for x, g in zip(out.pooler_output, grids))
        return out

    core.get_video_features = get_video_features
    return adapter


def save_adapter(model, directory: str | Path) -> None:
    """Writes the adapter's config and weights into ``directory`` (nothing when there is none)."""
    from safetensors.torch import save_file

    adapter = adapter_of(model)
    if adapter is None:
        return
    directory = Path(directory)
    save_file({k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()},
              str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(asdict(adapter.cfg), indent=2) + "\n")


def load_adapter(model, directory: str | Path) -> TemporalAdapter | None:
    """Attaches the adapter saved in ``directory``, if any; returns it."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / CONFIG_FILE).exists():
        return None
    cfg = AdapterConfig(**json.loads((directory / CONFIG_FILE).read_text()))
    adapter = attach_adapter(model, cfg)
    try:
        adapter.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    except (FileNotFoundError, RuntimeError) as exc:
        raise ValueError(f"{directory / WEIGHTS_FILE}: cannot load the temporal adapter: {exc}") from None
    return adapter


class detached:
    """Context: the adapter leaves the module tree (so `save_pretrained` writes a plain checkpoint)."""

    def __init__(self, model):
        self.visual = getattr(getattr(model, "model", model), "visual", None)
        self.adapter = None

    def __enter__(self):
        if self.visual is not None and hasattr(self.visual, "temporal_adapter"):
            self.adapter = self.visual.temporal_adapter
            del self.visual.temporal_adapter
        return self

    def __exit__(self, *exc):
        if self.adapter is not None:
            self.visual.temporal_adapter = self.adapter
        return False
