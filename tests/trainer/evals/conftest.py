"""A stand-in backbone with the `trainer.model.Transformer` feature API, for tests that must not
depend on training a real model: `features(tokens, layers)` returns (B, T, D) per 1-based layer."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn


class ToyBackbone(nn.Module):
    """Layer l's feature = embedding of the token, scaled by l, plus l-dependent noise."""

    def __init__(self, vocab: int = 40, dim: int = 8, n_layers: int = 4, max_seq_len: int = 200) -> None:
        super().__init__()
        self.cfg = types.SimpleNamespace(n_layers=n_layers, dim=dim, max_seq_len=max_seq_len, vocab_size=vocab)
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Parameter(torch.randn(vocab, dim, generator=g))
        self.head = nn.Linear(dim, vocab)

    def features(self, tokens: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        e = self.emb[tokens]  # (B, T, D)
        return [e * layer + 0.01 * layer for layer in layers]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb[tokens])  # (B, T, V)


@pytest.fixture
def toy_backbone() -> ToyBackbone:
    return ToyBackbone()
