"""Export parity: transformers' LlamaForCausalLM loads our export and gives the same logits."""

from __future__ import annotations

import json

import pytest
import torch

from trainer.export import export_hf
from trainer.model import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize(
    "extra",
    [dict(), dict(rope_theta=50000.0, n_kv_heads=2), dict(mup_base_dim=32)],
    ids=["plain", "gqa-rope50k", "mup"],
)
def test_export_logits_match_transformers(tmp_path, extra):
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=123, max_seq_len=96, mlp_hidden=160, **extra)
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    # Non-trivial norm weights so a swapped norm would show.
    with torch.no_grad():
        for p in ours.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    export_hf(ours, tmp_path, specials={"bos_video": 119, "bos_image": 120, "eos": 121, "pad": 122})
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["tie_word_embeddings"] is False and conf["vocab_size"] == 123
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = torch.randint(0, 123, (2, 80))
    with torch.no_grad():
        ref = hf(x).logits
        got = ours(x)
    assert (got - ref).abs().max().item() < 1e-4
