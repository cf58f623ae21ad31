"""Trainer outputs on an object store (s3:// through fsspec) against a real S3 API server (moto)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import fsspec
import pytest
import torch

from trainer import checkpoint as ck
from trainer.config import load_config
from trainer.train import train

sys.path.insert(0, str(Path(__file__).parent))
from trainer_fakes import factory  # noqa: E402

QUIET = ["progress=false", "tensorboard=false"]


@pytest.fixture
def s3_run(s3_server, request):
    so = s3_server["storage_options"]
    url = f"s3://{s3_server['bucket']}/runs/{request.node.name}"
    return url, so, fsspec.filesystem("s3", **so)


def _losses(fs, url: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, fs.cat_file(f"{url}/metrics.jsonl").decode().splitlines())}


def test_run_checkpoints_and_logs_on_s3_resume_and_match_a_local_run(s3_run, tmp_path, monkeypatch, s3_server):
    url, so, fs = s3_run
    monkeypatch.chdir(tmp_path)  # a URL mistaken for a path would create ./s3: here
    common = QUIET + ["global_batch=2", "micro_batch=2", "ckpt_every=2", "val_every=2", "lr=3e-3"]
    local = tmp_path / "local"
    train(load_config("tiny", common + ["max_steps=6"]), "fake", local, loader_factory=factory())
    # Remote: leave after 3 steps (checkpoint at 3), then the same call continues to 6.
    first = train(load_config("tiny", common + ["max_steps=6", "exit_after_steps=3"]), "fake", url,
                  loader_factory=factory(), storage_options=so)
    assert first["step"] == 3
    # A save killed before its commit leaves a prefix without meta.json: ignored, then cleaned.
    fs.pipe_file(f"{url}/step-00000005/model.safetensors", b"partial")
    with pytest.warns(UserWarning, match="incomplete checkpoint"):
        assert ck.latest_checkpoint(url, so) == f"{url}/step-00000003"
    out = train(load_config("tiny", common + ["max_steps=6"]), "fake", url, loader_factory=factory(),
                storage_options=so)
    assert out["resumed_from"] == 3 and out["step"] == 6
    assert not (tmp_path / "s3:").exists() and not any(p.name.startswith("s3") for p in tmp_path.iterdir())
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(url, detail=False))
    assert names == ["config.json", "metrics.jsonl", "position_loss", "step-00000004", "step-00000006",
                     "val.jsonl"]  # keep_last=2 pruned steps 2 and 3 remotely; debris removed
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{url}/step-00000006", detail=False)) == [
        "meta.json", "model.safetensors", "optimizer.pt", "rng-rank00000.pt"]
    # Bit-exact: the interrupted remote run equals the uninterrupted local one.
    want = {r["step"]: r["loss"] for r in map(json.loads, (local / "metrics.jsonl").read_text().splitlines())}
    assert _losses(fs, url) == want
    assert [json.loads(x)["step"] for x in fs.cat_file(f"{url}/val.jsonl").decode().splitlines()] == [2, 4, 6]
    assert fs.exists(f"{url}/position_loss/step-00000006.png")
    ml, _ = ck.load_model(local)
    mr, meta = ck.load_model(url, storage_options=so)
    assert meta["step"] == 6 and meta["step_dir"] == f"{url}/step-00000006"
    for k, v in ml.state_dict().items():
        assert torch.equal(v, mr.state_dict()[k]), k
    # No credential reaches what the run wrote.
    for path in fs.find(url):
        if path.endswith((".json", ".jsonl")):
            text = fs.cat_file(path).decode()
            assert s3_server["secret_key"] not in text and s3_server["access_key"] not in text


def test_sharded_checkpoint_round_trip_on_s3(s3_run):
    url, so, fs = s3_run
    torch.manual_seed(0)
    from trainer.model import ModelConfig, Transformer

    m = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, vocab_size=50, max_seq_len=16, mlp_hidden=48))
    w = ck.CheckpointWriter(url, 7, storage_options=so)
    w.write_sharded({"model": m.state_dict()})  # one process: DCP writes every tensor through fsspec
    w.write_rng(0, ck.capture_rng())
    w.commit({"state_format": "dcp", "model_config": m.cfg.to_dict(), "train_config": {}, "world_size": 1,
              "scheduler": {"kind": "warmup_cosine", "step": 7}, "loader_state": None})
    assert fs.exists(f"{url}/step-00000007/dcp/.metadata")
    loaded, meta = ck.load_model(url, storage_options=so)
    assert meta["state_format"] == "dcp"
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # Re-saving the same step un-commits the old one first.
    ck.CheckpointWriter(url, 7, storage_options=so)
    assert not fs.exists(f"{url}/step-00000007") and ck.latest_checkpoint(url, so) is None


def test_unknown_protocol_is_refused_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="unknown storage protocol 'nosuchfs'.*s3://bucket"):
        train(load_config("tiny", QUIET + ["max_steps=2"]), "fake", "nosuchfs://b/run", loader_factory=factory())
    assert os.listdir(tmp_path) == []
