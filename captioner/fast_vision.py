"""Faster Qwen2-VL / Qwen2.5-VL vision towers where flash attention is not in use (CPU, sdpa, eager).

Two things in transformers' vision tower cost far more than their arithmetic on such a device:

- the patch embedding is a ``Conv3d`` whose kernel equals its stride and its input (one patch of
  ``channels x temporal_patch x patch x patch`` pixels): a matrix product, which the
  convolution path runs several times slower (forward and backward);
- without flash attention, the attention runs once per slice (``cu_seqlens``: a temporal slice of
  a video, an image, a Qwen2.5-VL window) in a Python loop: a batch of 16 eight-frame clips makes
  64 small calls per layer, forward and backward.

`speed_up_vision(model)` gives the patch embedding a matrix-product forward (the same weights and
the same sum, up to float rounding) and the attention one batched call where all
slices of a forward pass have the same length (the toy world's clips and frames, and real videos
of one size); slices of different lengths still go one by one, as transformers runs them. The
parameters, their names and the checkpoint on disk are unchanged. The temporal adapter
(`captioner.adapter`) batches its clips the same way on its own.

Measured in bench/results/vision_step.json (``python bench/vision_step.py``).
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

PATCH_EMBEDS = ("PatchEmbed", "Qwen2_5_VisionPatchEmbed")
VISION_ATTENTIONS = ("VisionAttention", "Qwen2_5_VLVisionAttention")


def _patch_embed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """The Conv3d patch embedding as the matrix product it is (kernel = stride = the patch)."""
    weight = self.proj.weight
    x = hidden_states.to(weight.dtype).reshape(-1, weight[0].numel())
    out = F.linear(x, weight.reshape(weight.shape[0], -1), self.proj.bias)
    return out.view(-1, self.embed_dim)


def _batched_attention_forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                               position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                               max_seqlen: int | None = None, **kwargs) -> torch.Tensor:
    """Vision attention within each slice of ``cu_seqlens``, all slices in one call when they have one length."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if (self.training and self.attention_dropout) or position_embeddings is None or len(lengths) < 2 or \
            bool((lengths != lengths[0]).any()):
        return type(self).forward(self, hidden_states, cu_seqlens, position_embeddings=position_embeddings,
                                  max_seqlen=max_seqlen, **kwargs)
    rotary = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision
    n, heads = hidden_states.shape[0], self.num_heads
    q, k, v = self.qkv(hidden_states).reshape(n, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = rotary(q, k, *position_embeddings)
    slices, length = len(lengths), int(lengths[0])
    # [tokens, heads, dim] -> [slices, heads, length, dim]: each slice attends within itself
    q, k, v = (t.reshape(slices, length, heads, -1).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
    return self.proj(out.transpose(1, 2).reshape(n, -1))


# bound to a module, a function pickles as getattr(module, its name): named 'forward', an unpickled model gets
# transformers' own forward back (the same results) instead of failing to load
_patch_embed_forward.__name__ = _batched_attention_forward.__name__ = "forward"


def _uses_flash_attention(module: nn.Module) -> bool:
    impl = getattr(getattr(module, "config", None), "_attn_implementation", None) or ""
    return "flash" in impl


def speed_up_vision(model) -> int:
    """Gives ``model``'s vision tower the faster forwards above (in place); returns how many modules changed.

    A no-op for a model without a Qwen2-VL-style tower and for attention that is flash attention (which already
    takes all slices in one call). Idempotent.
    """
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    visual = getattr(getattr(core, "model", core), "visual", None)
    if visual is None:
        return 0
    changed = 0
    for module in visual.modules():
        name = type(module).__name__
        if "forward" in module.__dict__:
            continue  # already sped up (or given a forward by someone else: left as it is)
        proj = getattr(module, "proj", None)
        if name in PATCH_EMBEDS and isinstance(proj, nn.Conv3d) and tuple(proj.kernel_size) == tuple(proj.stride) \
                and not any(proj.padding):
            module.forward = types.MethodType(_patch_embed_forward, module)
            changed += 1
        elif name in VISION_ATTENTIONS and hasattr(module, "qkv") and not _uses_flash_attention(module):
            module.forward = types.MethodType(_batched_attention_forward, module)
            changed += 1
    return changed
