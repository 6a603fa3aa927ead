"""A small GPT for byte-level language modelling, and its task on a real English corpus
that every Python install carries (issue 11's ``lm`` study builds on it).

The corpus is the Python documentation's topic texts in the standard library's
``pydoc_data.topics`` (79 topics, ~466 kB of English prose and code, no download), read
in sorted topic order and encoded as UTF-8 bytes (vocabulary 256). It is cut into
non-overlapping windows of ``T + 1`` bytes; a sample is one window: input its first
``T`` bytes, target its last ``T`` (next-byte prediction). The per-sample unit is the
sequence; the loss is the mean over the batch's ``B × T`` tokens, which for equal-length
sequences is the mean over sequences of their mean token loss (``reduction="mean"``,
DESIGN.md §1), so noise in tokens is the noise per sequence divided by ``T``.

The model: token and learned position embeddings, ``layers`` pre-norm
``nn.TransformerEncoderLayer`` blocks with a causal mask, a final LayerNorm and an output
layer tied to the token embedding (``F.linear(h, wte.weight)``) — the parts the engine is
tested on in the zoo (tied weights, attention with masks, LayerNorm, a parameter used
directly).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 256


def corpus_bytes() -> torch.Tensor:
    """The corpus as a 1-D ``uint8`` tensor ``[~466k]`` (module docstring)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def windows(data: torch.Tensor, length: int, limit: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows of ``length + 1`` bytes: ``(x, y)``, both ``[N, length]``
    int64, ``y`` shifted by one; at most ``limit`` windows when ``limit > 0``."""
    if length < 1:
        raise ValueError(f"the sequence length must be at least 1, got {length}")
    n = (len(data) - 1) // (length + 1)
    if limit > 0:
        n = min(n, limit)
    if n < 2:
        raise ValueError(f"the corpus of {len(data)} bytes holds fewer than 2 windows of {length + 1}")
    w = data[: n * (length + 1)].long().view(n, length + 1)
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class TinyGPT(nn.Module):
    """Decoder-only Transformer: ``[B, T]`` byte ids -> logits ``[B, T, 256]``."""

    def __init__(self, length: int, dim: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, dim)
        nn.init.normal_(self.wte.weight, std=0.02)  # GPT-2's scale: N(0, 1) rows would make the tied logits huge
        self.wpe = nn.Parameter(torch.randn(length, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        h = self.wte(idx) + self.wpe[:t]
        mask = self.mask[:t, :t]
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return F.linear(self.ln_f(h), self.wte.weight)  # tied output layer


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy over the batch's ``B × T`` tokens."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
