"""Training loop: overfitting, exact resume after SIGKILL, DDP parity, non-finite abort, outputs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import checkpoint as ck
from trainer.config import load_config
from trainer.evals.position_loss import per_position_loss
from trainer.train import NonFiniteLossError, lr_at, train

sys.path.insert(0, str(Path(__file__).parent))
from trainer_fakes import FakeLoader, factory  # noqa: E402

QUIET = ["progress=false", "tensorboard=false"]
ROOT = Path(__file__).resolve().parents[2]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_tiny_model_overfits_one_batch(tmp_path):
    cfg = load_config("tiny", QUIET + ["max_steps=80", "global_batch=2", "micro_batch=2", "ckpt_every=0",
                                       "lr=1e-2", "warmup_steps=5", "weight_decay=0"])
    out = train(cfg, "fake", tmp_path, loader_factory=factory(fixed_batch=True))
    ls = losses(tmp_path)
    assert ls[1] > 4.0  # ~ln(67) at init
    assert out["loss"] < 0.05, ls


def test_schedule_warmup_then_cosine():
    cfg = load_config("tiny", ["lr=1e-3", "warmup_steps=10", "max_steps=110", "min_lr_ratio=0.1"])
    assert lr_at(1, cfg) == pytest.approx(1e-4)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert lr_at(110, cfg) == pytest.approx(1e-4)


def test_grad_accumulation_equals_one_big_micro_batch(tmp_path):
    common = QUIET + ["max_steps=4", "global_batch=4", "ckpt_every=0", "lr=3e-3"]
    # One fixed batch, so that 4 steps reliably lower the loss (fresh batches at lr 3e-3 are noise).
    train(load_config("tiny", common + ["micro_batch=4"]), "fake", tmp_path / "a",
          loader_factory=factory(fixed_batch=True))
    train(load_config("tiny", common + ["micro_batch=1"]), "fake", tmp_path / "b",
          loader_factory=factory(fixed_batch=True))
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=1e-5, abs=1e-5)
    assert a[4] < a[1]


def test_nonfinite_loss_stops_before_the_optimizer_step(tmp_path):
    # An absurd lr without clipping blows the weights up after one step; step 2's loss is not finite.
    cfg = load_config("tiny", QUIET + ["max_steps=5", "global_batch=2", "micro_batch=2", "lr=1e30", "warmup_steps=0",
                                       "grad_clip=0", "ckpt_every=1", "keep_last=5"])
    with pytest.raises(NonFiniteLossError, match=r"non-finite (loss|gradient norm) .* at step 2.*optimizer step was not taken"):
        train(cfg, "fake", tmp_path, loader_factory=factory())
    assert sorted(losses(tmp_path)) == [1]
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-00000001"]


def test_validation_writes_position_loss_json_and_png(tmp_path):
    cfg = load_config("tiny", QUIET + ["max_steps=2", "global_batch=2", "micro_batch=2", "val_every=2",
                                       "val_batches=2", "ckpt_every=2"])
    train(cfg, "fake", tmp_path, loader_factory=factory(seq_len=40, tpf=8))
    doc = json.loads((tmp_path / "position_loss" / "step-00000002.json").read_text())
    assert doc["schema"] == "position_loss" and doc["seq_len"] == 40 and doc["num_sequences"] == 4
    assert len(doc["position_loss"]) == 40 and all(v > 0 for v in doc["position_loss"])
    assert len(doc["frame_loss"]) == 5  # 1 + 39 tokens = 5 frames of 8
    assert (tmp_path / "position_loss" / "step-00000002.png").stat().st_size > 1000
    val = json.loads((tmp_path / "val.jsonl").read_text().splitlines()[-1])
    assert val["val_loss"] == pytest.approx(doc["mean_loss"])
    # The same numbers as the evaluation's per_position_loss on the same held-out batches and weights.
    model, _ = ck.load_model(tmp_path)
    it = iter(FakeLoader(global_batch=2, split="val", seq_len=40, tpf=8))
    loss, tframe = per_position_loss(model.float(), [next(it), next(it)])
    np.testing.assert_allclose(doc["position_loss"], loss, rtol=1e-4)
    np.testing.assert_allclose(doc["frame_loss"], [loss[tframe == f].mean() for f in range(5)], rtol=1e-4)
    assert val["val_first_frame_loss"] == pytest.approx(doc["frame_loss"][0], abs=1e-5)


def test_metrics_fields_and_resume_continues(tmp_path):
    cfg = load_config("tiny", QUIET + ["max_steps=3", "global_batch=2", "micro_batch=2", "ckpt_every=2",
                                       "peak_flops=1e12"])
    train(cfg, "fake", tmp_path, loader_factory=factory())
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_gb"} <= rec.keys()
    assert 0 < rec["mfu"] < 1 and rec["tokens_per_s"] > 0
    meta = ck.read_meta(tmp_path / "step-00000003")
    assert meta["loader_state"]["consumed_samples"] == 6 and meta["specials"]["bov"] == 64
    # Same command with a longer schedule resumes at step 3 (schedule changes are the caller's choice).
    out = train(load_config("tiny", QUIET + ["max_steps=5", "global_batch=2", "micro_batch=2", "ckpt_every=2",
                                             "peak_flops=1e12"]), "fake", tmp_path, loader_factory=factory())
    assert out["resumed_from"] == 3 and sorted(losses(tmp_path)) == [1, 2, 3, 4, 5]


def test_init_from_loads_weights_for_a_new_stage(tmp_path):
    train(load_config("tiny", QUIET + ["max_steps=2", "global_batch=2", "micro_batch=2"]), "fake", tmp_path / "a",
          loader_factory=factory())
    stage2 = load_config("tiny", QUIET + ["max_steps=1", "warmup_steps=0", "global_batch=2", "micro_batch=2", "model.rope_theta=50000",
                                          f"init_from={tmp_path / 'a'}", "val_every=1", "val_batches=1",
                                          "position_loss=false"])
    train(stage2, "fake", tmp_path / "b", loader_factory=factory(seq_len=64))
    a, meta_a = ck.load_model(tmp_path / "a")
    b, meta = ck.load_model(tmp_path / "b")
    assert meta["model_config"]["rope_theta"] == 50000 and meta["model_config"]["max_seq_len"] == 64
    assert meta["init_from"] == str(tmp_path / "a")
    # The second stage's counters continue the first's: its tokens and FLOPs (at its own FLOPs per token).
    fpt_a = json.loads((tmp_path / "a" / "config.json").read_text())["flops_per_token"]
    fpt_b = json.loads((tmp_path / "b" / "config.json").read_text())["flops_per_token"]
    seq_a = meta_a["seq_len"]
    assert meta_a["tokens_seen"] == 2 * 2 * seq_a and meta_a["flops_seen"] == pytest.approx(4 * seq_a * fpt_a)
    assert meta["tokens_seen"] == 4 * seq_a + 2 * 64
    assert meta["flops_seen"] == pytest.approx(4 * seq_a * fpt_a + 2 * 64 * fpt_b)
    assert json.loads((tmp_path / "b" / "metrics.jsonl").read_text())["tokens_seen"] == 4 * seq_a + 2 * 64
    # ... and so does the scaling command's compute for that run (MACs = FLOPs / 2).
    from trainer.evals.scaling import read_run_points

    (pt,) = read_run_points(str(tmp_path / "b"))
    assert pt["macs"] == pytest.approx(meta["flops_seen"] / 2)
    # One small step away from the initial weights, not a fresh init.
    diff = (a.tok_embeddings.weight - b.tok_embeddings.weight).abs().max().item()
    assert 0 < diff < 0.01


_RUN = """
import sys
sys.path.insert(0, {fakes!r})
from trainer.config import load_config
from trainer.train import train
from trainer_fakes import factory
cfg = load_config("tiny", {overrides!r})
train(cfg, "fake", {out!r}, loader_factory=factory(delay_s={delay}))
"""


def _run_script(out: Path, overrides: list[str], delay: float) -> list[str]:
    code = _RUN.format(fakes=str(Path(__file__).parent), overrides=overrides, out=str(out), delay=delay)
    return [sys.executable, "-c", code]


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_bit_exact_resume_after_sigkill(tmp_path):
    overrides = QUIET + ["max_steps=12", "global_batch=4", "micro_batch=2", "ckpt_every=3", "lr=3e-3",
                         "val_every=0"]
    ref = tmp_path / "ref"
    subprocess.run(_run_script(ref, overrides, 0.0), check=True, env=_env(), timeout=120)
    run = tmp_path / "run"
    proc = subprocess.Popen(_run_script(run, overrides, 0.15), env=_env())
    deadline = time.time() + 90
    while not (run / "step-00000006").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its 2nd checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done = sorted(losses(run))
    assert 6 <= done[-1] < 12  # killed mid-way, after step 6's checkpoint
    subprocess.run(_run_script(run, overrides, 0.0), check=True, env=_env(), timeout=120)
    a, b = losses(ref), losses(run)
    assert sorted(b) == list(range(1, 13))
    assert [a[s] for s in sorted(a)] == [b[s] for s in sorted(b)]  # bit-exact, not approximately
    assert [p.name for p in ck.list_checkpoints(run)] == ["step-00000009", "step-00000012"]
    ma, _ = ck.load_model(ref)
    mb, _ = ck.load_model(run)
    for k, v in ma.state_dict().items():
        assert torch.equal(v, mb.state_dict()[k]), k


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("parallel,model", [("ddp", "tiny"), ("fsdp", "tiny"), ("ddp", "tiny-mamba"),
                                            ("fsdp", "tiny-mamba"), ("fsdp", "tiny-gpt2")],
                         ids=["ddp", "fsdp", "ddp-mamba", "fsdp-mamba", "fsdp-gpt2"])
def test_two_process_gloo_equals_one_process_and_resumes(tmp_path, parallel, model):
    # mamba: the backbone whose blocks are transformers'; gpt2 under FSDP: its learned position table is
    # a root parameter, sharded with the embedding rather than with a block.
    overrides = QUIET + ["max_steps=4", "global_batch=4", "micro_batch=1", "ckpt_every=2", "lr=3e-3",
                         f"parallel={parallel}", "val_every=2", f"model={model}"]
    single = tmp_path / "single"
    subprocess.run(_run_script(single, overrides, 0.0), check=True, env=_env(), timeout=120)
    multi = tmp_path / "multi"
    # Two invocations: leave after 3 steps (checkpoint saved sharded-to-full), then resume to the end.
    # (One for mamba, to keep CI cheap: its resume is tested in-process in test_backbones.)
    for extra in (["exit_after_steps=3"], []) if model == "tiny" else ([],):
        port = _free_port()
        procs = []
        for rank in range(2):
            env = _env()
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
            procs.append(subprocess.Popen(_run_script(multi, overrides + extra, 0.0), env=env))
        assert [p.wait(timeout=180) for p in procs] == [0, 0]
    a, b = losses(single), losses(multi)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-5)
    va = [json.loads(x)["val_loss"] for x in (single / "val.jsonl").read_text().splitlines()]
    vb = [json.loads(x)["val_loss"] for x in (multi / "val.jsonl").read_text().splitlines()]
    # Validation sees 2 micro-batches per rank: the same held-out sequences only when world == 1 covers
    # them too, so compare the training losses exactly and check validation ran on both.
    assert len(va) == len(vb) == 2
    ma, _ = ck.load_model(single)
    mb, meta = ck.load_model(multi)
    assert meta["world_size"] == 2
    for k, v in ma.state_dict().items():
        torch.testing.assert_close(mb.state_dict()[k], v, rtol=1e-4, atol=1e-5)


def test_activation_checkpointing_gives_the_same_losses(tmp_path):
    common = QUIET + ["max_steps=3", "global_batch=2", "micro_batch=2", "ckpt_every=0"]
    train(load_config("tiny", common), "fake", tmp_path / "a", loader_factory=factory())
    train(load_config("tiny", common + ["activation_checkpointing=true"]), "fake", tmp_path / "b",
          loader_factory=factory())
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def _two_ranks(out: Path, overrides: list[str]) -> None:
    port = _free_port()
    procs = []
    for rank in range(2):
        env = _env()
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen(_run_script(out, overrides, 0.0), env=env))
    assert [p.wait(timeout=180) for p in procs] == [0, 0]


def test_fsdp_with_1b_defaults_on_two_processes_matches_one_and_saves_shards(tmp_path):
    # The 1b preset's execution settings together: FSDP2 + activation checkpointing + bf16 (mixed
    # precision policy with fp32 gradient reduction), against one process with bf16 autocast.
    # (Resuming from the shards is test_two_process_gloo_equals_one_process_and_resumes[fsdp].)
    lr = 3e-3
    common = QUIET + ["max_steps=4", "global_batch=4", "micro_batch=1", "ckpt_every=2", f"lr={lr}", "dtype=bf16",
                      "activation_checkpointing=true", "val_every=0"]
    single = tmp_path / "single"
    train(load_config("tiny", common), "fake", single, loader_factory=factory())
    multi = tmp_path / "multi"
    _two_ranks(multi, common + ["parallel=fsdp"])
    # The sharded checkpoint: one DCP file per rank, each holding about half of model + optimizer.
    step4 = multi / "step-00000004"
    assert ck.read_meta(step4)["state_format"] == "dcp" and not (step4 / "model.safetensors").exists()
    files = sorted(p.name for p in (step4 / "dcp").iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    n_params = sum(v.numel() for v in ck.load_model(step4)[0].state_dict().values())
    full_bytes = 3 * 4 * n_params  # fp32 weights + Adam's two moments
    for f in files[1:]:
        assert 0.35 * full_bytes < (step4 / "dcp" / f).stat().st_size < 0.65 * full_bytes, f
    a, b = losses(single), losses(multi)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:  # bf16 matmuls in both; FSDP also keeps bf16 parameter copies: bf16-level agreement
        assert b[s] == pytest.approx(a[s], rel=2e-2), (s, a[s], b[s])
    ma, _ = ck.load_model(single)
    mb, _ = ck.load_model(multi)
    for k, v in ma.state_dict().items():
        w = mb.state_dict()[k]
        # Adam moves a weight by up to ~lr per step whatever its gradient's size, so where bf16
        # rounding flips a tiny gradient's sign the two can differ by up to 4 * lr after 4 steps;
        # as a whole each tensor agrees within a few units of bf16's relative precision (2^-7).
        torch.testing.assert_close(w, v, rtol=0, atol=4 * lr)
        assert (w - v).norm() <= 4 * 2**-7 * v.norm(), k


def test_device_feed_is_one_batch_ahead_and_reports_the_consumed_position():
    from trainer.train import DeviceFeed

    loader = FakeLoader(global_batch=2, seq_len=16)
    feed = DeviceFeed(loader, torch.device("cpu"))
    b1 = feed.next()
    assert b1.state["consumed_samples"] == 2 and b1.n_valid == 2 * 16
    feed.prefetch()  # the loader has moved on, the batch in use still says where a checkpoint resumes
    assert loader.state_dict()["consumed_samples"] == 4 and b1.state["consumed_samples"] == 2
    b2 = feed.next()
    assert b2.state["consumed_samples"] == 4
    assert torch.equal(b1.inputs, next(iter(FakeLoader(global_batch=2, seq_len=16)))["inputs"])
    assert not torch.equal(b1.inputs, b2.inputs)


def test_compiled_ddp_wraps_ddp_and_matches_eager(tmp_path):
    """torch.compile(DDP(model)) (so Dynamo's DDP optimizer splits graphs at bucket boundaries and
    all-reduces overlap backward), run through the aot_eager backend (no C++ toolchain needed)."""
    import torch.distributed as dist
    from torch._dynamo.eval_frame import OptimizedModule
    from torch.nn.parallel import DistributedDataParallel as DDP

    from trainer.model import PRESETS, Transformer
    from trainer.train import _compile, _Dist

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        torch.manual_seed(0)
        eager = Transformer(PRESETS["tiny"])
        torch.manual_seed(0)
        raw = Transformer(PRESETS["tiny"])
        model = _compile(raw, _Dist(0, 2, 0, False), False, torch.device("cpu"), backend="aot_eager")
        assert isinstance(model, OptimizedModule) and isinstance(model._orig_mod, DDP)
        assert model._orig_mod.module is raw
        x = torch.randint(0, PRESETS["tiny"].vocab_size, (2, 24))
        for m in (eager, model):
            m(x).float().logsumexp(-1).mean().backward()
        torch.testing.assert_close(model(x), eager(x), rtol=1e-5, atol=1e-5)
        for (k, p), q in zip(eager.named_parameters(), raw.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=k)
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()
