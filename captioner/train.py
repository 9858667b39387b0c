"""Training recipes of the captioner: the toy base model, then the two adaptation stages of arXiv 2401.06129.

    captioner pretrain-toy --shards 'toy/pretrain-*.tar' --out base/
    captioner adapt --stage visual   --model base/   --shards 'toy/adapt-*.tar' --out stage1/
    captioner adapt --stage language --model stage1/ --shards 'toy/adapt-*.tar' --out stage2/

Stages (what trains, what stays frozen):
    lm        text only: the language model learns the world's language (pretrain split's gt.txt + lm.txt)
    image     single frames with static captions: the whole model (pretrain split's png + gt.txt)
    visual    video-caption pairs (gt.txt): vision tower + projector; the language model is frozen
    language  instruction pairs (qa.json, captioning included): the language model; vision side frozen

Processor outputs are computed once per clip and kept in memory (a clip's pixels
are shared by all its instruction pairs), as the 8-bit values they were computed from
where that is lossless (`PixelCodec`: a quarter of float32), else in bf16. Where the
vision side is frozen (the language stage), it runs once per clip while the examples
are prepared and only its output tokens are kept (``precompute_features``): about
1.6x faster steps for the tiny toy model and a few KB per clip instead of its pixels; the loss is
the same as through the pixels. Every example also keeps its M-RoPE positions, and
the loss projects only the supervised positions onto the vocabulary
(`answer_loss`); with ``--pack`` a clip's instruction pairs share one sequence
(`pack_pairs`), their common prompt once, masked so that the loss stays that of the
pairs apart. A checkpoint is a Hugging Face
directory (safetensors weights + processor) plus ``trainer_state.json`` (run
config, step; written last: the commit marker) and ``optimizer.pt``;
``--resume`` continues from it with the same data order.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields as dataclass_fields
from pathlib import Path

import numpy as np
import torch

STAGES = ("lm", "image", "visual", "language")
INPUT_KINDS = ("video", "image", "text")  # what a training batch holds (an example's media, None for text)
# the parts of the vision side (parameter names under 'visual') the visual stage can train, and how to tell them
VISION_PARTS = {"adapter": ".temporal_adapter.", "merger": ".merger.", "tower": None}  # tower: all the rest


@dataclass
class TrainConfig:
    """One run of one stage. Every field is a flag of `captioner pretrain-toy` / `captioner adapt`."""

    stage: str
    model: str  # checkpoint to start from (a directory or a hub id)
    shards: str  # shard pattern(s) of the training data
    out: str  # checkpoint directory to write
    steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * this
    warmup: int = 20
    weight_decay: float = 0.0
    # AdamW's second-moment decay. 0.999 (torch's default) remembers the large gradients of the first steps for
    # thousands of steps, and a tiny model's image stage then sits for 2000-11000 steps on a plateau where it
    # reads colours but names shapes at chance; at 0.95 (common for transformers) it names them 0.7 of the time
    # by step 3000 (bench/CAPTIONER_TOY.md)
    adam_beta2: float = 0.999
    # the vision side's parameters train at lr * this (image and visual stages; e.g. below 1 to fine-tune a real
    # tower gently). On the toy base's shape plateau 4x and 10x moved its end by draw, both ways
    # (bench/CAPTIONER_TOY.md)
    vision_lr_scale: float = 1.0
    frames: int = 8  # frames per clip, uniformly sampled
    max_samples: int = 0  # 0: every sample of the shards
    seed: int = 0
    lora: bool = False  # LoRA adapters (peft) on the trained part instead of full weights: for large models
    lora_rank: int = 16
    temporal_adapter: bool = False  # visual stage: add a space-time adapter on video tokens (captioner.adapter)
    # visual stage, with a new adapter: each frame fills its own temporal patch, one frame per slice of visual
    # tokens (captioner.adapter.AdapterConfig.still_frames); later stages and generation read it from the checkpoint
    still_frames: bool = False
    # visual stage, with a new adapter: channels of a branch that reads the frames' pixels and feeds the adapter
    # (captioner.adapter.PixelBranch); 0: none. The checkpoint records it: later stages and generation follow
    pixel_branch: int = 0
    precompute_features: bool = True  # language stage: run the frozen vision side once per clip, not every step
    # on the CPU, numbers below float32's normal range (~1e-38) computed as zero while the stage trains
    # (`flushing_denormals`): x86 handles them in microcode, and the visual stage's backward pass through the
    # temporal adapter meets them: 1.24x faster steps there (bench/results/denormal.json). A speed knob, not part
    # of what a run is (RUN_FIELDS)
    flush_denormals: bool = True
    # language stage: a clip's instruction pairs in one sequence, the prompt they share (template, visual tokens)
    # once (`pack_pairs`); --batch-size then counts clips, each bringing all its pairs
    pack: bool = False
    # language stage: how many times each instruction pair of a type ('caption', 'temporal', ...; qa.json's
    # "type") is used per epoch; unnamed types and pairs without a type count once, 0 leaves a type out
    task_weights: dict = field(default_factory=dict)
    # batches of each input kind ('video', 'image', 'text') per turn of the cycle the kinds take; unnamed kinds
    # once. The image stage has image and text batches: {'image': 3} spends three steps in four on frames
    input_weights: dict = field(default_factory=dict)
    # visual stage: which parts of the vision side train (`VISION_PARTS`, or their names comma-separated); empty:
    # all of it. ('adapter',) keeps the image model's tower and merger as they were and teaches only the adapter
    vision_parts: tuple | str = ()
    log_every: int = 10
    save_every: int = 0  # 0: only at the end
    resume: bool = False
    stop_at: int = 0  # stop (checkpointed, unfinished) after this step: time-boxed runs, kill-and-resume tests
    device: str = "auto"
    extra: dict = field(default_factory=dict)  # recorded, e.g. the preset that produced this config

    def __post_init__(self) -> None:
        problems = []
        if self.stage not in STAGES:
            problems.append(f"--stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        for name in ("steps", "batch_size", "grad_accum", "frames", "lora_rank", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            problems.append(f"--lr must be > 0, got {self.lr}")
        if not 0 < self.adam_beta2 < 1:
            problems.append(f"--adam-beta2 must be in (0, 1), got {self.adam_beta2}")
        if not self.vision_lr_scale > 0:
            problems.append(f"--vision-lr-scale must be > 0, got {self.vision_lr_scale}")
        elif self.vision_lr_scale != 1 and self.stage not in ("image", "visual"):
            problems.append(f"--vision-lr-scale applies to the stages that train the vision side (image, visual), "
                            f"not {self.stage!r}")
        if self.warmup < 0 or self.max_samples < 0 or self.save_every < 0:
            problems.append("--warmup, --max-samples and --save-every must be >= 0")
        bad = {k: v for k, v in self.task_weights.items() if not (isinstance(k, str) and k and
                                                                   isinstance(v, int) and v >= 0)}
        if bad:
            problems.append(f"--task-weight takes TYPE=N with N a whole number >= 0, got {bad}")
        elif self.task_weights and self.stage != "language":
            problems.append("--task-weight applies to the language stage (its instruction pairs have types)")
        bad = {k: v for k, v in self.input_weights.items() if k not in INPUT_KINDS or not (isinstance(v, int)
                                                                                           and v >= 1)}
        if bad:
            problems.append(f"--input-weight takes KIND=N with KIND one of {', '.join(INPUT_KINDS)} and N a whole "
                            f"number >= 1, got {bad}")
        if isinstance(self.vision_parts, str):  # as the flag gives it: 'adapter,merger'
            self.vision_parts = tuple(p.strip() for p in self.vision_parts.split(",") if p.strip())
        self.vision_parts = tuple(self.vision_parts)
        if unknown := [p for p in self.vision_parts if p not in VISION_PARTS]:
            problems.append(f"--train-vision takes parts among {', '.join(VISION_PARTS)}, got {', '.join(unknown)}")
        elif self.vision_parts and self.stage != "visual":
            problems.append("--train-vision applies to the visual stage (the others freeze the whole vision side "
                            "or train all of it)")
        elif "adapter" in self.vision_parts and not self.temporal_adapter:
            problems.append("--train-vision adapter needs --temporal-adapter")
        if self.still_frames and not (self.stage == "visual" and self.temporal_adapter):
            problems.append("--still-frames applies to the visual stage with --temporal-adapter (the adapter's "
                            "checkpoint records it; later stages and generation follow it)")
        if self.pixel_branch < 0:
            problems.append(f"--pixel-branch must be >= 0, got {self.pixel_branch}")
        elif self.pixel_branch and not (self.stage == "visual" and self.temporal_adapter):
            problems.append("--pixel-branch applies to the visual stage with --temporal-adapter (the adapter's "
                            "checkpoint records it; later stages and generation follow it)")
        if self.pack and self.stage != "language":
            problems.append("--pack applies to the language stage (a clip has one example in the other stages)")
        if problems:
            raise ValueError("; ".join(problems))


# --------------------------------------------------------------------------- examples

class PixelCodec:
    """A processor's pixel values as the 8-bit values they came from, and back.

    An image processor that only rescales (1/255) and normalises (per-channel mean and std)
    makes each value an affine function of one 8-bit pixel value, per channel: the channels
    are the leading axis of every row (Qwen2-VL's [patches, channels x time x rows x columns])
    or of every image ([images, channels, rows, columns]). `encode` keeps those codes, a
    quarter of the float32 output, where they reproduce it to 1e-5 (transformers' Qwen2-VL
    processors resize 8-bit frames in 8 bits, so their output always is; float frames or
    another normalisation give values that are not codes, and None); `decode` gives the
    float32 values back.
    """

    def __init__(self, sub_processor):
        normalise = getattr(sub_processor, "do_normalize", False)
        mean = list(sub_processor.image_mean) if normalise else [0.0] * 3
        std = list(sub_processor.image_std) if normalise else [1.0] * 3
        factor = float(sub_processor.rescale_factor) if getattr(sub_processor, "do_rescale", False) else 1.0
        self.channels = len(mean)
        # value = code * scale + shift, per channel
        self.scale = torch.tensor([factor / s for s in std])
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std)])

    def _per_channel(self, x: torch.Tensor) -> torch.Tensor | None:
        if x.dim() < 2 or x[0].numel() % self.channels:
            return None
        return x.reshape(len(x), self.channels, -1)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor | None:
        """uint8 codes of ``pixels`` (shape kept), or None where they would not give the values back."""
        values = pixels.float()
        x = self._per_channel(values)
        if x is None:
            return None
        codes = ((x - self.shift[:, None]) / self.scale[:, None]).round_()
        if codes.min() < 0 or codes.max() > 255:
            return None
        codes = codes.to(torch.uint8).reshape(pixels.shape)
        if (self.decode(codes) - values).abs().max() > 1e-5:
            return None
        return codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        x = self._per_channel(codes).float()  # a new tensor: the affine map runs in place on it
        return x.mul_(self.scale[:, None]).add_(self.shift[:, None]).reshape(codes.shape)


@dataclass
class Example:
    """One training sequence: token ids with the answer supervised, and the clip's pixels (shared)
    or, where the vision side is frozen, what it makes of them (``features``, shared)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    mm_token_type_ids: torch.Tensor
    media: str | None = None  # 'video', 'image' or None
    pixels: torch.Tensor | None = None  # float, or uint8 codes that ``codec`` turns back into the float values
    grid_thw: torch.Tensor | None = None
    features: torch.Tensor | None = None  # [visual tokens, hidden]: the frozen vision side's output
    position_ids: torch.Tensor | None = None  # [3, len]: M-RoPE positions (temporal, height, width), computed once
    # packed pairs (`pack_pairs`): 0 for the shared prefix, k for the tokens of pair k; None: one plain sequence
    segments: torch.Tensor | None = None
    pairs: int = 1  # instruction pairs this sequence holds
    codec: PixelCodec | None = None  # where ``pixels`` holds 8-bit codes (shared)

    def pixel_values(self) -> torch.Tensor:
        """The processor's float32 pixel values."""
        return self.codec.decode(self.pixels) if self.codec is not None else self.pixels.float()


def _inner_model(model):
    """The model under a peft wrapper and a ...ForConditionalGeneration head (Qwen2-VL's ``.model``)."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(core, "model", core)


PositionFn = Callable[[torch.Tensor, torch.Tensor, str, torch.Tensor], torch.Tensor]
"""(input_ids, mm_token_type_ids, media, grid) -> [3, len] M-RoPE positions of one sequence."""


def mrope_positions(model) -> PositionFn | None:
    """The model's own M-RoPE positions of one sequence (Qwen2-VL's ``get_rope_index``), or None for a model
    without them. A sequence's positions depend only on its tokens and grid, so they are computed once per
    example instead of in every forward pass (~9% of a language-stage step of the tiny model)."""
    core = _inner_model(model)
    if not hasattr(core, "get_rope_index"):
        return None

    def positions(ids: torch.Tensor, mm: torch.Tensor, media: str, grid: torch.Tensor) -> torch.Tensor:
        grids = {"video_grid_thw": grid} if media == "video" else {"image_grid_thw": grid}
        pos, _ = core.get_rope_index(ids[None], mm_token_type_ids=mm[None], attention_mask=torch.ones_like(ids)[None],
                                     **grids)
        return pos[:, 0].clone()

    return positions


FeatureFn = Callable[[str, torch.Tensor, torch.Tensor], list[torch.Tensor]]
"""(media, pixels of several clips, their grids) -> one [tokens, hidden] tensor per clip."""


def frozen_features(model, device: str) -> FeatureFn:
    """What a frozen vision side (tower, merger and any temporal adapter) makes of pixels, in eval mode."""
    core = _inner_model(model)

    @torch.no_grad()
    def encode(media: str, pixels: torch.Tensor, grid: torch.Tensor) -> list[torch.Tensor]:
        fn = core.get_video_features if media == "video" else core.get_image_features
        was_training = core.visual.training
        core.visual.eval()
        try:
            out = fn(pixels.to(device, torch.float32), grid.to(device), return_dict=True).pooler_output
        finally:
            core.visual.train(was_training)
        return [f.to("cpu", torch.float32).clone() for f in out]  # clone: not views of the whole batch

    return encode


def pack_pairs(examples: list[Example]) -> list[Example]:
    """The examples of one clip as one sequence: their common prefix once, then each one's own tokens.

    Every instruction pair of a clip starts with the same tokens (chat template, the visual tokens, up to the
    question), about half of each sequence in the toy world. Packed, pair k's tokens keep the M-RoPE positions
    they have alone and, through `answer_loss`'s mask, see the prefix and their own pair only: the loss of a
    packed clip is that of its pairs apart, from about half the tokens. Examples that cannot be packed this way
    (one alone, without precomputed positions, or where a pair's first own token is supervised) come back as
    they are.
    """
    if len(examples) < 2 or any(e.position_ids is None or e.segments is not None for e in examples):
        return examples
    first = examples[0].input_ids
    p = min(len(e.input_ids) for e in examples) - 1
    for e in examples[1:]:
        differs = (e.input_ids[:p] != first[:p]).nonzero()
        p = int(differs[0]) if len(differs) else p
    if p < 1 or any((e.labels[:p + 1] != -100).any() for e in examples):
        return examples
    segments = [torch.zeros(p, dtype=torch.long)] + [torch.full((len(e.input_ids) - p,), k + 1, dtype=torch.long)
                                                     for k, e in enumerate(examples)]
    head = examples[0]
    return [Example(input_ids=torch.cat([first[:p]] + [e.input_ids[p:] for e in examples]),
                    labels=torch.cat([head.labels[:p]] + [e.labels[p:] for e in examples]),
                    mm_token_type_ids=torch.cat([head.mm_token_type_ids[:p]] + [e.mm_token_type_ids[p:]
                                                                               for e in examples]),
                    media=head.media, pixels=head.pixels, codec=head.codec, grid_thw=head.grid_thw,
                    features=head.features,
                    position_ids=torch.cat([head.position_ids[:, :p]] + [e.position_ids[:, p:] for e in examples], 1),
                    segments=torch.cat(segments), pairs=len(examples))]


def _texts_for(stage: str, sample: dict, task_weights: dict | None = None) -> list[tuple[str | None, str, str]]:
    """(media, question, answer) triples a sample gives for a stage; in the language stage each instruction pair
    as many times as ``task_weights`` gives its type (once by default)."""
    from data_specs import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
    from data_specs.prompts import get_prompt
    from engine.shards import read_json, read_text

    video_q, image_q = get_prompt("caption-video-v1").text, get_prompt("caption-frame-v1").text
    if stage == "lm":
        out = [(None, image_q, read_text(sample, "gt.txt"))]
        lm = read_text(sample, "lm.txt")
        return out + ([(None, video_q, lm)] if lm else [])
    if stage == "image":  # text-only sentences keep the language model's video-caption language alive
        lm = read_text(sample, "lm.txt")
        return [("image", image_q, read_text(sample, "gt.txt"))] + ([(None, video_q, lm)] if lm else [])
    if stage == "visual":  # a still frame among the clips (the base's own, say) rehearses the image path
        still = not any(e in sample for e in VIDEO_EXTENSIONS) and any(e in sample for e in IMAGE_EXTENSIONS)
        return [("image", image_q, read_text(sample, "gt.txt")) if still
                else ("video", video_q, read_text(sample, "gt.txt"))]
    weights = task_weights or {}
    return [("video", qa["question"], qa["answer"]) for qa in read_json(sample, "qa.json") or []
            for _ in range(weights.get(qa.get("type"), 1))]


def _denormals_flushed() -> bool:
    """Whether this thread's float unit computes a denormal (1e-39 here) as zero."""
    return float(torch.tensor([1e-39]) * 1.0) == 0.0


@contextmanager
def flushing_denormals(enabled: bool = True):
    """Denormal floats computed as zero on the CPU inside the block (`torch.set_flush_denormal`: SSE3's
    flush-to-zero and denormals-are-zero); the thread's previous mode comes back after.

    Denormals (nonzero magnitudes below ~1.2e-38 in float32) take x86 CPUs tens to hundreds of cycles per
    operation, and training can drift into them (the toy visual stage's backward pass through the temporal
    adapter's convolution does). Flushed, such a value is exactly 0, which changes a result only where it
    hinges on magnitudes below 1e-38. Where the CPU cannot flush (not x86 with SSE3), or when not
    ``enabled``, the block runs as it would have.
    """
    if not enabled:
        yield
        return
    before = _denormals_flushed()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where there is no glibc."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hands freed heap pages back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    Preparing a clip allocates ~0.6 MB (decoded frames, processor output, pixels) and frees most of it, but the
    small tensors that stay (token ids, visual tokens) pin the heap around the freed blocks: without a trim, the
    full preset's language stage kept ~7 GB resident for ~0.1 GB of examples.
    """
    if trim := _malloc_trim():
        trim(0)


def build_examples(cfg: TrainConfig, processor, progress: bool = True, features: FeatureFn | None = None,
                   positions: PositionFn | None = None, frame_repeat: int = 1) -> tuple[list[Example], dict]:
    """Reads the shards and turns every usable sample into training examples.

    Args:
        features: where given, each clip's pixels go through it (in batches of a few dozen clips,
            as they are read) and examples keep its output instead of the pixels.
        positions: where given, each example with an image or video keeps its M-RoPE positions
            (`mrope_positions`); without them the model computes them in every forward pass.
        frame_repeat: each sampled frame this many times in a row (`captioner.adapter.frame_repeat`).

    Returns:
        The examples and a report: samples used, samples skipped by reason.
    """
    import io

    from PIL import Image
    from tqdm import tqdm

    from captioner.adapter import video_input
    from data_specs import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
    from engine.decode import Sampling, decode_video
    from engine.errors import SampleError
    from engine.shards import ErrorCollector, read_samples, video_member

    tok = processor.tokenizer
    video_pad, image_pad = "<|video_pad|>", "<|image_pad|>"
    video_id, image_id = tok.convert_tokens_to_ids(video_pad), tok.convert_tokens_to_ids(image_pad)
    errors = ErrorCollector()
    examples: list[Example] = []
    pending: dict[tuple, list[tuple[torch.Tensor, list[Example]]]] = {}  # (media, grid) -> clips to encode

    codecs = {"video": PixelCodec(processor.video_processor), "image": PixelCodec(processor.image_processor)}

    def encode(key: tuple) -> None:
        clips = pending.pop(key)
        media, grid = key[0], torch.tensor([key[1]] * len(clips))
        for (_, owners), feats in zip(clips, features(media, torch.cat([c[0] for c in clips]), grid)):
            for e in owners:
                e.features, e.pixels = feats, None

    n_used = unpacked = 0  # unpacked: clips with several pairs that `pack_pairs` left apart
    bar = tqdm(desc=f"prepare {cfg.stage}", unit="sample", disable=not progress)
    for sample in read_samples(cfg.shards, handler=errors):
        if cfg.max_samples and n_used >= cfg.max_samples:
            break
        try:
            triples = [t for t in _texts_for(cfg.stage, sample, cfg.task_weights) if t[2]]
            media, pixels, grid, n_tokens = None, None, None, 0
            kinds = {t[0] for t in triples}
            if "video" in kinds:
                ext = video_member(sample, VIDEO_EXTENSIONS)
                frames = decode_video(sample[ext], Sampling.uniform(cfg.frames), backend="av").frames
                enc = processor.video_processor(videos=[video_input(frames, frame_repeat)], return_tensors="pt",
                                                do_sample_frames=False)
                media, pixels, grid = "video", enc["pixel_values_videos"], enc["video_grid_thw"]
            elif "image" in kinds:
                ext = video_member(sample, IMAGE_EXTENSIONS)
                image = np.asarray(Image.open(io.BytesIO(sample[ext])).convert("RGB"))
                enc = processor.image_processor(images=[image], return_tensors="pt")
                media, pixels, grid = "image", enc["pixel_values"], enc["image_grid_thw"]
        except SampleError as exc:
            errors(exc.located(url=sample["__url__"], key=sample["__key__"]))
            continue
        if grid is not None:
            n_tokens = int(grid.prod()) // (processor.video_processor.merge_size ** 2)
        codec = None
        if grid is not None and features is None:  # kept until training: as 8-bit codes where lossless, else bf16
            codes = codecs[media].encode(pixels)
            codec, pixels = (None, pixels.to(torch.bfloat16)) if codes is None else (codecs[media], codes)
        owners: list[Example] = []
        for m, question, answer in triples:
            content = ([{"type": m}] if m else []) + [{"type": "text", "text": question}]
            prompt = processor.apply_chat_template([{"role": "user", "content": content}],
                                                   add_generation_prompt=True, tokenize=False)
            pad = video_pad if m == "video" else image_pad
            if m:
                prompt = prompt.replace(pad, pad * n_tokens, 1)
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            a_ids = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
            ids = torch.tensor(p_ids + a_ids)
            labels = torch.tensor([-100] * len(p_ids) + a_ids)
            mm = (ids == image_id).long() + 2 * (ids == video_id).long()
            pos = positions(ids, mm, m, grid) if positions is not None and m else None
            example = Example(ids, labels, mm, m, pixels if m else None, grid if m else None, position_ids=pos,
                              codec=codec if m else None)
            (owners if m else examples).append(example)
        if cfg.pack:
            packed = pack_pairs(owners)
            unpacked += len(owners) > 1 and len(packed) == len(owners)
            owners = packed
        examples += owners
        if features is not None and owners:
            key = (owners[0].media, tuple(grid[0].tolist()))
            pending.setdefault(key, []).append((pixels, owners))
            if len(pending[key]) >= 32:
                encode(key)
        n_used += 1
        bar.update(1)
        if n_used % 32 == 0:
            release_freed_memory()
    for key in list(pending):
        encode(key)
    bar.close()
    return examples, {"samples": n_used, "examples": sum(e.pairs for e in examples),
                      **({"sequences": len(examples), "unpacked_clips": unpacked} if cfg.pack else {}),
                      "skipped": errors.by_reason(),
                      "first_errors": [str(e) for e in errors.errors[:5]]}


def collate(batch: list[Example], pad_id: int) -> dict:
    """Right-padded tensors for a forward pass with labels (Qwen2-VL's names)."""
    n = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    mm = torch.zeros((len(batch), n), dtype=torch.long)
    for i, e in enumerate(batch):
        k = len(e.input_ids)
        ids[i, :k], labels[i, :k], mask[i, :k], mm[i, :k] = e.input_ids, e.labels, 1, e.mm_token_type_ids
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask, "mm_token_type_ids": mm}
    if all(e.position_ids is not None for e in batch):
        pos = torch.zeros((3, len(batch), n), dtype=torch.long)  # a pad's position is masked out: any will do
        for i, e in enumerate(batch):
            pos[:, i, :len(e.input_ids)] = e.position_ids
        out["position_ids"] = pos
    if any(e.segments is not None for e in batch):
        if "position_ids" not in out:
            raise ValueError("a batch of packed pairs needs every example's M-RoPE positions (build_examples' "
                             "positions=)")
        seg = torch.full((len(batch), n), -1, dtype=torch.long)  # -1: padding
        for i, e in enumerate(batch):
            seg[i, :len(e.input_ids)] = e.segments if e.segments is not None else 0
        out["segment_ids"] = seg
    media = batch[0].media
    if media is not None and batch[0].features is not None:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        grid = torch.cat([e.grid_thw for e in batch])
        out.update({f"{media}_grid_thw": grid, "mm_encoder_outputs": {
            media: BaseModelOutputWithPooling(pooler_output=tuple(e.features for e in batch))}})
    elif media is not None:
        codec = batch[0].codec
        if codec is not None and all(e.codec is codec for e in batch):  # one pass over the batch's codes
            pix = codec.decode(torch.cat([e.pixels for e in batch]))
        else:
            pix = torch.cat([e.pixel_values() for e in batch])
        grid = torch.cat([e.grid_thw for e in batch])
        if media == "video":
            out.update(pixel_values_videos=pix, video_grid_thw=grid)
        else:
            out.update(pixel_values=pix, image_grid_thw=grid)
    return out


