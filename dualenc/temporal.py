"""Temporal heads: frame embeddings [B, T, D] -> one video embedding [B, D].

    mean         CLIP4Clip's meanP: blind to frame order by construction.
    transformer  CLIP4Clip's seqTransf: frame position embeddings, a small transformer, residual to the frames.
    vidla        VidLA-style hierarchical temporal tokens (arXiv 2403.14870): learned tokens at several
                 temporal resolutions; each segment's tokens attend to the frames of their segment and to
                 every other token; the tokens are pooled (with the frames) into the video embedding.

Order can only enter through the position embeddings (and, for vidla, which segment a token reads): a
transformer without them, pooled over time, is as blind to order as the mean. So both learned heads
LayerNorm the frame stream before adding positions of the same unit scale, and LayerNorm what they add
back: whatever scale the image tower's features take, the order-dependent part stays commensurate with
the order-blind mean. (With raw tower features, norm ~8, and positions of std 0.02, reversing a clip
moved the video embedding by ~2e-4 of its norm, and training did not recover it.)
"""

from __future__ import annotations

import torch
from torch import nn


class MeanHead(nn.Module):
    def __init__(self, dim: int, **_: object):
        super().__init__()
        self.dim = dim

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return frames.mean(dim=1)


POS_STD = 1.0
"""Init std of position embeddings and data tokens: the scale of the LayerNorm'd frames they are added to."""


def _encoder(dim: int, layers: int, heads: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class TransformerHead(nn.Module):
    """seqTransf: ``mean_t LN(f_t) + mean_t LN_out(encoder(LN(f) + pos))_t``.

    CLIP4Clip L2-normalises frame features before the head; the LayerNorms do that job here, so that
    positions (init std `POS_STD`) are as large as the frames they tag and the transformer's output is
    as large as the residual it is added to.
    """

    def __init__(self, dim: int, layers: int = 2, heads: int = 4, max_frames: int = 64, **_: object):
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        self.pos = nn.Parameter(torch.zeros(max_frames, dim))
        nn.init.normal_(self.pos, std=POS_STD)
        self.encoder = _encoder(dim, layers, heads)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        t = frames.shape[1]
        if t > self.pos.shape[0]:
            raise ValueError(f"{t} frames exceed the head's max_frames {self.pos.shape[0]}")
        x = self.norm_in(frames)
        return x.mean(dim=1) + self.norm_out(self.encoder(x + self.pos[:t])).mean(dim=1)


class VidLAHead(nn.Module):
    """Hierarchical temporal data tokens at ``resolutions`` (segments per clip), ``tokens`` per segment."""

    def __init__(self, dim: int, layers: int = 2, heads: int = 4, resolutions: tuple[int, ...] = (1, 2, 4),
                 tokens: int = 1, max_frames: int = 64, **_: object):
        super().__init__()
        self.resolutions, self.tokens = tuple(resolutions), tokens
        n = sum(resolutions) * tokens
        self.data_tokens = nn.Parameter(torch.zeros(n, dim))
        self.pos = nn.Parameter(torch.zeros(max_frames, dim))
        nn.init.normal_(self.data_tokens, std=POS_STD)
        nn.init.normal_(self.pos, std=POS_STD)
        self.norm_in = nn.LayerNorm(dim)
        self.encoder = _encoder(dim, layers, heads)
        self.norm = nn.LayerNorm(dim)
        self._masks: dict[int, torch.Tensor] = {}

    def mask(self, t: int, device: torch.device) -> torch.Tensor:
        """Boolean [T + N, T + N]; True blocks attention. Frames see frames; segment tokens see their
        segment's frames and all tokens."""
        if t not in self._masks:
            n = self.data_tokens.shape[0]
            m = torch.zeros(t + n, t + n, dtype=torch.bool)
            m[:t, t:] = True  # frames do not read the tokens: the frame stream stays a plain temporal encoder
            row = t
            for r in self.resolutions:
                for s in range(r):
                    lo, hi = (s * t) // r, max((s * t) // r + 1, ((s + 1) * t) // r)
                    for _ in range(self.tokens):
                        m[row, :t] = True
                        m[row, lo:hi] = False
                        row += 1
            self._masks[t] = m
        return self._masks[t].to(device)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        b, t, _ = frames.shape
        if t > self.pos.shape[0]:
            raise ValueError(f"{t} frames exceed the head's max_frames {self.pos.shape[0]}")
        tokens = self.data_tokens.unsqueeze(0).expand(b, -1, -1)
        f = self.norm_in(frames)
        y = self.encoder(torch.cat([f + self.pos[:t], tokens], dim=1), mask=self.mask(t, frames.device))
        return f.mean(dim=1) + self.norm(y[:, t:]).mean(dim=1)


HEADS = {"mean": MeanHead, "transformer": TransformerHead, "vidla": VidLAHead}


def create_head(kind: str, dim: int, **kwargs) -> nn.Module:
    """A temporal head by name.

    Raises:
        ValueError: unknown kind, naming the valid ones.
    """
    if kind not in HEADS:
        raise ValueError(f"unknown temporal head {kind!r}; valid: {', '.join(HEADS)}")
    return HEADS[kind](dim, **kwargs)
