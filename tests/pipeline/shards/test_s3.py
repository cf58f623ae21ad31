"""Shards on a real S3 API server (moto in server mode on 127.0.0.1)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline import storage
from pipeline.cli import main
from pipeline.shards import (
    ShardWriter,
    committed_shards,
    open_shard,
    read_manifest,
    verify_shard,
    write_manifest,
)

TOK = {"id": "test-tokenizer", "sha256": "ab" * 32, "vocab_size": 8192, "downsample": 8}


def test_s3_round_trip_without_leaking_credentials(s3_server, rows):
    so = s3_server["storage_options"]
    out = f"s3://{s3_server['bucket']}/tokens/k600"
    for fmt, sid in (("arrow", 0), ("webdataset", 1)):
        w = ShardWriter(out if fmt == "arrow" else out + "-wds", sid, codebook_size=8192, tokenizer=TOK,
                        resolution=32, format=fmt, storage_options=so, row_group_size=3)
        for r in rows:
            w.add(r)
        w.commit(input_shard={"id": sid, "worklist_sha256": "x", "num_items": len(rows)}, errors=[])
    for o in (out, out + "-wds"):
        sides = committed_shards(o, so)
        assert len(sides) == 1 and sides[0]["counts"]["rows"] == len(rows)
        assert verify_shard(o, sides[0], so) == []
        man = write_manifest(o, so)
        assert read_manifest(o, so)["content_hash"] == man["content_hash"]
        with open_shard(storage.join(o, sides[0]["data_file"]), so, verify=True) as r:
            for i in (7, 0, len(rows) - 1):  # random access by ranges
                np.testing.assert_array_equal(r.tokens(i), rows[i]["tokens"])
                assert r.row(i)["key"] == rows[i]["key"]

    runner = CliRunner()
    logs = []
    for args in (["status", out, "--json"], ["verify", out], ["inspect", out, "--json"]):
        res = runner.invoke(main, [*args, "--endpoint-url", s3_server["endpoint_url"]])
        assert res.exit_code == 0, res.output
        logs.append(res.output)
    assert json.loads(logs[0])["rows"] == len(rows)

    # no credential in anything written or printed
    fs, _ = storage.url_to_fs(out, so)
    written = b"".join(fs.cat(p) for p in fs.find(f"{s3_server['bucket']}/tokens") if p.endswith(".json"))
    everything = written.decode() + "".join(logs)
    assert s3_server["secret_key"] not in everything and s3_server["access_key"] not in everything


def test_remote_webdataset_shard_is_read_by_member_ranges(s3_server, make_rows, monkeypatch):
    """Opening a remote tar shard fetches its headers, a row its two members: never the archive
    (s3fs's read-ahead through a stream would download most of it)."""
    so = s3_server["storage_options"]
    out = f"s3://{s3_server['bucket']}/tokens/wds-ranges"
    rows = make_rows(30, grid=(16, 16))  # 0.5-1.5 KB tokens per row: headers are a small part
    w = ShardWriter(out, 0, codebook_size=8192, tokenizer=TOK, resolution=128, format="webdataset",
                    storage_options=so)
    for r in rows:
        w.add(r)
    w.commit(input_shard={"id": 0, "worklist_sha256": "x", "num_items": len(rows)}, errors=[])
    side = committed_shards(out, so)[0]
    url = storage.join(out, side["data_file"])
    fs, path = storage.url_to_fs(url, so)
    archive = fs.size(path)
    tokens_bytes = sum(n for name, n in _tar_sizes(fs, path) if name.endswith(".tokens.npy"))
    fetched = []
    cat_file = fs.cat_file
    monkeypatch.setattr(fs, "cat_file", lambda p, start=None, end=None, **kw: fetched.append(end - start)
                        or cat_file(p, start=start, end=end, **kw))
    fs_open = fs.open
    monkeypatch.setattr(fs, "open", lambda p, *a, **k: pytest.fail(f"a stream was opened on {p}") if p.endswith(".tar")
                        else fs_open(p, *a, **k))
    with open_shard(url, so) as r:
        index_bytes = sum(fetched)
        assert len(r) == len(rows) and len(fetched) >= 2 * len(rows)  # one header range per member
        assert index_bytes < archive / 2
        before = len(fetched)
        for i in (17, 3):
            np.testing.assert_array_equal(r.tokens(i), rows[i]["tokens"])
        meta = r.row(9)
        assert meta["key"] == rows[9]["key"] and meta["label"] == rows[9]["label"]
        np.testing.assert_array_equal(meta["tokens"], rows[9]["tokens"])
        assert len(fetched) - before == 4  # two tokens members, then row 9's json and tokens
        member_bytes = sum(fetched[before:])
        assert r._impl.bytes_fetched == index_bytes + member_bytes
        assert member_bytes < 3 * (rows[17]["tokens"].size + rows[3]["tokens"].size + rows[9]["tokens"].size)
        # What `mix` reads of it: the metadata members only (one concurrent batch), no tokens.
        assert r.column("num_frames") == [x["num_frames"] for x in rows] and r.column("label")[9] == rows[9]["label"]
        meta_bytes = r._impl.bytes_fetched - index_bytes - member_bytes
        assert 0 < meta_bytes < archive - tokens_bytes


def _tar_sizes(fs, path):
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(fs.cat_file(path)), mode="r:") as t:
        return [(m.name, m.size) for m in t]
