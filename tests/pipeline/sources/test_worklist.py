"""Frozen work list: determinism, refusal to change, verification, and golden input shards."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from pipeline.sources import ensure_worklist, freeze_worklist, input_shards, load_worklist
from pipeline.sources.items import ITEM_FIELDS, make_item


def _items(n: int) -> list[dict]:
    # Deliberately unsorted: freezing sorts by key.
    return [
        make_item(uri=f"/d/v{i:03d}.mp4", dataset="ds", split="train", label=str(i % 3), video_id=f"v{i:03d}",
                  kind="video", t_start=float(i), t_end=None if i % 2 else float(i + 5))
        for i in reversed(range(n))
    ]


def test_freeze_is_deterministic_sorted_and_loads_back(tmp_path):
    a = freeze_worklist(_items(10), str(tmp_path / "a"), dataset="ds", root="/d")
    b = freeze_worklist(list(reversed(_items(10))), str(tmp_path / "b"), dataset="ds", root="/d")
    assert a.sha256 == b.sha256
    assert (tmp_path / "a" / "worklist.parquet").read_bytes() == (tmp_path / "b" / "worklist.parquet").read_bytes()
    wl = load_worklist(str(tmp_path / "a"))
    assert [i["key"] for i in wl.items] == [f"ds/v{i:03d}/00000" for i in range(10)]
    assert wl.items == sorted(_items(10), key=lambda i: i["key"])
    doc = json.loads((tmp_path / "a" / "worklist.json").read_text())
    assert doc["schema"] == "worklist" and doc["version"] == 2 and doc["num_items"] == 10


def test_frozen_list_is_never_replaced(tmp_path):
    out = str(tmp_path / "wl")
    first = freeze_worklist(_items(5), out, dataset="ds", root="/d")
    again = freeze_worklist(_items(5), out, dataset="ds", root="/d")
    assert again.sha256 == first.sha256
    with pytest.raises(ValueError, match="different work list is already frozen"):
        freeze_worklist(_items(6), out, dataset="ds", root="/d")


def test_corrupt_parquet_and_unknown_version_are_refused(tmp_path):
    out = tmp_path / "wl"
    freeze_worklist(_items(5), str(out), dataset="ds", root="/d")
    data = bytearray((out / "worklist.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "worklist.parquet").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt or was modified"):
        load_worklist(str(out))
    doc = json.loads((out / "worklist.json").read_text())
    doc["version"] = 3
    (out / "worklist.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="version 3 is not supported"):
        load_worklist(str(out))


def test_duplicate_keys_are_refused(tmp_path):
    items = _items(3) + _items(1)
    with pytest.raises(ValueError, match="duplicate work-item keys"):
        freeze_worklist(items, str(tmp_path / "wl"), dataset="ds", root="/d")


def test_ensure_worklist_lists_storage_only_once(tmp_path):
    root = tmp_path / "imgs"
    os.makedirs(root / "a")
    for n in ("x.jpg", "y.jpg"):
        (root / "a" / n).write_bytes(b"not really a jpeg")
    wl, created = ensure_worklist("folder", str(root), str(tmp_path / "wl"), probe=False)
    assert created and len(wl) == 2
    shutil.rmtree(root)  # a rerun must not need (or touch) the dataset listing
    wl2, created2 = ensure_worklist("folder", str(root), str(tmp_path / "wl"), probe=False)
    assert not created2 and wl2.sha256 == wl.sha256 and wl2.items == wl.items


def test_golden_input_shard_assignment(tmp_path):
    wl = freeze_worklist(_items(8), str(tmp_path / "wl"), dataset="ds", root="/d")
    shards = input_shards(wl, 3)
    assert [s.name for s in shards] == ["shard-000000", "shard-000001", "shard-000002"]
    assert [[i["video_id"] for i in s.items] for s in shards] == [
        ["v000", "v001", "v002"],
        ["v003", "v004", "v005"],
        ["v006", "v007"],
    ]
    assert shards[2].descriptor() == {"id": 2, "worklist_sha256": wl.sha256, "num_items": 2}
    # Same cut from the plain item list (any order) with the same hash.
    again = input_shards(list(reversed(wl.items)), 3, worklist_sha256=wl.sha256)
    assert again == shards
    with pytest.raises(ValueError, match="items_per_shard"):
        input_shards(wl, 0)


def test_worklist_cli_reports_and_reuses(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    root = tmp_path / "k"
    os.makedirs(root / "annotations")
    os.makedirs(root / "train")
    (root / "annotations" / "train.csv").write_text(
        "label,youtube_id,time_start,time_end,split\nrun,aaa,1,11,train\nrun,bbb,2,12,train\n")
    (root / "train" / "aaa_000001_000011.mp4").write_bytes(b"x")
    args = ["worklist", "--dataset", "kinetics400", "--input", str(root), "--out", str(tmp_path / "wl"),
            "--items-per-shard", "1"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "froze work list" in res.output and "1 items" in res.output and "input shards of 1: 1" in res.output
    assert "missing file: 1" in res.output and "bbb_000002_000012" in res.output
    res = CliRunner().invoke(main, args)
    assert "reused frozen work list" in res.output
    bad = CliRunner().invoke(main, ["worklist", "--dataset", "ego4d", "--input", str(root), "--out", str(tmp_path / "e")])
    assert bad.exit_code == 1 and "ego4d.json not found" in bad.output and "Traceback" not in bad.output


def _golden_items(n: int) -> list[dict]:
    """Items using every field, nulls included, in reverse key order."""
    out = []
    for i in reversed(range(n)):
        kind = "image" if i % 5 == 0 else "video"
        out.append(make_item(
            uri=f"s3://b/ds/{i:05d}.{'jpg' if kind == 'image' else 'mp4'}", dataset="ds", split=("train", "val")[i % 2],
            label=None if i % 3 == 0 else f"lab{i % 7}", video_id=f"v{i:05d}", kind=kind, chunk=(i % 4) * 28,
            t_start=float(i) / 3, t_end=None if i % 2 else float(i) / 3 + 59.7333,
            byte_offset=None if i % 5 else i * 1536, byte_size=None if i % 5 else 1000 + i))
    return out


# sha256 of worklist.parquet (version 2, compact rows) for _golden_items(n). Set deliberately when
# version 2 was introduced: a change here would orphan every job output planned from a version-2
# list (its plan records this hash); change the format only as a new version.
GOLDEN_SHA256 = {
    8: "3daf027801d2dae7bbbcabd57e565151530955cd0503f2b9e91c41a0e5aa6b44",
    70000: "23a6736f5daabb87feac9525998b852c23a755619935ad64660aead414613d05",  # two row groups
}
# The same for version 1 (one column per item field), as the dict-based code wrote it: lists
# frozen then must keep loading under this hash, so the jobs planned from them resume.
GOLDEN_SHA256_V1 = {8: "0a456db5c5f75250a14ca7ce70bc4f1db7c018b09f1a25b914aae1c657a7c393"}


def _write_v1_worklist(out, items: list[dict]) -> str:
    """A version-1 work list exactly as Toto wrote it before version 2 (same writer, item columns)."""
    import hashlib

    import pyarrow as pa

    from pipeline.sources.items import ARROW_SCHEMA
    from pipeline.sources.worklist import table_to_parquet_bytes

    rows = sorted(items, key=lambda i: i["key"])
    data = table_to_parquet_bytes(pa.table({k: [it[k] for it in rows] for k in ITEM_FIELDS}, schema=ARROW_SCHEMA))
    sha = hashlib.sha256(data).hexdigest()
    os.makedirs(out)
    with open(os.path.join(out, "worklist.parquet"), "wb") as f:
        f.write(data)
    doc = {"schema": "worklist", "version": 1, "sha256": sha, "num_items": len(rows), "dataset": "ds",
           "root": "/d", "options": {}, "report": {}}
    with open(os.path.join(out, "worklist.json"), "w") as f:
        json.dump(doc, f)
    return sha


def test_version_1_list_still_loads_with_its_hash_and_cuts_the_same_shards(tmp_path):
    items = _golden_items(8)
    sha = _write_v1_worklist(str(tmp_path / "v1"), items)
    assert sha == GOLDEN_SHA256_V1[8]
    wl = load_worklist(str(tmp_path / "v1"))
    assert wl.version == 1 and wl.sha256 == sha and len(wl) == 8
    assert wl.items == sorted(items, key=lambda i: i["key"])
    # Held compact like a version-2 list; shards carry the version-1 hash their sidecars record.
    assert wl.table.schema.names == ["key", "dir", "name", "split", "label", "kind", "t_start", "t_end",
                                     "byte_offset", "byte_size"]
    shards = input_shards(wl, 3)
    assert [s.descriptor() for s in shards] == [{"id": i, "worklist_sha256": sha, "num_items": n}
                                                for i, n in enumerate((3, 3, 2))]
    assert [list(s.items) for s in shards] == [wl.items[0:3], wl.items[3:6], wl.items[6:8]]
    # Freezing the same items into that folder returns the frozen version-1 list, not a rewrite.
    again = freeze_worklist(items, str(tmp_path / "v1"), dataset="ds", root="/d")
    assert again.sha256 == sha and again.version == 1


def test_compact_rows_are_smaller_and_a_key_that_disagrees_is_refused():
    import pyarrow as pa

    from pipeline.sources.items import ARROW_SCHEMA, compact_items, expand_items

    items = pa.Table.from_pylist(sorted(_golden_items(2000), key=lambda i: i["key"]), schema=ARROW_SCHEMA)
    rows = compact_items(items)
    assert expand_items(rows).equals(items)
    odd = pa.Table.from_pylist([{**items.slice(0, 1).to_pylist()[0], "uri": "/d/we\nird/a.jpg"}], schema=ARROW_SCHEMA)
    assert expand_items(compact_items(odd))["uri"].to_pylist() == ["/d/we\nird/a.jpg"]  # newline in a folder
    assert rows.nbytes < 0.7 * items.nbytes  # here 81 vs 122 bytes per item
    bad = items.set_column(0, "key", pa.array(["ds/other/00000"] + items["key"].to_pylist()[1:]))
    with pytest.raises(ValueError, match="'ds/other/00000' has dataset/video_id/chunk giving key 'ds/v00000/00000'"):
        compact_items(bad)


@pytest.mark.parametrize("n", sorted(GOLDEN_SHA256))
def test_worklist_hash_is_golden_from_dicts_columns_and_reload(tmp_path, n):
    from pipeline.sources import ItemColumns

    items = _golden_items(n)
    from_dicts = freeze_worklist(items, str(tmp_path / "a"), dataset="ds", root="/d")
    assert from_dicts.sha256 == GOLDEN_SHA256[n]
    # The adapters' path: sorted columns in small record batches, written without a whole-table
    # copy (Parquet pages follow chunk boundaries: the writer must not let them change the bytes).
    cols = ItemColumns(flush_rows=777)
    cols.extend(sorted(items, key=lambda i: i["key"]))
    assert cols.table()["key"].num_chunks == -(-n // 777)
    from_cols = freeze_worklist(cols.table(), str(tmp_path / "b"), dataset="ds", root="/d")
    assert from_cols.sha256 == GOLDEN_SHA256[n]
    assert (tmp_path / "a" / "worklist.parquet").read_bytes() == (tmp_path / "b" / "worklist.parquet").read_bytes()
    loaded = load_worklist(str(tmp_path / "b"))
    assert loaded.sha256 == GOLDEN_SHA256[n] and len(loaded) == n
    assert loaded.items_table().equals(from_dicts.items_table())
    assert loaded.items == sorted(items, key=lambda i: i["key"])
    # Input shards: the same row ranges and descriptors whether cut from dicts or the table.
    by_table = input_shards(loaded, 3000)
    by_dicts = input_shards(items, 3000)
    assert by_table == by_dicts
    assert [(s.id, s.start, s.stop) for s in by_table] == [(i, i * 3000, min(n, (i + 1) * 3000))
                                                           for i in range(-(-n // 3000))]
    assert by_dicts[0].worklist_sha256 == GOLDEN_SHA256[n]


def test_input_shard_offers_arrow_slice_and_dicts(tmp_path):
    wl = freeze_worklist(_golden_items(10), str(tmp_path / "wl"), dataset="ds", root="/d")
    s = input_shards(wl, 4)[1]
    assert (s.id, s.name, s.start, s.stop, s.num_items) == (1, "shard-000001", 4, 8, 4)
    assert s.table.num_rows == 4 and s.table.schema.names == list(ITEM_FIELDS)
    assert s.table["key"].to_pylist() == [f"ds/v{i:05d}/{(i % 4) * 28:05d}" for i in range(4, 8)]
    expected = sorted(_golden_items(10), key=lambda i: i["key"])[4:8]
    assert list(s.items) == expected
    assert s.descriptor() == {"id": 1, "worklist_sha256": wl.sha256, "num_items": 4}
    # A shard refers to the work list's buffers; it does not copy them (only `table` expands its rows).
    assert s.rows["name"].chunks[0].buffers()[2].address == wl.table["name"].chunks[0].buffers()[2].address
    # Pickled (e.g. sent to a Ray worker), it carries its own rows only, and stays the same shard.
    import pickle

    big = input_shards(_golden_items(3000), 10)[7]
    back = pickle.loads(pickle.dumps(big))
    assert back == big and back.items == big.items
    assert len(pickle.dumps(big)) < 20_000 < len(pickle.dumps(big.source))


def test_unsorted_table_is_sorted_and_duplicate_keys_in_a_table_are_refused(tmp_path):
    from pipeline.sources import ItemColumns

    cols = ItemColumns()
    cols.extend(_items(6))  # reversed key order
    wl = freeze_worklist(cols.table(), str(tmp_path / "wl"), dataset="ds", root="/d")
    assert wl.items_table()["video_id"].to_pylist() == [f"v{i:03d}" for i in range(6)]
    assert wl.sha256 == freeze_worklist(_items(6), str(tmp_path / "wl2"), dataset="ds", root="/d").sha256
    dup = ItemColumns()
    dup.extend(_items(3) + _items(2))
    with pytest.raises(ValueError, match=r"2 duplicate work-item keys, e.g. \['ds/v000/00000', 'ds/v001/00000'\]"):
        freeze_worklist(dup.table(), str(tmp_path / "wl3"), dataset="ds", root="/d")
