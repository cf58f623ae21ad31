"""The job's plain steps without Ray: records in any order, repeated by retries, make one shard."""

from __future__ import annotations

import numpy as np

from pipeline.jobs.steps import ShardAssembler, tokenize_records
from pipeline.shards import committed_shards, open_shard

TOK = {"id": "t:x:" + "ab" * 32, "sha256": "ab" * 32, "vocab_size": 512, "downsample": 8}


class _Tok:
    """Code = mean pixel value of each 8×8 block (deterministic, checkable)."""

    downsample = 8

    def encode(self, frames, batch_size=None):  # (N, R, R, 3) uint8 or a list of such -> (N, R/8, R/8) uint16
        frames = np.concatenate(frames) if isinstance(frames, list) else frames
        n, r = frames.shape[0], frames.shape[1]
        return frames.reshape(n, r // 8, 8, r // 8, 8, 3).mean(axis=(2, 4, 5)).astype(np.uint16)


def _chunk(sid: int, vid: str, chunk: int, value: int) -> dict:
    return {"type": "chunk", "shard_id": sid, "key": f"d/{vid}/{chunk:05d}", "dataset": "d", "split": "train",
            "video_id": vid, "label": None, "chunk": chunk, "t_start": chunk * 0.4, "fps": 10.0, "num_frames": 2,
            "frames": np.full((2, 16, 16, 3), value, np.uint8)}


def test_out_of_order_and_repeated_records_commit_once_sorted(tmp_path):
    recs = [_chunk(0, "b", 0, 7), _chunk(0, "a", 1, 5), _chunk(0, "a", 0, 3)]
    recs = tokenize_records(_Tok(), recs, batch_size=4)
    assert recs[0]["tokens"].shape == (2, 2, 2) and int(recs[0]["tokens"][0, 0, 0]) == 7 and "frames" not in recs[0]
    end = {"type": "end", "shard_id": 0, "expected_rows": 3, "num_items": 3,
           "errors": [{"uri": "z.mp4", "reason": "zero bytes"}], "decode_s": 0.1}
    asm = ShardAssembler(str(tmp_path), {0: {"id": 0, "worklist_sha256": "f" * 64, "num_items": 3}},
                         codebook_size=512, tokenizer=TOK, resolution=16, format="arrow", compression=None,
                         settings={}, grid=(2, 2))
    assert asm.add(recs[0]) is None and asm.add(recs[0]) is None  # a retry repeats a record
    assert asm.add(end) is None
    assert asm.add(recs[1]) is None
    side = asm.add(recs[2])
    assert side is not None and side["counts"]["rows"] == 3 and side["errors"] == [{"uri": "z.mp4", "reason": "zero bytes"}]
    assert asm.add(recs[1]) is None and asm.in_flight() == 0  # late repeat of a committed shard: ignored
    [s] = committed_shards(str(tmp_path))
    with open_shard(str(tmp_path / s["data_file"])) as r:
        assert r.column("key") == ["d/a/00000", "d/a/00001", "d/b/00000"]
        assert [int(r.tokens(i)[0, 0, 0]) for i in range(3)] == [3, 5, 7]
    assert (s["counts"]["inputs"], s["counts"]["inputs_failed"]) == (3, 1)


def test_a_shard_whose_inputs_all_failed_keeps_the_job_grid(tmp_path):
    asm = ShardAssembler(str(tmp_path), {4: {"id": 4, "worklist_sha256": "f" * 64, "num_items": 1}},
                         codebook_size=512, tokenizer=TOK, resolution=64, format="webdataset", compression=None,
                         settings={}, grid=(8, 8))
    side = asm.add({"type": "end", "shard_id": 4, "expected_rows": 0, "num_items": 1,
                    "errors": [{"uri": "x.mp4", "reason": "truncated"}], "decode_s": 0.0})
    assert side["shard_id"] == 4 and side["grid"] == [8, 8] and side["counts"]["rows"] == 0
    assert (tmp_path / "shard-000004.tar").exists() and (tmp_path / "shard-000004.json").exists()
