"""trainer.evals.context: a checkpoint run past its trained context, each rule's record and formula."""

from __future__ import annotations

import pytest
import torch

from trainer.evals.context import (
    context_limit,
    fit_context,
    fit_probe_inputs,
    trained_context,
    trained_length,
)
from trainer.evals.features import extract_features
from trainer.model import ModelConfig, build_model, rope_cache

V = 40


def _model(arch: str, max_seq_len: int = 64):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, dim=32, n_layers=1, n_heads=2, vocab_size=V, max_seq_len=max_seq_len, mlp_hidden=64)
    return build_model(cfg).eval()


@torch.no_grad()
def test_llama_rope_rules_run_longer_sequences_and_factor_one_is_exact():
    model = _model("llama")
    x = torch.randint(0, V, (1, 64))
    ref = model(x)
    long = torch.randint(0, V, (1, 128))
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model(long[:, :65])
    for rule in ("rope_base", "rope_pi"):
        m, rec = fit_context(model, 64, rule)
        assert rec == {"rule": rule, "trained_len": 64, "eval_len": 64, "factor": 1.0, "base": 10000.0}
        assert torch.equal(m(x), ref)  # factor 1: the same rotary tables, bit for bit
        for n in (65, 128):  # the 4097-token case at a tiny context, and a 2x (CATER's 32 frames) case
            m, rec = fit_context(model, n, rule)
            out = m(long[:, :n])
            assert out.shape == (1, n, V) and torch.isfinite(out).all() and rec["factor"] == n / 64
    # NTK-aware base: theta' = theta * s^(d / (d - 2)), head width d = 16.
    _, rec = fit_context(model, 128, "rope_base")
    assert rec["base"] == pytest.approx(10000.0 * 2.0 ** (16 / 14))
    # Its lowest frequency is interpolated by exactly s = 2; the highest (neighbours) is unchanged.
    new_cos, _ = rope_cache(16, 128, rec["base"])
    old_cos, _ = rope_cache(16, 128, 10000.0)
    torch.testing.assert_close(new_cos[2 * 50, 7], old_cos[50, 7], atol=1e-4, rtol=0)
    assert new_cos[1, 0] == old_cos[1, 0]
    # Position interpolation: position 2t is rotated as t was in training.
    m, rec = fit_context(model, 128, "rope_pi")
    torch.testing.assert_close(m.rope_cos[2 * 31], old_cos[31])
    assert m.cfg.max_seq_len == 128 and trained_length(m) == 64
    # A sequence that fits under auto restores the trained model exactly.
    m, rec = fit_context(model, 64, "auto")
    assert rec["rule"] == "none" and torch.equal(m(x), ref) and m.cfg.max_seq_len == 64
    _, rec = fit_context(model, 65, "auto")
    assert rec["rule"] == "rope_base"


@torch.no_grad()
def test_trained_context_restores_the_model_on_leaving_even_after_an_error():
    model = _model("llama")
    x = torch.randint(0, V, (1, 64))
    ref = model(x)
    with trained_context(model):
        fit_context(model, 128, "rope_base")
        assert model.cfg.max_seq_len == 128
    assert model.cfg.max_seq_len == 64 and torch.equal(model(x), ref)
    with pytest.raises(RuntimeError, match="boom"), trained_context(model):
        fit_context(model, 128, "rope_pi")
        raise RuntimeError("boom")
    assert model.cfg.max_seq_len == 64 and torch.equal(model(x), ref)


def test_none_and_drop_bos_refuse_what_does_not_fit():
    model = _model("llama")
    assert context_limit(model, "none") == 64 and context_limit(model, "drop_bos") == 65
    with pytest.raises(ValueError, match="--context auto"):
        fit_context(model, 65, "none")
    _, rec = fit_context(model, 64, "drop_bos")
    assert rec == {"rule": "drop_bos", "trained_len": 64, "eval_len": 64, "bos": False}
    with pytest.raises(ValueError, match="bos dropped"):
        fit_context(model, 65, "drop_bos")
    with pytest.raises(ValueError, match="does not apply to llama"):
        fit_context(model, 65, "pos_interp")
    with pytest.raises(ValueError, match="unknown"):
        fit_context(model, 65, "yarn")


