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


def test_executors_one_per_64_gpus_and_their_shares_of_the_pools():
    from pipeline.jobs.ray_job import executor_share

    sizes = stage_sizes(TokenizeConfig(**BASE, ray_address="auto", num_gpus=200), {"CPU": 0.0}, fixed=False)
    assert sizes["executors"] == {"count": 4, "num_cpus": 1.0}  # ceil(200 / 64), a core each on a cluster
    shares = [executor_share(sizes, k) for k in range(4)]
    assert [s["tokenize"]["max"] for s in shares] == [50, 50, 50, 50]
    assert all(s["tokenize"]["min"] == 1 and s["decode"] == {"min": 1, "max": None, "num_cpus": 1.0} for s in shares)
    assert all(s["write"] == sizes["write"] for s in shares)  # the writers are the job's, shared
    one = stage_sizes(TokenizeConfig(**BASE, ray_address="auto", num_gpus=64), {"CPU": 0.0}, fixed=False)
    assert one["executors"] == {"count": 1, "num_cpus": 0.0}  # in the driver
    # Embedded, fixed pools: 7 decode actors over 2 executors -> 4 + 3; the executors take no CPU.
    emb = stage_sizes(TokenizeConfig(**BASE, num_cpus=5, decode_cpus=0.5, cpu_actors=2, executors=2), {"CPU": 5.0},
                      fixed=True)
    assert emb["executors"] == {"count": 2, "num_cpus": 0.0} and emb["decode"]["max"] == 6
    assert [executor_share(emb, k)["decode"]["max"] for k in (0, 1)] == [3, 3]
    assert [executor_share(emb, k)["tokenize"]["max"] for k in (0, 1)] == [1, 1]
    odd = {**emb, "decode": {"min": 7, "max": 7, "num_cpus": 0.5}}
    assert [executor_share(odd, k)["decode"]["min"] for k in (0, 1)] == [4, 3]
    with pytest.raises(RuntimeError, match="--executors 3 needs at least 3 tokenizer actors"):
        stage_sizes(TokenizeConfig(**BASE, num_cpus=5, cpu_actors=2, executors=3), {"CPU": 5.0}, fixed=True)
    with pytest.raises(ValueError, match="TokenizeConfig.executors=0"):
        TokenizeConfig(**BASE, executors=0)


def test_image_datasets_default_to_large_shards():
    # 64 images are 16 384 tokens at 128 px: one executor event (and one output file) each; ImageNet
    # shards default to 16 384 images, video datasets to 64 clips. An explicit value wins.
    assert TokenizeConfig(**{**BASE, "dataset": "imagenet"}).items_per_shard == 16384
    assert TokenizeConfig(**BASE).items_per_shard == 64
    assert TokenizeConfig(**{**BASE, "dataset": "kinetics600"}).items_per_shard == 64
    assert TokenizeConfig(**{**BASE, "dataset": "imagenet"}, items_per_shard=8).settings()["items_per_shard"] == 8
