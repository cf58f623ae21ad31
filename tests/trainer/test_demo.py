"""The demo study end to end (`--quick` scale): every stage runs and the report has every section.

The bundled demo tokenizer is replaced by a small randomly initialised dVAE written by the test
(tests make their own weights), so this checks the wiring of data -> tokenize (Ray) -> mix ->
pretrain -> study -> generation, not the numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest
import torch

from schemas import validate
from trainer.demo import DemoConfig, run_demo

SECTIONS = (
    "## Findings at a glance", "## Data checks (from the tokens, before training)", "## Setup", "## Pipeline", "## Probes: image: object class",
    "## Probes: video: object class", "## Loss by position within a clip", "## Label propagation (DAVIS protocol)",
    "## Scaling: validation loss against compute", "## Generation", "## Timings",
)


def _random_dvae(out_dir: str) -> str:
    from pipeline.tokenizers.base import build_modules, make_config, save_tokenizer, state_dict_of
    from pipeline.tokenizers.dalle import DVAEArch

    torch.manual_seed(0)
    arch = DVAEArch(vocab_size=512, n_hid=16, n_blk_per_group=1, n_init=8)
    cfg = make_config("dvae", "test-random-dvae", arch, resolution=64, has_decoder=True, source={"test": True})
    enc, dec = build_modules(cfg)
    save_tokenizer(out_dir, cfg, state_dict_of(enc, dec, "dvae"))
    return f"dvae:{out_dir}"


@pytest.mark.slow
def test_demo_quick_end_to_end_report(tmp_path):
    spec = _random_dvae(str(tmp_path / "tok"))
    cfg = dataclasses.replace(DemoConfig.quick_config(str(tmp_path / "demo")), tokenizer=spec)
    path = run_demo(cfg)
    out = tmp_path / "demo"
    text = open(path).read()
    for s in SECTIONS:
        assert s in text, s
    assert len(re.findall(r"\*\*(holds|does not hold|inconclusive \(within noise\))\*\*", text)) == 6
    assert re.search(r"\| attention probe, best block \| \d+\.\d% \(block \d+\) \| 64\.7%", text)
    assert re.search(r"\| loss, first frame \| \d+\.\d{3} \|", text)
    assert re.search(r"\| J&F mean \| \d+\.\d \| 42\.0", text)
    # The size sweep (main run + one width, validated every 2 steps): a fit on the frontier of both runs.
    assert re.search(r"\| exponent b of L = a·C\^b \(± s\.e\.\) \| -?\d\.\d{4} ± (\d\.\d{4}|nan) \| -0\.0378", text)
    assert "No fit: " not in text and "each run of the size sweep" in text
    assert re.search(r"\| image task: bag-of-tokens logistic regression, top-1 \(chance\) \| \d+\.\d% ± ", text)
    assert re.search(r"bits per token: unigram vs given the previous frame's token at the same position \| \d+\.\d\d vs", text)
    meta = json.loads((out / "sweep" / "w040" / "config.json").read_text())
    assert meta["model_config"]["dim"] == 40 and meta["model_config"]["mup_base_dim"] == 160
    assert meta["model_config"]["n_heads"] == 5 and meta["model_config"]["mlp_hidden"] == 128
    assert meta["train_config"]["max_steps"] == 4 and meta["train_config"]["lr"] == cfg_lr(out)
    for png in ("probe-image.png", "probe-video.png", "position-loss.png"):
        assert os.path.getsize(out / png) > 1000
    assert os.path.getsize(out / "generation.gif") > 0
    doc = validate(json.loads((out / "results.json").read_text()), "demo_results")
    assert len(doc["findings"]) == 6
    assert re.search(r"- pretrain: \d+ s\n", text) and re.search(r"- sweep: \d+ s\n", text)
    # Rerun: every stage is complete and skipped (its earlier time reported); only the study is redone.
    assert run_demo(cfg) == path
    assert "- pretrain: " in open(path).read() and "(done by an earlier run)" in open(path).read()


def cfg_lr(out) -> float:
    return json.loads((out / "run" / "config.json").read_text())["train_config"]["lr"]  # one lr for all widths


def test_demo_config_validation():
    with pytest.raises(ValueError, match="resolution"):
        DemoConfig(resolution=60)
    with pytest.raises(ValueError, match="ratios"):
        DemoConfig(ratios={"imagenet": 1.0})
    q = DemoConfig.quick_config("x")
    assert q.quick and q.data_scale < 0.1 and q.train_tokens == 6 * 2048
    with pytest.raises(ValueError, match="exit_after_minutes"):
        DemoConfig(pretrain_overrides=("exit_after_minutes=6",))
    with pytest.raises(ValueError, match=r"sweep_widths=\(64,\): width 64 is invalid \(ModelConfig.*multiples of 10"):
        DemoConfig(sweep_widths=(64,))  # 5 heads do not divide 64
    assert DemoConfig(sweep_widths=(50,)).sweep_widths == (50,)  # 5 heads of 10: what the model allows
