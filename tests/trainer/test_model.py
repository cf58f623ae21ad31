"""The model's contract: shapes, hidden states, KV cache, config validation, μP, FLOPs."""

from __future__ import annotations

import pytest
import torch

from trainer.model import (
    PRESETS,
    KVCache,
    ModelConfig,
    Transformer,
    count_params,
    flops_per_token,
    param_groups,
)


def small(**kw) -> ModelConfig:
    base = dict(dim=32, n_layers=3, n_heads=4, vocab_size=50, max_seq_len=40, mlp_hidden=64)
    base.update(kw)
    return ModelConfig(**base)


def test_forward_shapes_and_hidden_states_match_features():
    torch.manual_seed(0)
    m = Transformer(small()).eval()
    x = torch.randint(0, 50, (2, 17))
    logits, hidden = m(x, return_hidden=[1, 3])
    assert logits.shape == (2, 17, 50)
    assert [h.shape for h in hidden] == [(2, 17, 32), (2, 17, 32)]
    feats = m.features(x, layers=[3, 1])
    torch.testing.assert_close(feats[0], hidden[1], rtol=0, atol=0)
    torch.testing.assert_close(feats[1], hidden[0], rtol=0, atol=0)
    torch.testing.assert_close(m(x), logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="blocks are numbered 1..3"):
        m.features(x, layers=[4])


def test_causality_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    m = Transformer(small()).eval()
    x = torch.randint(0, 50, (1, 20))
    y = x.clone()
    y[0, 12:] = (y[0, 12:] + 7) % 50
    torch.testing.assert_close(m(x)[:, :12], m(y)[:, :12], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kv", [None, 2])
def test_kv_cache_matches_full_forward(kv):
    torch.manual_seed(0)
    cfg = small(n_kv_heads=kv)
    m = Transformer(cfg).eval()
    x = torch.randint(0, 50, (2, 30))
    with torch.no_grad():
        full = m(x)
        cache = KVCache(cfg, 2, 40, "cpu")
        parts = [m(x[:, :11], cache=cache)] + [m(x[:, t : t + 1], cache=cache) for t in range(11, 25)]
        parts.append(m(x[:, 25:], cache=cache))  # a multi-token chunk on top of a filled cache
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)


def test_config_validation_names_field_and_fix():
    with pytest.raises(ValueError, match=r"ModelConfig.n_heads=5 .*divisible"):
        ModelConfig(dim=64, n_layers=2, n_heads=5, vocab_size=10, max_seq_len=8)
    with pytest.raises(ValueError, match=r"ModelConfig.dim=0 .*positive integer"):
        ModelConfig(dim=0, n_layers=2, n_heads=1, vocab_size=10, max_seq_len=8)
    with pytest.raises(ValueError, match=r"ModelConfig.n_kv_heads=3 .*divisor"):
        ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=3, vocab_size=10, max_seq_len=8)


def test_presets_match_the_paper():
    assert (PRESETS["base"].dim, PRESETS["base"].n_heads, PRESETS["base"].n_layers) == (768, 12, 12)
    assert PRESETS["base"].ffn_dim == 4 * 768
    assert (PRESETS["large"].dim, PRESETS["large"].n_heads, PRESETS["large"].n_layers) == (1024, 16, 16)
    assert (PRESETS["1b"].dim, PRESETS["1b"].n_layers, PRESETS["1b"].mlp_hidden) == (2048, 22, 5504)
    # ~120M / ~280M / ~1.1B as in the paper (embeddings included, 8196-token vocabulary).
    assert 115e6 < count_params(PRESETS["base"]) < 130e6
    assert 270e6 < count_params(PRESETS["large"]) < 295e6
    assert 1.05e9 < count_params(PRESETS["1b"]) < 1.2e9
    m = Transformer(small())
    assert m.num_params() == count_params(m.cfg)


def test_flops_per_token_formula():
    cfg = small()
    n = count_params(cfg, include_embedding=False)
    assert flops_per_token(cfg, 40) == 6 * n + 12 * 3 * 32 * 40


def test_param_groups_decay_and_mup_lr_scale():
    m = Transformer(small(dim=64, mup_base_dim=32))
    groups = {g["name"]: g for g in param_groups(m, lr=1e-3, weight_decay=0.1)}
    assert groups["hidden"]["lr"] == pytest.approx(5e-4)  # width_mult 2 -> hidden lr halved
    assert groups["no_decay"]["weight_decay"] == 0.0
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    assert id(m.tok_embeddings.weight) in no_decay and id(m.norm.weight) in no_decay
    assert id(m.output.weight) not in no_decay
    assert m.output_mult == 0.5
    n = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n == m.num_params() + (m.cfg.padded_vocab_size - m.cfg.vocab_size) * m.cfg.dim  # + head padding


def test_mup_at_base_width_equals_standard_parameterisation():
    torch.manual_seed(0)
    a = Transformer(small(dim=32)).eval()
    b = Transformer(small(dim=32, mup_base_dim=32)).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 50, (1, 9))
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=1e-6)


def test_lm_head_is_padded_to_a_multiple_of_64_and_padding_is_never_predicted():
    cfg = small()  # vocab 50 -> 64 head rows
    assert cfg.padded_vocab_size == 64 and ModelConfig(vocab_size=8196).padded_vocab_size == 8256
    torch.manual_seed(0)
    m = Transformer(cfg)
    assert tuple(m.output.weight.shape) == (64, cfg.dim)
    assert m.output.weight[50:].abs().sum() == 0  # padding rows start (and stay) at zero
    x = torch.randint(0, 50, (2, 9))
    logits = m(x)
    assert logits.shape == (2, 9, 50)  # the padding columns never reach a loss or a sampler
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
    assert m.output.weight.grad[50:].abs().sum() == 0 and m.output.weight.grad[:50].abs().sum() > 0
