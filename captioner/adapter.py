"""A temporal adapter on the vision side: what changed where, across a video's visual tokens.

Qwen2-VL's vision tower attends within each temporal slice (two frames, through its Conv3d
patch), so motion across slices is left to the language model and its M-RoPE positions; a
tiny model's M-RoPE gives spatial positions almost no rotation, so it can hardly tell where a
token sits. The adapter sits between the tower and the language model, on video tokens only:
a space-time convolution over the merged token grid (neighbouring slices and neighbouring
tokens in one kernel, through a bottleneck), added back through a zero-initialised
projection, so a new adapter leaves the image model exactly as it was; visual adaptation
(stage 1) trains it with the vision tower while the language model stays frozen, an honest
reading of the paper's "visual adaptation".

Qwen2-VL's video path pairs consecutive frames in each temporal patch, so an image model meets
a blend of two moments in every slice, unlike the stills it learned from (an image is one frame
repeated). With ``still_frames`` the adapter's checkpoint asks for each sampled frame repeated to fill
its own patch: every slice is then one frame as the image model saw it, and change lives only across
slices, where the adapter and the language model look. It costs the tokens of twice the frames;
`video_input` applies it wherever frames meet the processor (training, generation, token budgets).

In the toy world rotation is the action the adapted captioner names worst, and the one stage 1's visual
tokens carry worst (bench/visual_probe.py). With ``pixel_channels`` the adapter also reads the frames: a
small convolutional branch (`PixelBranch`: a 7-px patch embedding and a strided 3x3 convolution, on each
slice's first frame) whose features, max- and mean-pooled to the merged token grid, join the adapter's
bottleneck before its space-time convolution, where the convolution can compare each cell's
shape, size and orientation from slice to slice. It takes the pixels the tower takes
(``pixel_values_videos``, read in the processor's patch layout) and, behind the zero-initialised
projection, a new adapter is still the identity.

On disk the adapter lives beside an untouched Hugging Face checkpoint:

    temporal_adapter.json          its config
    temporal_adapter.safetensors   its weights

so `AutoModelForImageTextToText` still loads the checkpoint (without the adapter), and
`load_captioner` / the trainers attach it with `load_adapter(model, dir)`.
"""

from __future__ import annotations

import json
import types
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields as dataclass_fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CONFIG_FILE = "temporal_adapter.json"
WEIGHTS_FILE = "temporal_adapter.safetensors"


@dataclass
class AdapterConfig:
    dim: int  # the language model's hidden size (what the vision merger outputs)
    width: int = 0  # the space-time convolution's channels (0: min(dim, 256))
    kernel: tuple[int, int, int] = (3, 3, 3)  # (time, rows, columns) of merged tokens
    # each sampled frame repeated to fill a whole temporal patch: one frame per slice, as the image model saw
    # stills (False: consecutive frames share a patch, Qwen2-VL's own video input)
    still_frames: bool = False
    # channels of a branch that reads the frames' pixels (`PixelBranch`); 0: none, the adapter sees tokens only
    pixel_channels: int = 0

    def __post_init__(self) -> None:
        self.kernel = tuple(self.kernel)
        if self.width <= 0:
            self.width = min(self.dim, 256)
        if any(k % 2 == 0 for k in self.kernel):
            raise ValueError(f"adapter kernel {self.kernel} must be odd along every axis")
        if self.pixel_channels < 0:
            raise ValueError(f"adapter pixel_channels must be >= 0, got {self.pixel_channels}")