def _to(inputs: dict, device: str) -> dict:
    """A collated batch on ``device`` (precomputed features included)."""
    out = {k: v.to(device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    for media, enc in inputs.get("mm_encoder_outputs", {}).items():
        enc.pooler_output = tuple(f.to(device) for f in enc.pooler_output)
        out.setdefault("mm_encoder_outputs", {})[media] = enc
    return out


def answer_loss(model, inputs: dict) -> torch.Tensor:
    """The causal-LM loss of a collated batch (mean over its supervised tokens), with logits only where a
    token is supervised.

    The same value as ``model(**inputs).loss``, which projects every position onto the vocabulary: an
    instruction example supervises ~8 of its ~75 tokens, so the LM head and the softmax over the vocabulary
    ran ~9x more often than the loss needs (transformers' boolean ``logits_to_keep``).
    A batch of packed pairs (``segment_ids``, `pack_pairs`) gets the mask that keeps them apart: a token sees
    the tokens before it in the shared prefix and in its own pair.
    """
    labels = inputs["labels"]
    target = torch.full_like(labels, -100)
    target[:, :-1] = labels[:, 1:]  # position t predicts token t + 1
    rest = {k: v for k, v in inputs.items() if k not in ("labels", "segment_ids")}
    if (seg := inputs.get("segment_ids")) is not None:
        target[:, :-1][seg[:, 1:] != seg[:, :-1]] = -100  # a pair's last token does not predict the next pair
        rest["attention_mask"] = _pair_mask(model, seg)
    keep = target != -100
    if not keep.any():
        raise ValueError("a batch without a supervised token")
    logits = model(**rest, logits_to_keep=keep).logits
    if logits.shape[0] != int(keep.sum()):
        raise ValueError(f"{type(model).__name__} does not take a boolean logits_to_keep (transformers' "
                         f"slice_logits_to_keep): got logits {tuple(logits.shape)} for {int(keep.sum())} positions")
    return torch.nn.functional.cross_entropy(logits.float(), target[keep])


def _pair_mask(model, seg: torch.Tensor) -> dict:
    """The attention of packed pairs, as the per-layer-type masks transformers takes prepared: query i sees key
    j <= i where j is in the shared prefix (segment 0) or in i's own segment; padding (-1) is seen by none."""
    text = model.config.get_text_config()
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise ValueError(f"--pack needs full attention in every layer; this model has {sorted(kinds)}")
    impl = getattr(text, "_attn_implementation", None) or getattr(model.config, "_attn_implementation", "sdpa")
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"--pack needs the sdpa or eager attention (a 4-D mask), not {impl!r}")
    n = seg.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=seg.device).tril()
    seen = causal & (seg[:, None, :] >= 0) & ((seg[:, None, :] == 0) | (seg[:, :, None] == seg[:, None, :]))
    seen |= torch.eye(n, dtype=torch.bool, device=seg.device)  # a pad sees itself: no row of the softmax is empty
    mask = seen[:, None]
    if impl == "eager":  # eager attention adds its mask
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=seg.device).masked_fill(~mask, torch.finfo(dtype).min)
    return {"full_attention": mask}


