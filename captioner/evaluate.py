"""Caption a toy-world split with a checkpoint and score it against the ground truth, attribute by attribute.

    from captioner.evaluate import evaluate_toy
    report = evaluate_toy("stage2/", "toy/test-*.tar", mode="video")
    report["metrics"]["direction_within_axis"]
"""

from __future__ import annotations

import time

from captioner.interface import Captioner, Clip
from data_specs import GenerationParams
from data_specs.prompts import get_prompt

MODES = {
    "video": "caption-video-v1",  # the clip's frames as a video
    "middle-frame": "caption-video-v1",  # the base image model: the middle frame only, asked what happens
    "frame": "caption-frame-v1",  # a single frame (the pretrain split's images), asked what it shows
}


def load_eval_clips(shards: str, frames: int = 8, limit: int = 0) -> tuple[list[Clip], list[str]]:
    """Decoded clips and their gt.txt captions (bad samples are skipped: the toy world has none)."""
    from engine.decode import Sampling, decode_video
    from engine.shards import ErrorCollector, read_samples, read_text, video_member

    clips, refs = [], []
    for sample in read_samples(shards, handler=ErrorCollector()):
        ext = video_member(sample)
        clips.append(Clip(sample["__key__"], decode_video(sample[ext], Sampling.uniform(frames), backend="av").frames))
        refs.append(read_text(sample, "gt.txt") or "")
        if limit and len(clips) >= limit:
            break
    return clips, refs


def load_eval_frames(shards: str, limit: int = 0) -> tuple[list[Clip], list[str]]:
    """Single frames of the pretrain split (each a one-frame `Clip`) and their gt.txt frame captions."""
    import io

    import numpy as np
    from PIL import Image

    from data_specs import IMAGE_EXTENSIONS
    from engine.shards import ErrorCollector, read_samples, read_text, video_member

    clips, refs = [], []
    for sample in read_samples(shards, handler=ErrorCollector()):
        image = np.asarray(Image.open(io.BytesIO(sample[video_member(sample, IMAGE_EXTENSIONS)])).convert("RGB"))
        clips.append(Clip(sample["__key__"], image[None]))
        refs.append(read_text(sample, "gt.txt") or "")
        if limit and len(clips) >= limit:
            break
    return clips, refs


def evaluate_frames(model: str | Captioner, frames: tuple[list[Clip], list[str]], batch_size: int = 32) -> dict:
    """Captions single frames with the frame prompt and scores them (`captioner.toy_metrics.score_static`):
    whether an image model (the base, or stage 1 with its language model as the base's) sees the shapes.

    Returns:
        ``{"metrics": {...}, "examples": [(key, prediction, reference), ...], "seconds": s}``
    """
    from captioner.load import load_captioner
    from captioner.toy_metrics import score_static

    cap = load_captioner(model, backend="hf") if isinstance(model, str) else model
    clips, refs = frames
    t0 = time.perf_counter()
    preds = caption_clips(cap, clips, "frame", batch_size)
    return {"metrics": score_static(preds, refs), "seconds": round(time.perf_counter() - t0, 2),
            "examples": [(c.key, p, r) for c, p, r in zip(clips, preds, refs)]}


def middle_frame(clip: Clip) -> Clip:
    """The clip's middle frame, duplicated: Qwen2-VL's temporal patch wants 2 frames."""
    return Clip(clip.key, clip.frames[[len(clip.frames) // 2] * 2])


def caption_clips(cap: Captioner, clips: list[Clip], mode: str = "video", batch_size: int = 32,
                  max_new_tokens: int = 32, num_beams: int = 1) -> list[str]:
    prompt = get_prompt(MODES[mode])
    if mode == "middle-frame":
        clips = [middle_frame(c) for c in clips]
    params = GenerationParams(max_new_tokens=max_new_tokens, num_beams=num_beams)
    texts: list[str] = []
    for i in range(0, len(clips), batch_size):
        texts += [r.text for r in cap.caption(clips[i:i + batch_size], prompt, params)]
    return texts


def evaluate_toy(model: str | Captioner, shards: str, mode: str = "video", frames: int = 8, limit: int = 0,
                 batch_size: int = 32, clips: tuple[list[Clip], list[str]] | None = None,
                 num_beams: int = 1) -> dict:
    """Captions the split and scores it (see `captioner.toy_metrics.score`); greedy unless ``num_beams`` > 1.

    Returns:
        ``{"metrics": {...}, "examples": [(key, prediction, reference), ...], "seconds": s}``
    """
    from captioner.load import load_captioner
    from captioner.toy_metrics import score

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    cap = load_captioner(model, backend="hf") if isinstance(model, str) else model
    clip_list, refs = clips or load_eval_clips(shards, frames, limit)
    t0 = time.perf_counter()
    preds = caption_clips(cap, clip_list, mode, batch_size, num_beams=num_beams)
    return {"metrics": score(preds, refs), "seconds": round(time.perf_counter() - t0, 2),
            "examples": [(c.key, p, r) for c, p, r in zip(clip_list, preds, refs)]}


def forced_choice_toy(cap, clips: list[Clip], refs: list[str], mode: str = "video") -> dict:
    """Two-way forced choice by likelihood: the true caption against its time-flipped twin.

    Generation only scores what a model says; a model that never learned to say an event
    (the base image model, asked what happens) scores 0 there. Here the model only has to
    find the true caption likelier than a foil that differs in one thing, so chance is 0.5:

    - ``direction``: per reference event on a two-way axis (left/right, up/down, grow/shrink,
      appear/disappear), the caption with that one action inverted (`INVERSE`) is the foil.
    - ``order``: per two-event reference, the caption with its events swapped is the foil.

    A tie counts half. Needs a backend with ``log_likelihoods`` (the `hf` backend).

    Returns:
        ``{"direction": acc, "order": acc, "n_direction": n, "n_order": n}`` (acc None when n is 0).
    """
    from captioner.toy_metrics import DIRECTIONAL_AXES, format_caption, parse_caption
    from data_specs.toyworld import AXIS, INVERSE

    if not hasattr(cap, "log_likelihoods"):
        raise ValueError(f"forced-choice scoring needs the hf backend, not {cap.backend!r}")
    prompt = get_prompt(MODES[mode])
    hits = {"direction": 0.0, "order": 0.0}
    counts = {"direction": 0, "order": 0}
    for clip, ref in zip(clips, refs):
        if mode == "middle-frame":
            clip = middle_frame(clip)
        events = parse_caption(ref)
        if events is None:
            raise ValueError(f"reference of {clip.key} is not in the toy grammar: {ref!r}")
        foils: list[tuple[str, str]] = []
        for j, e in enumerate(events):
            if AXIS[e.action] in DIRECTIONAL_AXES:
                flipped = list(events)
                flipped[j] = e._replace(action=INVERSE[e.action])
                foils.append(("direction", format_caption(flipped)))
        if len(events) == 2:
            foils.append(("order", format_caption(events[::-1])))
        if not foils:
            continue
        lls = cap.log_likelihoods(clip, prompt, [format_caption(events)] + [f for _, f in foils])
        for (kind, _), ll in zip(foils, lls[1:]):
            counts[kind] += 1
            hits[kind] += 1.0 if lls[0] > ll else 0.5 if lls[0] == ll else 0.0
    return {**{k: (hits[k] / counts[k] if counts[k] else None) for k in hits},
            **{f"n_{k}": counts[k] for k in counts}}
