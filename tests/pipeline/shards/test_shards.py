import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest

import schemas
from pipeline import storage
from pipeline.shards import (
    ShardWriter,
    build_manifest,
    clean_debris,
    committed_shards,
    debris,
    open_shard,
    read_manifest,
    unigram_stats,
    verify_shard,
    write_manifest,
)
from pipeline.shards.wds_format import TarShardReader

TOK = {"id": "test-tokenizer", "sha256": "ab" * 32, "vocab_size": 8192, "downsample": 8}
INPUT = {"id": 7, "worklist_sha256": "cd" * 32, "num_items": 11}


def write(out, rows, fmt="arrow", shard_id=7, **kw):
    w = ShardWriter(str(out), shard_id, codebook_size=8192, tokenizer=TOK, resolution=32, format=fmt,
                    row_group_size=kw.pop("row_group_size", 4), **kw)
    for r in rows:
        w.add(r)
    return w.commit(input_shard={**INPUT, "id": shard_id}, errors=[{"uri": "s3://b/bad.mp4", "reason": "truncated"}])


@pytest.mark.parametrize("fmt,compression", [("arrow", None), ("arrow", "zstd"), ("webdataset", None)])
def test_round_trip_equal_arrays_and_metadata(tmp_path, rows, fmt, compression):
    side = write(tmp_path, rows, fmt, compression=compression)
    assert side["counts"] == {"rows": 11, "frames": sum(r["num_frames"] for r in rows), "tokens": sum(r["tokens"].size for r in rows)}
    assert side["grid"] == [4, 4] and side["fps"] == 30.0 and side["errors"][0]["reason"] == "truncated"
    with open_shard(str(tmp_path / side["data_file"]), verify=True) as r:
        assert len(r) == len(rows)
        for i, want in enumerate(rows):
            got = r.row(i)
            for k in ("key", "dataset", "split", "video_id", "chunk", "t_start", "fps", "num_frames", "label"):
                assert got[k] == want[k], k
            assert got["tokens"].dtype == np.uint16
            np.testing.assert_array_equal(got["tokens"], want["tokens"])
        # random access in any order, and negative indices
        np.testing.assert_array_equal(r.tokens(-1), rows[-1]["tokens"])
        assert r.column("key") == [x["key"] for x in rows]


def test_arrow_local_reads_are_memory_mapped_views(tmp_path, rows):
    side = write(tmp_path, rows)
    with open_shard(str(tmp_path / side["data_file"])) as r:
        t = r.tokens(5)
        assert not t.flags.owndata  # a view into the map, not a copy


@pytest.mark.parametrize("fmt", ["arrow", "webdataset"])
def test_same_rows_give_byte_identical_files(tmp_path, rows, fmt, make_rows):
    a = write(tmp_path / "a", rows, fmt)
    b = write(tmp_path / "b", make_rows(11), fmt)
    assert a["sha256"] == b["sha256"]
    ext = a["data_file"]
    assert (tmp_path / "a" / ext).read_bytes() == (tmp_path / "b" / ext).read_bytes()


def test_token_outside_codebook_is_refused_on_write(tmp_path, rows):
    w = ShardWriter(str(tmp_path), 0, codebook_size=512, tokenizer=TOK, resolution=32)
    bad = dict(rows[0], tokens=np.full(rows[0]["tokens"].shape, 512))
    with pytest.raises(ValueError, match="token value 512 is outside the codebook"):
        w.add(bad)
    # 65536 would wrap to 0 in uint16: it must be refused, not stored as 0
    w2 = ShardWriter(str(tmp_path), 1, codebook_size=65536, tokenizer=TOK, resolution=32)
    with pytest.raises(ValueError, match="65536"):
        w2.add(dict(rows[0], tokens=np.full(rows[0]["tokens"].shape, 65536)))
    with pytest.raises(ValueError, match="codebook must have 2..65536"):
        ShardWriter(str(tmp_path), 2, codebook_size=70000, tokenizer=TOK, resolution=32)


def test_bad_keys_and_shapes_are_refused(tmp_path, rows):
    w = ShardWriter(str(tmp_path), 0, codebook_size=8192, tokenizer=TOK, resolution=32)
    with pytest.raises(ValueError, match="invalid row key"):
        w.add(dict(rows[0], key="k600/a.b/00000"))
    with pytest.raises(ValueError, match="num_frames\\*grid_h\\*grid_w"):
        w.add(dict(rows[0], num_frames=9))


def test_flipped_byte_fails_verify_naming_the_shard(tmp_path, rows):
    side = write(tmp_path, rows)
    assert verify_shard(str(tmp_path), side) == []
    p = tmp_path / side["data_file"]
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    problems = verify_shard(str(tmp_path), side)
    assert problems and "sha256 mismatch" in problems[0]
    with pytest.raises(ValueError, match="shard-000007.arrow: sha256 .* corrupt"):
        open_shard(str(p), verify=True)


