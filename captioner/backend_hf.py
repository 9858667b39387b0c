"""The `hf` backend: Hugging Face transformers, true batched `generate` with left padding, any device."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from captioner.adapter import frame_repeat, video_input
from captioner.interface import Budgeted, CaptionResult, Captioner, Clip, processor_visual_tokens
from data_specs import GenerationParams
from data_specs.prompts import PromptTemplate


def build_messages(prompt: PromptTemplate) -> list[dict]:
    """The chat for one clip: the media placeholder, then the instruction (shared by every backend)."""
    messages = [{"role": "system", "content": prompt.system}] if prompt.system else []
    messages.append({"role": "user", "content": [{"type": prompt.media}, {"type": "text", "text": prompt.text}]})
    return messages


def render_prompt(processor, prompt: PromptTemplate) -> str:
    """The prompt text with the model's own chat template and one media placeholder."""
    return processor.apply_chat_template(build_messages(prompt), add_generation_prompt=True, tokenize=False)


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; valid: auto, float32, bfloat16, float16") from None


class HFCaptioner(Captioner):
    """A transformers image-text-to-text model (Qwen2-VL / Qwen2.5-VL) behind the `Captioner` interface."""

    backend = "hf"

    def __init__(self, model: str, dtype: str = "auto", device: str = "auto", revision: str | None = None,
                 trust_remote_code: bool = False, model_obj=None, processor=None):
        super().__init__()
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.model_id, self.revision = str(model), revision
        self.processor = processor or AutoProcessor.from_pretrained(model, revision=revision,
                                                                    trust_remote_code=trust_remote_code)
        self.processor.tokenizer.padding_side = "left"  # generation continues the right end of every row
        self.model = model_obj or AutoModelForImageTextToText.from_pretrained(
            model, revision=revision, dtype=resolve_dtype(dtype, self.device), use_safetensors=True,
            trust_remote_code=trust_remote_code)
        if Path(model).is_dir():
            self.weights_dir = Path(model)
            if model_obj is None:
                from captioner.adapter import load_adapter

                load_adapter(self.model, model)  # pseudocap's temporal adapter, when the checkpoint has one
        from captioner.fast_vision import speed_up_vision

        speed_up_vision(self.model)  # the same tower, batched where transformers loops without flash attention
        self.model.to(self.device).eval()
        self.frame_repeat = frame_repeat(self.model)  # 2 where the checkpoint's adapter takes still frames
        text_cfg = getattr(self.model.config, "text_config", self.model.config)
        self.context_length = int(getattr(text_cfg, "max_position_embeddings", 4096))
        self.eos_ids = _as_set(self.model.generation_config.eos_token_id) | {self.processor.tokenizer.eos_token_id}
        self._prompt_tokens: dict[str, int] = {}

    def visual_tokens(self, frames: int, height: int, width: int, media: str) -> int:
        return processor_visual_tokens(self.processor, frames * (self.frame_repeat if media == "video" else 1),
                                       height, width, media)

    def prompt_tokens(self, prompt: PromptTemplate) -> int:
        if prompt.id not in self._prompt_tokens:
            self._prompt_tokens[prompt.id] = len(self.processor.tokenizer(render_prompt(self.processor, prompt))
                                                 ["input_ids"])
        return self._prompt_tokens[prompt.id]

    def inputs(self, batch: list[Budgeted], prompt: PromptTemplate):
        """Processor outputs for a batch (left-padded), on the model's device."""
        text = [render_prompt(self.processor, prompt)] * len(batch)
        media = ([video_input(b.frames, self.frame_repeat) for b in batch] if prompt.media == "video"
                 else [b.frames[0] for b in batch])
        kwargs = {"videos": media, "do_sample_frames": False} if prompt.media == "video" else {"images": media}
        enc = self.processor(text=text, padding=True, return_tensors="pt", **kwargs)
        return enc.to(self.device)

    @torch.inference_mode()
    def _generate(self, batch: list[Budgeted], prompt: PromptTemplate,
                  params: GenerationParams) -> list[CaptionResult]:
        t0 = time.perf_counter()
        enc = self.inputs(batch, prompt)
        gen = dict(max_new_tokens=params.max_new_tokens, num_beams=params.num_beams, do_sample=params.do_sample,
                   pad_token_id=self.processor.tokenizer.pad_token_id)
        if params.do_sample:
            gen.update(temperature=params.temperature, top_p=params.top_p)
            if params.seed is not None:
                torch.manual_seed(params.seed)
        out = self.model.generate(**enc, **gen)
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        latency = (time.perf_counter() - t0) / len(batch)
        mask = enc["attention_mask"]
        results = []
        for row, b, m in zip(new, batch, mask):
            n_out, finish = len(row), "length"
            for j, tok in enumerate(row):
                if tok in self.eos_ids:
                    n_out, finish = j + 1, "stop"
                    break
            text = self.processor.tokenizer.decode(row[:n_out], skip_special_tokens=True).strip()
            results.append(CaptionResult(b.clip.key, text, input_tokens=int(m.sum()), output_tokens=n_out,
                                         finish_reason=finish, latency_s=latency, frames_used=len(b.frames),
                                         budget_note=b.note))
        return results

    @torch.inference_mode()
    def log_likelihoods(self, clip: Clip, prompt: PromptTemplate, answers: list[str]) -> list[float]:
        """Summed log-probability of each answer (then the end-of-turn token) given the clip and the prompt.

        Forced-choice scoring: which of several captions the model finds likelier for the clip,
        whether or not it would generate any of them. All answers share one forward pass.
        """
        b = self.fit(clip, prompt, GenerationParams(max_new_tokens=max(8, max(len(a) for a in answers))))
        tok = self.processor.tokenizer
        media = video_input(b.frames, self.frame_repeat) if prompt.media == "video" else b.frames[0]
        kwargs = ({"videos": [media] * len(answers), "do_sample_frames": False} if prompt.media == "video"
                  else {"images": [media] * len(answers)})
        head = render_prompt(self.processor, prompt)
        tok.padding_side = "right"
        try:
            enc = self.processor(text=[head + a + "<|im_end|>" for a in answers], padding=True, return_tensors="pt",
                                 **kwargs).to(self.device)
        finally:
            tok.padding_side = "left"
        logp = torch.log_softmax(self.model(**enc).logits[:, :-1].float(), dim=-1)
        picked = logp.gather(-1, enc["input_ids"][:, 1:, None])[..., 0]  # [i, j]: log p(token j + 1)
        ends = enc["attention_mask"].sum(dim=1).tolist()  # right padding: each row's length
        out = []
        for i, a in enumerate(answers):  # the answer is the last n tokens of its row
            n = len(tok(a + "<|im_end|>", add_special_tokens=False)["input_ids"])
            out.append(float(picked[i, ends[i] - n - 1:ends[i] - 1].sum()))
        return out


def _as_set(x) -> set[int]:
    if x is None:
        return set()
    return set(x) if isinstance(x, (list, tuple, set)) else {int(x)}
