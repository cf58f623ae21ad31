"""The `cater` adapter on CATER's release layout (videos/*.avi + lists/localize/{train,val}.txt).

Listing never opens a video, so these layouts hold small placeholder files; the miniature's test
(tests/pipeline/demo_data/test_cater.py) reads real encoded videos.
"""

from __future__ import annotations

import pytest

from pipeline.sources import list_items


def _layout(root, lines: dict[str, str], videos: list[str]) -> str:
    for name in videos:
        p = root / "videos" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"RIFF")
    for split, text in lines.items():
        p = root / "lists" / "localize" / f"{split}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return str(root)


def test_lists_become_labelled_items_with_splits(tmp_path):
    vids = [f"CLEVR_new_{i:06d}.avi" for i in range(5)]
    root = _layout(tmp_path, {
        "train": "CLEVR_new_000000.avi 14\nCLEVR_new_000001.avi 0\n\nCLEVR_new_000002.avi, 35\n",
        # a path before the name (CATER's generator writes the full path) and a missing video
        "val": "/scratch/all_actions/images/CLEVR_new_000003.avi 7\nCLEVR_new_000009.avi 3\n",
    }, vids)
    items, report = list_items("cater", root)
    got = [(it["video_id"], it["split"], it["label"], it["uri"].rsplit("/", 2)[-2:]) for it in items]
    assert got == [
        ("CLEVR_new_000000", "train", "14", ["videos", "CLEVR_new_000000.avi"]),
        ("CLEVR_new_000001", "train", "0", ["videos", "CLEVR_new_000001.avi"]),
        ("CLEVR_new_000002", "train", "35", ["videos", "CLEVR_new_000002.avi"]),
        ("CLEVR_new_000003", "val", "7", ["videos", "CLEVR_new_000003.avi"]),
    ]
    assert all(it["key"] == f"cater/{it['video_id']}/00000" and it["kind"] == "video" and it["t_end"] is None
               for it in items)
    assert report.problems == {"missing_file": 1, "unmatched_file": 1}
    assert report.examples["missing_file"] == ["videos/CLEVR_new_000009.avi (listed in lists/localize/val.txt:2, class 3)"]
    assert report.examples["unmatched_file"] == ["videos/CLEVR_new_000004.avi"]
    only_val, _ = list_items("cater", root, splits=["val"])
    assert [it["video_id"] for it in only_val] == ["CLEVR_new_000003"]


def test_bad_rows_and_duplicates_are_reported(tmp_path):
    root = _layout(tmp_path, {"train": "CLEVR_new_000000.avi 36\nCLEVR_new_000001.avi x\nCLEVR_new_000002.avi\n"
                                       "CLEVR_new_000003.avi 5\n",
                              "val": "CLEVR_new_000003.avi 5\n"},
                   [f"CLEVR_new_{i:06d}.avi" for i in range(4)])
    items, report = list_items("cater", root)
    assert [(it["video_id"], it["split"]) for it in items] == [("CLEVR_new_000003", "train")]
    assert report.problems["bad_row"] == 3 and report.problems["duplicate_row"] == 1
    assert "CLASS in 0..35" in report.examples["bad_row"][0]


def test_missing_list_and_missing_videos_are_errors_that_say_what_to_unpack(tmp_path):
    root = _layout(tmp_path, {"train": "CLEVR_new_000000.avi 1\n"}, ["CLEVR_new_000000.avi"])
    with pytest.raises(ValueError, match=r"lists/localize/val.txt is missing: unpack the release's lists.zip"):
        list_items("cater", root)
    assert len(list_items("cater", root, splits=["train"])[0]) == 1
    (tmp_path / "videos" / "CLEVR_new_000000.avi").unlink()
    with pytest.raises(ValueError, match=r"unpack the release's videos.zip into .*/videos/"):
        list_items("cater", root, splits=["train"])
    with pytest.raises(ValueError, match="use one of"):
        list_items("cater", root, task="localise")
