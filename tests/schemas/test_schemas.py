import pytest

import schemas


def test_every_kind_has_a_loadable_current_schema():
    assert {"shard_sidecar", "dataset_manifest", "mix_manifest", "run_summary", "job_plan"} <= set(schemas.kinds())
    for k in schemas.kinds():
        assert schemas.current_version(k) >= 1
        schemas._validator(k, schemas.current_version(k))


def test_unknown_newer_version_is_refused_with_what_to_do():
    doc = {"schema": "job_plan", "version": 99}
    with pytest.raises(schemas.SchemaError) as e:
        schemas.validate(doc, "job_plan", source="out/job.json")
    msg = str(e.value)
    assert "version 99" in msg and "out/job.json" in msg and "upgrade Toto" in msg


def test_wrong_kind_and_missing_fields_are_named():
    with pytest.raises(schemas.SchemaError, match="expected a document of kind 'job_plan'"):
        schemas.validate({"schema": "run_summary", "version": 1}, "job_plan")
    with pytest.raises(schemas.SchemaError, match="'num_items' is a required property"):
        schemas.validate(
            schemas.new_document("job_plan", dataset="x", input="i", worklist_sha256="h", num_input_shards=1, settings={}),
            "job_plan",
        )


def test_content_hash_is_order_independent_and_excludes_itself():
    a = schemas.with_content_hash({"b": 1, "a": [1, 2]})
    b = schemas.with_content_hash({"a": [1, 2], "b": 1})
    assert a["content_hash"] == b["content_hash"] == schemas.content_hash(a)
    assert schemas.with_content_hash({"a": [2, 1], "b": 1})["content_hash"] != a["content_hash"]
