"""The loader's remote read path on a real S3 API server (moto on 127.0.0.1): frames by coalesced
ranges, checked per frame; old shards through the whole-file sha256 with a warning."""

import uuid
import warnings

import numpy as np
import pyarrow as pa
import pytest

from pipeline import storage
from pipeline.mix import MixConfig, MixReader, access, build_mix
from pipeline.mix.access import coalesce
from pipeline.mix.synthetic import decode_frame, write_positional_dataset
from pipeline.mix.tables import locate_frames
from pipeline.shards import committed_shards, write_manifest
from pipeline.shards.arrow_format import ARROW_SCHEMA_V1

TOK = {"id": "t", "sha256": "0" * 64, "vocab_size": 8192, "downsample": 8}
VIDEOS = [{"frames": 100, "label": "walk"}, {"frames": 60, "label": "run"}, {"frames": 45, "label": "walk"}]


def _mix(base, so, *, frames=4, stride=3, grid=(4, 4)):
    vid = f"{base}/k600"
    write_positional_dataset(vid, VIDEOS, dataset="k600", chunk_frames=32, rows_per_shard=3, grid=grid,
                             storage_options=so)
    cfg = MixConfig(ratios={"k600": "1"}, inputs={"k600": vid}, frames=frames, stride=stride, seed=1)
    build_mix(cfg, f"{base}/mix.json", so, progress=False)
    return f"{base}/mix.json", vid


@pytest.fixture(scope="module")
def remote_mix(s3_server):
    """One remote mix for the tests that only read it (or restore what they change)."""
    base, so = _remote(s3_server)
    return _mix(base, so)[0], so


def _remote(s3_server):
    return f"s3://{s3_server['bucket']}/remote-{uuid.uuid4().hex[:6]}", s3_server["storage_options"]


def _flip(url, byte, so):
    fs, path = storage.url_to_fs(url, so)
    data = bytearray(fs.cat_file(path))
    data[byte] ^= 0x10
    fs.pipe_file(path, bytes(data))


def _first_frame_byte(r: MixReader, ids):
    """(data file URL, byte offset) of the first token of the first frame that batch ``ids`` reads."""
    si, _pos, frames = r.sample_frames(ids)[0]
    tab = r._tab[si]
    q, k = locate_frames(np.asarray(tab["cum"]), frames.reshape(-1)[:1])
    sh = r._dsm[r.sources[si]]["shards"][int(tab["shard"][q[0]])]
    return storage.join(r._src[si]["url"], sh["data_file"]), int(tab["elem"][q[0]] + k[0] * r.hw) * 2


def test_remote_frames_equal_local_and_fetch_at_most_1_5x_what_they_deliver(tmp_path, remote_mix):
    remote, so = remote_mix
    local, _ = _mix(str(tmp_path), None)
    ids = np.arange(12, dtype=np.int64)
    want = MixReader(local).batch(ids)
    frame_bytes = 16 * 2
    for slack, fewer in ((0.5, False), (4.0, True)):
        before = dict(access.REMOTE_FETCHES)
        r = MixReader(remote, storage_options=so, read_slack=slack, cache_mb=0)
        got = r.batch(ids)
        np.testing.assert_array_equal(got["inputs"], want["inputs"])
        assert got["label"] == want["label"]
        fetched = access.REMOTE_FETCHES["bytes"] - before["bytes"]
        requests = access.REMOTE_FETCHES["requests"] - before["requests"]
        distinct = len(np.unique(np.concatenate([f.reshape(-1) for _, _, f in r.sample_frames(ids)])))
        delivered = distinct * frame_bytes
        if not fewer:
            # stride 3: the hole between two frames of a clip (2 frames) exceeds half a frame, so each
            # frame is its own request; a clip's 4-byte checksums, 8 bytes apart, come in one
            assert delivered + 4 * distinct <= fetched <= 1.5 * (delivered + 4 * distinct)
            per_frame_requests = requests
        else:
            assert requests < per_frame_requests and fetched > delivered
        assert requests <= 2 * distinct
        assert not any(f._checked for f in r._stores[0]._files.values())  # no whole-file hash


def test_flipped_byte_in_a_remote_frame_is_caught_naming_the_shard(remote_mix):
    mix, so = remote_mix
    ids = np.arange(8, dtype=np.int64)
    r = MixReader(mix, storage_options=so, cache_mb=0)
    clean = r.batch(ids)["inputs"]
    url, byte = _first_frame_byte(r, ids)
    _flip(url, byte + 1, so)  # the high byte of the frame's first token
    try:
        with pytest.raises(ValueError, match=rf"{storage.basename(url)}: 1 frame\(s\) read fail their checksum"):
            MixReader(mix, storage_options=so, cache_mb=0).batch(ids)
        # What the check stood between: without it the damaged token is delivered silently.
        dirty = MixReader(mix, storage_options=so, verify="off", cache_mb=0).batch(ids)["inputs"]
        assert (dirty != clean).sum() == 1
    finally:
        _flip(url, byte + 1, so)  # (the module's other tests read this mix)