# --------------------------------------------------------------------------- freezing

def vision_part(name: str) -> str | None:
    """The `VISION_PARTS` key of parameter ``name``, None outside the vision side (the names under 'visual')."""
    name = f".{name}"
    if ".visual." not in name:
        return None
    return next((part for part, marker in VISION_PARTS.items() if marker and marker in name), "tower")


def trainable_mask(name: str, stage: str, vision_parts: tuple = ()) -> bool:
    """Whether parameter ``name`` trains in ``stage``; in the visual stage, only ``vision_parts`` of the vision
    side where given (all of it by default)."""
    part = vision_part(name)
    if stage == "visual":
        return part is not None and (not vision_parts or part in vision_parts)
    visual = part is not None
    if stage in ("language", "lm"):
        return not visual
    return True


def apply_freezing(model, cfg: TrainConfig):
    """Freezes per stage; with ``cfg.lora``, wraps the trained part's linear layers in LoRA adapters."""
    if cfg.lora:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ImportError("--lora needs peft: pip install 'pseudocap[lora]'") from None
        linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                  and trainable_mask(n + ".weight", cfg.stage, cfg.vision_parts)
                  and "lm_head" not in n and "temporal_adapter" not in n}
        model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank,
                                                 target_modules=sorted(linear)))
        for name, p in model.named_parameters():  # the adapter is small: it trains whole, never through LoRA
            if "temporal_adapter" in name:
                p.requires_grad_(trainable_mask(name, cfg.stage, cfg.vision_parts))
        return model
    for name, p in model.named_parameters():
        p.requires_grad_(trainable_mask(name, cfg.stage, cfg.vision_parts))
    return model


