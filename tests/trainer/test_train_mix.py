"""End to end through the real loader: token shards (pipeline.shards) -> mix -> MixLoader -> pretrain."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pipeline.mix import MixConfig, build_mix
from pipeline.mix.synthetic import write_positional_dataset
from trainer import checkpoint as ck
from trainer.cli import main


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    vid, img = str(root / "k600"), str(root / "imagenet")
    write_positional_dataset(vid, [{"frames": 120, "label": "a"}, {"frames": 70, "label": "b"},
                                   {"frames": 64, "split": "val", "label": "c"}],
                             dataset="k600", chunk_frames=32, rows_per_shard=2)
    write_positional_dataset(img, [{"frames": 1, "label": f"c{i % 3}", "number": i} for i in range(24)],
                             dataset="imagenet", rows_per_shard=10)
    cfg = MixConfig(ratios={"k600": "0.6", "imagenet": "0.4"}, inputs={"k600": vid, "imagenet": img},
                    frames=4, stride=2, images_per_seq=4, seed=0)
    out = str(root / "mix.json")
    build_mix(cfg, out, progress=False)
    return out


def _pretrain(mix, out, *overrides):
    args = ["pretrain", "--config", "tiny", "--data", mix, "--out", str(out), "progress=false", "tensorboard=false",
            "global_batch=4", "micro_batch=2", "lr=3e-3", "warmup_steps=1", "val_every=3", "ckpt_every=3",
            *overrides]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output


def _losses(run):
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_on_a_real_mix_resumes_exactly(mix, tmp_path):
    _pretrain(mix, tmp_path / "full", "max_steps=6")
    full = _losses(tmp_path / "full")
    assert len(full) == 6 and full[-1] < full[0]
    model, meta = ck.load_model(tmp_path / "full")
    # vocabulary and context come from the mix: 512 codes + 4 specials, 4 frames x 2x2 tokens.
    assert model.cfg.vocab_size == 516 and model.cfg.max_seq_len == 16
    assert meta["grid"] == [2, 2] and meta["stride"] == 2 and meta["frames"] == 4
    assert meta["tokenizer"]["id"] == "synthetic-positions" and meta["specials"]["bos_video"] == 512
    assert meta["loader_state"]["consumed_samples"] == 24
    val = [json.loads(x) for x in (tmp_path / "full" / "val.jsonl").read_text().splitlines()]
    assert [v["step"] for v in val] == [3, 6] and all(v["val_loss"] > 0 for v in val)
    pos = json.loads((tmp_path / "full" / "position_loss" / "step-00000006.json").read_text())
    assert pos["seq_len"] == 16 and len(pos["frame_loss"]) == 4

    # The same run left after 2 steps (exit_after_steps) and restarted gives identical losses.
    _pretrain(mix, tmp_path / "split", "max_steps=6", "exit_after_steps=2")
    assert [p.name for p in ck.list_checkpoints(tmp_path / "split")] == ["step-00000002"]
    _pretrain(mix, tmp_path / "split", "max_steps=6")
    assert _losses(tmp_path / "split") == full


def test_missing_validation_split_fails_before_training(mix, tmp_path):
    r = CliRunner().invoke(main, ["pretrain", "--data", mix, "--out", str(tmp_path), "progress=false",
                                  "val_every=2", "val_split=holdout", "global_batch=2", "micro_batch=2"])
    assert r.exit_code != 0
    assert "validation needs split 'holdout'" in str(r.exception) and "val_every=0" in str(r.exception)
    assert not list(tmp_path.glob("step-*"))
