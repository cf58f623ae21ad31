"""The demo set: real layouts read by the real adapters, deterministic, labels that mean something."""

from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.decode import DecodeConfig, decode_item
from pipeline.demo_data import (
    MIN_FRAME,
    OBJECT_CLASSES,
    OBJECT_DRIFT,
    DemoDataConfig,
    make_demo_data,
    object_clip_frames,
    render_object_image,
)
from pipeline.sources import list_items

TINY = dict(scale=1.0, images=40, val_images=10, videos=20, val_videos=8, davis=2, davis_frames=6, workers=1)


def tree_hash(root: str) -> dict[str, str]:
    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo") / "data")
    summary = make_demo_data(DemoDataConfig(out=out, seed=3, **TINY))
    return out, summary


def test_layouts_are_read_by_the_real_adapters_without_problems(demo):
    out, summary = demo
    assert {k: summary["imagenet"][k] for k in ("train", "val", "classes")} == {"train": 40, "val": 10, "classes": 10}
    assert 0.15 < summary["imagenet"]["object_area"] < 0.35  # a minority of the frame
    items, report = list_items("imagenet", os.path.join(out, "imagenet"))
    assert report.problems == {}
    assert sum(i["split"] == "train" for i in items) == 40 and sum(i["split"] == "val" for i in items) == 10
    assert {i["label"] for i in items} <= {f"n{d:08d}" for d in range(10)}
    kin, report = list_items("kinetics600", os.path.join(out, "kinetics"))
    assert report.problems == {} and len(kin) == 28
    assert sorted({i["label"] for i in kin}) == sorted(OBJECT_CLASSES)
    train_labels = [i["label"] for i in kin if i["split"] == "train"]
    assert all(train_labels.count(m) == 2 for m in OBJECT_CLASSES)  # balanced classes
    assert {i["split"] for i in kin} == {"train", "val"}


def test_clips_and_images_decode(demo):
    out, _ = demo
    kin, _ = list_items("kinetics600", os.path.join(out, "kinetics"))
    recs = decode_item(kin[0], DecodeConfig(resolution=64))
    assert [r["type"] for r in recs] == ["chunk"] and recs[0]["num_frames"] == 32 and recs[0]["fps"] == 16
    imgs, _ = list_items("imagenet", os.path.join(out, "imagenet"))
    (rec,) = decode_item(imgs[0], DecodeConfig(resolution=64))
    assert rec["frames"].shape == (1, 64, 64, 3) and rec["frames"].std() > 10


def test_davis_layout_and_masks(demo):
    out, _ = demo
    root = os.path.join(out, "davis")
    seqs = [line.strip() for f in ("train.txt", "val.txt") for line in open(os.path.join(root, "ImageSets", "2017", f))]
    assert seqs == ["demo-seq-000", "demo-seq-001"]
    for s in seqs:
        jpgs = sorted(os.listdir(os.path.join(root, "JPEGImages", "480p", s)))
        pngs = sorted(os.listdir(os.path.join(root, "Annotations", "480p", s)))
        assert jpgs == [f"{t:05d}.jpg" for t in range(6)] and pngs == [f"{t:05d}.png" for t in range(6)]
        masks = [Image.open(os.path.join(root, "Annotations", "480p", s, p)) for p in pngs]
        assert all(m.mode == "P" and m.size == (128, 96) for m in masks)
        assert masks[0].getpalette()[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]  # DAVIS palette
        ids = set(np.unique(np.asarray(masks[0])))
        assert 0 in ids and 1 <= len(ids) - 1 <= 3
        # Objects move: the masks of the first and last frame differ.
        assert (np.asarray(masks[0]) != np.asarray(masks[-1])).any()


