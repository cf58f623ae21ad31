"""The same training function under Ray Train's TorchTrainer (2 CPU workers, gloo)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from trainer.config import load_config
from trainer.train import train

sys.path.insert(0, str(Path(__file__).parent))
from trainer_fakes import factory  # noqa: E402


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ray_torch_trainer_matches_one_process(tmp_path, ray_local):
    import trainer_fakes
    from ray import cloudpickle

    from trainer.train import run_with_ray

    # Workers cannot import the tests directory: ship the fake loader's module by value.
    cloudpickle.register_pickle_by_value(trainer_fakes)
    cfg = load_config("tiny", ["progress=false", "tensorboard=false", "max_steps=3", "global_batch=4",
                               "micro_batch=1", "ckpt_every=3", "lr=3e-3"])
    train(cfg, "fake", tmp_path / "single", loader_factory=factory())
    res = run_with_ray(cfg, "fake", str(tmp_path / "ray"), num_workers=2, use_gpu=False, cpus_per_worker=0.5,
                       loader_factory=factory())
    assert res["step"] == 3
    a, b = _losses(tmp_path / "single"), _losses(tmp_path / "ray")
    assert len(a) == len(b) == 3
    assert b == pytest.approx(a, rel=1e-5, abs=1e-5)
