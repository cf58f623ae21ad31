"""Sidecars are read concurrently, once per phase: what a caller already read is reused."""

from __future__ import annotations

import json

import pytest

from pipeline import storage
from pipeline.shards import ShardWriter, build_manifest, committed_shards, write_manifest

TOK = {"id": "test-tokenizer", "sha256": "ab" * 32, "vocab_size": 8192, "downsample": 8}


def _commit(out: str, shard_id: int, rows, so=None) -> dict:
    w = ShardWriter(out, shard_id, codebook_size=8192, tokenizer=TOK, resolution=32, storage_options=so)
    for r in rows:
        w.add(r)
    return w.commit(input_shard={"id": shard_id, "worklist_sha256": "cd" * 32, "num_items": len(rows)})


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out"), None
    s3 = request.getfixturevalue("s3_server")
    return f"s3://{s3['bucket']}/sidecars-{tmp_path.name}", s3["storage_options"]


def test_known_sidecars_are_reused_and_only_new_ones_fetched(out, make_rows):
    url, so = out
    first = [_commit(url, i, make_rows(2, seed=i), so) for i in (3, 0)]
    for i in (5, 1):
        _commit(url, i, make_rows(2, seed=i), so)
    # Overwrite a known sidecar's file with junk: the known copy must be used, not a re-read.
    storage.atomic_write_bytes(storage.join(url, "shard-000003.json"), b"{ not json", so)
    got = committed_shards(url, so, known=first)
    assert [s["shard_id"] for s in got] == [0, 1, 3, 5]
    assert got[0] is first[1] and got[2] is first[0]
    assert got[1]["counts"]["rows"] == 2 and got[3]["input_shard"]["id"] == 5
    with pytest.raises(Exception, match="shard-000003.json is not valid JSON"):
        committed_shards(url, so)  # without `known`, every sidecar is read (and the junk found)
    # The manifest is built from the given sidecars, the same as from a fresh read of sound ones.
    storage.atomic_write_bytes(storage.join(url, "shard-000003.json"),
                               json.dumps(first[0]).encode(), so)  # restore
    man = write_manifest(url, so, sidecars=list(reversed(got)))
    assert [s["id"] for s in man["shards"]] == [0, 1, 3, 5]
    assert man["content_hash"] == build_manifest(url, so)["content_hash"]


def test_listing_given_by_the_caller_is_used_and_checked(out, make_rows):
    url, so = out
    _commit(url, 2, make_rows(1), so)
    names = storage.listdir(url, so)
    assert [s["shard_id"] for s in committed_shards(url, so, names=names)] == [2]
    with pytest.raises(ValueError, match="names shard-000002.arrow, which is missing"):
        committed_shards(url, so, names=[n for n in names if not n.endswith(".arrow")])


def test_read_json_many_keeps_order_and_names_a_missing_document(out, make_rows):
    url, so = out
    sides = [_commit(url, i, make_rows(1, seed=i), so) for i in range(6)]
    urls = [storage.join(url, f"shard-{i:06d}.json") for i in (4, 0, 5, 2)]
    got = storage.read_json_many(urls, "shard_sidecar", so)
    assert [g["shard_id"] for g in got] == [4, 0, 5, 2] and got[0] == sides[4]
    with pytest.raises(FileNotFoundError, match="shard_sidecar document not found: .*shard-000009.json"):
        storage.read_json_many(urls + [storage.join(url, "shard-000009.json")], "shard_sidecar", so)
