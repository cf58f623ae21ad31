"""Ego4D STA: the reader on the generated miniature, its errors, frames before the annotated one,
RoI pooling, and `toto-train sta` end to end (tiny model, demo tokenizer)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from schemas import validate
from trainer.evals.sta import roi_features
from trainer.evals.sta_data import clip_path, load_detections, load_sta_split, read_frames_before
from trainer.evals.sta_miniature import COLORS, make_sta_miniature


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return make_sta_miniature(str(tmp_path_factory.mktemp("sta")), train_clips=4, val_clips=2)


def test_reader_reads_the_official_layout(mini):
    train = load_sta_split(mini["annotations"], "train")
    assert len(train.annotations) == 8 and train.nouns == {0: "cup", 1: "knife", 2: "sponge"}
    a = train.annotations[0]
    assert a.clip_uid == "train-clip-00" and a.clip_frame == 11 and a.uid == "train-clip-00_0000011"
    assert all(o.verb == o.noun and 0.25 <= o.ttc <= 2.25 for o in a.objects)
    dets = load_detections(mini["detections"], [x.uid for x in train.annotations])
    assert len(dets[a.uid]) == len(a.objects) + 1 and dets[a.uid][-1].score == 0.3


def test_frames_before_end_at_the_annotated_frame_and_show_its_boxes(mini):
    a = load_sta_split(mini["annotations"], "val").annotations[1]  # clip_frame 15, the clip's last frame
    frames = read_frames_before(clip_path(mini["videos"], a.clip_uid), a.clip_frame, 3, 4)
    assert frames.shape == (3, 64, 96, 3)
    for o in a.objects:  # the box of the annotated frame is filled with its noun's colour in the last frame
        x1, y1, x2, y2 = (int(v) for v in o.box)
        centre = frames[-1, (y1 + y2) // 2, (x1 + x2) // 2].astype(int)
        assert np.abs(centre - np.array(COLORS[o.noun])).max() < 40
    # Before the clip's start the first frame repeats, as the official loader clamps indices.
    early = read_frames_before(clip_path(mini["videos"], a.clip_uid), 2, 3, 4)
    assert np.array_equal(early[0], early[1])
    with pytest.raises(ValueError, match="past the end"):
        read_frames_before(clip_path(mini["videos"], a.clip_uid), 40, 2, 1)


def test_reader_errors_name_the_field_and_the_file(mini, tmp_path):
    doc = json.loads(open(f"{mini['annotations']}/fho_sta_train.json").read())
    del doc["annotations"][2]["objects"][0]["time_to_contact"]
    (tmp_path / "fho_sta_train.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"fho_sta_train.json: annotations\[2\].objects\[0\]: field 'time_to_contact'"):
        load_sta_split(str(tmp_path), "train")
    with pytest.raises(ValueError, match="fho_sta_val.json not found"):
        load_sta_split(str(tmp_path), "val")
    with pytest.raises(ValueError, match="no detections for 1 annotation"):
        load_detections(mini["detections"], ["nope"])
    with pytest.raises(ValueError, match="v2/clips"):
        clip_path(mini["videos"], "missing-clip")


def test_roi_features_pool_the_cells_under_the_box():
    feats = torch.arange(4 * 4, dtype=torch.float32).reshape(4, 4, 1)  # (h, w, D=1), value = 4 r + c
    # A 40x40 frame: the box [10, 10, 29, 29] covers cells rows 1-2, cols 1-2 -> mean of 5, 6, 9, 10.
    out = roi_features(feats, np.array([[10, 10, 29, 29], [0, 0, 0, 0]]), 40, 40)
    assert out.shape == (2, 2 + 4)
    assert out[0, 0] == 7.5 and out[0, 1] == 7.5 and out[1, 0] == 0.0  # a tiny box takes its own cell
    assert torch.allclose(out[0, 2:], torch.tensor([0.25, 0.25, 29 / 40, 29 / 40]))


def test_sta_command_end_to_end(mini, tmp_path, demo_checkpoint):
    from trainer.cli import main

    demo_checkpoint(str(tmp_path / "run"), max_seq_len=1 + 4 * 64, grid=(8, 8))
    res = CliRunner().invoke(main, ["sta", str(tmp_path / "run"), "--annotations", mini["annotations"],
                                    "--videos", mini["videos"], "--detections", mini["detections"],
                                    "--out", str(tmp_path / "out"), "--epochs", "60", "--threads", "1"])
    assert res.exit_code == 0, res.output
    doc = validate(json.loads((tmp_path / "out" / "sta.json").read_text()), "sta_result")
    m = doc["top5_map"]
    # Every object has a detection with its noun at IoU > 0.5, and each frame's one false box is within
    # the Top-5 discount: Noun mAP is exactly 100 whatever the heads score.
    assert m["noun"] == 100.0
    assert m["overall"] <= min(m["noun_verb"], m["noun_ttc"]) <= m["noun"]
    assert doc["layer"] == 1 and doc["resolution"] == 64 and doc["counts"]["val_frames"] == 4
    assert doc["counts"]["train_boxes"] >= 2 * 8  # detections and appended ground truths of 8 train frames
    preds = json.loads((tmp_path / "out" / "predictions.json").read_text())["results"]
    assert set(preds) == {"val-clip-00_0000011", "val-clip-00_0000015", "val-clip-01_0000011", "val-clip-01_0000015"}
    p = preds["val-clip-00_0000011"][0]
    assert set(p) == {"box", "noun_category_id", "verb_category_id", "time_to_contact", "score"} and p["score"] <= 0.95
    assert "Top-5 mAP  noun 100.00" in res.output
    bad = CliRunner().invoke(main, ["sta", str(tmp_path / "run"), "--annotations", str(tmp_path), "--videos",
                                    mini["videos"], "--detections", mini["detections"], "--out", str(tmp_path / "o2")])
    assert bad.exit_code != 0 and "fho_sta_train.json" in bad.output and "Traceback" not in bad.output


def test_heads_learn_verbs_and_ttc_from_separable_features():
    from trainer.evals.sta import StaConfig, train_heads

    g = torch.Generator().manual_seed(0)
    verbs = torch.arange(60) % 3
    x = torch.randn(60, 8, generator=g) * 0.1
    x[torch.arange(60), verbs] += 2.0  # verb k lights up feature k
    ttcs = 0.5 + x[:, 4].abs()  # TTC readable from feature 4
    heads = train_heads(x, verbs, ttcs, 3, StaConfig(hidden=32, epochs=80, batch_size=16))
    with torch.no_grad():
        logits, ttc = heads(x)
    assert (logits.argmax(1) == verbs).all()
    assert (ttc - ttcs).abs().mean() < 0.1 and (ttc >= 0).all()


def test_a_frame_without_detections_costs_its_class_recall(mini, tmp_path, demo_checkpoint):
    from trainer.checkpoint import load_model
    from trainer.evals.run import frame_tokenizer_from_meta
    from trainer.evals.sta import StaConfig, sta_job

    demo_checkpoint(str(tmp_path / "run"), max_seq_len=1 + 4 * 64, grid=(8, 8))
    dets = json.loads(open(mini["detections"]).read())
    dets["val-clip-00_0000011"] = []  # the one cup of that frame is never proposed
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    model, meta = load_model(str(tmp_path / "run"))
    doc, _ = sta_job(model, meta, mini["annotations"], mini["videos"], str(tmp_path / "dets.json"),
                     str(tmp_path / "out"), tokenize=frame_tokenizer_from_meta(meta), resolution=64,
                     cfg=StaConfig(epochs=2), log=lambda m: None)
    # Val holds 2 cups, 2 knives, 2 sponges: cup AP = 1/2 (its remaining prediction is right), others 1.
    assert doc["top5_map"]["noun"] == pytest.approx(100 * (0.5 + 1 + 1) / 3)
    assert doc["counts"]["val_detections"] == 0 + 2 + 3 + 3  # per frame: its objects' boxes + one false box


def test_frames_past_the_first_second_are_found_after_a_seek(tmp_path):
    from pipeline.media import write_video

    # Frame i is grey level 2i; keyframes every second, so frame 100 is read after a seek.
    write_video(str(tmp_path / "c.mp4"), lambda i, t: np.full((32, 32, 3), 2 * i, np.uint8), num_frames=120,
                fps=30, gop=30)
    f = read_frames_before(str(tmp_path / "c.mp4"), 100, 4, 5)
    assert np.abs(f.reshape(4, -1).mean(1) - [170, 180, 190, 200]).max() < 3
