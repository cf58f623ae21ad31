"""Adapters on small synthetic trees in each dataset's layout, including missing/unmatched files."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest

from pipeline.decode import DecodeConfig, decode_item
from pipeline.media import quadrant_frame, write_image, write_video
from pipeline.sources import list_items, make_key, segment_video
from pipeline.sources.items import make_item


def touch(path: str, data: bytes = b"x") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_kinetics_trimmed_untrimmed_missing_unmatched(tmp_path):
    root = tmp_path / "k600"
    touch(str(root / "annotations" / "train.csv"), (
        b"label,youtube_id,time_start,time_end,split\n"
        b"abseiling,-abc_DEF123,10,20,train\n"
        b"zumba,zz9,0,10,train\n"
        b"zumba,missing1,5,15,train\n"
    ))
    touch(str(root / "annotations" / "validate.csv"), (
        b"label,youtube_id,time_start,time_end,split\n"
        b"air drumming,full01,30,40,validate\n"
    ))
    touch(str(root / "train" / "-abc_DEF123_000010_000020.mp4"))
    touch(str(root / "train" / "zz9_000000_000010.mp4"))
    touch(str(root / "train" / "stray_000001_000011.mp4"))  # not in any CSV
    touch(str(root / "val" / "full01.mp4"))  # untrimmed: cut by the CSV times
    items, report = list_items("kinetics600", str(root))
    by_id = {i["video_id"]: i for i in items}
    assert [i["key"] for i in items] == sorted(i["key"] for i in items)
    assert set(by_id) == {"-abc_DEF123_000010_000020", "zz9_000000_000010", "full01_000030_000040"}
    a = by_id["-abc_DEF123_000010_000020"]
    assert (a["label"], a["split"], a["t_start"], a["t_end"], a["kind"]) == ("abseiling", "train", 0.0, None, "video")
    assert a["key"] == "kinetics600/-abc_DEF123_000010_000020/00000"
    u = by_id["full01_000030_000040"]
    assert (u["label"], u["split"], u["t_start"], u["t_end"]) == ("air drumming", "val", 30.0, 40.0)
    assert u["uri"].endswith("val/full01.mp4")
    assert report.problems == {"missing_file": 1, "unmatched_file": 1}
    assert "missing1_000005_000015" in report.examples["missing_file"][0]
    assert report.examples["unmatched_file"] == ["train/stray_000001_000011.mp4"]
    assert "missing file: 1" in report.summary()
    only_val, _ = list_items("kinetics600", str(root), splits=["validate"])
    assert [i["video_id"] for i in only_val] == ["full01_000030_000040"]


def test_kinetics_without_csv_is_a_clear_error(tmp_path):
    touch(str(tmp_path / "train" / "a_000000_000010.mp4"))
    with pytest.raises(ValueError, match="annotation CSV"):
        list_items("kinetics400", str(tmp_path))


def test_ego4d_segments_long_videos_with_consecutive_chunks(tmp_path):
    meta = {"videos": [
        {"video_uid": "uid-long", "duration_sec": 150.0},
        {"video_uid": "uid-short", "duration_sec": 20.0},
        {"video_uid": "uid-gone", "duration_sec": 10.0},
    ]}
    touch(str(tmp_path / "ego4d.json"), json.dumps(meta).encode())
    touch(str(tmp_path / "v2" / "full_scale" / "uid-long.mp4"))
    touch(str(tmp_path / "v1" / "full_scale" / "uid-short.mp4"))
    touch(str(tmp_path / "v2" / "full_scale" / "uid-extra.mp4"))
    items, report = list_items("ego4d", str(tmp_path), max_item_seconds=60, chunk_seconds=64 / 30)
    long = [i for i in items if i["video_id"] == "uid-long"]
    # 60 s rounds down to 28 chunks of 64/30 s = 59.73 s per item: 150 s → 3 items.
    assert [i["chunk"] for i in long] == [0, 28, 56]
    assert [round(i["t_start"], 4) for i in long] == [0.0, round(28 * 64 / 30, 4), round(56 * 64 / 30, 4)]
    assert long[0]["t_end"] == pytest.approx(28 * 64 / 30) and long[-1]["t_end"] is None
    assert [i["key"] for i in long] == ["ego4d/uid-long/00000", "ego4d/uid-long/00028", "ego4d/uid-long/00056"]
    short = [i for i in items if i["video_id"] == "uid-short"]
    assert len(short) == 1 and short[0]["uri"].endswith("v1/full_scale/uid-short.mp4")
    assert report.problems == {"missing_file": 1, "unmatched_file": 1}


def test_segment_video_keeps_short_and_unknown_durations():
    item = make_item(uri="x.mp4", dataset="d", split="train", label=None, video_id="v", kind="video")
    assert segment_video(item, None) == [item]
    assert segment_video(item, 30.0) == [item]
    segs = segment_video(item, 10.0, max_item_seconds=4.0, chunk_seconds=1.5)
    assert [(s["chunk"], s["t_start"], s["t_end"]) for s in segs] == [(0, 0.0, 3.0), (2, 3.0, 6.0), (4, 6.0, 9.0), (6, 9.0, None)]


def test_howto100m_probes_duration_and_segments(tmp_path):
    touch(str(tmp_path / "HowTo100M_v1.csv"), (
        b"video_id,category_1,category_2,rank,task_id\n"
        b"vidA,Food and Entertaining,Recipes,1,100\n"
        b"vidB,Hobbies and Crafts,Knitting,2,101\n"
        b"vidMissing,Cars,Repair,3,102\n"
    ))
    os.makedirs(tmp_path / "videos")
    write_video(str(tmp_path / "videos" / "vidA.mp4"), lambda i, t: quadrant_frame(32, 32, t, 3.0), fps=10, num_frames=30)
    write_video(str(tmp_path / "videos" / "vidB.webm"), lambda i, t: quadrant_frame(32, 32), fps=10, num_frames=5,
                codec="libvpx-vp9")
    touch(str(tmp_path / "videos" / "other.mkv"))
    items, report = list_items("howto100m", str(tmp_path), max_item_seconds=1.0, chunk_seconds=0.5)
    a = [i for i in items if i["video_id"] == "vidA"]
    assert [(i["chunk"], i["t_start"], i["t_end"]) for i in a] == [(0, 0.0, 1.0), (2, 1.0, 2.0), (4, 2.0, None)]
    assert a[0]["label"] == "Food and Entertaining"
    b = [i for i in items if i["video_id"] == "vidB"]
    assert len(b) == 1 and b[0]["uri"].endswith("vidB.webm")
    assert report.problems == {"missing_file": 1, "unmatched_file": 1}
    # The segments decode into consecutive chunks with no frame lost or repeated.
    cfg = DecodeConfig(resolution=16, chunk_frames=5, max_fps=10)
    chunks = [r for it in a for r in decode_item(it, cfg)]
    assert [r["chunk"] for r in chunks] == [0, 1, 2, 3, 4, 5]
    assert sum(r["num_frames"] for r in chunks) == 30
    assert [r["t_start"] for r in chunks] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])


def _jpeg(path: str, color) -> str:
    img = np.zeros((40, 48, 3), np.uint8)
    img[:] = color
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return write_image(path, img)


def test_imagenet_2012_train_val_with_solution(tmp_path):
    _jpeg(str(tmp_path / "train" / "n01440764" / "n01440764_10026.JPEG"), (200, 10, 10))
    _jpeg(str(tmp_path / "train" / "n01443537" / "n01443537_2.JPEG"), (10, 200, 10))
    touch(str(tmp_path / "train" / "n01443537" / "notes.txt"))
    _jpeg(str(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG"), (10, 10, 200))
    _jpeg(str(tmp_path / "val" / "ILSVRC2012_val_00000009.JPEG"), (10, 10, 200))
    touch(str(tmp_path / "LOC_val_solution.csv"), (
        b"ImageId,PredictionString\n"
        b"ILSVRC2012_val_00000001,n01751748 1 2 3 4 n01751748 5 6 7 8\n"
        b"ILSVRC2012_val_00000002,n09193705 1 2 3 4\n"
    ))
    items, report = list_items("imagenet", str(tmp_path))
    got = {(i["split"], i["label"], i["video_id"]) for i in items}
    assert got == {
        ("train", "n01440764", "n01440764_10026"),
        ("train", "n01443537", "n01443537_2"),
        ("val", "n01751748", "ILSVRC2012_val_00000001"),
    }
    assert all(i["kind"] == "image" and i["chunk"] == 0 for i in items)
    assert report.problems == {"missing_file": 1, "unlabelled_image": 1}
    assert "ILSVRC2012_val_00000002" in report.examples["missing_file"][0]
    assert "ILSVRC2012_val_00000009" in report.examples["unlabelled_image"][0]


def test_imagenet_21k_folders_and_tars_read_as_streams(tmp_path):
    _jpeg(str(tmp_path / "n00000001" / "n00000001_1.JPEG"), (250, 0, 0))
    buf = io.BytesIO()
    colors = {"n00000002_7.JPEG": (0, 250, 0), "sub/n00000002_8.JPEG": (0, 0, 250)}
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, color in colors.items():
            b = io.BytesIO()
            img = np.zeros((30, 30, 3), np.uint8)
            img[:] = color
            from PIL import Image

            Image.fromarray(img).save(b, format="JPEG", quality=95)
            ti = tarfile.TarInfo(name)
            ti.size = len(b.getvalue())
            tf.addfile(ti, io.BytesIO(b.getvalue()))
        evil = tarfile.TarInfo("../evil.JPEG")
        evil.size = 3
        tf.addfile(evil, io.BytesIO(b"abc"))
        link = tarfile.TarInfo("link.JPEG")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
    (tmp_path / "n00000002.tar").write_bytes(buf.getvalue())
    items, report = list_items("imagenet", str(tmp_path))
    by_id = {i["video_id"]: i for i in items}
    assert set(by_id) == {"n00000001_1", "n00000002_7", "n00000002_8"}
    assert by_id["n00000002_7"]["label"] == "n00000002" and by_id["n00000002_7"]["byte_offset"] is not None
    assert report.problems == {"rejected_tar_member": 2}
    assert not (tmp_path / "evil.JPEG").exists() and not (tmp_path.parent / "evil.JPEG").exists()
    cfg = DecodeConfig(resolution=16)
    for vid, color in (("n00000002_7", (0, 250, 0)), ("n00000002_8", (0, 0, 250))):
        (rec,) = decode_item(by_id[vid], cfg)
        assert rec["type"] == "chunk", rec
        assert np.abs(rec["frames"][0, 8, 8].astype(int) - color).max() <= 6


def test_folder_with_index_glob_and_reports(tmp_path):
    _jpeg(str(tmp_path / "a" / "one.jpg"), (1, 2, 3))
    _jpeg(str(tmp_path / "a" / "two.png"), (1, 2, 3))
    os.makedirs(tmp_path / "clips")
    write_video(str(tmp_path / "clips" / "c.1.mp4"), lambda i, t: quadrant_frame(32, 32), fps=10, num_frames=10)
    touch(str(tmp_path / "readme.md"))
    items, report = list_items("folder", str(tmp_path))
    assert [(i["kind"], i["label"]) for i in items] == [("image", None), ("image", None), ("video", None)]
    assert {i["video_id"] for i in items} >= {"a__one", "a__two"}
    # A dot in the file name is made key-safe with a hash suffix (keys never contain dots).
    vid = next(i for i in items if i["kind"] == "video")
    assert "." not in vid["key"] and vid["video_id"].startswith("clips__c_1-")
    touch(str(tmp_path / "list.csv"), b"path,label,split\na/one.jpg,cat,train\nclips/c.1.mp4,dog,val\na/gone.jpg,x,train\n")
    items, report = list_items("folder", str(tmp_path), index="list.csv", name="mine")
    assert [(i["dataset"], i["label"], i["split"]) for i in items] == [("mine", "cat", "train"), ("mine", "dog", "val")]
    assert report.problems == {"missing_file": 1, "unmatched_file": 1}
    assert report.examples == {"missing_file": ["a/gone.jpg"], "unmatched_file": ["a/two.png"]}
    touch(str(tmp_path / "list.jsonl"), b'{"path": "a/two.png", "label": 3}\n')
    items, _ = list_items("folder", str(tmp_path), index="list.jsonl")
    assert [(i["label"], i["split"]) for i in items] == [("3", "train")]
    items, _ = list_items("folder", str(tmp_path), pattern="a/*.jpg")
    assert [i["video_id"] for i in items] == ["a__one"]


def test_unknown_dataset_and_missing_root(tmp_path):
    with pytest.raises(ValueError, match="choose one of"):
        list_items("kinetics999", str(tmp_path))
    with pytest.raises(ValueError, match="not a directory"):
        list_items("folder", str(tmp_path / "nope"))


def test_make_key_is_fixed_width():
    assert make_key("imagenet", "n01_1", 7) == "imagenet/n01_1/00007"


def test_folder_on_s3(s3_server, tmp_path):
    import fsspec

    so = s3_server["storage_options"]
    fs = fsspec.filesystem("s3", **so)
    root = f"s3://{s3_server['bucket']}/folder-ds"
    local = _jpeg(str(tmp_path / "x.jpg"), (250, 250, 0))
    fs.put_file(local, f"{root}/imgs/x.jpg")
    fs.pipe_file(f"{root}/imgs/empty.jpg", b"")
    items, report = list_items("folder", root, storage_options=so)
    assert [i["uri"] for i in items] == [f"{root}/imgs/empty.jpg", f"{root}/imgs/x.jpg"]
    recs = [r for it in items for r in decode_item(it, DecodeConfig(resolution=16), storage_options=so)]
    assert recs[0]["type"] == "error" and recs[0]["reason"] == "zero bytes"
    assert recs[1]["type"] == "chunk" and np.abs(recs[1]["frames"][0, 8, 8].astype(int) - (250, 250, 0)).max() <= 6


def test_imagenet_val_solution_outside_root(tmp_path):
    root = tmp_path / "ILSVRC" / "Data" / "CLS-LOC"
    _jpeg(str(root / "val" / "ILSVRC2012_val_00000003.JPEG"), (9, 9, 9))
    touch(str(tmp_path / "LOC_val_solution.csv"), b"ImageId,PredictionString\nILSVRC2012_val_00000003,n04286575 1 2 3 4\n")
    items, report = list_items("imagenet", str(root))
    assert items == [] and report.problems == {"unlabelled_image": 1}
    items, report = list_items("imagenet", str(root), val_solution=str(tmp_path / "LOC_val_solution.csv"))
    assert [(i["split"], i["label"]) for i in items] == [("val", "n04286575")] and report.problems == {}


def test_listing_file_replaces_storage_listing(tmp_path):
    import gzip

    root = tmp_path / "ds"
    for rel in ("a/one.jpg", "b/two.mp4"):
        touch(str(root / rel))
    walked, _ = list_items("folder", str(root), probe=False)
    (tmp_path / "files.txt.gz").write_bytes(gzip.compress(b"b/two.mp4\n\na/one.jpg\n"))
    listed, report = list_items("folder", str(root), probe=False, listing=str(tmp_path / "files.txt.gz"))
    assert listed == walked and report.num_files == 2
    # The listing is authoritative: a path in it is an item without touching storage.
    (tmp_path / "more.txt").write_text("a/one.jpg\nc/three.png\n")
    items, _ = list_items("folder", str(root), probe=False, listing=str(tmp_path / "more.txt"))
    assert [i["uri"] for i in items] == [f"{root}/a/one.jpg", f"{root}/c/three.png"]
    (tmp_path / "bad.txt").write_text("a/one.jpg\n../etc/passwd\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: '../etc/passwd' is not a plain path relative"):
        list_items("folder", str(root), listing=str(tmp_path / "bad.txt"))


def test_folder_paths_mapping_to_one_video_id_keep_the_first_and_report_the_rest(tmp_path):
    for rel in ("a/b.jpg", "a__b.jpg", "a__b.png", "c.jpg"):
        touch(str(tmp_path / rel))
    items, report = list_items("folder", str(tmp_path), probe=False)
    # Listed in path order, "a/b.jpg" < "a__b.jpg" < "a__b.png": the first of the three ids "a__b" stays.
    assert [(i["video_id"], i["uri"][len(str(tmp_path)) + 1:]) for i in items] == [("a__b", "a/b.jpg"), ("c", "c.jpg")]
    assert report.problems == {"duplicate_row": 2}
    assert report.examples["duplicate_row"] == ["a__b.jpg", "a__b.png"]


def test_folder_rows_computed_in_arrow_equal_make_item_for_odd_names(tmp_path):
    from pipeline.sources.adapters import _folder_video_id
    from pipeline.sources.items import make_item, media_kind

    rels = ["a/b.jpg", "A-b_9/c.JPG", "clip.1.mp4", "sp ace/é.png", ".hidden.mkv", "deep/er/x.WebM", "v.MOV",
            "n01440764/n01440764_10026.JPEG", "x.tar.gz", "notes.md", "new\nline/d.jpg"]
    for rel in rels:
        touch(str(tmp_path / rel))
    items, _ = list_items("folder", str(tmp_path), probe=False)
    want = sorted((make_item(uri=f"{tmp_path}/{rel}", dataset="folder", split="train", label=None,
                             video_id=_folder_video_id(rel), kind=media_kind(rel))
                   for rel in rels if media_kind(rel)), key=lambda i: i["key"])
    assert items == want and len(items) == 9
    assert {i["video_id"] for i in items} >= {"a__b", "A-b_9__c", "deep__er__x", "v", "n01440764__n01440764_10026"}
