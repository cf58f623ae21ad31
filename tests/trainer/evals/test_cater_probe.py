"""`toto-train probe --task cater` end to end: the CATER-like miniature, tokenized by the pipeline
(demo tokenizer, local Ray), probed on a tiny random checkpoint; the JSON holds top-1 / top-5 over
the 36 cells and the preset's settings. The preset's defaults and the explicit options that win."""

from __future__ import annotations

import json

from click.testing import CliRunner

from pipeline.demo_data.cater import CaterConfig, make_cater
from trainer.cli import main
from trainer.evals.run import TASK_PRESETS, preset_settings


def test_preset_settings():
    assert preset_settings("probe") == {}
    p = preset_settings("cater")
    assert (p["frames"], p["stride"], p["clips"], p["poolings"]) == (16, 18, 1, ("attention",))
    assert p["classes"] == tuple(str(c) for c in range(36))
    assert preset_settings("cater", 32)["stride"] == 9 and preset_settings("cater", 8)["stride"] == 36
    # 16 and 32 frames at their strides fit CATER's 300-frame videos in one clip each
    assert all((f - 1) * s + 1 <= 300 for f, s in TASK_PRESETS["cater"]["strides"].items())


def test_probe_task_cater_end_to_end(ray_local, tmp_path, demo_checkpoint):
    from pipeline.jobs import TokenizeConfig, run_tokenize

    data = str(tmp_path / "cater")
    make_cater(CaterConfig(out=data, seed=1, train=6, val=3, frames=24, size=64))
    tok = str(tmp_path / "tok")
    run_tokenize(TokenizeConfig(dataset="cater", input=data, output=tok, tokenizer="demo", resolution=32,
                                max_fps=24.0, chunk_frames=24, num_cpus=1, decode_cpus=0.5, tokenizer_cpus=0.5,
                                items_per_shard=9, batch_size=8, rows_per_batch=4, progress=False))
    run = demo_checkpoint(str(tmp_path / "run"), max_seq_len=1 + 4 * 16, grid=(4, 4), resolution=32, spec=False)
    out = str(tmp_path / "out")
    # 4 frames at stride 7 span 22 of the 24 frames (the preset's 16 x 18 needs CATER's 300).
    res = CliRunner().invoke(main, ["probe", run, "--task", "cater", "--train", tok, "--val", tok, "--frames", "4",
                                    "--stride", "7", "--layers", "half", "--epochs", "2", "--batch-size", "4",
                                    "--out", out, "--threads", "1"])
    assert res.exit_code == 0, res.output
    with open(f"{out}/probe-cater.json") as f:
        doc = json.load(f)
    (r,) = doc["results"]
    assert r["pooling"] == "attention" and r["layer"] == 1  # the preset's head; --layers half of 2 blocks
    assert 0.0 <= r["top1"] <= r["top5"] <= 100.0
    assert r["num_eval"] == 3  # one clip per val video (the preset's clips=1), every video scored
    pre = doc["task_preset"]
    assert (pre["frames"], pre["stride"], pre["clips"], pre["classes"]) == (4, 7, 1, 36)
    assert pre["paper"]["top1"] == {"16": 62.8, "32": 72.9}
    assert "top-5" in res.output

    # A stride the videos are too short for is refused naming the clip length.
    bad = CliRunner().invoke(main, ["probe", run, "--task", "cater", "--train", tok, "--val", tok, "--frames", "4",
                                    "--out", str(tmp_path / "out2"), "--threads", "1"])
    assert bad.exit_code != 0 and "4 frames at stride 72" in bad.output


def test_cater_preset_is_in_the_help():
    res = CliRunner().invoke(main, ["probe", "--help"])
    assert res.exit_code == 0 and "cater = 16-frame clips at stride 18" in " ".join(res.output.split())
