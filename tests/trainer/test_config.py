"""Run configs: presets, files, key=value overrides and validation messages naming field and fix."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from trainer.cli import main
from trainer.config import PRESETS, apply_overrides, config_to_dict, load_config


def test_presets_and_overrides():
    cfg = load_config("demo", ["lr=1e-3", "model.dim=128", "model.n_heads=4", "compile=true", "peak_flops=1e12",
                               "init_from=runs/a", "global_batch=8"])
    assert (cfg.lr, cfg.model.dim, cfg.model.n_heads, cfg.compile) == (1e-3, 128, 4, True)
    assert cfg.model.ffn_dim == 512  # the demo preset's explicit SwiGLU width is kept
    assert (cfg.peak_flops, cfg.init_from, cfg.global_batch) == (1e12, "runs/a", 8)
    assert PRESETS["demo"].model.dim == 160  # presets are not mutated
    base = load_config("base", ["model.dim=1024", "model.n_heads=16"])
    assert base.model.ffn_dim == 4096  # derived widths follow an overridden dim
    assert load_config("base-256").model.rope_theta == 50000.0
    assert load_config("tiny", ["peak_flops=none"]).peak_flops is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lr=-1"], r"TrainConfig.lr=-1.0 is invalid: use a positive learning rate"),
        (["keep_last=1"], r"TrainConfig.keep_last=1 is invalid: keep at least 2"),
        (["dtype=fp16"], r"TrainConfig.dtype='fp16' is invalid: choose one of"),
        (["parallel=zero3"], r"TrainConfig.parallel='zero3' is invalid: choose one of \('ddp', 'fsdp'\)"),
        (["max_steps=abc"], r"TrainConfig.max_steps='abc' is invalid: expected int"),
        (["warmup_steps=50"], r"TrainConfig.warmup_steps=50 is invalid: must not exceed max_steps=20"),
        (["model.n_heads=7"], r"ModelConfig.n_heads=7 is invalid: dim=64 must be divisible"),
        (["lrr=1"], r"unknown override 'lrr'; did you mean lr\?"),
        (["model.dimm=3"], r"unknown override 'model.dimm'; did you mean model.dim\?"),
        (["lr"], r"not key=value"),
        (["beta2=1.5"], r"TrainConfig.beta2=1.5 is invalid: use a value in \[0, 1\)"),
    ],
)
def test_validation_messages(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config("tiny", overrides)


def test_unknown_preset_suggests_and_file_configs(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config preset 'basee' \(did you mean 'base'\?\)"):
        load_config("basee")
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"preset": "demo", "lr": 5e-4, "model": {"n_layers": 3}}))
    cfg = load_config(str(f), ["max_steps=7", "warmup_steps=1"])
    assert (cfg.name, cfg.lr, cfg.model.n_layers, cfg.model.dim, cfg.max_steps) == ("demo", 5e-4, 3, 160, 7)
    y = tmp_path / "run.yaml"
    y.write_text("preset: tiny\nmicro_batch: 3\n")
    assert load_config(str(y)).micro_batch == 3
    # A config round-trips through its dict form (what checkpoints store).
    from trainer.config import config_from_dict

    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert apply_overrides(cfg, []) == cfg


def test_cli_reports_bad_overrides_and_prints_config():
    r = CliRunner().invoke(main, ["pretrain", "--data", "x", "--out", "y", "--config", "tiny", "lr=-3"])
    assert r.exit_code == 2 and "TrainConfig.lr=-3.0 is invalid" in r.output
    r = CliRunner().invoke(main, ["pretrain", "--data", "x", "--out", "y", "--config", "demo", "--print-config",
                                  "--init-from", "runs/a", "max_steps=90"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["max_steps"] == 90 and doc["init_from"] == "runs/a" and doc["model"]["dim"] == 160