def _downgrade_to_v1(dataset_url: str, so) -> None:
    """Rewrite every shard as format 1 (no frame_sums), with a sidecar as an older Toto wrote it."""
    fs, _ = storage.url_to_fs(dataset_url, so)
    for side in committed_shards(dataset_url, so):
        url = storage.join(dataset_url, side["data_file"])
        table = pa.ipc.open_file(pa.py_buffer(fs.cat_file(url))).read_all().drop_columns(["frame_sums"])
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, ARROW_SCHEMA_V1) as w:
            w.write_table(table.replace_schema_metadata(ARROW_SCHEMA_V1.metadata))
        data = sink.getvalue().to_pybytes()
        fs.pipe_file(url, data)
        side.pop("checksums")
        import hashlib

        side["sha256"], side["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
        storage.write_json(storage.join(dataset_url, f"shard-{side['shard_id']:06d}.json"), side, "shard_sidecar", so)
    write_manifest(dataset_url, so)


def test_old_shards_without_sums_fall_back_to_sha256_with_a_warning(s3_server):
    base, so = _remote(s3_server)
    vid = f"{base}/k600"
    write_positional_dataset(vid, VIDEOS, dataset="k600", chunk_frames=32, rows_per_shard=3, grid=(4, 4),
                             storage_options=so)
    _downgrade_to_v1(vid, so)
    mix = f"{base}/mix.json"
    build_mix(MixConfig(ratios={"k600": "1"}, inputs={"k600": vid}, frames=4, stride=3, seed=1), mix, so, progress=False)
    ids = np.arange(8, dtype=np.int64)
    r = MixReader(mix, storage_options=so)
    assert (np.asarray(r._tab[0]["sums"]) == -1).all()
    with pytest.warns(UserWarning, match="no per-frame checksums"):
        got = r.batch(ids)
    assert all(f._checked for f in r._stores[0]._files.values())  # each file hashed whole, once
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per shard and process, not per batch
        r.batch(ids)
    # the tokens say where they came from: frame f of a clip is stride 3 after frame f-1
    body = got["inputs"][:, 1 : 1 + 3 * 16].reshape(8, 3, 16)  # (inputs hold 3 whole frames of 4 + bos)
    f0 = np.array([[decode_frame(body[i, j], 512)[1] for j in range(3)] for i in range(8)])
    assert (np.diff(f0, axis=1) == 3).all()
    url, byte = _first_frame_byte(r, ids)
    _flip(url, byte, so)
    with pytest.raises(ValueError, match=rf"{storage.basename(url)}: sha256 .* does not match"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            MixReader(mix, storage_options=so).batch(ids)


def test_coalesce_merges_only_holes_within_the_limit():
    lo = np.array([0, 10, 40, 41, 100], dtype=np.int64)
    hi = lo + 8
    gid, g_lo, g_hi = coalesce(lo, hi, 5)  # holes: 2, 22, -7 (overlap), 51
    assert gid.tolist() == [0, 0, 1, 1, 2]
    assert g_lo.tolist() == [0, 40, 100] and g_hi.tolist() == [18, 49, 108]
    gid, _, _ = coalesce(lo, hi, 0)
    assert gid.tolist() == [0, 1, 2, 2, 3]


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_remote_row_table_equals_local_without_reading_the_tokens(tmp_path, s3_server, compression):
    from pipeline.mix.tables import read_row_table
    from pipeline.shards import ShardWriter, read_manifest

    base, so = _remote(s3_server)
    rng = np.random.default_rng(0)
    rows = [dict(key=f"k/v{i}/00000", dataset="k", split="train" if i % 3 else "val", video_id=f"v{i}", chunk=0,
                 t_start=0.0, fps=30.0, num_frames=32 + i % 5, grid_h=16, grid_w=16, label=None if i % 4 == 0 else "a",
                 tokens=rng.integers(0, 8192, size=(32 + i % 5) * 256, dtype=np.uint16)) for i in range(40)]
    for url, opts in ((f"{base}/ds", so), (str(tmp_path / "ds"), None)):
        for sid in range(2):
            w = ShardWriter(url, sid, codebook_size=8192, tokenizer=TOK, resolution=128, row_group_size=8,
                            compression=compression, storage_options=opts)
            for r in rows[sid * 20 : (sid + 1) * 20]:
                w.add(r)
            w.commit(input_shard={"id": sid, "worklist_sha256": "x", "num_items": 20}, errors=[])
        write_manifest(url, opts)
    if compression is None:  # and one shard as an older Toto wrote it (no checksums), on both sides
        for url, opts in ((f"{base}/ds", so), (str(tmp_path / "ds"), None)):
            _downgrade_to_v1(url, opts)
    local = read_row_table(str(tmp_path / "ds"), read_manifest(str(tmp_path / "ds")))
    remote_m = read_manifest(f"{base}/ds", so)
    import s3fs

    fetched = []
    real_fetch, real_cat = s3fs.core.S3File._fetch_range, s3fs.S3FileSystem._cat_file

    def counting_fetch(self, start, end):  # what Arrow reads through the file object
        data = real_fetch(self, start, end)
        fetched.append(len(data))
        return data

    async def counting_cat(self, path, *a, **kw):  # the exact ranges (footer, headers, offsets)
        data = await real_cat(self, path, *a, **kw)
        fetched.append(len(data))
        return data

    s3fs.core.S3File._fetch_range, s3fs.S3FileSystem._cat_file = counting_fetch, counting_cat
    try:
        remote = read_row_table(f"{base}/ds", remote_m, so)
    finally:
        s3fs.core.S3File._fetch_range, s3fs.S3FileSystem._cat_file = real_fetch, real_cat
    for a in ("shard", "row", "elem", "sums", "num_frames", "chunk"):
        np.testing.assert_array_equal(getattr(remote, a), getattr(local, a), err_msg=a)
    for a in ("split", "dataset", "video_id", "label"):
        assert getattr(remote, a).to_pylist() == getattr(local, a).to_pylist()
    assert (local.elem >= 0).all() == (compression is None)
    # what came over the wire: the files' headers and metadata columns, not their tokens
    got = sum(fetched)
    total = sum(s["bytes"] for s in remote_m["shards"])
    assert got < 0.1 * total, (got, total)


def test_shard_readers_beyond_the_limit_are_closed_and_reopened(tmp_path, monkeypatch):
    vid = str(tmp_path / "k600")
    write_positional_dataset(vid, VIDEOS, dataset="k600", chunk_frames=32, rows_per_shard=2, format="webdataset")
    mix = str(tmp_path / "mix.json")
    build_mix(MixConfig(ratios={"k600": "1"}, inputs={"k600": vid}, frames=4, stride=3, seed=1), mix, progress=False)
    ids = np.arange(24, dtype=np.int64)
    want = MixReader(mix).batch(ids)["inputs"]
    monkeypatch.setattr(access, "MAX_OPEN_READERS", 2)
    r = MixReader(mix)
    for _ in range(2):
        np.testing.assert_array_equal(r.batch(ids)["inputs"], want)
        store = r._stores[0]
        assert len(store._readers) == 2 and len(store._files) > 2
        assert sum(f._reader is not None for f in store._files.values()) == 2


def test_remote_zstd_shards_are_checked_batch_by_batch_without_a_download(tmp_path, s3_server):
    from pipeline.shards import ShardWriter

    base, so = _remote(s3_server)
    rng = np.random.default_rng(0)
    rows = [dict(key=f"k/v{i}/00000", dataset="k", split="train", video_id=f"v{i}", chunk=0, t_start=0.0, fps=30.0,
                 num_frames=12, grid_h=4, grid_w=4, label="a", tokens=rng.integers(0, 512, size=12 * 16, dtype=np.uint16))
            for i in range(8)]
    for url, opts in ((f"{base}/z", so), (str(tmp_path / "z"), None)):
        w = ShardWriter(url, 0, codebook_size=512, tokenizer=TOK, resolution=32, row_group_size=4, compression="zstd",
                        storage_options=opts)
        for r in rows:
            w.add(r)
        w.commit(input_shard={"id": 0, "worklist_sha256": "x", "num_items": 8}, errors=[])
        write_manifest(url, opts)
        build_mix(MixConfig(ratios={"k": "1"}, inputs={"k": url}, frames=4, stride=2, seed=0), f"{url}/mix.json", opts,
                  progress=False)
    ids = np.arange(8, dtype=np.int64)
    want = MixReader(str(tmp_path / "z" / "mix.json")).batch(ids)["inputs"]
    r = MixReader(f"{base}/z/mix.json", storage_options=so, cache_mb=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "downloads the whole file" warning
        np.testing.assert_array_equal(r.batch(ids)["inputs"], want)
    (f,) = r._stores[0]._files.values()
    assert not f._checked and f._reader._impl.check_frames
