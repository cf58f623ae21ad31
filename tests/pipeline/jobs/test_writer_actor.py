"""The shard writer actor commits its shards itself, exactly once; the driver learns it by polling."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline.jobs.plan import JobPlan
from pipeline.jobs.progress import Progress
from pipeline.jobs.ray_job import ShardWriterActor, _Driver
from pipeline.shards import committed_shards, open_shard

TOK = {"id": "t:x:" + "ab" * 32, "sha256": "ab" * 32, "vocab_size": 512, "downsample": 8, "precision": "fp32"}
KW = dict(codebook_size=512, tokenizer=TOK, resolution=16, format="arrow", compression=None, settings={},
          storage_options=None)


def _row(sid: int, vid: str, value: int) -> dict:
    return {"type": "chunk", "shard_id": sid, "key": f"d/{vid}/00000", "dataset": "d", "split": "train",
            "video_id": vid, "label": None, "chunk": 0, "t_start": 0.0, "fps": 10.0, "num_frames": 2,
            "tokens": np.full((2, 2, 2), value, np.uint16)}


def _end(sid: int, rows: int) -> dict:
    return {"type": "end", "shard_id": sid, "expected_rows": rows, "num_items": rows, "errors": [], "decode_s": 0.1,
            "blocks": 1, "node": "dec-node"}


def _writer(ray, out: str, sids=(0, 1)):
    shards = {s: {"id": s, "worklist_sha256": "f" * 64, "num_items": 2} for s in sids}
    return ray.remote(ShardWriterActor).options(num_cpus=0, max_concurrency=4, max_restarts=0).remote(
        out, shards, (2, 2), KW)


def _plan(n: int) -> JobPlan:
    return JobPlan(cfg=None, tokenizer=TOK, codebook_size=512, worklist_sha256="f" * 64, num_items=2 * n, shards=[])


def test_writer_commits_each_shard_once_and_the_driver_learns_it_by_polling(ray_local, tmp_path):
    ray = ray_local
    out = str(tmp_path / "out")
    w = _writer(ray, out)
    a, b, c = _row(0, "b", 7), _row(0, "a", 5), _row(1, "c", 9)
    ray.get(w.add.remote([a, _end(0, 2)], "tok-node", "cpu"))
    ray.get(w.add.remote([b, a, c], "tok-node", "cpu"))  # completes shard 0; `a` again: a retried block
    ray.get(w.add.remote([b, _end(0, 2)], "tok-node", "cpu"))  # a late repeat of a shard already taken
    plan = _plan(2)
    progress = Progress(total_shards=2, done=[], enabled=False)
    drv = _Driver(ray, [w], plan, progress)
    drv.poll(drain=True)
    assert [s["shard_id"] for s in plan.committed] == [0] and drv.committed == {0}
    # Counts are what the tokenizer calls handed over (repeats included: the sidecars are the truth).
    assert (progress.rows, progress.frames, progress.tokens) == (5, 10, 40)
    assert drv.stats["writer_adds"] == 3 and drv.stats["decode_blocks"] == 1
    assert drv.placement["decode"] == {"dec-node": 1} and drv.placement["tokenize"] == {"tok-node": 4}
    assert sum(drv.placement["write"].values()) == 1 and drv.devices == {"cpu": 4}
    [side] = committed_shards(out)  # the sidecar is on storage, written by the writer, valid
    assert side == plan.committed[0] and side["counts"]["rows"] == 2
    with open_shard(f"{out}/{side['data_file']}") as r:
        assert r.column("key") == ["d/a/00000", "d/b/00000"]
    ray.get(w.add.remote([_end(1, 1)], "tok-node", "cpu"))
    drv.poll(drain=True)
    assert sorted(drv.committed) == [0, 1] and len(plan.committed) == 2 and drv.failure() is None
    drv.poll()  # nothing new: nothing counted twice
    assert len(plan.committed) == 2 and progress.rows == 5


def test_a_failed_commit_stops_the_writer_and_the_job_says_why(ray_local, tmp_path):
    ray = ray_local
    blocker = tmp_path / "file"
    blocker.write_text("x")  # the output "folder" is a file: the data file cannot be written
    w = _writer(ray, str(blocker / "out"), sids=(0,))
    ray.get(w.add.remote([_row(0, "a", 1), _end(0, 1)], "n", "cpu"))
    drv = _Driver(ray, [w], _plan(1), Progress(total_shards=1, done=[], enabled=False))
    drv.poll(drain=True)
    assert drv.committed == set()
    assert drv.failure().startswith("committing a shard failed (shard 0: ") and "rerun the same command" in drv.failure()
    with pytest.raises(ray.exceptions.RayTaskError, match="stopped after a failed commit"):
        ray.get(w.add.remote([_row(0, "b", 1)], "n", "cpu"))  # the tokenizer's next call fails the dataset


def test_a_lost_writer_makes_the_job_say_rerun(ray_local, tmp_path):
    ray = ray_local
    w = _writer(ray, str(tmp_path / "out"), sids=(0,))
    ray.get(w.add.remote([_row(0, "a", 1)], "n", "cpu"))  # rows held, shard not complete
    ray.kill(w)
    # ray.kill is asynchronous: a call sent right after it may still be served. Wait until calls fail.
    deadline = time.monotonic() + 60
    while True:
        try:
            ray.get(w.poll.remote(False), timeout=10)
        except ray.exceptions.RayActorError:
            break
        assert time.monotonic() < deadline, "the killed writer kept answering for 60 s"
        time.sleep(0.1)
    drv = _Driver(ray, [w], _plan(1), Progress(total_shards=1, done=[], enabled=False))
    drv.poll()
    assert "shard writer actor was lost" in drv.failure() and "rerun the same command to resume" in drv.failure()
    assert drv.committed == set()
