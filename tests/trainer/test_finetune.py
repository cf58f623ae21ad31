"""Full fine-tuning: it learns, layer-wise lr decay and weight-decay groups are as specified, and an
interrupted run resumed gives exactly the uninterrupted result."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from schemas import validate
from trainer.cli import main
from trainer.finetune import PRESETS, FinetuneConfig, FinetuneModel, finetune, layer_decay_groups, lr_at_step

sys.path.insert(0, str(Path(__file__).parent))
from figure_fixtures import make_checkpoint, write_labelled  # noqa: E402


@pytest.fixture(scope="module")
def images_and_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    data = write_labelled(str(d / "data"), video=False, per_class=8, seed=0)
    ckpt = make_checkpoint(str(d / "run"), n_layers=2)
    return data, ckpt


def _cfg(**kw) -> FinetuneConfig:
    base = dict(PRESETS["tiny"], device="cpu", epochs=3, global_batch=8)
    base.update(kw)
    return FinetuneConfig(**base)


def test_layer_decay_groups_scale_and_decay_exclusions():
    from trainer.evals.probes import AttentionPoolingHead
    from trainer.model import ModelConfig, Transformer

    bb = Transformer(ModelConfig(dim=32, n_layers=3, n_heads=2, vocab_size=20, max_seq_len=16, mlp_hidden=64))
    from trainer.finetune import _freeze_unused

    _freeze_unused(bb, 2)  # the head reads block 2: block 3, the final norm and the lm-head are unused
    m = FinetuneModel(bb, AttentionPoolingHead(32, 5, 2), 2, torch.arange(1, 5))
    groups = layer_decay_groups(m, weight_decay=0.05, layer_decay=0.5)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(m.named_parameters())
    scale = {n: by_param[id(p)]["lr_scale"] for n, p in named.items() if id(p) in by_param}
    wd = {n: by_param[id(p)]["weight_decay"] for n, p in named.items() if id(p) in by_param}
    assert scale["head.classifier.weight"] == 1.0 and scale["head.query"] == 1.0
    assert scale["backbone.layers.1.attention.wqkv.weight"] == 0.5  # block 2 of L=2: 0.5^(3-2)
    assert scale["backbone.layers.0.feed_forward.w2.weight"] == 0.25
    assert scale["backbone.tok_embeddings.weight"] == 0.125  # the lowest: 0.5^(L+1)
    assert wd["backbone.layers.0.attention.wqkv.weight"] == 0.05 and wd["head.k.weight"] == 0.05
    for name in ("backbone.layers.0.attention_norm.weight", "head.k.bias", "head.classifier.bias", "head.query",
                 "backbone.tok_embeddings.weight"):
        assert wd[name] == 0.0, name
    assert not any(n.startswith(("backbone.layers.2.", "backbone.output", "backbone.norm")) for n in scale)


def test_lr_schedule_warmup_then_cosine():
    assert lr_at_step(0, 10, 2, 1.0, 0.0) == 0.5 and lr_at_step(1, 10, 2, 1.0, 0.0) == 1.0
    assert lr_at_step(2, 10, 2, 1.0, 0.0) == 1.0
    assert lr_at_step(6, 10, 2, 1.0, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at_step(10, 10, 2, 1.0, 0.1) == pytest.approx(0.1)


def test_finetune_learns_and_resume_is_exact(images_and_ckpt, tmp_path):
    data, ckpt = images_and_ckpt
    cfg = _cfg()
    full = finetune(ckpt, data, data, str(tmp_path / "a"), cfg, log=lambda m: None)
    validate(full, "finetune_result")
    assert [e["epoch"] for e in full["epochs"]] == [1, 2, 3]
    assert full["steps_per_epoch"] == 3 and full["num_train"] == 24 and full["num_val"] == 24
    # Three classes separable by token content: fine-tuning must beat chance (33 %) clearly.
    assert full["final"]["top1"] >= 80.0 and full["final"]["top5"] == 100.0
    assert full["epochs"][-1]["train_loss"] < full["epochs"][0]["train_loss"]
    # Interrupted after 4 of 9 steps (inside epoch 2), then the same call again.
    out_b = str(tmp_path / "b")
    part = finetune(ckpt, data, data, out_b, _cfg(exit_after_steps=4), log=lambda m: None)
    assert part["final"] is None and len(part["epochs"]) == 1
    resumed = finetune(ckpt, data, data, out_b, cfg, log=lambda m: None)
    for a, b in zip(full["epochs"], resumed["epochs"], strict=True):
        assert (a["top1"], a["top5"]) == (b["top1"], b["top5"])
    assert resumed["epochs"][0]["train_loss"] == full["epochs"][0]["train_loss"]
    # The epoch the interruption cut: its running loss was carried in the checkpoint.
    assert resumed["epochs"][1]["train_loss"] == full["epochs"][1]["train_loss"]
    assert resumed["epochs"][2]["train_loss"] == full["epochs"][2]["train_loss"]  # a whole epoch after the resume
    from trainer import checkpoint as ck

    sd_a, _, _ = ck.load_state(ck.latest_checkpoint(str(tmp_path / "a")))
    sd_b, _, _ = ck.load_state(ck.latest_checkpoint(out_b))
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    on_disk = json.loads((Path(out_b) / "finetune.json").read_text())
    assert on_disk["final"] == full["final"]
    # Other settings on the same OUT are refused, naming the fix.
    with pytest.raises(ValueError, match="started with another lr; rerun with the same settings, or use a new --out"):
        finetune(ckpt, data, data, out_b, _cfg(lr=1e-2), log=lambda m: None)
    other = str(tmp_path / "other-data")
    import shutil

    shutil.copytree(data, other)
    with pytest.raises(ValueError, match="started with another train, val;"):
        finetune(ckpt, other, other, out_b, _cfg(), log=lambda m: None)


def test_finetune_cli_on_video_clips(tmp_path):
    data = write_labelled(str(tmp_path / "vid"), video=True, per_class=3, seed=1, frames=4)
    ckpt = make_checkpoint(str(tmp_path / "run"), n_layers=1, max_seq_len=40)  # 2 frames fit (33 tokens), 4 do not
    r = CliRunner().invoke(main, ["finetune", ckpt, "--train", data, "--val", data, "--preset", "tiny", "--epochs", "1",
                                  "--frames", "2", "--stride", "2", "--global-batch", "3", "--device", "cpu",
                                  "--out", str(tmp_path / "ft")])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    # 9 validation videos, 2 clips each (the tiny preset), scored once per video
    assert doc["kind"] == "video" and doc["frames"] == 2 and doc["num_val"] == 18 and doc["epochs"][0]["num_eval"] == 9
    assert "top-1" in r.output and "82.6" in r.output
    bad = CliRunner().invoke(main, ["finetune", ckpt, "--train", data, "--val", data, "--preset", "tiny",
                                    "--frames", "4", "--stride", "1", "--out", str(tmp_path / "ft2")])
    assert bad.exit_code != 0 and "fewer --frames" in bad.output



def _rank(rank: int, port: int, ckpt: str, data: str, out: str, cfg: dict) -> None:
    """One rank in a forked child (no second torch import: forking keeps the suite cheap)."""
    import os

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    finetune(ckpt, data, data, out, FinetuneConfig(**cfg), log=lambda m: None)


def _two_ranks(ckpt: str, data: str, out: str, cfg: FinetuneConfig) -> None:
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank, args=(r, port, ckpt, data, out, cfg.to_dict())) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert [p.exitcode for p in procs] == [0, 0]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_process(images_and_ckpt, tmp_path, parallel):
    data, ckpt = images_and_ckpt
    cfg = _cfg(epochs=2, parallel=parallel)
    single = finetune(ckpt, data, data, str(tmp_path / "one"), cfg, log=lambda m: None)
    two_dir = str(tmp_path / "two")
    if parallel == "fsdp":
        # Sharded: interrupted inside epoch 2 on two ranks, resumed on two ranks from the gathered checkpoint.
        _two_ranks(ckpt, data, two_dir, dataclasses.replace(cfg, exit_after_steps=4))
        assert len(json.loads((tmp_path / "two" / "finetune.json").read_text())["epochs"]) == 1
    _two_ranks(ckpt, data, two_dir, cfg)
    two = json.loads((tmp_path / "two" / "finetune.json").read_text())
    assert two["world_size"] == 2 and two["config"]["parallel"] == parallel
    for a, b in zip(single["epochs"], two["epochs"], strict=True):
        # The global batch is split over the ranks and the head's BatchNorm statistics are global: the
        # same steps up to summation order.
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert (b["top1"], b["top5"]) == (a["top1"], a["top5"])
    from trainer import checkpoint as ck

    sd1, _, _ = ck.load_state(ck.latest_checkpoint(str(tmp_path / "one")))
    sd2, _, _ = ck.load_state(ck.latest_checkpoint(str(tmp_path / "two")))
    for k, v in sd1.items():
        torch.testing.assert_close(sd2[k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["tiny-gpt2", "tiny-mamba"])
def test_finetune_decays_what_pretraining_decays_and_trains_gpt2_positions(arch):
    from trainer.config import MODEL_PRESETS
    from trainer.evals.probes import AttentionPoolingHead
    from trainer.finetune import _freeze_unused
    from trainer.model import build_model, param_groups

    cfg = MODEL_PRESETS[arch]
    bb = build_model(cfg)
    # Pre-training's decay per parameter name on a fresh model of the same config.
    ref = build_model(cfg)
    by_id = {id(p): g["weight_decay"] for g in param_groups(ref, 1e-3, 0.1) for p in g["params"]}
    want = {n: by_id[id(p)] for n, p in ref.named_parameters()}
    layer = cfg.n_layers  # the head reads the last block: only the final norm and lm-head go unused
    _freeze_unused(bb, layer)
    m = FinetuneModel(bb, AttentionPoolingHead(cfg.dim, 5, 2), layer, torch.arange(1, 5))
    groups = layer_decay_groups(m, weight_decay=0.1, layer_decay=0.5)
    got = {n[len("backbone."):]: g["weight_decay"] for g in groups for p in g["params"]
           for n, q in m.named_parameters() if q is p and n.startswith("backbone.")}
    assert set(got) == {n for n in want if not n.startswith(("norm.", "output."))}
    assert got == {n: want[n] for n in got}
    if arch == "tiny-gpt2":
        assert bb.pos_embeddings.weight.requires_grad and got["pos_embeddings.weight"] == 0.0
    else:
        assert got["layers.0.mixer.conv1d.weight"] == 0.0 and got["layers.0.mixer.A_log"] == 0.0
        assert got["layers.0.mixer.in_proj.weight"] == 0.1


def test_fsdp_under_bf16_trains_and_keeps_fp32_master_weights(images_and_ckpt, tmp_path):
    # The pre-training policy: bf16 parameters for compute and all-gathers, fp32 shards, gradients
    # reduced in fp32. The run trains (its loss close to one process under the same autocast) and
    # its checkpoint holds fp32 weights.
    data, ckpt = images_and_ckpt
    cfg = _cfg(epochs=2, parallel="fsdp", dtype="bf16")
    single = finetune(ckpt, data, data, str(tmp_path / "one"), cfg, log=lambda m: None)
    _two_ranks(ckpt, data, str(tmp_path / "two"), cfg)
    two = json.loads((tmp_path / "two" / "finetune.json").read_text())
    assert two["config"]["dtype"] == "bf16" and len(two["epochs"]) == 2
    for a, b in zip(single["epochs"], two["epochs"], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=5e-2)
    from trainer import checkpoint as ck

    sd, _, _ = ck.load_state(ck.latest_checkpoint(str(tmp_path / "two")))
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {torch.float32}