class PixelBranch(nn.Module):
    """Features of each slice's first frame, max- and mean-pooled to the merged token grid and projected to the
    adapter's width: an embedding of cells a quarter of a merged token's side (7 px for Qwen2-VL's 28-px tokens),
    then a strided 3x3 convolution (2x2 outputs per merged token).

    It reads the processor's flat patches as they are (rows: C, tp, p, p, in merge windows): the frames are
    never rebuilt, the pixels are copied once, into the cells' embedding. One frame per slice: the tower
    already sees the pair within a slice, and a version that read both cost 1.34x a stage-1 step against this
    one's 1.13x, at 8 channels (bench/pixel_step.py, run on each while the branch was built)."""

    def __init__(self, channels: int, width: int, patch: int, merge: int, in_channels: int = 3):
        super().__init__()
        token = patch * merge
        if token % 4 or patch % (token // 4):
            raise ValueError(f"a pixel branch needs {merge}x{merge} patches of {patch} px to split into 4x4 cells")
        self.in_channels, self.patch, self.merge = in_channels, patch, merge
        self.cell = token // 4
        self.embed = nn.Linear(in_channels * self.cell * self.cell, channels)
        self.conv = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * channels, width)

    def cells(self, pixels: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """The cells' embedding (before its activation) as images, one per slice: [videos * t, channels, 4h, 4w].

        pixels: [videos, t*h*w*m*m, C*tp*p*p], the processor's patches of videos of one grid; grid: merged (t, h, w).
        """
        v, n, row = pixels.shape
        t, h, w = grid
        m, c, p, cell = self.merge, self.in_channels, self.patch, self.cell
        sub = p // cell  # cells per patch side
        if n != t * h * w * m * m or row % (c * p * p):
            raise ValueError(f"pixel branch: {n} patches of {row} values are not a {t}x{h}x{w} grid of merged "
                             f"tokens of {m}x{m} patches of {c} channels of {p}x{p} px")
        first = pixels.reshape(v * n, c, row // (c * p * p), p * p)[:, :, 0]  # each patch's first frame
        # rows (patch, cell row) of (C, cell's pixel row, cell column, pixel column): a patch row's pixels stay in
        # contiguous runs, which makes the one copy cheap; a block-diagonal weight takes the cell columns apart
        x = first.reshape(v * n, c, sub, cell, sub * cell).permute(0, 2, 1, 3, 4)
        weight = self.embed.weight.view(-1, c, cell, 1, cell)
        eye = torch.eye(sub, dtype=weight.dtype, device=weight.device)
        blocks = (eye[:, None, None, None, :, None] * weight[None]).reshape(-1, c * cell * sub * cell)
        e = F.linear(x.reshape(-1, c * cell * sub * cell), blocks, self.embed.bias.repeat(sub))
        # patches in merge windows (t, h, w, m, m) -> images [v, t, ch, (h, m, sub), (w, m, sub)]
        e = e.view(v, t, h, w, m, m, sub, sub, -1).permute(0, 1, 8, 2, 4, 6, 3, 5, 7)
        return e.reshape(v * t, -1, h * m * sub, w * m * sub)

    def forward(self, pixels: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """pixels: as `cells` takes them; grid: merged (t, h, w). Returns [videos, width, t, h, w]."""
        v = len(pixels)
        t, h, w = grid
        x = self.act(self.conv(self.act(self.cells(pixels, grid))))  # [v*t, 2c, 2h, 2w]
        pooled = torch.cat([F.max_pool2d(x, 2), F.avg_pool2d(x, 2)], 1).reshape(v, t, -1, h, w)
        return self.proj(pooled.permute(0, 1, 3, 4, 2)).permute(0, 4, 1, 2, 3)


class TemporalAdapter(nn.Module):
    """A space-time convolution over each video's merged tokens, added back through a zero-initialised
    projection (so a new adapter is the identity), optionally reading the frames' pixels too (`PixelBranch`)."""

    def __init__(self, cfg: AdapterConfig, patch: int = 14, merge: int = 2, in_channels: int = 3):
        super().__init__()
        self.cfg = cfg
        self.pixel_branch = PixelBranch(cfg.pixel_channels, cfg.width, patch, merge, in_channels) \
            if cfg.pixel_channels else None
        self.down = nn.Linear(cfg.dim, cfg.width)
        self.conv = nn.Conv3d(cfg.width, cfg.width, cfg.kernel, padding=tuple(k // 2 for k in cfg.kernel))
        self.act = nn.GELU()
        self.up = nn.Linear(cfg.width, cfg.dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int, int],
                pixels: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: [t*h*w, dim] of one video in (time, row, column) order, or [videos, t*h*w, dim] of several
        of that one grid; grid: merged (t, h, w); pixels: the videos' patches as the processor makes them
        ([(videos,) patches, C*tp*p*p]), which an adapter with a pixel branch needs."""
        t, h, w = grid
        x = tokens if tokens.dim() == 3 else tokens[None]
        # what changed where: neighbouring slices and neighbouring tokens in one kernel
        y = self.down(x).reshape(len(x), t, h, w, -1).permute(0, 4, 1, 2, 3)
        if self.pixel_branch is not None:
            if pixels is None:
                raise ValueError("this temporal adapter reads pixels (pixel_channels="
                                 f"{self.cfg.pixel_channels}): pass the videos' patches")
            y = y + self.pixel_branch(pixels if pixels.dim() == 3 else pixels[None], grid)
        y = self.act(self.conv(y)).permute(0, 2, 3, 4, 1).reshape(len(x), t * h * w, -1)
        return (x + self.up(y)).reshape(tokens.shape)

    def forward_many(self, tokens: list[torch.Tensor], grids: list[tuple[int, int, int]],
                     pixels: torch.Tensor | None = None) -> list[torch.Tensor]:
        """`forward` of several videos; those of one grid in one call (a batch of same-size clips: one).

        pixels: the videos' patches as the processor concatenates them ([patches, C*tp*p*p]), for a pixel branch.
        """
        if len(set(grids)) == 1:  # one grid: the patches are [videos, patches, row] as they lie, no copy
            stacked = None if pixels is None else pixels.view(len(tokens), -1, pixels.shape[-1])
            return list(self(torch.stack(tokens), grids[0], stacked).unbind(0))
        merge = self.pixel_branch.merge if self.pixel_branch is not None else 1
        pieces = [None] * len(tokens) if pixels is None else \
            pixels.split([t * h * w * merge * merge for t, h, w in grids])
        return [self(x, g, p) for x, g, p in zip(tokens, grids, pieces)]


def _visual(model):
    """The vision tower (``model.model.visual`` in the generation model), or None."""
    return getattr(getattr(model, "model", model), "visual", None)


def adapter_of(model) -> TemporalAdapter | None:
    return getattr(_visual(model), "temporal_adapter", None)


def frame_repeat(model) -> int:
    """How many times `video_input` repeats each frame for ``model``: its temporal patch with a still-frames
    adapter, else 1."""
    adapter = adapter_of(model)
    if adapter is None or not adapter.cfg.still_frames:
        return 1
    return int(getattr(getattr(model.config, "vision_config", None), "temporal_patch_size", 2) or 2)


def video_input(frames, repeat: int):
    """Frames [T, ...] as the video processor should get them: each ``repeat`` times in a row (`frame_repeat`)."""
    return frames if repeat == 1 else np.repeat(frames, repeat, axis=0)


def attach_adapter(model, cfg: AdapterConfig | None = None, still_frames: bool = False,
                   pixel_channels: int = 0) -> TemporalAdapter:
    """Adds a (new, identity) adapter to ``model``'s video path; returns it. Idempotent.

    Args:
        cfg: the adapter's config (default: the model's width, ``still_frames`` and ``pixel_channels`` as given).

    Raises:
        ValueError: the model already has an adapter that takes frames otherwise, or reads pixels otherwise.
    """
    core = getattr(model, "model", model)
    if _visual(model) is None or not hasattr(core, "get_video_features"):
        raise ValueError(f"{type(model).__name__} has no vision tower with video features to adapt")
    text_cfg = getattr(model.config, "text_config", model.config)
    cfg = cfg or AdapterConfig(dim=int(text_cfg.hidden_size), still_frames=still_frames,
                               pixel_channels=pixel_channels)
    existing = adapter_of(model)
    if existing is not None:
        for name in ("still_frames", "pixel_channels"):
            if getattr(existing.cfg, name) != getattr(cfg, name):
                raise ValueError(f"the model's temporal adapter has {name}={getattr(existing.cfg, name)}; a run "
                                 f"asking for {getattr(cfg, name)} would change what its visual tokens mean")
        return existing
    visual = core.visual
    ref = next(visual.parameters())
    vision_cfg = getattr(model.config, "vision_config", None)
    adapter = TemporalAdapter(cfg, patch=int(vision_cfg.patch_size), merge=int(visual.spatial_merge_size),
                              in_channels=int(getattr(vision_cfg, "in_channels", 3) or 3)).to(ref.device, ref.dtype)
    visual.temporal_adapter = adapter  # under 'visual': frozen and trained with the vision side
    # a method bound to this model (not a closure over it): a deep copy of the model gets its own
    core.get_video_features = types.MethodType(_adapted_video_features, core)
    return adapter


def _adapted_video_features(core, pixel_values_videos, video_grid_thw=None, **kwargs):
    """The model class's own `get_video_features`, then the tower's temporal adapter, looked up at call time
    (so `detached` and copies see what is attached to them)."""
    out = type(core).get_video_features(core, pixel_values_videos, video_grid_thw, **kwargs)
    adapter = getattr(core.visual, "temporal_adapter", None)
    if adapter is not None:
        merge = int(core.visual.spatial_merge_size)
        grids = [(int(t), int(h) // merge, int(w) // merge) for t, h, w in video_grid_thw.tolist()]
        pixels = None  # the patches as the tower got them
        if adapter.pixel_branch is not None:
            pixels = pixel_values_videos.to(next(adapter.parameters()).dtype)
        out.pooler_output = tuple(adapter.forward_many(list(out.pooler_output), grids, pixels))
    return out


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
    fields = json.loads((directory / CONFIG_FILE).read_text())
    unknown = sorted(set(fields) - {f.name for f in dataclass_fields(AdapterConfig)})
    if unknown:
        raise ValueError(f"{directory / CONFIG_FILE}: unknown temporal-adapter field(s) {', '.join(unknown)}; "
                         "this checkpoint was written by another version of pseudocap")
    adapter = attach_adapter(model, AdapterConfig(**fields))
    try:
        adapter.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    except (FileNotFoundError, RuntimeError) as exc:
        raise ValueError(f"{directory / WEIGHTS_FILE}: cannot load the temporal adapter: {exc}") from None
    return adapter


@contextmanager
def detached(model):
    """The adapter leaves the module tree for the block (so `save_pretrained` writes a plain checkpoint)."""
    visual, adapter = _visual(model), adapter_of(model)
    if adapter is not None:
        del visual.temporal_adapter
    try:
        yield
    finally:
        if adapter is not None:
            visual.temporal_adapter = adapter
