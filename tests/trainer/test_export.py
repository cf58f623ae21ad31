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


def test_export_hf_command_from_a_run_directory(tmp_path):
    from click.testing import CliRunner

    from trainer import checkpoint as ck
    from trainer.cli import main

    cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, vocab_size=70, max_seq_len=32, mlp_hidden=64)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    w = ck.CheckpointWriter(tmp_path / "run", 5)
    w.write_model(model.state_dict())
    w.commit({"model_config": cfg.to_dict(), "train_config": {}, "scheduler": {"kind": "warmup_cosine", "step": 5},
              "loader_state": None, "world_size": 1,
              "specials": {"bos_video": 66, "bos_image": 67, "eos": 68, "pad": 69}})
    r = CliRunner().invoke(main, ["export-hf", str(tmp_path / "run"), str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (conf["bos_token_id"], conf["eos_token_id"], conf["pad_token_id"]) == (66, 68, 69)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    x = torch.randint(0, 70, (1, 32))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() < 1e-4
