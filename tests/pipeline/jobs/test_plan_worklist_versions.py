"""A job planned from a version-1 work list (before the compact rows of version 2) still resumes."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

from pipeline.jobs import TokenizeConfig, prepare
from pipeline.shards import ShardWriter
from pipeline.sources.items import ARROW_SCHEMA, ITEM_FIELDS
from pipeline.sources.worklist import table_to_parquet_bytes


def test_job_planned_from_a_version_1_list_resumes_with_its_hash(tmp_path, make_layout, tok_spec):
    lay = make_layout("folder", str(tmp_path / "data"))
    out = tmp_path / "out"
    cfg = TokenizeConfig(dataset="folder", input=lay["root"], output=str(out), tokenizer=tok_spec, resolution=64,
                         items_per_shard=2, progress=False)
    first = prepare(cfg)
    items = [it for s in first.shards for it in s.items]
    # Turn the output into what the old code left: the same items frozen as version 1, a plan naming
    # that list's hash, and shard 0 committed against it.
    data = table_to_parquet_bytes(pa.table({k: [it[k] for it in items] for k in ITEM_FIELDS}, schema=ARROW_SCHEMA))
    v1 = hashlib.sha256(data).hexdigest()
    assert v1 != first.worklist_sha256
    (out / "worklist" / "worklist.parquet").write_bytes(data)
    doc = json.loads((out / "worklist" / "worklist.json").read_text())
    (out / "worklist" / "worklist.json").write_text(json.dumps({**doc, "version": 1, "sha256": v1}))
    plan_doc = json.loads((out / "job.json").read_text())
    (out / "job.json").write_text(json.dumps({**plan_doc, "worklist_sha256": v1}))
    w = ShardWriter(str(out), 0, codebook_size=first.codebook_size, tokenizer=first.tokenizer, resolution=64,
                    grid=(8, 8))
    w.commit(input_shard={"id": 0, "worklist_sha256": v1, "num_items": 2})

    again = prepare(cfg)
    assert again.worklist_sha256 == v1 and not again.listed_now
    assert [s["shard_id"] for s in again.done] == [0]
    assert [s.id for s in again.pending] == [s.id for s in first.shards[1:]]
    assert [it for s in again.shards for it in s.items] == items
    assert all(s.worklist_sha256 == v1 for s in again.pending)
