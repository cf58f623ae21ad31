"""Per-frame checksums written into Arrow shards (format 2) and the process-wide byte cache."""

import numpy as np
import pyarrow as pa
import pytest

import schemas
from pipeline import storage
from pipeline.shards import ShardWriter, open_shard
from pipeline.shards.arrow_format import ARROW_SCHEMA, ARROW_SCHEMA_V1, frame_sums
from pipeline.shards.cache import ByteLRU


def _write(tmp_path, rows, tok, **kw):
    w = ShardWriter(str(tmp_path), 0, codebook_size=8192, tokenizer=tok, resolution=32, row_group_size=3, **kw)
    for r in rows:
        w.add(r)
    return w.commit(input_shard={"id": 0, "worklist_sha256": "x", "num_items": len(rows)}, errors=[])


def test_frame_sums_column_holds_each_frames_checksum(tmp_path, rows, tokenizer_info):
    side = _write(tmp_path, rows, tokenizer_info)
    assert side["checksums"] == {"frames": "mul32", "column": "frame_sums"}
    schemas.validate(side, "shard_sidecar")
    with pa.memory_map(str(tmp_path / side["data_file"])) as src:
        table = pa.ipc.open_file(src).read_all()
    assert table.schema.equals(ARROW_SCHEMA, check_metadata=True)
    sums = table.column("frame_sums").to_pylist()
    for r, got in zip(rows, sums, strict=True):
        frames = np.asarray(r["tokens"], dtype=np.uint16).reshape(r["num_frames"], -1)
        assert len(got) == r["num_frames"]
        assert got == frame_sums(frames).tolist()
        # the definition, spelled out: sum of tokens times odd 32-bit weights, mod 2^32
        w = frame_sums(np.eye(frames.shape[1], dtype=np.uint16)).astype(np.int64)
        assert (w % 2 == 1).all()
        assert got[0] == int((frames[0].astype(np.int64) * w).sum() % 2**32)


def test_any_change_to_one_token_changes_its_frame_sum():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 8192, size=(1, 256), dtype=np.uint16)
    ref = int(frame_sums(frame)[0])
    for pos in range(0, 256, 17):
        for bit in range(16):  # a flipped bit in either byte of the token
            bad = frame.copy()
            bad[0, pos] ^= np.uint16(1 << bit)
            assert int(frame_sums(bad)[0]) != ref


def test_old_format_shards_without_sums_still_read(tmp_path, rows, tokenizer_info):
    side = _write(tmp_path, rows, tokenizer_info)
    path = str(tmp_path / side["data_file"])
    with open(path, "rb") as f:  # (into memory: the file is rewritten below)
        table = pa.ipc.open_file(pa.py_buffer(f.read())).read_all().drop_columns(["frame_sums"])
    v1 = table.replace_schema_metadata(ARROW_SCHEMA_V1.metadata)
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, ARROW_SCHEMA_V1) as w:
        w.write_table(v1)
    side.pop("checksums")
    side["sha256"], side["bytes"] = storage.sha256_file(path), (tmp_path / side["data_file"]).stat().st_size
    storage.write_json(str(tmp_path / "shard-000000.json"), side, "shard_sidecar")  # an old sidecar validates
    with open_shard(path, verify=True) as r:
        assert not r._impl.has_frame_sums
        for i in (0, 5, len(rows) - 1):
            np.testing.assert_array_equal(r.tokens(i), rows[i]["tokens"])


def test_same_rows_give_the_same_sums_and_bytes(tmp_path, rows, tokenizer_info):
    a = _write(tmp_path / "a", rows, tokenizer_info)
    b = _write(tmp_path / "b", rows, tokenizer_info)
    assert a["sha256"] == b["sha256"]
    assert (tmp_path / "a" / a["data_file"]).read_bytes() == (tmp_path / "b" / b["data_file"]).read_bytes()


def test_byte_lru_keeps_the_most_recent_within_its_budget():
    c = ByteLRU(10)
    c.put(("f", 0), b"aaaa", 4)
    c.put(("f", 1), b"bbbb", 4)
    assert c.get(("f", 0)) == b"aaaa"  # now the most recent
    c.put(("g", 0), b"cccc", 4)  # over budget: the least recent, ("f", 1), goes
    assert c.get(("f", 1)) is None and c.get(("f", 0)) == b"aaaa" and c.get(("g", 0)) == b"cccc"
    assert c.nbytes == 8 and len(c) == 2
    c.put(("h", 0), b"x" * 11, 11)  # larger than the whole budget: not kept, nothing evicted for it
    assert c.get(("h", 0)) is None and c.nbytes == 8
    c.resize(4)
    assert len(c) == 1 and c.get(("g", 0)) == b"cccc"
    with pytest.raises(ValueError, match="budget"):
        c.resize(-1)


def test_reader_checks_each_decoded_batch_when_asked(tmp_path, rows, tokenizer_info):
    side = _write(tmp_path, rows, tokenizer_info)
    path = tmp_path / side["data_file"]
    with open_shard(str(path)) as r:
        start = r._impl._batch(1)[2]  # values of batch 1 (rows 3..5): find their bytes in the file
        pos = path.read_bytes().find(start[:8].tobytes())
    data = bytearray(path.read_bytes())
    data[pos + 3] ^= 0x01
    path.write_bytes(bytes(data))
    with open_shard(str(path)) as r:
        r._impl.check_frames = True
        r._impl._batch(0)  # batch 0 is intact
        with pytest.raises(ValueError, match=r"shard-000000.arrow: record batch 1: 1 frame\(s\) fail their checksum"):
            r._impl._batch(1)
