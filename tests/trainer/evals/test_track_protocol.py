"""`toto-train track` at the paper's settings, at tiny sizes: 512 px frames (64x64 = 4096 tokens at 8 px
patches, one more than a 4096 context with bos), 256 px, and a --layers all sweep with its peak layer."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from schemas import validate
from trainer.cli import main

CODEBOOK = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory, make_track_setup):
    # The paper's context: 4096 positions, at a tiny width.
    return make_track_setup(tmp_path_factory.mktemp("track"), max_seq_len=4096, codebook=CODEBOOK)


def _track(setup, out: str, *extra: str):
    res = CliRunner().invoke(main, [*setup["args"], "--out", str(setup["root"] / out), *extra])
    doc = None
    if res.exit_code == 0:
        doc = validate(json.loads((setup["root"] / out / "track.json").read_text()), "track_result")
    return res, doc


def test_512px_frame_runs_past_the_4096_context(setup):
    # 512 px / 8 px = 64x64 = 4096 tokens a frame: [bos] + frame = 4097, the 16-frame Kinetics case too.
    common = ("--resolution", "512", "--layer", "1", "--n-context", "0")
    res, doc = _track(setup, "t512", *common, "--max-frames", "3")
    assert res.exit_code == 0, res.output
    assert doc["resolution"] == 512
    assert doc["context"] == {"rule": "rope_base", "trained_len": 4096, "eval_len": 4097, "factor": 4097 / 4096,
                              "base": pytest.approx(10000 * (4097 / 4096) ** (16 / 14))}
    assert 0.0 <= doc["summary"]["JF_mean"] <= 1.0
    # Dropping bos instead: the frame fits exactly; refusing to extend names the fix.
    res, doc = _track(setup, "t512b", *common, "--context", "drop_bos", "--max-frames", "2")
    assert res.exit_code == 0, res.output
    assert doc["context"] == {"rule": "drop_bos", "trained_len": 4096, "eval_len": 4096, "bos": False}
    res, _ = _track(setup, "t512c", *common, "--context", "none", "--max-frames", "1")
    assert res.exit_code != 0 and "4097 tokens exceeds the trained context of 4096" in res.output
    assert "--context auto" in res.output


def test_layers_all_at_256px_reports_the_peak_layer(setup):
    res, doc = _track(setup, "sweep", "--resolution", "256", "--layers", "all")
    assert res.exit_code == 0, res.output
    # 256 px: 32x32 = 1024 tokens a frame, windows of 3 frames + bos fit the trained 4096.
    assert doc["context"] == {"rule": "none", "trained_len": 4096, "eval_len": 1 + 3 * 1024}
    assert [r["layer"] for r in doc["layers"]] == [1, 2] and [r["relative_depth"] for r in doc["layers"]] == [0.5, 1.0]
    peak = max(doc["layers"], key=lambda r: r["JF_mean"])
    assert doc["peak_layer"] == doc["layer"] == peak["layer"]
    assert doc["summary"]["JF_mean"] == peak["JF_mean"]  # objects and summary are the peak layer's
    assert os.path.getsize(setup["root"] / "sweep" / "track-layers.png") > 1000
    assert f"peak layer {peak['layer']}" in res.output
    # The sweep's one pass gives each layer the features a pass for that layer alone gives (the CLI's
    # sweep then keeps them in fp16 to halve memory over every layer of a sequence).
    from trainer.checkpoint import load_model
    from trainer.evals.davis import model_patch_features, patch_features

    model, _ = load_model(str(setup["root"] / "run"))
    tokens = np.random.default_rng(0).integers(0, CODEBOOK, size=(7, 16, 16))  # 7 frames: windows of 4, hop 2
    both = patch_features(model, tokens, bos=CODEBOOK, layers=[1, 2], window=4)
    for layer in (1, 2):
        assert torch.equal(both[layer], model_patch_features(model, tokens, bos=CODEBOOK, layer=layer, window=4))
    assert both[1].shape == (7, 16, 16, 32) and not torch.equal(both[1], both[2])
    res, _ = _track(setup, "bad", "--resolution", "260")
    assert res.exit_code != 0 and "multiple of the tokenizer's 8 px" in res.output
