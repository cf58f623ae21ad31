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
    "## Scaling: validation loss against compute", "## Coarse-to-fine against direct training", "## Generation",
    "## Timings",
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
    assert len(re.findall(r"\*\*(holds|does not hold|inconclusive \(within noise\))\*\*", text)) == 8
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
    assert len(doc["findings"]) == 8
    assert re.search(r"- pretrain: \d+ s\n", text) and re.search(r"- sweep: \d+ s\n", text)
    _check_coarse_to_fine(out, text, doc)
    # Rerun: every stage is complete and skipped (its earlier time reported); only the study is redone.
    assert run_demo(cfg) == path
    assert "- pretrain: " in open(path).read() and "(done by an earlier run)" in open(path).read()
    assert re.search(r"- fine: \d+ s \(done by an earlier run\)", open(path).read())
    # --until stops after the new stages and returns their outputs.
    assert run_demo(cfg, until="coarse-data") == str(out / "mix-coarse.json")
    assert run_demo(cfg, until="fine") == str(out / "c2f" / "fine")


def _check_coarse_to_fine(out, text: str, doc: dict) -> None:
    """Finding 5's arm: half-resolution tokens and mix, stage A, stage B from it at full resolution with RoPE
    base 50 000 and the compute of both stages in its logs, compared with the main run in the report."""
    for marker in ("tokens-coarse/imagenet/manifest.json", "tokens-coarse/kinetics/manifest.json", "mix-coarse.json",
                   "c2f/coarse/demo-pretrain-done.json", "c2f/fine/demo-pretrain-done.json"):
        assert (out / marker).exists(), marker
    assert json.loads((out / "tokens-coarse" / "imagenet" / "manifest.json").read_text())["grid"] == [4, 4]
    coarse = json.loads((out / "c2f" / "coarse" / "config.json").read_text())
    fine = json.loads((out / "c2f" / "fine" / "config.json").read_text())
    main = json.loads((out / "run" / "config.json").read_text())
    assert coarse["seq_len"] == 16 * 16 and fine["seq_len"] == main["seq_len"] == 16 * 64
    assert coarse["model_config"]["rope_theta"] == 10000.0 and fine["model_config"]["rope_theta"] == 50000.0
    assert {k: v for k, v in fine["model_config"].items() if k not in ("rope_theta", "max_seq_len")} == \
        {k: v for k, v in main["model_config"].items() if k not in ("rope_theta", "max_seq_len")}
    assert fine["train_config"]["init_from"].startswith(str(out / "c2f" / "coarse" / "step-"))
    assert coarse["train_config"]["max_steps"] == fine["train_config"]["max_steps"] == 2
    last_a = [json.loads(x) for x in (out / "c2f" / "coarse" / "metrics.jsonl").read_text().splitlines()][-1]
    first_b = json.loads((out / "c2f" / "fine" / "metrics.jsonl").read_text().splitlines()[0])
    assert first_b["tokens_seen"] == last_a["tokens_seen"] + 2048  # stage B continues stage A's count
    c2f = doc["coarse_to_fine"]
    assert c2f["tokens"] == {"direct": 6 * 2048, "coarse": 2 * 2048, "fine": 2 * 2048, "c2f": 4 * 2048}
    assert c2f["flops"]["coarse"] < c2f["flops"]["fine"] and c2f["within_compute"]
    assert c2f["flops"]["c2f"] == pytest.approx(c2f["flops"]["coarse"] + c2f["flops"]["fine"])
    assert c2f["flops"]["c2f"] < c2f["flops"]["direct"]
    # The direct arm's score is the main run's own attention probe at the named block, on the same samples.
    sweep = json.loads((out / "probe-image.json").read_text())
    row = next(r for r in sweep["results"] if r["layer"] == 2 and r["pooling"] == "attention")
    assert c2f["named_block"] == 2 and c2f["image"]["direct_top1"] == row["top1"]
    assert c2f["image"]["n"] == row["num_eval"]
    for task in ("image", "video"):
        assert re.search(rf"\| coarse-to-fine beats direct training at no more compute \({task} task\) \| 64\.4 vs 61\.2 "
                         r"top-1 \(ImageNet, 16→32 vs 32×32 tokens\) \| block 2/5: \d+\.\d vs \d+\.\d top-1, [+-]\d+\.\d ± "
                         r"\d+\.\d \(n=\d+\); \d\.\d\de\+\d+ vs \d\.\d\de\+\d+ FLOPs \|", text), task
    assert re.search(r"\| compute, coarse-to-fine: stage A \+ stage B \(FLOPs\) \| \d\.\d\de\+\d+ \+ \d\.\d\de\+\d+ = ", text)
    assert re.search(r"- coarse-data: \d+ s\n", text) and re.search(r"- coarse: \d+ s\n", text)


def cfg_lr(out) -> float:
    return json.loads((out / "run" / "config.json").read_text())["train_config"]["lr"]  # one lr for all widths


def test_demo_config_validation():
    with pytest.raises(ValueError, match="resolution"):
        DemoConfig(resolution=60)
    with pytest.raises(ValueError, match="ratios"):
        DemoConfig(ratios={"imagenet": 1.0})
    with pytest.raises(ValueError, match="multiple of 16"):
        DemoConfig(resolution=72)  # its half, 36 px, is no multiple of the tokenizer's 8
    with pytest.raises(ValueError, match="no more compute than the direct run"):
        DemoConfig(c2f_coarse_tokens=491_520, c2f_fine_tokens=491_521)
    q = DemoConfig.quick_config("x")
    assert q.quick and q.data_scale < 0.1 and q.train_tokens == 6 * 2048
    with pytest.raises(ValueError, match="exit_after_minutes"):
        DemoConfig(pretrain_overrides=("exit_after_minutes=6",))
    with pytest.raises(ValueError, match=r"sweep_widths=\(64,\): width 64 is invalid \(ModelConfig.*multiples of 10"):
        DemoConfig(sweep_widths=(64,))  # 5 heads do not divide 64
    assert DemoConfig(sweep_widths=(50,)).sweep_widths == (50,)  # 5 heads of 10: what the model allows
