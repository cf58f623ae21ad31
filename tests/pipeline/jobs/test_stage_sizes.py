"""Pool bounds the job asks Ray for (no Ray started): "up to N" GPUs on a cluster whatever is up
now, fixed pools on the embedded Ray, and the tokenizer's device from what torch can use."""

from __future__ import annotations

import pytest

from pipeline.jobs import TokenizeConfig
from pipeline.jobs.ray_job import device_for, stage_sizes
from pipeline.jobs.steps import ShardBuffer

BASE = dict(dataset="folder", input="/in", output="/out", progress=False)


def test_cluster_pools_grow_and_ask_for_gpus_that_are_not_up_yet():
    cfg = TokenizeConfig(**BASE, ray_address="auto", num_gpus=16, decode_cpus=1.0)
    sizes = stage_sizes(cfg, {"CPU": 0.0}, fixed=False)  # an autoscaling cluster at submit: head only
    assert sizes["tokenize"] == {"min": 1, "max": 16, "num_gpus": 1, "num_cpus": 1.0}
    assert sizes["decode"] == {"min": 1, "max": None, "num_cpus": 1.0}  # no bound, full CPU each
    assert sizes["write"] == {"actors": 2, "num_cpus": 0.0}             # one writer per 8 tokenizers
    # Without --num-gpus: the GPUs up now (none here) → CPU tokenizers, up to --cpu-actors.
    cpu = stage_sizes(TokenizeConfig(**BASE, ray_address="auto", cpu_actors=3, decode_concurrency=40),
                      {"CPU": 0.0}, fixed=False)
    assert cpu["tokenize"] == {"min": 1, "max": 3, "num_gpus": 0, "num_cpus": 1.0}
    assert cpu["decode"]["max"] == 40


def test_embedded_pools_are_fixed_to_this_machine():
    cfg = TokenizeConfig(**BASE, num_cpus=4, decode_cpus=0.5)
    sizes = stage_sizes(cfg, {"CPU": 4.0}, fixed=True)
    assert sizes["tokenize"] == {"min": 1, "max": 1, "num_gpus": 0, "num_cpus": 1.0}
    assert sizes["decode"] == {"min": 6, "max": 6, "num_cpus": 0.5}  # (4 - 1 tokenizer) / 0.5
    with pytest.raises(RuntimeError, match="--num-gpus 2 but this machine's embedded Ray has 1 GPUs"):
        stage_sizes(TokenizeConfig(**BASE, num_gpus=2), {"CPU": 8.0, "GPU": 1.0}, fixed=True)
    with pytest.raises(ValueError, match="TokenizeConfig.writers=0"):
        TokenizeConfig(**BASE, writers=0)


class _Cuda:
    def __init__(self, ok: bool) -> None:
        self.ok = ok

    def is_available(self) -> bool:
        return self.ok


class _Torch:
    def __init__(self, ok: bool) -> None:
        self.cuda = _Cuda(ok)


def test_device_is_what_torch_can_use_not_what_ray_reserved(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # Ray reserved a GPU for the actor...
    assert device_for(_Torch(False)) == "cpu"       # ...on a node that only declares one
    assert device_for(_Torch(True)) == "cuda"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")   # no GPU reserved
    assert device_for(_Torch(True)) == "cpu"


def test_buffer_reports_a_complete_shard_again_until_it_is_taken():
    buf = ShardBuffer({3})
    row = {"type": "chunk", "shard_id": 3, "key": "d/v/00000"}
    end = {"type": "end", "shard_id": 3, "expected_rows": 1, "num_items": 1, "errors": [], "decode_s": 0.0}
    assert buf.add(end) is None and buf.add(row) == 3
    assert buf.add(row) == 3  # a retried task's repeat reports the completion again
    rows, got_end, _ = buf.take(3)
    assert [r["key"] for r in rows] == ["d/v/00000"] and got_end is end
    assert buf.add(row) is None and buf.in_flight() == 0  # after the write: ignored
    with pytest.raises(RuntimeError, match="did not plan"):
        buf.add({**row, "shard_id": 4})
