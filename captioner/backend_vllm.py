"""The `vllm` backend: offline `LLM.generate` with the frames as multi-modal data (GPU only).

vLLM is imported only when this backend is selected; without it, a clear error
names the `gpu` extra. Prompt building is the `hf` backend's (the model's own
chat template through its processor), and `parse_output` turns a vLLM
`RequestOutput` into a `CaptionResult`; both are unit-tested without vLLM.
"""

from __future__ import annotations

import time
from pathlib import Path

from captioner.backend_hf import render_prompt
from captioner.interface import Budgeted, CaptionResult, Captioner, processor_visual_tokens
from data_specs import GenerationParams
from data_specs.prompts import PromptTemplate

_FINISH = {"stop": "stop", "length": "length", "abort": "error"}


def import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise ImportError("the vllm backend needs vLLM on a CUDA machine: pip install 'pseudocap[gpu]' "
                          f"(vllm==0.32.0, matching torch 2.13) [{exc}]") from None
    return vllm


def build_request(processor, prompt: PromptTemplate, b: Budgeted) -> dict:
    """One vLLM prompt dict: the rendered chat text plus the frames as multi-modal data."""
    data = {"video": b.frames} if prompt.media == "video" else {"image": b.frames[0]}
    return {"prompt": render_prompt(processor, prompt), "multi_modal_data": data}


def sampling_kwargs(params: GenerationParams) -> dict:
    """`vllm.SamplingParams` arguments equivalent to the `hf` backend's generation parameters."""
    kw = {"max_tokens": params.max_new_tokens, "n": 1}
    if params.do_sample:
        kw.update(temperature=params.temperature, top_p=params.top_p, seed=params.seed)
    else:
        kw.update(temperature=0.0)
    if params.num_beams > 1:
        raise ValueError("beam search is not offered by the vllm backend here; use --backend hf")
    return kw


def parse_output(request_output, b: Budgeted, latency_s: float) -> CaptionResult:
    """A vLLM `RequestOutput` as a `CaptionResult` (text, token counts, finish reason)."""
    completion = request_output.outputs[0]
    finish = _FINISH.get(completion.finish_reason or "stop", "stop")
    return CaptionResult(
        key=b.clip.key, text=completion.text.strip(), input_tokens=len(request_output.prompt_token_ids or []),
        output_tokens=len(completion.token_ids), finish_reason=finish, latency_s=latency_s,
        frames_used=len(b.frames), budget_note=b.note, error="aborted: vLLM aborted the request" if finish == "error"
        else None)


class VLLMCaptioner(Captioner):
    backend = "vllm"

    def __init__(self, model: str, dtype: str = "auto", revision: str | None = None, trust_remote_code: bool = False,
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.9):
        super().__init__()
        from captioner.adapter import CONFIG_FILE

        if (Path(model) / CONFIG_FILE).exists():
            raise ValueError(f"{model} has a pseudocap temporal adapter ({CONFIG_FILE}), which vLLM's Qwen2-VL "
                             "does not run; caption it with --backend hf")
        vllm = import_vllm()
        from transformers import AutoProcessor

        self._vllm = vllm
        self.model_id, self.revision = str(model), revision
        self.processor = AutoProcessor.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
        self.llm = vllm.LLM(model=str(model), revision=revision, dtype=dtype, trust_remote_code=trust_remote_code,
                            max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                            limit_mm_per_prompt={"video": 1, "image": 1})
        self.context_length = int(self.llm.llm_engine.model_config.max_model_len)
        if Path(model).is_dir():
            self.weights_dir = Path(model)
        self._prompt_tokens: dict[str, int] = {}

    def visual_tokens(self, frames: int, height: int, width: int, media: str) -> int:
        return processor_visual_tokens(self.processor, frames, height, width, media)

    def check(self, prompt: PromptTemplate, params: GenerationParams) -> None:
        sampling_kwargs(params)  # raises for what vLLM cannot do here (beam search)

    def prompt_tokens(self, prompt: PromptTemplate) -> int:
        if prompt.id not in self._prompt_tokens:
            self._prompt_tokens[prompt.id] = len(self.processor.tokenizer(render_prompt(self.processor, prompt))
                                                 ["input_ids"])
        return self._prompt_tokens[prompt.id]

    def _generate(self, batch: list[Budgeted], prompt: PromptTemplate,
                  params: GenerationParams) -> list[CaptionResult]:
        t0 = time.perf_counter()
        outs = self.llm.generate([build_request(self.processor, prompt, b) for b in batch],
                                 self._vllm.SamplingParams(**sampling_kwargs(params)), use_tqdm=False)
        latency = (time.perf_counter() - t0) / len(batch)
        return [parse_output(o, b, latency) for o, b in zip(outs, batch)]
