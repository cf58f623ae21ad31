"""Shards on a real S3 API server (moto in server mode on 127.0.0.1)."""

import json

import numpy as np
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
