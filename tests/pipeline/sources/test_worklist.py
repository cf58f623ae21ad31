"""Frozen work list: determinism, refusal to change, verification, and golden input shards."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from pipeline.sources import ensure_worklist, freeze_worklist, input_shards, load_worklist
from pipeline.sources.items import make_item


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
    assert doc["schema"] == "worklist" and doc["version"] == 1 and doc["num_items"] == 10


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
    doc["version"] = 2
    (out / "worklist.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="version 2 is not supported"):
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
