"""`toto-train probe | scaling` end to end on a real checkpoint and real token shards."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.shards import ShardWriter, write_manifest
from schemas import validate
from trainer.cli import main

sys.path.insert(0, str(Path(__file__).parents[1]))
from figure_fixtures import make_checkpoint  # noqa: E402

CODEBOOK = 64
TOK = {"id": "test-labelled", "sha256": "0" * 64, "vocab_size": CODEBOOK, "downsample": 8}


def _write_labelled(out: str, *, video: bool, per_class: int, seed: int) -> None:
    """Class c's tokens come from codes [4c, 4c + 4): separable by token content.

    Images: one 4x4 frame per row. Videos: 12 frames per row, one row per video.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for split in ("train", "val"):
        for c in range(3):
            for i in range(per_class):
                nf = 12 if video else 1
                tok = (4 * c + rng.integers(0, 4, size=(nf, 4, 4))).astype(np.uint16)
                vid = f"{split}{c}{i:03d}"
                rows.append({"key": f"toy/{vid}/00000", "dataset": "toy", "split": split, "video_id": vid, "chunk": 0,
                             "t_start": 0.0, "fps": 30.0, "num_frames": nf, "grid_h": 4, "grid_w": 4,
                             "label": f"class{c}", "tokens": tok})
    w = ShardWriter(out, 0, codebook_size=CODEBOOK, tokenizer=TOK, resolution=32)
    for r in rows:
        w.add(r)
    w.commit(input_shard={"id": 0, "worklist_sha256": "0" * 64, "num_items": len(rows)}, errors=[])
    write_manifest(out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    _write_labelled(str(root / "images"), video=False, per_class=12, seed=0)
    _write_labelled(str(root / "videos"), video=True, per_class=6, seed=1)
    return {"root": root, "ckpt": make_checkpoint(str(root / "run"), n_layers=3)}


def test_probe_images_all_layers_both_poolings(setup):
    out = setup["root"] / "probe-img"
    data = str(setup["root"] / "images")
    res = CliRunner().invoke(main, ["probe", setup["ckpt"], "--train", data, "--val", data, "--layers", "all",
                                    "--pooling", "both", "--epochs", "10", "--lr", "1e-2", "--batch-size", "12",
                                    "--heads", "2", "--out", str(out), "--task", "digits"])
    assert res.exit_code == 0, res.output
    doc = validate(json.loads((out / "probe-digits.json").read_text()), "probe_sweep")
    assert sorted({(r["layer"], r["pooling"]) for r in doc["results"]}) == [
        (layer, p) for layer in (1, 2, 3) for p in ("attention", "average")]
    assert {r["num_train"] for r in doc["results"]} == {36} and {r["num_eval"] for r in doc["results"]} == {36}
    assert all(r["top1"] >= 90.0 for r in doc["results"])  # token content separates the classes
    assert os.path.getsize(out / "probe-digits.png") > 1000
    assert "layer   3 (1.00)  average" in res.output


def test_probe_videos_averages_clips_per_video(setup):
    out = setup["root"] / "probe-vid"
    data = str(setup["root"] / "videos")
    res = CliRunner().invoke(main, ["probe", setup["ckpt"], "--train", data, "--val", data, "--layers", "2",
                                    "--frames", "4", "--stride", "2", "--clips", "2", "--epochs", "10", "--lr", "1e-2",
                                    "--batch-size", "12", "--heads", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "probe-probe.json").read_text())
    (r,) = doc["results"]
    assert r["layer"] == 2 and r["pooling"] == "attention"
    assert r["num_train"] == 36  # 18 videos x 2 clips
    assert r["num_eval"] == 18  # one score per validation video
    assert r["top1"] >= 90.0


def test_probe_rejects_clips_longer_than_context(setup):
    data = str(setup["root"] / "videos")
    res = CliRunner().invoke(main, ["probe", setup["ckpt"], "--train", data, "--val", data, "--frames", "8",
                                    "--stride", "1", "--context", "none", "--out", str(setup["root"] / "x")])
    assert res.exit_code != 0 and "context" in res.output


def test_probe_stream_and_cache_agree_and_a_rerun_resumes(setup):
    data = str(setup["root"] / "images")
    common = ["--train", data, "--val", data, "--layers", "1,3", "--pooling", "cross-attn-mlp", "--epochs", "10",
              "--lr", "1e-2", "--batch-size", "12", "--heads", "2", "--checkpoint-every", "2"]
    docs = {}
    for mode in ("stream", "cache"):
        out = setup["root"] / f"probe-{mode}"
        res = CliRunner().invoke(main, ["probe", setup["ckpt"], *common, "--features", mode, "--out", str(out)])
        assert res.exit_code == 0, res.output
        docs[mode] = validate(json.loads((out / "probe-probe.json").read_text()), "probe_sweep")
        assert docs[mode]["probe_config"]["features"] == mode
        assert os.path.exists(out / "probe-work" / "probe" / f"state-{mode}.pt")
    rows = [[(r["layer"], r["pooling"], r["top1"], r["correct"]) for r in docs[m]["results"]] for m in docs]
    assert rows[0] == rows[1] and [r[:2] for r in rows[0]] == [(1, "cross-attn-mlp"), (3, "cross-attn-mlp")]
    assert all(r[2] >= 90.0 for r in rows[0])
    # A rerun finds the finished state: it trains nothing and reports the same scores.
    out = setup["root"] / "probe-stream"
    res = CliRunner().invoke(main, ["probe", setup["ckpt"], *common, "--features", "stream", "--out", str(out)])
    assert res.exit_code == 0 and "resuming probes at epoch 10" in res.output
    again = json.loads((out / "probe-probe.json").read_text())
    assert [(r["top1"], r["correct"], r["final_train_loss"]) for r in again["results"]] == [
        (r["top1"], r["correct"], r["final_train_loss"]) for r in docs["stream"]["results"]]
    # Other settings in the same OUT: the old state is not resumed, the run starts afresh.
    other = [("2e-2" if a == "1e-2" else a) for a in common]  # another learning rate
    res = CliRunner().invoke(main, ["probe", setup["ckpt"], *other, "--features", "stream", "--out", str(out)])
    assert res.exit_code == 0 and "starting afresh" in res.output and "resuming" not in res.output


def test_probe_state_of_an_older_checkpoint_is_not_resumed(setup, tmp_path):
    # The same command after the run trained further (a newer step in the run dir) starts afresh.
    data = str(setup["root"] / "images")
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    cmd = ["probe", run, "--train", data, "--val", data, "--layers", "1", "--pooling", "average", "--epochs", "2",
           "--batch-size", "12", "--features", "cache", "--out", out]
    make_checkpoint(run, step=10)
    assert CliRunner().invoke(main, cmd).exit_code == 0
    res = CliRunner().invoke(main, cmd)
    assert res.exit_code == 0 and "resuming probes at epoch 2" in res.output
    make_checkpoint(run, step=20)
    res = CliRunner().invoke(main, cmd)
    assert res.exit_code == 0 and "starting afresh" in res.output and "resuming" not in res.output
    caches = sorted(os.listdir(os.path.join(out, "probe-work", "probe", "train")))
    assert len([c for c in caches if c.startswith("cache-")]) == 2  # one feature cache per checkpoint


def test_probe_auto_sizes_the_cache_it_would_build_not_the_subset(setup, tmp_path):
    # The cache holds the whole train split: 36 images x 16 tokens x 32 dims x 1 layer x 2 bytes = 36 864 B,
    # while --max-samples 6 is 6 144 B. A 20 000 B limit must stream; a 40 000 B limit caches.
    data = str(setup["root"] / "images")
    for limit, want in ((20_000, "stream"), (40_000, "cache")):
        out = tmp_path / want
        res = CliRunner().invoke(main, ["probe", setup["ckpt"], "--train", data, "--val", data, "--layers", "1",
                                        "--pooling", "average", "--epochs", "2", "--batch-size", "4",
                                        "--max-samples", "6", "--features", "auto",
                                        "--cache-limit-gb", str(limit / 2**30), "--out", str(out)])
        assert res.exit_code == 0, res.output
        assert json.loads((out / "probe-probe.json").read_text())["probe_config"]["features"] == want


def test_probe_extends_the_context_for_longer_clips(setup):
    # 8 frames of 4x4 + bos = 129 tokens against a context of 80: auto changes the rotary base and records it.
    out = setup["root"] / "probe-long"
    data = str(setup["root"] / "videos")
    res = CliRunner().invoke(main, ["probe", setup["ckpt"], "--train", data, "--val", data, "--frames", "8",
                                    "--stride", "1", "--clips", "1", "--layers", "2", "--epochs", "2",
                                    "--batch-size", "12", "--heads", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = validate(json.loads((out / "probe-probe.json").read_text()), "probe_sweep")
    assert doc["context"]["rule"] == "rope_base" and doc["context"]["trained_len"] == 80
    assert doc["context"]["eval_len"] == 129 and doc["context"]["factor"] == pytest.approx(129 / 80)


def test_scaling_command(tmp_path):
    runs = []
    for i, opt in enumerate([1e12, 1e13]):
        d = tmp_path / f"run{i}"
        d.mkdir()
        with open(d / "metrics.jsonl", "w") as f:
            for c in (opt / 4, opt, opt * 4):
                f.write(json.dumps({"step": 1, "macs": c, "val_loss": 7.32 * c**-0.0378}) + "\n")
        runs.append(str(d))
    res = CliRunner().invoke(main, ["scaling", *runs, "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    doc = validate(json.loads((tmp_path / "out" / "scaling.json").read_text()), "scaling_fit")
    assert doc["fit"]["a"] == pytest.approx(7.32, rel=1e-6) and doc["fit"]["b"] == pytest.approx(-0.0378, rel=1e-6)
    assert "paper: 7.32 · C^-0.0378" in res.output


def test_track_defaults_from_checkpoint_meta():
    from pipeline.tokenizers import load_tokenizer
    from trainer.evals.run import resolution_from_meta, tokenizer_spec_for

    meta = {"grid": [8, 8], "tokenizer": {"id": load_tokenizer("demo", device="cpu").id, "downsample": 8}}
    assert resolution_from_meta(meta) == 64
    assert resolution_from_meta({"resolution": 128}) == 128
    assert tokenizer_spec_for(meta, None) == "demo"
    assert tokenizer_spec_for(meta, "dalle:w") == "dalle:w"
    with pytest.raises(ValueError, match="--tokenizer"):
        tokenizer_spec_for({"tokenizer": {"id": "dalle-123"}}, None)
    with pytest.raises(ValueError, match="--tokenizer"):  # another dVAE that is also named demo
        tokenizer_spec_for({"tokenizer": {"id": "dvae:demo:" + "0" * 64}}, None)
    with pytest.raises(ValueError, match="--resolution"):
        resolution_from_meta({"tokenizer": {"id": "x"}})


def test_max_samples_takes_a_seeded_subset_across_classes(setup):
    from pipeline.mix.sequence import make_specials
    from trainer.evals.run import load_labelled

    kw = dict(specials=make_specials(CODEBOOK), frames=1, stride=1, clips=1, split="train", max_seq_len=80)
    tok, fi, labels, vids = load_labelled(str(setup["root"] / "images"), max_samples=6, **kw)
    assert tok.shape == (6, 17) and len(set(labels)) >= 2  # the rows are stored class by class
    again = load_labelled(str(setup["root"] / "images"), max_samples=6, **kw)
    assert again[3] == vids  # deterministic for a seed
    vkw = dict(kw, frames=4, stride=2, clips=2)
    _, _, vlab, vvid = load_labelled(str(setup["root"] / "videos"), max_samples=4, **vkw)
    assert len(vvid) == 4 and all(vvid.count(v) == 2 for v in vvid)  # whole videos: both clips kept


def test_track_command_with_a_dvae_tokenizer(tmp_path, make_track_setup):
    """`toto-train track` on DAVIS-layout sequences with a (random) dVAE: J/F/J&F written and printed."""
    from pipeline.tokenizers.base import build_modules, save_tokenizer, state_dict_of

    ws = make_track_setup(tmp_path, max_seq_len=80, codebook=CODEBOOK, n_hid=16)
    tcfg, root = ws["tcfg"], ws["davis"]
    res = CliRunner().invoke(main, [*ws["args"], "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    doc = validate(json.loads((tmp_path / "out" / "track.json").read_text()), "track_result")
    assert doc["resolution"] == 32 and doc["layer"] == 1  # grid 4 x downsample 8; the middle of 2 blocks
    assert [o["object"] for o in doc["objects"]] == [1] and 0.0 <= doc["summary"]["JF_mean"] <= 1.0
    assert "overall (1 objects): J " in res.output
    # A tokenizer other than the checkpoint's is refused: its tokens would mean nothing to the model.
    torch.manual_seed(1)
    enc2, _ = build_modules(tcfg)
    save_tokenizer(str(tmp_path / "tok2"), tcfg, state_dict_of(enc2, None, "dvae"))
    bad = CliRunner().invoke(main, ["track", str(tmp_path / "run"), "--davis", str(root), "--tokenizer",
                                    f"dvae:{tmp_path / 'tok2'}", "--out", str(tmp_path / "out2")])
    assert bad.exit_code != 0 and "trained on" in bad.output
