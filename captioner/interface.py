"""One captioner interface for every backend: clips in, `CaptionResult`s out, a bad clip never sinks a batch.

    cap = load_captioner("tiny/", backend="hf")
    results = cap.caption([Clip("k1", frames)], get_prompt("caption-video-v1"), GenerationParams())

Backends implement `_generate(batch, prompt, params)` for a list of already
budgeted clips; `Captioner.caption` does the shared work: the token budget
(lower frames or resolution to fit the context, or reject with a reason), the
shared prompt builder, and the fallback that retries a failed batch clip by clip
so that only the failing clip is reported.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_specs import GenerationParams
from data_specs.prompts import PromptTemplate


@dataclass
class Clip:
    """Frames of one sample: uint8 RGB [T, H, W, 3] (T = 1 for an image prompt)."""

    key: str
    frames: np.ndarray


@dataclass
class CaptionResult:
    key: str
    text: str
    input_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str = "stop"  # 'stop' | 'length' | 'error'
    latency_s: float = 0.0
    error: str | None = None  # why the clip failed (reason: detail); text is '' then
    frames_used: int = 0
    budget_note: str | None = None  # what the token budget changed, if anything

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Budgeted:
    clip: Clip
    frames: np.ndarray
    visual_tokens: int
    note: str | None = None


@dataclass
class BudgetPolicy:
    """How clips are fitted into the model's context before generation."""

    min_frames: int = 2  # never fewer frames than this (Qwen2-VL's temporal patch is 2)
    min_side: int = 56  # never smaller frames than this


class Captioner:
    """The interface. Subclasses set the attributes below and implement `_generate` and `visual_tokens`."""

    backend: str = "?"
    model_id: str = "?"
    revision: str | None = None
    context_length: int = 4096

    def __init__(self) -> None:
        self._weights_hash: str | None = None
        self.weights_dir: Path | None = None
        self.budget_policy = BudgetPolicy()

    def check(self, prompt: PromptTemplate, params: GenerationParams) -> None:
        """Raises ValueError for settings this backend cannot honour (once, not once per clip)."""

    # -- to implement ------------------------------------------------------------------
    def _generate(self, batch: list[Budgeted], prompt: PromptTemplate,
                  params: GenerationParams) -> list[CaptionResult]:
        raise NotImplementedError

    def visual_tokens(self, frames: int, height: int, width: int, media: str) -> int:
        raise NotImplementedError

    def prompt_tokens(self, prompt: PromptTemplate) -> int:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------
    @property
    def weights_hash(self) -> str | None:
        """sha256 over the checkpoint's safetensors files (computed once, lazily)."""
        if self._weights_hash is None and self.weights_dir is not None:
            self._weights_hash = weights_hash_of(self.weights_dir)
        return self._weights_hash

    def fit(self, clip: Clip, prompt: PromptTemplate, params: GenerationParams) -> Budgeted:
        """Fits one clip into the context: fewer frames first, then lower resolution; else raises.

        Raises:
            ValueError: 'over-budget: ...' when even the smallest setting does not fit.
        """
        frames = clip.frames
        if prompt.media == "image" and len(frames) > 1:
            frames = frames[len(frames) // 2: len(frames) // 2 + 1]  # the per-frame baseline: the middle frame
        room = self.context_length - self.prompt_tokens(prompt) - params.max_new_tokens
        t, h, w = frames.shape[:3]
        need = self.visual_tokens(t, h, w, prompt.media)
        if need <= room:
            return Budgeted(clip, frames, need)
        notes = []
        while need > room and len(frames) > self.budget_policy.min_frames:
            keep = max(self.budget_policy.min_frames, len(frames) // 2)
            idx = [int((i + 0.5) * len(frames) / keep) for i in range(keep)]
            frames = frames[idx]
            need = self.visual_tokens(len(frames), h, w, prompt.media)
            notes.append(f"frames {t}->{len(frames)}")
            t = len(frames)
        while need > room and min(h, w) // 2 >= self.budget_policy.min_side:
            h, w = h // 2, w // 2
            need = self.visual_tokens(len(frames), h, w, prompt.media)
            notes.append(f"resolution -> {w}x{h}")
        if need > room:
            raise ValueError(f"over-budget: {need} visual tokens at the smallest setting, {room} left in a "
                             f"context of {self.context_length}")
        if (h, w) != frames.shape[1:3]:
            frames = _resize(frames, h, w)
        return Budgeted(clip, frames, need, "; ".join(notes))

    def caption(self, clips: list[Clip], prompt: PromptTemplate,
                params: GenerationParams = GenerationParams()) -> list[CaptionResult]:
        """Captions clips in one batch; a failing batch is retried clip by clip.

        Returns:
            One result per clip, in order; failed clips have ``error`` set and empty text.
        """
        self.check(prompt, params)
        results: dict[int, CaptionResult] = {}
        fitted: list[tuple[int, Budgeted]] = []
        for i, clip in enumerate(clips):
            try:
                fitted.append((i, self.fit(clip, prompt, params)))
            except ValueError as exc:
                results[i] = CaptionResult(clip.key, "", finish_reason="error", error=str(exc))
        if fitted:
            try:
                out = self._generate([b for _, b in fitted], prompt, params)
                if len(out) != len(fitted):
                    raise RuntimeError(f"backend returned {len(out)} results for {len(fitted)} clips")
                for (i, _), r in zip(fitted, out):
                    results[i] = r
            except Exception:  # noqa: BLE001 - one bad clip must not lose the batch: isolate it
                for i, b in fitted:
                    t0 = time.perf_counter()
                    try:
                        results[i] = self._generate([b], prompt, params)[0]
                    except Exception as exc:  # noqa: BLE001
                        results[i] = CaptionResult(b.clip.key, "", finish_reason="error",
                                                   error=f"generation-failed: {type(exc).__name__}: {exc}",
                                                   latency_s=time.perf_counter() - t0)
        return [results[i] for i in range(len(clips))]


def weights_hash_of(checkpoint: str | Path) -> str | None:
    """sha256 (16 hex digits) over a local checkpoint's safetensors files, in name order; None for a hub id."""
    directory = Path(checkpoint)
    if not directory.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _resize(frames: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BILINEAR)) for f in frames])


def processor_visual_tokens(processor, frames: int, height: int, width: int, media: str) -> int:
    """Visual tokens for a Qwen2-VL-family processor, read from its own patch, merge and pixel settings."""
    proc = processor.video_processor if media == "video" else processor.image_processor
    size = getattr(proc, "size", None) or {}
    return qwen2vl_visual_tokens(
        frames, height, width, media, patch=getattr(proc, "patch_size", 14), merge=getattr(proc, "merge_size", 2),
        temporal=getattr(proc, "temporal_patch_size", 2) or 2,
        min_pixels=size.get("shortest_edge", getattr(proc, "min_pixels", 56 * 56)),
        max_pixels=size.get("longest_edge", getattr(proc, "max_pixels", 28 * 28 * 1280)))


def qwen2vl_visual_tokens(frames: int, height: int, width: int, media: str, *, patch: int = 14, merge: int = 2,
                          temporal: int = 2, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280) -> int:
    """Visual tokens Qwen2-VL spends on ``frames`` frames of ``height`` x ``width`` (after its smart resize)."""
    factor = patch * merge
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    t = 1 if media == "image" else math.ceil(frames / temporal)
    return t * (h // patch) * (w // patch) // (merge * merge)
