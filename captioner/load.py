"""`load_captioner`: a checkpoint (local directory or hub id) behind the `Captioner` interface."""

from __future__ import annotations

from pathlib import Path

from captioner.interface import Captioner


def load_captioner(model: str, backend: str = "hf", dtype: str = "auto", device: str = "auto",
                   revision: str | None = None, trust_remote_code: bool = False, **backend_kwargs) -> Captioner:
    """Loads an image-text-to-text model for captioning.

    Args:
        model: a local checkpoint directory (e.g. from `captioner tiny` or `captioner adapt`) or a hub id
            (fetched only where a hub is reachable; set HF_HUB_OFFLINE=1 to forbid it).
        backend: 'hf' (transformers, any device) or 'vllm' (GPU, needs the `gpu` extra).
        dtype: 'auto' (bf16 on GPU, fp32 on CPU), 'float32', 'bfloat16' or 'float16'.
        device: 'auto', 'cpu', 'cuda', 'cuda:1', ... (hf only; vLLM places the model itself).
        revision: a hub revision (recorded in provenance).
        trust_remote_code: off unless asked: remote code runs arbitrary Python.

    Raises:
        ValueError: unknown backend.
        FileNotFoundError: ``model`` is a path (``./x``, ``/x``, ``~/x``, or more than one ``/``, which no hub
            id has) and no directory is there.
        ImportError: vllm selected but not installed (names the extra).
    """
    path = Path(model).expanduser()
    if not path.is_dir() and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        raise FileNotFoundError(f"{model}: no checkpoint directory there (and a hub id is 'name' or 'org/name')")
    if backend == "hf":
        from captioner.backend_hf import HFCaptioner

        return HFCaptioner(model, dtype=dtype, device=device, revision=revision, trust_remote_code=trust_remote_code,
                           **backend_kwargs)
    if backend == "vllm":
        from captioner.backend_vllm import VLLMCaptioner

        return VLLMCaptioner(model, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code,
                             **backend_kwargs)
    raise ValueError(f"unknown captioner backend {backend!r}; valid: hf, vllm")
