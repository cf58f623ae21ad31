"""The probe engine: streamed vs cached features, exact resume, 2-process data parallel = 1 process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from trainer.evals.probes import ProbeConfig
from trainer.evals.stream_probe import (
    CacheSource,
    HeadSpec,
    TensorSource,
    TokenSource,
    build_feature_cache,
    train_heads,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _token_set(n: int, seed: int, bos: int = 39):
    """[bos] + 6 visual tokens; class 0 draws codes 0..9, class 1 codes 10..19 (10 % noise codes)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    body = rng.integers(0, 10, size=(n, 6)) + 10 * labels[:, None]
    noise = rng.random((n, 6)) < 0.1
    body[noise] = rng.integers(20, 30, size=int(noise.sum()))
    tokens = np.concatenate([np.full((n, 1), bos), body], axis=1).astype(np.int32)
    fi = np.concatenate([np.full((n, 1), -1), np.zeros((n, 6))], axis=1).astype(np.int16)
    return tokens, fi, torch.from_numpy(labels).long()


SPECS = [HeadSpec(1, "attention"), HeadSpec(1, "average"), HeadSpec(3, "attention"), HeadSpec(3, "cross-attn-mlp")]
CFG = ProbeConfig(epochs=3, batch_size=10, lr=3e-2, num_heads=2)


def _weights(trained):
    return [{k: v.clone() for k, v in h.state_dict().items()} for _, h in trained]


def test_stream_and_cache_train_the_same_heads(toy_backbone, tmp_path):
    tr_tok, tr_fi, tr_y = _token_set(48, 0)
    va_tok, va_fi, va_y = _token_set(20, 1)
    layers = [1, 3]
    stream_tr = TokenSource(toy_backbone, tr_tok, tr_fi, layers)
    stream_va = TokenSource(toy_backbone, va_tok, va_fi, layers)
    build_feature_cache(stream_tr, str(tmp_path / "tr"), batch_size=7)
    build_feature_cache(stream_va, str(tmp_path / "va"), batch_size=7)
    cache_tr, cache_va = CacheSource(str(tmp_path / "tr"), layers), CacheSource(str(tmp_path / "va"), layers)
    assert np.load(tmp_path / "tr" / "layer-3.npy", mmap_mode="r").dtype == np.float16
    a = train_heads(stream_tr, tr_y, stream_va, va_y, SPECS, ["lo", "hi"], CFG)
    b = train_heads(cache_tr, tr_y, cache_va, va_y, SPECS, ["lo", "hi"], CFG)
    for (ra, _), (rb, _) in zip(a, b, strict=True):
        assert ra.top1 == rb.top1 and ra.correct == rb.correct and ra.train_loss == rb.train_loss
    for wa, wb in zip(_weights(a), _weights(b), strict=True):
        for k in wa:
            assert torch.equal(wa[k], wb[k]), k
    assert all(r.top1 >= 85.0 for r, _ in a)  # the token codes separate the classes at every head
    assert [len(r.train_loss) for r, _ in a] == [3] * 4 and all(r.num_eval == 20 for r, _ in a)


class Stop(Exception):
    pass


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(45) % 3
    feats = {2: torch.randn(45, 5, 8, generator=g) + 2.0 * torch.nn.functional.one_hot(y, 8)[:, None, :]}
    vy = torch.arange(12) % 3
    vfeats = {2: torch.randn(12, 5, 8, generator=g) + 2.0 * torch.nn.functional.one_hot(vy, 8)[:, None, :]}
    specs = [HeadSpec(2, "attention"), HeadSpec(2, "linear")]
    groups = [f"v{i // 2}" for i in range(12)]  # two clips per validation video
    args = (TensorSource(feats), y, TensorSource(vfeats), vy, specs, ["a", "b", "c"], CFG)
    whole = train_heads(*args, val_groups=groups)
    state = str(tmp_path / "state.pt")

    def crash(step):
        if step == 9:  # epoch 2 of 3 (5 steps an epoch), after the checkpoint of step 8
            raise Stop

    with pytest.raises(Stop):
        train_heads(*args, val_groups=groups, state_path=state, checkpoint_every=4, on_step=crash)
    assert torch.load(state, weights_only=True)["step"] == 8
    resumed = train_heads(*args, val_groups=groups, state_path=state, checkpoint_every=4)
    for (ra, _), (rb, _) in zip(whole, resumed, strict=True):
        assert (ra.top1, ra.top5, ra.correct, ra.train_loss) == (rb.top1, rb.top5, rb.correct, rb.train_loss)
        assert ra.num_eval == 6  # videos scored once
    for wa, wb in zip(_weights(whole), _weights(resumed), strict=True):
        for k in wa:
            assert torch.equal(wa[k], wb[k]), k
    with pytest.raises(ValueError, match="another probe run"):
        train_heads(*args[:6], ProbeConfig(epochs=2, batch_size=10, lr=1e-2, num_heads=2), state_path=state)


WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    from trainer.evals.probes import ProbeConfig
    from trainer.evals.stream_probe import Dist, HeadSpec, TensorSource, train_heads
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    data = torch.load(sys.argv[2])
    specs = [HeadSpec(*s) for s in data["specs"]]
    out = train_heads(TensorSource(data["tr"]), data["ty"], TensorSource(data["va"]), data["vy"], specs,
                      ["a", "b", "c"], ProbeConfig(**data["cfg"]), val_groups=data["groups"], dist=Dist())
    if dist.get_rank() == 0:
        torch.save([(r.top1, r.correct, r.train_loss, h.state_dict()) for r, h in out], sys.argv[3])
    dist.destroy_process_group()
""")


def test_two_gloo_processes_train_the_heads_one_process_trains(tmp_path):
    g = torch.Generator().manual_seed(1)
    ty, vy = torch.arange(40) % 3, torch.arange(15) % 3
    tr = {1: torch.randn(40, 4, 8, generator=g) + torch.nn.functional.one_hot(ty, 8)[:, None, :].float()}
    va = {1: torch.randn(15, 4, 8, generator=g) + torch.nn.functional.one_hot(vy, 8)[:, None, :].float()}
    specs = [(1, "attention"), (1, "average"), (1, "cross-attn-mlp")]
    groups = [f"v{i // 3}" for i in range(15)]
    cfg = ProbeConfig(epochs=2, batch_size=8, lr=1e-2, num_heads=2)
    torch.save({"tr": tr, "va": va, "ty": ty, "vy": vy, "specs": specs, "groups": groups, "cfg": cfg.__dict__},
               tmp_path / "data.pt")
    (tmp_path / "worker.py").write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), REPO, str(tmp_path / "data.pt"),
                               str(tmp_path / "out.pt")],
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}) for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    two = torch.load(tmp_path / "out.pt", weights_only=True)
    one = train_heads(TensorSource(tr), ty, TensorSource(va), vy, [HeadSpec(*s) for s in specs], ["a", "b", "c"],
                      cfg, val_groups=groups)
    for (t1, correct, loss, sd), (r, h) in zip(two, one, strict=True):
        # Equal up to float summation order: the all-reduce adds two partial gradients, and BatchNorm
        # statistics come from all-reduced sums instead of torch's one-pass kernel.
        assert t1 == r.top1 and correct == r.correct
        np.testing.assert_allclose(loss, r.train_loss, rtol=1e-5)
        for k, v in h.state_dict().items():
            torch.testing.assert_close(sd[k].float(), v.float(), atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("device,backend", [("cpu", "gloo"), ("cuda", "nccl"), ("cuda:1", "nccl")])
def test_probe_process_group_backend_follows_the_device_and_has_the_train_timeout(monkeypatch, device, backend):
    """`--device cpu` under torchrun joins over gloo even where CUDA is visible (NCCL cannot reduce the
    CPU heads' tensors), cuda over NCCL; with the timeout pre-training's group has."""
    import datetime

    import torch.distributed as dist

    from trainer import train
    from trainer.evals.stream_probe import Dist

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(("init", kw)))
    d = Dist.init_from_env(device)
    assert d.world == 1  # the stubbed group never started
    want = [("set_device", 1)] if backend == "nccl" else []
    assert calls == want + [("init", {"backend": backend, "timeout": datetime.timedelta(minutes=30)})]
    calls.clear()
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    train._setup_dist(torch.device(device).type)  # pre-training joins the same way
    assert calls == [("init", {"backend": backend, "timeout": datetime.timedelta(minutes=30)})]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_heads_train_on_the_device_of_the_features(toy_backbone, tmp_path):
    """`--device cuda`: streamed features stay on the GPU and the heads (and their BatchNorm statistics)
    train there; CPU features (a cache) are moved to the heads' device batch by batch."""
    tr_tok, tr_fi, tr_y = _token_set(48, 0)
    va_tok, va_fi, va_y = _token_set(20, 1)
    model = toy_backbone.cuda()
    stream_tr, stream_va = TokenSource(model, tr_tok, tr_fi, [1, 3]), TokenSource(model, va_tok, va_fi, [1, 3])
    assert stream_tr.features(np.arange(2), 0)[1].device.type == "cuda"
    build_feature_cache(stream_tr, str(tmp_path / "tr"), batch_size=7)
    cache_tr = CacheSource(str(tmp_path / "tr"), [1, 3])
    for src in (stream_tr, cache_tr):
        out = train_heads(src, tr_y, stream_va, va_y, SPECS, ["lo", "hi"], CFG, device="cuda")
        for r, h in out:
            assert r.top1 >= 85.0
            assert all(t.device.type == "cuda" for t in [*h.parameters(), *h.buffers()])
