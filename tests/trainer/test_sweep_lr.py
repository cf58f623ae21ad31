"""sweep-lr: the (width, lr) grid runs, each run's best validation loss is recorded and plotted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from trainer.cli import main
from trainer.sweep_lr import parse_lrs, run_sweep, sweep_configs

sys.path.insert(0, str(Path(__file__).parent))
from trainer_fakes import factory  # noqa: E402

TINY = ["progress=false", "tensorboard=false", "max_steps=3", "warmup_steps=1", "global_batch=2", "micro_batch=2",
        "ckpt_every=3", "val_batches=1", "position_loss=false", "model.mup_base_dim=32"]


def test_parse_lrs_ranges_and_lists():
    assert parse_lrs("2^-10..2^-5") == [2.0**e for e in range(-10, -4)]
    assert parse_lrs("2^-7, 1e-3") == [2.0**-7, 1e-3]
    for bad, msg in (("2^-5..2^-10", "smaller power"), ("fast", "not a learning rate"), ("-1e-3", "positive")):
        with pytest.raises(ValueError, match=msg):
            parse_lrs(bad)


def test_grid_configs_set_width_lr_and_validation():
    grid = sweep_configs("a2", [256, 512], [2.0**-8], [])
    assert [(n, c.model.dim, c.model.n_heads, c.model.n_layers, c.model.mup_base_dim, c.lr) for n, _, _, c in grid] == [
        ("w256-lr2^-8", 256, 8, 6, 256, 2.0**-8), ("w512-lr2^-8", 512, 8, 6, 256, 2.0**-8)]
    sp = sweep_configs("a2", [256], [1e-3], ["max_steps=10", "warmup_steps=2", "val_every=0"], sp=True)[0][3]
    assert sp.model.mup_base_dim is None and sp.val_every == 10  # validation forced on, at the end
    odd = sweep_configs("a2", [256], [1e-3], ["max_steps=1800", "val_every=500"])[0][3]
    assert odd.val_every == 450  # the largest cadence <= 500 that validates step 1800
    with pytest.raises(ValueError, match="width 100.*n_heads"):
        sweep_configs("a2", [100], [1e-3])


def test_sweep_runs_the_grid_records_best_val_loss_and_resumes(tmp_path):
    widths, lrs = [32, 64], [2.0**-8, 2.0**-5]
    doc = run_sweep("tiny", "fake", str(tmp_path), widths, lrs, overrides=TINY, loader_factory=factory())
    assert [(p["width"], p["lr"]) for p in doc["points"]] == [(w, lr) for w in widths for lr in lrs]
    for p in doc["points"]:
        run = tmp_path / p["run"]
        vals = [json.loads(x)["val_loss"] for x in (run / "val.jsonl").read_text().splitlines()]
        assert p["best_val_loss"] == min(vals) and not p["diverged"]
        conf = json.loads((run / "config.json").read_text())
        assert conf["model_config"]["dim"] == p["width"] and conf["train_config"]["lr"] == p["lr"]
        assert conf["model_config"]["mup_base_dim"] == 32
    for w in widths:
        mine = [p for p in doc["points"] if p["width"] == w]
        assert doc["best"][str(w)]["best_val_loss"] == min(p["best_val_loss"] for p in mine)
    assert json.loads((tmp_path / "lr_sweep.json").read_text())["best"] == doc["best"]
    assert (tmp_path / "lr_sweep.png").stat().st_size > 0
    # Re-running finds every run finished: nothing is trained again, the same document comes out.
    before = (tmp_path / "w32-lr2^-8" / "metrics.jsonl").read_text()

    def no_loader(*a, **k):
        raise AssertionError("a finished run was set up again")

    again = run_sweep("tiny", "fake", str(tmp_path), widths, lrs, overrides=TINY, loader_factory=no_loader)
    assert again["points"] == doc["points"] and (tmp_path / "w32-lr2^-8" / "metrics.jsonl").read_text() == before


def test_sweep_lr_help_and_bad_widths():
    r = CliRunner().invoke(main, ["sweep-lr", "--help"])
    assert r.exit_code == 0 and "Figure 11" in r.output and "--ray-address" in r.output
    r = CliRunner().invoke(main, ["sweep-lr", "--data", "x", "--out", "y", "--widths", "a,b"])
    assert r.exit_code != 0 and "comma-separated widths" in r.output


def test_sweep_as_ray_tasks_gives_the_sequential_results(tmp_path, ray_local):
    import trainer_fakes
    from ray import cloudpickle  # the copy Ray pickles tasks with

    cloudpickle.register_pickle_by_value(trainer_fakes)  # Ray workers cannot import the tests' module
    try:
        grid = dict(widths=[32], lrs=[2.0**-5], overrides=TINY, loader_factory=factory())
        seq = run_sweep("tiny", "fake", str(tmp_path / "seq"), **grid)
        par = run_sweep("tiny", "fake", str(tmp_path / "ray"), ray_address="auto", **grid)
    finally:
        cloudpickle.unregister_pickle_by_value(trainer_fakes)
    [a], [b] = seq["points"], par["points"]
    assert b["run"] == a["run"] and b["best_val_loss"] == pytest.approx(a["best_val_loss"], rel=1e-5)
    assert (tmp_path / "ray" / "w32-lr2^-5" / "step-00000003").is_dir()
