"""The CATER-like miniature: CATER's layout and label rule, a label the frames determine, hidden-at-end
clips still labelled by their carrier, determinism, and the `cater` adapter reading it."""

from __future__ import annotations

import hashlib
import json
import math
import os

import av
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.demo_data.cater import (
    SNITCH_RGB,
    CaterConfig,
    cell_of,
    localize_from_frames,
    make_cater,
)
from pipeline.demo_data.cli import demo_cater
from pipeline.sources import list_items

SMALL = dict(train=6, val=3, frames=24, size=64)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("cater") / "a"
    return str(root), make_cater(CaterConfig(out=str(root), seed=3, **SMALL))


def _lists(root: str) -> dict[str, int]:
    out = {}
    for split in ("train", "val"):
        with open(os.path.join(root, "lists", "localize", f"{split}.txt")) as f:
            for line in f:
                name, cls = line.split()
                out[name] = int(cls)
    return out


def _decode(path: str) -> np.ndarray:
    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])  # (F, S, S, 3)


def _scene(root: str, name: str) -> dict:
    with open(os.path.join(root, "scenes", name.replace(".avi", ".json"))) as f:
        return json.load(f)


def test_layout_and_label_rule(mini):
    root, summary = mini
    labels = _lists(root)
    assert sorted(labels) == [f"CLEVR_new_{i:06d}.avi" for i in range(9)]
    assert summary["train"]["videos"] == 6 and summary["val"]["videos"] == 3
    assert summary["train"]["carried"] == 2 and summary["val"]["released"] == 1
    for name, cls in labels.items():
        sc = _scene(root, name)
        loc = sc["objects"][0]["locations"]
        assert sc["objects"][0]["shape"] == "spl" and len(loc) == 24
        x, y, _ = loc["23"]
        # CATER's localize_dataset: (floor(y) + 3) * 6 + floor(x) + 3 of the last location
        assert cls == (math.floor(y) + 3) * 6 + math.floor(x) + 3 == cell_of(x, y)
    assert cell_of(-3.0, -3.0) == 0 and cell_of(2.99, 2.99) == 35 and cell_of(0.5, -2.5) == 3


def test_tracking_baseline_from_decoded_frames_gets_every_label(mini):
    root, _ = mini
    labels = _lists(root)
    got = {}
    for name in labels:
        cols = {o["instance"]: tuple(o["rgb"]) for o in _scene(root, name)["objects"]}
        got[name] = localize_from_frames(_decode(os.path.join(root, "videos", name)), cols)
    assert got == labels  # 100%: the frames determine the label


def test_a_snitch_hidden_at_the_end_has_its_carriers_cell(mini):
    root, _ = mini
    labels = _lists(root)
    hidden = [n for n in labels if _scene(root, n)["kind"] == "carried"]
    assert len(hidden) == 3
    for name in hidden:
        sc = _scene(root, name)
        last = _decode(os.path.join(root, "videos", name))[-1].astype(int)
        gold = (np.abs(last - np.array(SNITCH_RGB)).sum(-1) < 60).sum()
        assert gold == 0  # not a pixel of the snitch is seen in the last frame
        carrier = next(o for o in sc["objects"] if o["instance"] == sc["carrier"])
        assert carrier["shape"] == "cone"
        x, y, _ = carrier["locations"]["23"]
        assert labels[name] == cell_of(x, y)
    # and a snitch seen at the end elsewhere: the released ones show it again
    released = [n for n in labels if _scene(root, n)["kind"] == "released"]
    for name in released:
        last = _decode(os.path.join(root, "videos", name))[-1].astype(int)
        assert (np.abs(last - np.array(SNITCH_RGB)).sum(-1) < 60).sum() >= 4


def _digest(root: str) -> str:
    h = hashlib.sha256()
    for d, _, names in sorted(os.walk(root)):
        for n in sorted(names):
            h.update(os.path.relpath(os.path.join(d, n), root).encode())
            with open(os.path.join(d, n), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def test_deterministic_for_a_seed_and_the_command(mini, tmp_path):
    root, _ = mini
    res = CliRunner().invoke(demo_cater, ["--out", str(tmp_path / "b"), "--seed", "3", "--train", "6",
                                    "--val", "3", "--frames", "24", "--size", "64"])
    assert res.exit_code == 0, res.output
    assert "train 6 videos" in res.output and "2 carried" in res.output
    assert _digest(str(tmp_path / "b")) == _digest(root)
    other = make_cater(CaterConfig(out=str(tmp_path / "c"), seed=4, train=1, val=1, frames=12, size=64))
    assert other["train"]["videos"] == 1
    assert _lists(str(tmp_path / "c")) != {k: v for k, v in _lists(root).items() if k in ("CLEVR_new_000000.avi",
                                                                                      "CLEVR_new_000001.avi")}
    with pytest.raises(ValueError, match="CaterConfig.frames=4 is invalid"):
        CaterConfig(out=str(tmp_path / "d"), frames=4)


def test_the_cater_adapter_reads_the_miniature(mini):
    root, _ = mini
    labels = _lists(root)
    items, report = list_items("cater", root)
    assert report.problems == {}
    assert [(it["video_id"], it["split"]) for it in items] == [
        (f"CLEVR_new_{i:06d}", "train" if i < 6 else "val") for i in range(9)]
    assert {it["video_id"] + ".avi": int(it["label"]) for it in items} == labels
