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

    def __post_init__(self) -> None:
        self.kernel = tuple(self.kernel)
        if self.width <= 0:
            self.width = min(self.dim, 256)
        if any(k % 2 == 0 for k in self.kernel):
            raise ValueError(f"adapter kernel {self.kernel} must be odd along every axis")


class TemporalAdapter(nn.Module):
    """A space-time convolution over each video's merged tokens, added back through a zero-initialised
    projection (so a new adapter is the identity)."""

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.cfg = cfg
        self.down = nn.Linear(cfg.dim, cfg.width)
        self.conv = nn.Conv3d(cfg.width, cfg.width, cfg.kernel, padding=tuple(k // 2 for k in cfg.kernel))
        self.act = nn.GELU()
        self.up = nn.Linear(cfg.width, cfg.dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """tokens: [t*h*w, dim] of one video in (time, row, column) order, or [videos, t*h*w, dim] of several
        of that one grid; grid: merged (t, h, w)."""
        t, h, w = grid
        x = tokens if tokens.dim() == 3 else tokens[None]
        # what changed where: neighbouring slices and neighbouring tokens in one kernel
        y = self.down(x).reshape(len(x), t, h, w, -1).permute(0, 4, 1, 2, 3)
        y = self.act(self.conv(y)).permute(0, 2, 3, 4, 1).reshape(len(x), t * h * w, -1)
        return (x + self.up(y)).reshape(tokens.shape)

    def forward_many(self, tokens: list[torch.Tensor], grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """`forward` of several videos; those of one grid in one call (a batch of same-size clips: one)."""
        if len(set(grids)) == 1:
            return list(self(torch.stack(tokens), grids[0]).unbind(0))
        return [self(x, g) for x, g in zip(tokens, grids)]


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


def attach_adapter(model, cfg: AdapterConfig | None = None, still_frames: bool = False) -> TemporalAdapter:
    """Adds a (new, identity) adapter to ``model``'s video path; returns it. Idempotent.

    Args:
        cfg: the adapter's config (default: the model's width, ``still_frames`` as given).

    Raises:
        ValueError: the model already has an adapter that takes frames otherwise.
    """
    core = getattr(model, "model", model)
    if _visual(model) is None or not hasattr(core, "get_video_features"):
        raise ValueError(f"{type(model).__name__} has no vision tower with video features to adapt")
    text_cfg = getattr(model.config, "text_config", model.config)
    cfg = cfg or AdapterConfig(dim=int(text_cfg.hidden_size), still_frames=still_frames)
    existing = adapter_of(model)
    if existing is not None:
        if existing.cfg.still_frames != cfg.still_frames:
            raise ValueError(f"the model's temporal adapter has still_frames={existing.cfg.still_frames}; a run "
                             f"asking for {cfg.still_frames} would change what its visual tokens mean")
        return existing
    visual = core.visual
    ref = next(visual.parameters())
    adapter = TemporalAdapter(cfg).to(ref.device, ref.dtype)
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
        out.pooler_output = tuple(adapter.forward_many(list(out.pooler_output), grids))
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