def batch_plan(examples: list[Example], cfg: TrainConfig):
    """``batch_for(step, micro) -> (kind, examples)``: which batch each micro-batch of each step trains on.

    A batch holds one kind of input ('video', 'image' or 'text'). The kinds take turns, each as many times per
    turn as ``cfg.input_weights`` gives it (once by default), and each kind goes through its own examples in
    epochs, shuffled by ``cfg.seed``. The batch is a function of the position alone, so a resumed run trains on
    exactly what an uninterrupted one would.
    """
    kinds = [(k, [e for e in examples if e.media == m]) for k, m in zip(INPUT_KINDS, ("video", "image", None))]
    kinds = [(k, pool) for k, pool in kinds if pool]
    cycle = [n for n, (k, _) in enumerate(kinds) for _ in range(cfg.input_weights.get(k, 1))]
    orders: list[list[np.ndarray]] = [[] for _ in kinds]
    rngs = [np.random.default_rng([cfg.seed, 7, n]) for n in range(len(kinds))]

    def batch_for(step: int, micro: int) -> tuple[str, list[Example]]:
        turn, slot = divmod(step * cfg.grad_accum + micro, len(cycle))
        n = cycle[slot]
        i = turn * cycle.count(n) + cycle[:slot].count(n)  # batches of kind n before this one
        pool = kinds[n][1]
        per_epoch = max(1, len(pool) // cfg.batch_size)
        epoch, j = divmod(i, per_epoch)
        while len(orders[n]) <= epoch:
            orders[n].append(rngs[n].permutation(len(pool)))
        idx = orders[n][epoch][j * cfg.batch_size:(j + 1) * cfg.batch_size]
        return kinds[n][0], [pool[m] for m in idx]

    return batch_for


# --------------------------------------------------------------------------- checkpoints

def param_groups(model, cfg: TrainConfig) -> list[dict]:
    """The optimizer's parameter groups of ``model``'s trainable parameters: matrices decay with
    ``cfg.weight_decay``, norms and biases do not; the vision side's (``.visual.`` in the name) carry
    ``lr_scale = cfg.vision_lr_scale``, which the loop multiplies into the schedule's learning rate."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = cfg.weight_decay if p.ndim >= 2 else 0.0
        scale = cfg.vision_lr_scale if ".visual." in f".{name}" else 1.0
        groups.setdefault((decay, scale), []).append(p)
    return [{"params": ps, "weight_decay": decay, "lr_scale": scale} for (decay, scale), ps in groups.items()]


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def read_state(out: str | Path) -> dict | None:
    path = Path(out) / "trainer_state.json"
    return json.loads(path.read_text()) if path.exists() else None


# what a run is: resuming with any of these changed would mix two runs in one checkpoint
RUN_FIELDS = ("stage", "model", "shards", "batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup",
              "weight_decay", "frames", "max_samples", "seed", "lora", "lora_rank", "temporal_adapter",
              "still_frames", "task_weights", "pack", "input_weights", "vision_parts", "vision_lr_scale",
              "adam_beta2", "pixel_branch")


def config_changes(state: dict, cfg: TrainConfig, fields: tuple[str, ...] = RUN_FIELDS) -> list[str]:
    """``name: saved -> asked`` for each of ``fields`` where ``cfg`` differs from the checkpoint's config.

    Paths compare by what they name: a saved relative path is read from the directory the run was started in
    (``cwd`` in trainer_state.json). Fields a stage does not use (frames before the video stages, the LoRA
    rank without LoRA) are not compared.
    """
    # a field the saved config lacks was added since that run: it ran as the field's default does
    defaults = {f.name: f.default_factory() if f.default_factory is not MISSING else f.default
                for f in dataclass_fields(TrainConfig)}
    saved, asked = {**defaults, **state.get("config", {})}, asdict(cfg)
    skip = {"frames"} if cfg.stage in ("lm", "image") else set()
    if not cfg.lora and not saved.get("lora"):
        skip.add("lora_rank")
    base = state.get("cwd", os.getcwd())
    changes = [f"{k}: {saved.get(k)!r} -> {asked[k]!r}" for k in fields
               if k in saved and k not in skip and _canonical(k, saved[k], base) != _canonical(k, asked[k])]
    if "model" in fields and not any(c.startswith("model:") for c in changes):
        then, now = state.get("source"), checkpoint_id(cfg.model)
        if then and now and then != now:
            changes.append(f"model: {cfg.model} has been trained further or again since this run started from it")
    return changes


def checkpoint_id(path: str) -> str | None:
    """A digest of a checkpoint's trainer_state.json (its run and step); None for one this trainer did not write."""
    state = Path(path) / "trainer_state.json"
    return hashlib.sha256(state.read_bytes()).hexdigest()[:16] if state.is_file() else None


def _canonical(name: str, value, base: str | None = None):
    """A local path or shard pattern as real absolute paths (relative to ``base``, else the working directory),
    in the pattern's order (it is the data order); URLs and hub ids as they are."""
    import braceexpand

    def real(path: str) -> str:
        if "://" in path and not path.startswith("file://"):
            return path
        path = path.removeprefix("file://")
        return os.path.realpath(os.path.join(base or os.getcwd(), path))

    if name == "model" and Path(base or ".", value).is_dir():
        return real(value)
    if name == "shards":
        return [real(u) for u in braceexpand.braceexpand(str(value))]
    if name == "vision_parts":  # a list once saved as JSON
        return tuple(value)
    return value


def save_checkpoint(model, processor, optimizer, cfg: TrainConfig, step: int, out: Path, report: dict,
                    source: str | None = None) -> None:
    """Writes the checkpoint next to the old one, then swaps it in; trainer_state.json is written last."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from captioner.adapter import detached, save_adapter

    to_save = model.merge_and_unload() if cfg.lora and step >= cfg.steps else model
    with detached(to_save):  # model.safetensors stays a plain Hugging Face checkpoint
        to_save.save_pretrained(tmp, safe_serialization=True)
    save_adapter(to_save, tmp)
    processor.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate()}, tmp / "optimizer.pt")
    out.mkdir(parents=True, exist_ok=True)
    (out / "trainer_state.json").unlink(missing_ok=True)  # uncommitted while files move
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()
    state = {"step": step, "config": asdict(cfg), "cwd": os.getcwd(),  # relative paths in the config are from here
             "source": source,  # checkpoint_id of cfg.model when the run started: a retrained source is noticed
             "data": report, "finished": step >= cfg.steps}
    state["config"].pop("stop_at")  # how a run was cut is not part of what it is
    (out / "trainer_state.json.tmp").write_text(json.dumps(state, indent=2) + "\n")
    os.replace(out / "trainer_state.json.tmp", out / "trainer_state.json")


# --------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig, progress: bool = True,
          on_checkpoint: Callable[[int, Path], None] | None = None) -> dict:
    """Runs one stage to ``cfg.steps`` optimizer steps; resumes from ``cfg.out`` when asked.

    ``on_checkpoint(step, out)`` is called after every checkpoint is written (``cfg.save_every``
    and the last step): a learning curve evaluates there without stopping the run, so the
    examples are prepared once.

    Returns:
        A summary: final step, last loss, seconds, examples used.
    """
    with flushing_denormals(cfg.flush_denormals):
        return _train(cfg, progress, on_checkpoint)


def _train(cfg: TrainConfig, progress: bool, on_checkpoint: Callable[[int, Path], None] | None) -> dict:
    from tqdm import tqdm
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from captioner.adapter import attach_adapter, frame_repeat, load_adapter
    from captioner.fast_vision import speed_up_vision

    out = Path(cfg.out)
    state = read_state(out) if cfg.resume else None
    if state and (changed := config_changes(state, cfg)):
        raise ValueError(f"--resume: {out} holds another run ({'; '.join(changed)}); resume it with its own "
                         "settings or write to a fresh --out")
    if state and state.get("finished") and state["step"] >= cfg.steps:
        return {"step": state["step"], "resumed": True, "skipped": "already finished"}
    source = str(out) if state else cfg.model
    source_id = state.get("source") if state else checkpoint_id(cfg.model)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    processor = AutoProcessor.from_pretrained(source)
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32, use_safetensors=True)
    if Path(source).is_dir():
        load_adapter(model, source)
    if cfg.temporal_adapter and cfg.stage == "visual":
        # a new one is the identity: the image model as it was
        attach_adapter(model, still_frames=cfg.still_frames, pixel_channels=cfg.pixel_branch)
    speed_up_vision(model)  # the same tower, batched where transformers loops (captioner.fast_vision)
    model = apply_freezing(model, cfg).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"stage {cfg.stage!r} leaves no trainable parameter in {source}")
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(0.9, cfg.adam_beta2),
                                  weight_decay=0.0)  # torch's default decay: 0.01
    start = 0
    if state:
        blob = torch.load(out / "optimizer.pt", weights_only=False)
        optimizer.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["torch_rng"])
        random.setstate(blob["python_rng"])
        start = state["step"]
    frozen_vision = cfg.stage == "language" and cfg.precompute_features
    positions = mrope_positions(model)
    if cfg.pack and positions is None:
        raise ValueError(f"--pack needs a model with M-RoPE positions (Qwen2-VL family); {type(model).__name__} "
                         "has none")
    examples, report = build_examples(cfg, processor, progress=progress,
                                      features=frozen_features(model, device) if frozen_vision else None,
                                      positions=positions, frame_repeat=frame_repeat(model))
    report["visual_features"] = "precomputed" if frozen_vision else "per step"
    if not examples:
        raise ValueError(f"no training example in {cfg.shards} for stage {cfg.stage!r}: {report}")
    if cfg.vision_parts == ("adapter",) and any(e.media == "image" for e in examples):
        raise ValueError(f"{cfg.shards} holds still frames, which the visual stage trains through the tower and "
                         "merger; --train-vision adapter freezes both (the adapter sees only video): leave the "
                         "frames out of --shards, or train the merger or tower too")
    pad_id = processor.tokenizer.pad_token_id
    batch_for = batch_plan(examples, cfg)

    metrics_path = out / "metrics.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    t0, last_loss = time.perf_counter(), float("nan")
    window: dict[str, list[float]] = {}  # per input kind, the losses of the batches since the last metrics line
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.stage}", unit="step", disable=not progress)
    for step in range(start, cfg.steps):
        for g in optimizer.param_groups:
            g["lr"] = _lr_at(step, cfg) * g.get("lr_scale", 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            kind, batch = batch_for(step, micro)
            inputs = _to(collate(batch, pad_id), device)
            loss = answer_loss(model, inputs) / cfg.grad_accum
            loss.backward()
            value = loss.item()
            loss_sum += value
            window.setdefault(kind, []).append(value * cfg.grad_accum)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        last_loss = loss_sum
        elapsed = time.perf_counter() - t0
        bar.set_postfix(loss=f"{last_loss:.3f}", steps_per_s=f"{(step + 1 - start) / elapsed:.2f}")
        bar.update(1)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            with open(metrics_path, "a") as f:
                by_kind = {k: round(sum(v) / len(v), 5) for k, v in window.items()}  # batches since the last line
                f.write(json.dumps({"stage": cfg.stage, "step": step + 1, "loss": round(last_loss, 5),
                                    "loss_by_input": by_kind, "lr": _lr_at(step, cfg),
                                    "elapsed_s": round(elapsed, 2)}) + "\n")
            window = {}
        if cfg.stop_at and step + 1 == cfg.stop_at and step + 1 < cfg.steps:
            save_checkpoint(model, processor, optimizer, cfg, step + 1, out, report, source_id)
            bar.close()
            return {"step": step + 1, "loss": last_loss, "stopped": True, **report}
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(model, processor, optimizer, cfg, step + 1, out, report, source_id)
            if on_checkpoint:
                h0 = time.perf_counter()
                on_checkpoint(step + 1, out)
                t0 += time.perf_counter() - h0  # the hook's time is not training time
    bar.close()
    save_checkpoint(model, processor, optimizer, cfg, cfg.steps, out, report, source_id)
    if on_checkpoint:
        on_checkpoint(cfg.steps, out)
    return {"step": cfg.steps, "loss": last_loss, "seconds": round(time.perf_counter() - t0, 1), **report}
