"""The evaluation half of the demo study on a small random checkpoint and synthetic data: every
report section is written and carries numbers (the numbers themselves are not tuned or asserted)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.shards import ShardWriter, write_manifest
from schemas import validate
from trainer.evals.study import (
    StudyConfig,
    TaskData,
    compare_blocks,
    compare_models,
    compare_poolings,
    named_middle_block,
    run_study,
)

CODEBOOK = 32
TOK = {"id": "test-colour", "sha256": "0" * 64, "vocab_size": CODEBOOK, "downsample": 8}


def _dataset(out, *, video, per_class, seed):
    rng = np.random.default_rng(seed)
    w = ShardWriter(out, 0, codebook_size=CODEBOOK, tokenizer=TOK, resolution=32)
    n = 0
    for split in ("train", "val"):
        for c in range(3):
            for i in range(per_class):
                nf = 10 if video else 1
                if video:  # the class is a motion: a bright token moving by c-1 cells per frame
                    tok = rng.integers(0, 8, size=(nf, 4, 4))
                    for f in range(nf):
                        tok[f, 1, (i + (c - 1) * f) % 4] = 30
                else:
                    tok = 8 * c + rng.integers(0, 8, size=(nf, 4, 4))
                vid = f"{split}{c}{i:03d}"
                w.add({"key": f"t/{vid}/00000", "dataset": "t", "split": split, "video_id": vid, "chunk": 0,
                       "t_start": 0.0, "fps": 30.0, "num_frames": nf, "grid_h": 4, "grid_w": 4,
                       "label": f"c{c}", "tokens": tok.astype(np.uint16)})
                n += 1
    w.commit(input_shard={"id": 0, "worklist_sha256": "0" * 64, "num_items": n}, errors=[])
    write_manifest(out)


def _davis(root):
    for name, step in (("left", -2), ("right", 3)):
        os.makedirs(os.path.join(root, "JPEGImages", "480p", name))
        os.makedirs(os.path.join(root, "Annotations", "480p", name))
        for t in range(6):
            img = np.full((48, 64, 3), 80, dtype=np.uint8)
            m = np.zeros((48, 64), dtype=np.uint8)
            x = 20 + step * t  # a large object: it must cover whole patches of the 4x4 token grid
            img[8:40, x : x + 28] = (220, 40, 40)
            m[8:40, x : x + 28] = 1
            Image.fromarray(img).save(os.path.join(root, "JPEGImages", "480p", name, f"{t:05d}.jpg"))
            p = Image.fromarray(m, mode="P")
            p.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
            p.save(os.path.join(root, "Annotations", "480p", name, f"{t:05d}.png"))


def _tokenize(frames: np.ndarray) -> np.ndarray:
    """A colour quantiser standing in for the demo tokenizer: (F, H, W, 3) -> (F, H/8, W/8) codes < 32."""
    n, h, w, _ = frames.shape
    f = frames.reshape(n, h // 8, 8, w // 8, 8, 3).mean(axis=(2, 4))  # (F, h, w, 3)
    q = (f // 128).astype(np.int64)  # 2 levels per channel
    return (q[..., 0] * 4 + q[..., 1] * 2 + q[..., 2]).astype(np.uint16)


def _generate(model, meta, out_dir):
    path = os.path.join(out_dir, "generation.png")
    Image.fromarray(np.zeros((8, 16, 3), dtype=np.uint8)).save(path)
    return path


def _checkpoint(run_dir, max_seq_len: int = 168, **meta):
    from pipeline.mix.sequence import make_specials
    from trainer import checkpoint as ck
    from trainer.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=3, n_heads=2, vocab_size=CODEBOOK + 4, max_seq_len=max_seq_len, mlp_hidden=64)
    w = ck.CheckpointWriter(run_dir, 5)
    w.write_model(Transformer(cfg).state_dict())
    w.commit({"model_config": cfg.to_dict(), "train_config": {"name": "test"},
              "scheduler": {"kind": "warmup_cosine", "step": 5},
              "loader_state": {"version": 1, "mix_hash": "x", "consumed_samples": 5}, "world_size": 1,
              "specials": make_specials(CODEBOOK), "tokenizer": TOK, **meta})
    return run_dir


def _c2f_run(run_dir, tokens: int, flops: float, val_loss: float, **meta) -> str:
    """A checkpoint (the same weights every time) with its compute and one validation line, as pretrain writes them."""
    _checkpoint(run_dir, tokens_seen=tokens, flops_seen=flops, **meta)
    with open(os.path.join(run_dir, "val.jsonl"), "w") as f:
        f.write(json.dumps({"step": 5, "val_loss": val_loss, "tokens_seen": tokens, "flops": flops}) + "\n")
    return run_dir


def test_study_writes_every_section_with_numbers(tmp_path):
    _dataset(str(tmp_path / "img"), video=False, per_class=8, seed=0)
    _dataset(str(tmp_path / "vid"), video=True, per_class=6, seed=1)
    _davis(str(tmp_path / "davis"))
    out = str(tmp_path / "out")
    cfg = StudyConfig(probe_epochs=4, probe_batch_size=16, probe_heads=2, video_frames=4, video_stride=2,
                      video_clips=2, video_pool_tokens=2, loss_clips=6, loss_stride=1, probe_lr=1e-2)
    path = run_study(_checkpoint(str(tmp_path / "run")), image_task=TaskData("image: toy classes", str(tmp_path / "img")),
                     video_task=TaskData("video: toy motion", str(tmp_path / "vid")), out_dir=out,
                     davis_root=str(tmp_path / "davis"), tokenize=_tokenize, resolution=32, generate=_generate, cfg=cfg)
    text = open(path).read()
    for heading in ("## Findings at a glance", "## Setup", "## Probes: image: toy classes", "## Probes: video: toy motion",
                    "## Loss by position within a clip", "## Label propagation (DAVIS protocol)",
                    "## Scaling: validation loss against compute", "## Generation",
                    "## Timings"):
        assert heading in text, heading
    # Six verdicts (two probe findings per task, the first-frame finding, scaling), each stated either way.
    assert len(re.findall(r"\*\*(holds|does not hold|inconclusive \(within noise\))\*\*", text)) == 6
    assert re.search(r"\| J&F mean \| \d+\.\d \| 42\.0", text)
    assert re.search(r"\| attention − average at block 2 \(± paired s\.e\.\) \| [+-]\d+\.\d ± \d+\.\d \| \+7\.9", text)
    for png in ("probe-image.png", "probe-video.png", "position-loss.png", "generation.png"):
        assert f"]({png})" in text and os.path.getsize(os.path.join(out, png)) > 0
    res = validate(json.loads(open(os.path.join(out, "results.json")).read()), "demo_results")
    assert len(res["position_loss"]["per_frame"]) == 10  # 168 // 16 = 10 frames fit the context
    assert res["track"]["objects"] == 2
    assert 0.0 <= res["track"]["baseline_JF_mean"] <= 1.0
    assert re.search(r"\| baseline J&F: patch colours, same grid \| \d+\.\d \|", text)
    assert re.search(r"\| first − later \(± s\.e\., paired over clips\) \| [+-]\d\.\d{3} ± \d\.\d{3} \|", text)


def test_named_block_comparisons_are_paired_over_the_same_samples():
    # Block 2 of 3 is named in advance; block 1 being better changes nothing (not the best of several).
    rows = [
        {"layer": 1, "pooling": "attention", "top1": 100.0, "correct": [1, 1, 1, 1]},
        {"layer": 2, "pooling": "attention", "top1": 75.0, "correct": [1, 1, 1, 0]},
        {"layer": 3, "pooling": "attention", "top1": 50.0, "correct": [1, 0, 0, 1]},
        {"layer": 2, "pooling": "average", "top1": 25.0, "correct": [0, 0, 1, 0]},
    ]
    doc = {"n_layers": 3, "results": rows}
    assert named_middle_block(3) == 2
    blocks = compare_blocks(doc, named_middle_block(3))
    # Discordant pairs: block 2 alone right on samples 2, 3; the last alone on sample 4.
    assert (blocks["only_a"], blocks["only_b"], blocks["n"], blocks["last"]) == (2, 1, 4, 3)
    assert blocks["diff"] == 25.0 and blocks["se"] == pytest.approx(100 * (3 - 1 / 4) ** 0.5 / 4)
    pools = compare_poolings(doc, 2)
    assert (pools["only_a"], pools["only_b"], pools["diff"]) == (2, 0, 50.0)


def test_model_comparison_is_paired_at_the_named_block():
    # Finding 5: the same probe (attention, block 2) of two models on the same four samples.
    def doc(correct2: list[int], classes=("a", "b")) -> dict:
        return {"n_layers": 3, "classes": list(classes), "results": [
            {"layer": 1, "pooling": "attention", "top1": 100.0, "correct": [1, 1, 1, 1]},
            {"layer": 2, "pooling": "attention", "top1": 25.0 * sum(correct2), "correct": correct2}]}

    c = compare_models(doc([1, 1, 1, 0]), doc([0, 0, 1, 1]), named_middle_block(3))
    # Block 1 (all right in both) plays no part; at block 2: a alone right on samples 1, 2, b alone on 4.
    assert (c["only_a"], c["only_b"], c["n"], c["a"], c["b"], c["layer"]) == (2, 1, 4, 75.0, 50.0, 2)
    assert c["diff"] == 25.0 and c["se"] == pytest.approx(100 * (3 - 1 / 4) ** 0.5 / 4)
    with pytest.raises(ValueError, match="cannot be paired"):
        compare_models(doc([1, 1, 1, 0]), doc([1, 1, 1, 0], classes=("a", "c")), 2)
    with pytest.raises(ValueError, match="paired scores need the same samples"):
        compare_models(doc([1, 1, 1, 0]), doc([1, 1, 0]), 2)


def test_coarse_to_fine_is_judged_at_no_more_compute_with_its_measured_reason(tmp_path):
    from trainer.checkpoint import latest_checkpoint, load_model
    from trainer.evals.probes import ProbeConfig
    from trainer.evals.report import Report
    from trainer.evals.run import probe_job
    from trainer.evals.study import _c2f_section, _probe_task

    _dataset(str(tmp_path / "img"), video=False, per_class=6, seed=0)
    _dataset(str(tmp_path / "vid"), video=True, per_class=4, seed=1)
    out = str(tmp_path / "out")
    cfg = StudyConfig(probe_epochs=2, probe_batch_size=16, probe_heads=2, video_frames=4, video_stride=2,
                      video_clips=2, video_pool_tokens=2)
    probe_cfg = ProbeConfig(epochs=2, lr=cfg.probe_lr, batch_size=16, num_heads=2)
    tasks = (("image", TaskData("image", str(tmp_path / "img")), False),
             ("video", TaskData("video", str(tmp_path / "vid")), True))
    direct = _c2f_run(str(tmp_path / "direct"), 2000, 1e6, 2.0)
    coarse = _c2f_run(str(tmp_path / "coarse"), 1000, 2e5, 3.0, max_seq_len=64)
    init = str(latest_checkpoint(coarse))
    model, meta = load_model(direct)
    sweeps = {k: probe_job(model, meta, _probe_task(t, k, v, cfg, "2", ("attention",)), probe_cfg, out)[0]
              for k, t, v in tasks}

    def section(c2f: str) -> tuple[dict, str]:
        report = Report("t", out)
        res = _c2f_section(report, c2f, meta, sweeps, tasks, 2, cfg, probe_cfg, out, log=lambda m: None)
        return res, report.render()

    # The second stage has the direct run's weights, so both probes score alike: within noise on both tasks,
    # and the report gives the measured reason (its higher full-resolution loss, its fewer full-resolution tokens).
    res, text = section(_c2f_run(str(tmp_path / "fine"), 2000, 7e5, 2.5, init_from=init))
    assert res["within_compute"] and res["flops"] == {"direct": 1e6, "coarse": 2e5, "c2f": 7e5, "fine": 5e5}
    assert res["tokens"] == {"direct": 2000, "coarse": 1000, "c2f": 2000, "fine": 1000}
    assert res["val_loss"] == {"c2f": 2.5, "direct": 2.0} and res["grid"]["fine"] == "?"
    assert res["image"]["diff"] == 0.0 and res["image"]["holds"] is None and res["video"]["n"] == sweeps["video"][
        "results"][0]["num_eval"]
    assert "| compute, coarse-to-fine: stage A + stage B (FLOPs) | 2.00e+05 + 5.00e+05 = 7.00e+05 | 2.13e+17 (16→32) " \
           "| 0.70 × direct |" in text
    assert "the measured reason: the coarse-to-fine model ends with a higher validation loss at full resolution " \
           "(2.500 vs 2.000 nats on the same held-out batches) after 1,000 full-resolution tokens against the " \
           "direct run's 2,000" in text
    assert text.count("| coarse-to-fine beats direct training at no more compute (") == 2
    # More compute than the direct run: no verdict, whatever the probes say.
    res, text = section(_c2f_run(str(tmp_path / "fine-over"), 2000, 1.5e6, 1.5, init_from=init))
    assert not res["within_compute"] and res["image"]["holds"] is None and res["video"]["holds"] is None
    assert "No verdict: the coarse-to-fine arm spent more compute than the direct run (1.500e+06 > 1.000e+06" in text
    # Not a second stage (no init_from), or another model: refused before any probe runs.
    with pytest.raises(ValueError, match="not started with init_from"):
        section(direct)
    with pytest.raises(ValueError, match="another model config"):
        _c2f_section(Report("t", out), str(tmp_path / "fine"), dict(meta, model_config={**meta["model_config"], "dim": 64}),
                     sweeps, tasks, 2, cfg, probe_cfg, out, log=lambda m: None)


def test_data_checks_known_answers(tmp_path):
    from trainer.evals.data_checks import check_dataset, token_predictability

    _dataset(str(tmp_path / "img"), video=False, per_class=8, seed=0)
    _dataset(str(tmp_path / "vid"), video=True, per_class=6, seed=1)
    # Image classes use disjoint token ranges (8c..8c+7): a bag of tokens separates them perfectly.
    img = check_dataset(str(tmp_path / "img"), video=False)["bag_of_tokens"]
    assert img["top1"] == 100.0 and img["chance"] == pytest.approx(100 / 3) and img["carried"]
    # Video tokens are independent draws from 0..7 (plus one moving token 30): the previous frame
    # tells nothing, so the conditional cross-entropy is no lower than the unigram's (~3.3 bits).
    vid = check_dataset(str(tmp_path / "vid"), video=True, frames=4, stride=2)["predictability"]
    assert 3.0 < vid["unigram_bits"] < 3.6 and vid["ratio"] > 0.95
    # A copy of the previous frame is predictable: conditional bits far below the unigram's.
    rng = np.random.default_rng(0)
    still = np.repeat(rng.integers(0, 64, size=(40, 1, 16)), 4, axis=1)  # (clips, frames, tokens)
    p = token_predictability(still[:30], still[30:], vocab=64)
    assert p["repeat_rate"] == 1.0 and p["conditional_bits"] < 0.5 * p["unigram_bits"]


def test_scaling_verdict_needs_a_sweep_not_one_runs_curve(tmp_path):
    from trainer.evals.report import Report
    from trainer.evals.study import _scaling_section

    runs = []
    for i, n in enumerate((1, 2, 4)):  # three sizes on the law L = 5 C^-0.05, four points each
        d = tmp_path / f"w{i}"
        d.mkdir()
        rows = [{"step": k, "train_loss": 9.9, "macs": float(c), "val_loss": float(5 * c**-0.05 * (1 + 0.01 * k))}
                for k, c in enumerate(np.geomspace(1e15 * n, 1e16 * n, 4))]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(str(d))
    one = Report("t", str(tmp_path))
    got = _scaling_section(one, runs[:1], str(tmp_path))
    assert got["holds"] is None and "its training curve, not a frontier across model sizes" in "".join(one.parts)
    sweep = Report("t", str(tmp_path))
    got = _scaling_section(sweep, runs, str(tmp_path))
    assert got["holds"] is True and got["b"] < 0 and "each run of the size sweep" in "".join(sweep.parts)


def test_depth_reason_reads_the_probe_curve_and_the_runs_last_validation_interval(tmp_path):
    from trainer.evals.study import _depth_reason

    doc = {"results": [{"layer": b, "pooling": p, "top1": t}
                       for b, t in zip(range(1, 6), (41.2, 40.8, 43.4, 44.2, 44.4), strict=True)
                       for p in ("attention", "average")]}
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"global_batch": 8, "seq_len": 1024, "flops_per_token": 2e7}))

    def val(losses):
        (run / "val.jsonl").write_text("".join(json.dumps({"step": 20 * (i + 1), "val_loss": v}) + "\n"
                                               for i, v in enumerate(losses)))
        return _depth_reason(doc, 5, str(run))

    text = val([5.2, 4.8, 4.7])
    assert text.startswith("the attention probe peaks at block 5 of 5 (relative depth 1.00; top-1 by block "
                           "41.2, 40.8, 43.4, 44.2, 44.4, rising at 3 of 4 steps)")
    assert "still improving when training stopped: validation loss 4.800 → 4.700 nats over its last 20 steps " \
           "(2.1% lower)" in text
    text = val([5.2, 4.7, 4.7])
    assert "had stopped falling (4.700 → 4.700 nats over its last 20 steps), so this is not a model stopped early" in text
    assert "still improving" not in text