@torch.no_grad()
def test_gpt2_position_table_interpolated_frame_by_frame():
    # 16 frames of a 2x2 grid + bos = 65 learned positions; a 32-frame clip needs 129.
    model = _model("gpt2", max_seq_len=65)
    w = model.pos_embeddings.weight.detach().clone()
    x = torch.randint(0, V, (1, 65))
    ref = model(x)
    m, rec = fit_context(model, 65, "pos_interp", grid=(2, 2), trained_grid=(2, 2))
    assert rec["factor"] == 1.0 and torch.equal(m(x), ref)
    m, rec = fit_context(model, 129, "auto", grid=(2, 2), trained_grid=(2, 2))
    assert rec["rule"] == "pos_interp" and rec["frame_wise"] and m(torch.randint(0, V, (1, 129))).shape == (1, 129, V)
    new = m.pos_embeddings.weight
    assert torch.equal(new[:5], w[:5]) and torch.equal(new[-4:], w[-4:])  # bos, first and last frames kept
    # 16 -> 32 frames, ends aligned: new frame 2 sits at trained frame 2·15/31 = 30/31, between frames 0 and 1.
    frame = w[1:].reshape(16, 4, 32)
    torch.testing.assert_close(new[1 + 4 * 2 : 1 + 4 * 3], frame[0] / 31 + frame[1] * 30 / 31)
    # A finer eval grid (4x4): each frame's rows are resized bilinearly; 1-D without grids.
    m, rec = fit_context(model, 1 + 16 * 16, "pos_interp", grid=(4, 4), trained_grid=(2, 2))
    assert m.pos_embeddings.weight.shape == (257, 32) and rec["frame_wise"]
    m, rec = fit_context(model, 100, "pos_interp")
    assert not rec["frame_wise"] and torch.equal(m.pos_embeddings.weight[[0, -1]], w[[0, -1]])
    m, _ = fit_context(model, 10, "auto")
    assert m.pos_embeddings.weight is model.pos_embeddings.weight and torch.equal(m(x), ref)


@torch.no_grad()
def test_mamba_needs_no_positions():
    model = _model("mamba", max_seq_len=16)
    m, rec = fit_context(model, 32, "auto")
    assert rec == {"rule": "no_positions", "trained_len": 16, "eval_len": 32}
    assert m(torch.randint(0, V, (1, 32))).shape == (1, 32, V)
    with pytest.raises(ValueError, match="no positions"):
        fit_context(model, 32, "rope_pi")


@torch.no_grad()
def test_readme_frames_16_clip_runs_through_the_probe_path():
    # The README's `--frames 16` clip is 1 + 16·HW tokens; at a tiny 2x2 grid against a context of 64
    # (= 16·4) it is one token too long, as 4097 is for 4096.
    model = _model("llama")
    tokens = torch.cat([torch.full((3, 1), V - 1), torch.randint(0, V - 4, (3, 64))], dim=1)  # (3, 65)
    fi = torch.cat([torch.full((3, 1), -1), torch.arange(16).repeat_interleave(4).expand(3, 64)], dim=1)
    m, rec, (tok, f) = fit_probe_inputs(model, "auto", (tokens, fi))
    assert rec["rule"] == "rope_base" and rec["eval_len"] == 65 and tok.shape == (3, 65)
    feats = extract_features(m, tok, f, [1])[1]
    assert feats.shape == (3, 64, 32)
    m, rec, (tok, f) = fit_probe_inputs(model, "drop_bos", (tokens, fi))
    assert rec["bos"] is False and rec["eval_len"] == 64 and torch.equal(tok, tokens[:, 1:])  # 16·4 fits exactly
    assert extract_features(m, tok, f, [1])[1].shape == (3, 64, 32)
    # CATER's 32 frames: 1 + 32·HW, twice the context.
    tokens32 = torch.cat([torch.full((2, 1), V - 1), torch.randint(0, V - 4, (2, 128))], dim=1)
    fi32 = torch.cat([torch.full((2, 1), -1), torch.arange(32).repeat_interleave(4).expand(2, 128)], dim=1)
    m, rec, (tok, f) = fit_probe_inputs(model, "auto", (tokens32, fi32))
    assert rec["factor"] == 129 / 64 and extract_features(m, tok, f, [1])[1].shape == (2, 128, 32)
