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
    "## Findings at a glance", "## Setup", "## Pipeline", "## Probes: image: digit identity",
    "## Probes: video: motion class", "## Loss by position within a clip", "## Label propagation (DAVIS protocol)",
    "## Pre-training: validation loss against compute", "## Generation", "## Timings",
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
    assert len(re.findall(r"\*\*(holds|does not hold|inconclusive \(within noise\))\*\*", text)) == 5
    assert re.search(r"\| attention probe, best block \| \d+\.\d% \(block \d+\) \| 64\.7%", text)
    assert re.search(r"\| loss, first frame \| \d+\.\d{3} \|", text)
    assert re.search(r"\| J&F mean \| \d+\.\d \| 42\.0", text)
    # Two validations (steps 3 and 6): a fit when the loss fell between them, else the reason why not.
    assert re.search(r"\| exponent b of L = a·C\^b \| -?\d\.\d{4} \(one run's curve\) \| -0\.0378|No fit: ", text)
    for png in ("probe-image.png", "probe-video.png", "position-loss.png"):
        assert os.path.getsize(out / png) > 1000
    assert os.path.getsize(out / "generation.gif") > 0
    doc = validate(json.loads((out / "results.json").read_text()), "demo_results")
    assert len(doc["findings"]) == 5
    assert re.search(r"- pretrain: \d+ s\n", text)
    # Rerun: every stage is complete and skipped (its earlier time reported); only the study is redone.
    assert run_demo(cfg) == path
    assert "- pretrain: " in open(path).read() and "(done by an earlier run)" in open(path).read()


def test_demo_config_validation():
    with pytest.raises(ValueError, match="resolution"):
        DemoConfig(resolution=60)
    with pytest.raises(ValueError, match="ratios"):
        DemoConfig(ratios={"imagenet": 1.0})
    q = DemoConfig.quick_config("x")
    assert q.quick and q.data_scale < 0.1 and "max_steps=6" in q.pretrain_overrides
    assert "exit_after_minutes=6" in DemoConfig().pretrain_overrides