def test_data_file_without_sidecar_is_debris_ignored_then_cleaned(tmp_path, rows):
    write(tmp_path, rows[:3], shard_id=0)
    # an interrupted writer: data file renamed but no sidecar, plus a temporary file
    (tmp_path / "shard-000001.arrow").write_bytes(b"partial")
    (tmp_path / ".shard-000002.arrow.tmp-123-abcd").write_bytes(b"partial")
    assert [s["shard_id"] for s in committed_shards(str(tmp_path))] == [0]
    assert sorted(os.path.basename(d) for d in debris(str(tmp_path))) == [".shard-000002.arrow.tmp-123-abcd", "shard-000001.arrow"]
    with pytest.raises(FileNotFoundError, match="never committed"):
        open_shard(str(tmp_path / "shard-000001.arrow"))
    clean_debris(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["shard-000000.arrow", "shard-000000.json"]


def test_sidecar_without_data_file_is_debris_and_vanished_debris_is_no_error(tmp_path, rows, monkeypatch):
    # A killed run's late writer renames shard 1's sidecar after a rerun's clean-up removed its
    # data file (listed without a sidecar): readers refuse the shard, clean-up removes the orphan.
    write(tmp_path, rows[:3], shard_id=0)
    write(tmp_path, rows[3:], shard_id=1)
    os.remove(tmp_path / "shard-000001.arrow")
    with pytest.raises(ValueError, match="shard-000001.json names shard-000001.arrow, which is missing.*rerun the same tokenize"):
        committed_shards(str(tmp_path))
    assert [os.path.basename(d) for d in debris(str(tmp_path))] == ["shard-000001.json"]
    # A temporary that its writer renames away between the listing and the removal.
    names = [*os.listdir(tmp_path), ".shard-000002.arrow.tmp-9-ffff"]
    assert sorted(os.path.basename(d) for d in clean_debris(str(tmp_path), names=names)) == [
        ".shard-000002.arrow.tmp-9-ffff", "shard-000001.json"]
    assert sorted(os.listdir(tmp_path)) == ["shard-000000.arrow", "shard-000000.json"]
    assert [s["shard_id"] for s in committed_shards(str(tmp_path))] == [0]


def test_write_probe_leaves_nothing_and_a_killed_probe_is_debris(tmp_path, rows, monkeypatch):
    write(tmp_path, rows[:3], shard_id=0)
    storage.check_writable(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["shard-000000.arrow", "shard-000000.json"]
    # A kill between the probe's write and its removal leaves the probe under its final name.
    with monkeypatch.context() as m:
        m.setattr(storage, "remove", lambda url, so=None: None)
        storage.check_writable(str(tmp_path))
    left = [n for n in os.listdir(tmp_path) if n.startswith(".toto-write-probe")]
    assert len(left) == 1
    assert [os.path.basename(d) for d in debris(str(tmp_path))] == left
    clean_debris(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["shard-000000.arrow", "shard-000000.json"]


def test_writer_failure_leaves_no_final_files(tmp_path, rows):
    w = ShardWriter(str(tmp_path), 0, codebook_size=8192, tokenizer=TOK, resolution=32)
    w.add(rows[0])
    w.abort()
    assert os.listdir(tmp_path) == []


def test_sidecar_of_unknown_version_is_refused(tmp_path, rows):
    side = write(tmp_path, rows)
    side_path = tmp_path / "shard-000007.json"
    import json

    doc = json.loads(side_path.read_text())
    doc["version"] = 2
    side_path.write_text(json.dumps(doc))
    with pytest.raises(schemas.SchemaError, match="version 2.*reads versions 1.*upgrade Toto"):
        committed_shards(str(tmp_path))
    assert side["version"] == 1


def test_manifest_rebuilt_from_sidecars_and_hash_checked(tmp_path, rows):
    write(tmp_path, rows[:5], shard_id=0)
    write(tmp_path, rows[5:], shard_id=1)
    man = write_manifest(str(tmp_path))
    assert man["totals"]["rows"] == 11 and man["totals"]["shards"] == 2 and man["totals"]["errors"] == 2
    assert [s["id"] for s in man["shards"]] == [0, 1]
    assert read_manifest(str(tmp_path)) == man
    assert build_manifest(str(tmp_path))["content_hash"] == man["content_hash"]
    p = tmp_path / "manifest.json"
    p.write_text(p.read_text().replace('"rows": 11', '"rows": 12'))
    with pytest.raises(ValueError, match="content_hash does not match"):
        read_manifest(str(tmp_path))


def test_webdataset_shard_reads_with_plain_webdataset(tmp_path, rows):
    import webdataset as wds

    side = write(tmp_path, rows, "webdataset")
    got = list(wds.WebDataset(str(tmp_path / side["data_file"]), shardshuffle=False).decode())
    assert [s["__key__"] for s in got] == [r["key"] for r in rows]
    for s, r in zip(got, rows, strict=True):
        np.testing.assert_array_equal(s["tokens.npy"], r["tokens"])
        assert s["json"]["label"] == r["label"]


def _tar_with(member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        t.addfile(member, io.BytesIO(data) if data else None)
    return buf.getvalue()


@pytest.mark.parametrize("name,kind", [("../x.json", "file"), ("/abs/x.json", "file"), ("a/x.json", "symlink"), ("a/x.json", "hardlink")])
def test_unsafe_tar_members_are_refused(tmp_path, name, kind):
    ti = tarfile.TarInfo(name)
    if kind == "symlink":
        ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        ti.type, ti.linkname = tarfile.LNKTYPE, "/etc/passwd"
    else:
        ti.size = 2
    p = tmp_path / "shard-000000.tar"
    p.write_bytes(_tar_with(ti, b"{}" if kind == "file" else b""))
    with pytest.raises(ValueError, match="refusing tar member"):
        TarShardReader(str(p))


def test_nothing_is_ever_unpickled(tmp_path, rows, monkeypatch):
    calls = []
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: calls.append(a))
    for fmt in ("arrow", "webdataset"):
        side = write(tmp_path / fmt, rows, fmt)
        with open_shard(str(tmp_path / fmt / side["data_file"]), verify=True) as r:
            [r.row(i) for i in range(len(r))]
    # an object-array .npy member (which needs pickle) is refused by allow_pickle=False
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with tarfile.open(tmp_path / "shard-000001.tar", "w") as t:
        for name, data in (("k/v/00000.json", b'{"num_frames": 1}'), ("k/v/00000.tokens.npy", buf.getvalue())):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    r = TarShardReader(str(tmp_path / "shard-000001.tar"))
    with pytest.raises(ValueError, match="allow_pickle"):
        r.tokens(0)
    assert calls == []


def test_unigram_stats():
    c = np.array([2, 2, 0, 0])
    s = unigram_stats(c)
    assert s["coverage"] == 0.5 and s["entropy_bits"] == pytest.approx(1.0) and s["max_entropy_bits"] == 2.0


def test_sha256_in_sidecar_matches_file(tmp_path, rows):
    side = write(tmp_path, rows)
    assert side["sha256"] == hashlib.sha256((tmp_path / side["data_file"]).read_bytes()).hexdigest()
    assert side["bytes"] == (tmp_path / side["data_file"]).stat().st_size
    assert storage.sha256_file(str(tmp_path / side["data_file"])) == side["sha256"]


def test_rows_sliced_from_one_array_give_the_same_file_as_separate_arrays(tmp_path, rows):
    # The writer passes back-to-back slices of one buffer to Arrow without copying; the bytes on
    # disk must not depend on where the rows' tokens live.
    flat = np.concatenate([r["tokens"].reshape(-1) for r in rows]).astype(np.uint16)
    sliced, at = [], 0
    for r in rows:
        n = r["tokens"].size
        sliced.append({**r, "tokens": flat[at : at + n].reshape(r["tokens"].shape)})
        at += n
    copies = [{**r, "tokens": r["tokens"].astype(np.uint16).copy()} for r in rows]
    a, b = write(tmp_path / "a", sliced), write(tmp_path / "b", copies)
    assert a["sha256"] == b["sha256"] and a["sha256"] == storage.sha256_file(str(tmp_path / "a" / a["data_file"]))
    with open_shard(str(tmp_path / "a" / a["data_file"])) as r:
        for i, want in enumerate(rows):
            np.testing.assert_array_equal(r.tokens(i), want["tokens"])


def test_contiguous_span_is_a_view_only_when_the_parts_tile_one_buffer():
    from pipeline.shards.arrow_format import _contiguous_span

    base = np.arange(100, dtype=np.uint16)
    span = _contiguous_span([base[0:30], base[30:31], base[31:80]], 80)
    assert np.shares_memory(span, base) and not span.flags.writeable
    np.testing.assert_array_equal(span, base[:80])
    gap = _contiguous_span([base[0:30], base[31:40]], 39)  # one value skipped: must copy
    assert not np.shares_memory(gap, base)
    np.testing.assert_array_equal(gap, np.r_[base[0:30], base[31:40]])
    other = np.arange(100, 200, dtype=np.uint16)
    mixed = _contiguous_span([base[0:10], other[0:10]], 20)
    np.testing.assert_array_equal(mixed, np.r_[base[:10], other[:10]])
    assert _contiguous_span([], 0).size == 0


def test_hashing_file_digest_and_size_match_the_bytes_written(tmp_path):
    from pipeline.shards.arrow_format import HashingFile

    rng = np.random.default_rng(3)
    # small writes (gathered), writes that straddle the gather threshold, and large ones
    # (passed through, with early writeback every few MiB)
    sizes = [1, 7, 300, 65535, 65536, 3, 9 << 20, 12, 100_000, 5 << 20, 2]
    chunks = [rng.integers(0, 256, size=s, dtype=np.uint8).tobytes() for s in sizes]
    f = HashingFile(str(tmp_path / "x"))
    for c in chunks:
        assert f.write(c) == len(c)
    assert f.tell() == sum(sizes)
    f.close()
    data = (tmp_path / "x").read_bytes()
    assert data == b"".join(chunks)
    assert f.sha256.hexdigest() == hashlib.sha256(data).hexdigest() and f.size == len(data)
