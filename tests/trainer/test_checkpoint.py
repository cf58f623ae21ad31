"""Checkpoint directories: atomic commit, retention, incomplete dirs ignored, load_model."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from trainer import checkpoint as ck
from trainer.model import ModelConfig, Transformer


def _save(run, step, model, extra=None):
    w = ck.CheckpointWriter(run, step)
    w.write_model(model.state_dict())
    w.write_optimizer({"state": {}, "param_groups": []})
    w.write_rng(0, ck.capture_rng())
    meta = {
        "model_config": model.cfg.to_dict(),
        "train_config": {"name": "t"},
        "scheduler": {"kind": "warmup_cosine", "step": step},
        "loader_state": {"version": 1, "mix_hash": "abc", "consumed_samples": step * 4},
        "world_size": 1,
        "specials": {"bov": 49},
        "tokenizer": {"id": "demo"},
    }
    meta.update(extra or {})
    return w.commit(meta)


def _model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, vocab_size=50, max_seq_len=16, mlp_hidden=48))


def test_commit_load_model_and_names(tmp_path):
    m = _model()
    path = _save(tmp_path, 1000, m)
    assert path.name == "step-00001000"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "optimizer.pt", "rng-rank00000.pt"]
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
    loaded, meta = ck.load_model(tmp_path)  # a run dir resolves to its newest checkpoint
    assert meta["step"] == 1000 and meta["specials"] == {"bov": 49} and meta["tokenizer"] == {"id": "demo"}
    assert meta["train_config"]["name"] == "t" and not loaded.training
    for k, v in m.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)


def test_retention_keeps_last_k(tmp_path):
    m = _model()
    for s in (10, 20, 30, 40):
        _save(tmp_path, s, m)
        ck.prune(tmp_path, keep=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-00000030", "step-00000040"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000030", "step-00000040"]
    with pytest.raises(ValueError, match="at least one"):
        ck.prune(tmp_path, keep=0)


def test_incomplete_directories_are_ignored(tmp_path):
    m = _model()
    _save(tmp_path, 10, m)
    # A newer step dir without the meta.json marker, and temp debris of a killed save.
    (tmp_path / "step-00000020").mkdir()
    (tmp_path / "step-00000020" / "model.safetensors").write_bytes(b"partial")
    tmp = ck.CheckpointWriter(tmp_path, 30)
    tmp.write_model(m.state_dict())
    with pytest.warns(UserWarning, match="incomplete checkpoint"):
        assert ck.latest_checkpoint(tmp_path).name == "step-00000010"
    assert [p.name for p in ck.clean_tmp(tmp_path)] == [".tmp-step-00000030"]
    with pytest.raises(ValueError, match="completion marker"):
        ck.read_meta(tmp_path / "step-00000020")


def test_meta_schema_is_enforced(tmp_path):
    m = _model()
    path = _save(tmp_path, 5, m)
    doc = json.loads((path / "meta.json").read_text())
    doc["version"] = 99
    (path / "meta.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError):
        ck.read_meta(path)


def test_rng_round_trip():
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    state = ck.capture_rng()
    a = (torch.rand(3), random.random(), np.random.rand())
    ck.restore_rng(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    torch.testing.assert_close(a[0], b[0])
    assert a[1:] == b[1:]
