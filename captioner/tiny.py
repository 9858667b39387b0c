"""Tiny Qwen2-VL checkpoints of the real classes, built offline from a config and a BPE tokenizer.

    captioner tiny --out tiny/ --vocab-from 'toy/pretrain-*.tar' --layers 2 --width 64

The result is saved with `save_pretrained` (safetensors), so `load_captioner(DIR)`,
`AutoProcessor` and `AutoModelForImageTextToText` load it exactly like a real
checkpoint. Tests and the toy world use it; speed and memory scale like the
real architecture because the code paths are the same.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
"""The only special tokens Qwen2-VL needs; their ids are written into the model config."""

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen2-VL's chat layout without its default system prompt (the tiny model never needs one)."""

TINY_CONFIGS: dict[str, dict] = {
    # name -> overrides; architectures are data (STYLE.md 2)
    "qwen2-vl-tiny": {"layers": 2, "width": 64, "heads": 4, "kv_heads": 2, "vision_layers": 2, "vision_width": 64},
    # one more language-model layer, the vision tower as in qwen2-vl-tiny: a language-stage step costs about 1.3x
    "qwen2-vl-tiny-l3": {"layers": 3, "width": 64, "heads": 4, "kv_heads": 2, "vision_layers": 2, "vision_width": 64},
    # a vision tower 1.5x as wide (96; the language model and the merger's output as in qwen2-vl-tiny), room to hold
    # position and orientation in the visual tokens. Measured on the full preset: no more reliable than the default
    # (bench/CAPTIONER_TOY.md)
    "qwen2-vl-tiny-v96": {"layers": 2, "width": 64, "heads": 4, "kv_heads": 2, "vision_layers": 2, "vision_width": 96},
    "qwen2-vl-small": {"layers": 4, "width": 128, "heads": 4, "kv_heads": 2, "vision_layers": 2,
                       "vision_width": 96},
    # 7-px patches: 4x the visual tokens of a frame, about 2x the training time; the base model names the
    # shape of unseen toy frames 0.83 of the time against 0.76 with 14-px patches (4000 image steps)
    "qwen2-vl-tiny-p7": {"layers": 2, "width": 64, "heads": 4, "kv_heads": 2, "vision_layers": 2,
                         "vision_width": 64, "patch": 7},
    # M-RoPE that turns for a 4x4 grid of merged tokens: at rope_theta 1e4 with sections [4, 2, 2] of 8 frequency
    # pairs, rows and columns get the two lowest pairs each (<= 0.01 rad per position), so the language model can
    # hardly tell where a visual token sits; theta 10 with [2, 3, 3] turns 0.13-0.56 rad per row or column.
    # Measured: worse on the quick preset, its base reading shapes less (README, Benchmarks)
    "qwen2-vl-tiny-rope": {"layers": 2, "width": 64, "heads": 4, "kv_heads": 2, "vision_layers": 2, "vision_width": 64,
                           "rope_theta": 10.0, "mrope_section": [2, 3, 3]},
}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 600):
    """A byte-level BPE tokenizer (the `tokenizers` library) with Qwen2-VL's special tokens.

    Returns:
        a `transformers.PreTrainedTokenizerFast` ready for `save_pretrained`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, padding_side="left", model_max_length=4096)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def toy_corpus(shards: str | None = None, limit: int = 20000) -> list[str]:
    """Text to train the tokenizer on: the shards' text members, or the toy world's own language."""
    texts: list[str] = []
    if shards:
        from engine.shards import ErrorCollector, read_json, read_samples, read_text

        for sample in read_samples(shards, handler=ErrorCollector()):
            for ext in ("txt", "gt.txt", "lm.txt", "alt.txt"):
                try:
                    t = read_text(sample, ext)
                except Exception:  # noqa: BLE001 - a bad member just does not contribute text
                    t = None
                if t:
                    texts.append(t)
            try:
                for qa in read_json(sample, "qa.json") or []:
                    texts += [qa["question"], qa["answer"]]
            except Exception:  # noqa: BLE001
                pass
            if len(texts) >= limit:
                break
    else:
        from engine.synth import SynthConfig, alt_text, instructions, sample_clip, static_caption

        import numpy as np

        for split in ("adapt", "pretrain"):
            cfg = SynthConfig(split=split, n=1, seed=12345)
            for i in range(300):
                clip = sample_clip(cfg, i)
                texts.append(clip.caption)
                if split == "adapt":
                    texts.append(alt_text(clip, np.random.default_rng(i)))
                    texts += [x for qa in instructions(clip) for x in (qa["question"], qa["answer"])]
                else:
                    texts.append(static_caption(clip))
    texts += ["Describe what happens in the video.", "Describe the image."]
    return texts


def build_tiny(out: str | Path, vocab_from: str | None = None, name: str = "qwen2-vl-tiny",
               layers: int | None = None, width: int | None = None, vocab_size: int = 600,
               image_size: int = 112, seed: int = 0) -> Path:
    """Builds and saves a tiny Qwen2-VL (random weights) with its tokenizer and processor.

    Args:
        out: output directory (a Hugging Face checkpoint directory).
        vocab_from: shard pattern whose text trains the tokenizer (default: the toy world's grammar).
        name: a key of `TINY_CONFIGS`.
        layers, width: override the language model's depth and width (the vision tower follows depth).
        vocab_size: BPE vocabulary size (special tokens included).
        image_size: the frame size the processor keeps as is (a multiple of 28).

    Returns:
        The output directory.
    """
    import torch
    from transformers import (
        Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    if name not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny config {name!r}; valid: {', '.join(TINY_CONFIGS)}")
    spec = dict(TINY_CONFIGS[name])
    patch = int(spec.get("patch", 14))
    if image_size % (2 * patch):
        raise ValueError(f"--image-size {image_size} must be a multiple of {2 * patch} (patch {patch}, merged 2x2)")
    if layers is not None:
        spec["layers"] = spec["vision_layers"] = layers
    if width is not None:
        spec["width"] = spec["vision_width"] = width
    if spec["width"] % spec["heads"] or (spec["width"] // spec["heads"]) % 8:
        raise ValueError(f"--width {spec['width']} must split into {spec['heads']} heads of a multiple of 8 dims")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(toy_corpus(vocab_from), vocab_size=vocab_size)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = spec["width"] // spec["heads"]
    half = head_dim // 2
    mrope = list(spec.get("mrope_section") or [half - 2 * (half // 3), half // 3, half // 3])  # temporal, h, w
    if sum(mrope) != half:
        raise ValueError(f"tiny config {name!r}: mrope_section {mrope} must sum to head_dim / 2 = {half}")
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=spec["width"], intermediate_size=spec["width"] * 4,
            num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
            num_key_value_heads=spec["kv_heads"], max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": float(spec.get("rope_theta", 1e4)),
                             "mrope_section": mrope},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=True),
        vision_config=dict(depth=spec["vision_layers"], embed_dim=spec["vision_width"],
                           hidden_size=spec["width"], num_heads=spec["heads"], mlp_ratio=2,
                           patch_size=patch, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=pixels, patch_size=patch)
    video_processor = Qwen2VLVideoProcessor(size={"shortest_edge": 56 * 56, "longest_edge": pixels}, patch_size=patch,
                                            do_sample_frames=False, cap_pixels_per_frame=False)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                                 chat_template=CHAT_TEMPLATE)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "pseudocap_tiny.json").write_text(json.dumps({"name": name, **spec, "vocab_size": len(tok),
                                                         "image_size": image_size, "seed": seed}, indent=2) + "\n")
    return out