def test_same_seed_same_bytes_other_seed_differs(tmp_path, demo):
    out, _ = demo
    # A separate process with two workers: bytes must not depend on the process or on workers.
    again = str(tmp_path / "again")
    code = ("from pipeline.demo_data import DemoDataConfig, make_demo_data; "
            f"make_demo_data(DemoDataConfig(out={again!r}, seed=3, **dict({TINY!r}, workers=2)))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    assert tree_hash(again) == tree_hash(out)
    other = str(tmp_path / "other")
    make_demo_data(DemoDataConfig(out=other, seed=4, **dict(TINY, videos=0, val_videos=0, davis=0)))
    a, b = tree_hash(other), tree_hash(out)
    shared = [k for k in a if k.endswith(".JPEG") and k in b]
    assert any(a[k] != b[k] for k in shared) or set(a) != set(b)


def test_object_covers_a_minority_and_clips_move_slowly():
    for j in range(20):
        rgb, k, area = render_object_image(np.random.default_rng(j), 64)
        assert rgb.shape == (64, 64, 3) and 0 <= k < len(OBJECT_CLASSES)
        assert 0.18 < area < 0.32  # a 32-40 px disc of a 64 px frame: ~16 of the 64 tokens
    moved = []
    for j in range(20):
        frames, corners = object_clip_frames(np.random.default_rng(j), j % 10, 64, 32)
        assert len(frames) == 32 and frames[0].shape == (64, 64, 3)
        (x0, y0), (x1, y1) = corners[0], corners[-1]
        moved.append(np.hypot(x1 - x0, y1 - y0))
        # Between consecutive frames the object moves at most about half a pixel.
        assert max(np.hypot(a[0] - b[0], a[1] - b[1]) for a, b in zip(corners, corners[1:], strict=False)) <= 1.5
    assert max(moved) <= OBJECT_DRIFT[1] + 1 and np.median(moved) >= OBJECT_DRIFT[0] - 2


def test_frames_must_hold_the_largest_object():
    for j in range(40):  # every draw of the object fits the smallest accepted frame
        assert render_object_image(np.random.default_rng(j), MIN_FRAME)[0].shape == (MIN_FRAME, MIN_FRAME, 3)
        frames, _ = object_clip_frames(np.random.default_rng(j), j % 10, MIN_FRAME, 4)
        assert frames[-1].shape == (MIN_FRAME, MIN_FRAME, 3)
    for field in ("image_size", "video_size"):
        with pytest.raises(ValueError, match=rf"DemoDataConfig.{field}=40 is invalid: use .*\[{MIN_FRAME}, 512\]"):
            DemoDataConfig(out="x", **{field: 40})


def test_cli_tiny_set(tmp_path):
    from pipeline.cli import main

    res = CliRunner().invoke(main, ["demo-data", "--out", str(tmp_path / "d"), "--scale", "0.01", "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert "imagenet 30+5 images, kinetics 3+1 clips, davis 1 sequences" in res.output
    with open(tmp_path / "d" / "kinetics" / "annotations" / "train.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(r["label"] in OBJECT_CLASSES for r in rows)
    bad = CliRunner().invoke(main, ["demo-data", "--out", str(tmp_path / "e"), "--scale", "0"])
    assert bad.exit_code != 0 and "DemoDataConfig.scale=0.0" in bad.output


def test_background_windows_never_leave_the_photo(monkeypatch):
    """Rendered with all-white photos, no frame may show the black fill outside the background."""
    import pipeline.demo_data as dd

    white = tuple(np.full_like(p, 255) for p in dd.backgrounds())
    white_tex = tuple(np.full_like(p, 255) for p in dd.object_textures())
    monkeypatch.setattr(dd, "backgrounds", lambda: white)
    monkeypatch.setattr(dd, "object_textures", lambda: white_tex)
    for j in range(24):
        # The photo is dimmed by up to 0.6, so white reads as >= 153; black fill would read 0.
        frames, _ = dd.object_clip_frames(np.random.default_rng(j), j % 10, 64, 16)
        assert np.stack(frames).min() >= 128, j


def test_demo_to_worklist_to_shards_to_decoded_chunks(demo, tmp_path):
    """The path the tokenize job takes: list once, freeze, cut into input shards, decode a shard."""
    from pipeline.decode import decode_items
    from pipeline.sources import ensure_worklist, input_shards

    out, _ = demo
    cfg = DecodeConfig(resolution=64)
    wl, created = ensure_worklist("kinetics600", os.path.join(out, "kinetics"), str(tmp_path / "wl"),
                                  chunk_seconds=cfg.chunk_seconds)
    assert created and len(wl) == 28
    shards = input_shards(wl, 10)
    assert [s.num_items for s in shards] == [10, 10, 8]
    recs = list(decode_items(shards[2].items, cfg))
    assert [r["type"] for r in recs] == ["chunk"] * 8
    assert [r["key"] for r in recs] == [i["key"] for i in shards[2].items]
    assert all(r["frames"].shape == (32, 64, 64, 3) and r["label"] in OBJECT_CLASSES for r in recs)
