"""GPT-2 and Mamba backbones: parity with transformers on the same weights, caches, sizes, μP groups,
learned-position resizing, and one short train + resume per arm."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from trainer import checkpoint as ck
from trainer.backbones import GPT2, Mamba, resize_positions
from trainer.config import load_config
from trainer.export import export_hf
from trainer.generate import sample_tokens
from trainer.model import ModelConfig, build_model, count_params, flops_per_token, param_groups
from trainer.train import train

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))
from trainer_fakes import factory  # noqa: E402

ARCHS = ("gpt2", "mamba")
HF_CLASS = {"gpt2": "GPT2LMHeadModel", "mamba": "MambaForCausalLM"}


def small(arch: str, **kw) -> ModelConfig:
    base = dict(arch=arch, dim=32, n_layers=2, n_heads=4, vocab_size=70, max_seq_len=48, mlp_hidden=96)
    base.update(kw)
    return ModelConfig(**base)


def _perturb_vectors(model) -> None:
    """Non-trivial norms and biases, so a swapped or dropped one would show in the logits."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and not name.endswith(".D"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + (0.75 if "norm" in name or "ln" in name else -0.25))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mup", [None, 16], ids=["sp", "mup"])
def test_logits_equal_the_transformers_model_on_exported_weights(tmp_path, arch, mup):
    torch.manual_seed(0)
    ours = build_model(small(arch, mup_base_dim=mup)).eval()
    assert isinstance(ours, GPT2 if arch == "gpt2" else Mamba)
    _perturb_vectors(ours)
    export_hf(ours, tmp_path, specials={"bos_video": 66, "bos_image": 67, "eos": 68, "pad": 69})
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["architectures"] == [HF_CLASS[arch]] and conf["tie_word_embeddings"] is False
    assert (conf["bos_token_id"], conf["eos_token_id"]) == (66, 68)
    hf = getattr(transformers, HF_CLASS[arch]).from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = torch.randint(0, 70, (2, 40))
    with torch.no_grad():
        ref = hf(x).logits
        got, hidden = ours(x, return_hidden=[1, 2])
        hf_hidden = hf(x, output_hidden_states=True).hidden_states
    assert got.shape == (2, 40, 70)
    assert (got - ref).abs().max().item() < 1e-4
    # Block 1's residual stream: GPT-2's hidden state 1 (0 is the embedding), Mamba's 0 (no embedding entry).
    assert (hidden[0] - hf_hidden[1 if arch == "gpt2" else 0]).abs().max().item() < 1e-4
    torch.testing.assert_close(ours.features(x, [1])[0], hidden[0], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_decoding_equals_the_full_forward_and_greedy_generation(arch):
    torch.manual_seed(0)
    m = build_model(small(arch)).eval()
    x = torch.randint(0, 64, (2, 30))
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(2, 30, "cpu")
        steps = [m(x[:, :9], cache=cache)] + [m(x[:, t : t + 1], cache=cache) for t in range(9, 30)]
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5
    prefix = x[:, :7]
    got = sample_tokens(m, prefix, 10, temperature=0)
    seq = prefix.clone()
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, seq[:, 7:])


@pytest.mark.parametrize("arch", ("llama", *ARCHS))
def test_a_cache_refuses_more_positions_than_it_was_made_for(arch):
    m = build_model(small(arch)).eval()
    cache = m.new_cache(1, 8, "cpu")
    with torch.no_grad():
        m(torch.zeros(1, 8, dtype=torch.long), cache=cache)
        assert cache.pos == 8
        with pytest.raises(ValueError, match=r"9 positions exceed the cache's max_len=8"):
            m(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    assert cache.pos == 8  # a refused call does not move the cache


@pytest.mark.parametrize("arch", ARCHS)
def test_sizes_flops_and_mup_groups(arch):
    cfg = small(arch, dim=64, mup_base_dim=32)
    m = build_model(cfg)
    assert m.num_params() == count_params(cfg) and m.num_params(False) == count_params(cfg, False)
    n = count_params(cfg, False)
    if arch == "gpt2":
        assert flops_per_token(cfg, 48) == 6 * n + 12 * 2 * 64 * 48
        # The trainer passes all parameters but the token embedding: the positions come off.
        assert flops_per_token(cfg, 48, m.num_params(include_embedding=False)) == flops_per_token(cfg, 48)
    else:
        assert flops_per_token(cfg, 48) == 6 * n + 27 * 2 * 128 * 16  # L * E * state, E = 2 * dim
    groups = {g["name"]: g for g in param_groups(m, lr=1e-3, weight_decay=0.1)}
    assert groups["hidden"]["lr"] == pytest.approx(5e-4)
    names = {id(p): k for k, p in m.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    hidden = {names[id(p)] for p in groups["hidden"]["params"]}
    vector_like = {"pos_embeddings.weight"} if arch == "gpt2" else {"layers.0.mixer.A_log", "layers.0.mixer.conv1d.weight"}
    assert vector_like <= no_decay and not vector_like & hidden
    assert ("layers.0.attn.c_attn.weight" if arch == "gpt2" else "layers.0.mixer.in_proj.weight") in hidden


def test_config_names_the_arch_and_its_options():
    with pytest.raises(ValueError, match="arch.*llama"):
        ModelConfig(arch="rnn")
    with pytest.raises(ValueError, match="n_kv_heads.*llama option"):
        ModelConfig(arch="gpt2", n_kv_heads=2)
    ModelConfig(arch="gpt2", dim=36, n_heads=4)  # odd head_dim is fine without rotary embeddings


def test_resize_positions_interpolates_each_frame_and_keeps_the_start_token():
    h = w = 4
    frames, D = 3, 3
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    rows = [torch.stack([torch.full((h, w), float(f)), ys, xs], -1).reshape(h * w, D) for f in range(frames)]
    weight = torch.cat([torch.full((1, D), -7.0), *rows])  # (1 + 3*16, 3): [frame, y, x] per position
    assert torch.equal(resize_positions(weight, (h, w), (h, w), weight.shape[0]), weight)
    new = resize_positions(weight, (h, w), (8, 8), 1 + 2 * 64 + 10)  # two whole frames and part of a third
    assert new.shape == (139, D) and torch.equal(new[0], weight[0])
    grid = new[1 : 1 + 128].reshape(2, 8, 8, D)
    # Bilinear (half-pixel centres) of a linear ramp: position (j + 0.5) / 2 - 0.5, clamped to the grid.
    expect = ((torch.arange(8).float() + 0.5) / 2 - 0.5).clamp(0, w - 1)
    torch.testing.assert_close(grid[1, :, :, 2], expect.expand(8, 8))
    torch.testing.assert_close(grid[0, :, :, 1], expect[:, None].expand(8, 8))
    assert torch.equal(grid[1, :, :, 0], torch.ones(8, 8)) and torch.equal(new[129:, 0], torch.full((10,), 2.0))
    with pytest.raises(ValueError, match="hold 3 4x4 frames"):
        resize_positions(weight, (h, w), (8, 8), 1 + 4 * 64)
    # A model's inputs lack the clip's last token: the third frame's missing rows come from the second frame.
    cut = weight[:-3]
    done = resize_positions(cut, (h, w), (h, w), weight.shape[0])
    assert torch.equal(done[: cut.shape[0]], cut) and torch.equal(done[cut.shape[0]:], weight[1 + 16 + 13 : 1 + 32])


QUIET = ["progress=false", "tensorboard=false", "global_batch=2", "micro_batch=2", "val_every=0"]


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arch", ARCHS)
def test_each_arm_trains_checkpoints_and_resumes_exactly(tmp_path, arch):
    common = QUIET + ["max_steps=4", "ckpt_every=2", "lr=1e-2", "warmup_steps=1"]
    fixed = factory(fixed_batch=True)  # one batch again and again: the loss must fall
    train(load_config(f"tiny-{arch}", common), "fake", tmp_path / "ref", loader_factory=fixed)
    train(load_config(f"tiny-{arch}", common + ["exit_after_steps=2"]), "fake", tmp_path / "run", loader_factory=fixed)
    out = train(load_config(f"tiny-{arch}", common), "fake", tmp_path / "run", loader_factory=fixed)
    assert out["resumed_from"] == 2
    ref, run = _losses(tmp_path / "ref"), _losses(tmp_path / "run")
    assert len(ref) == 4 and ref == run  # bit-exact across the restart
    assert ref[-1] < 0.9 * ref[0]
    model, meta = ck.load_model(tmp_path / "run")
    assert meta["model_config"]["arch"] == arch and type(model).__name__ == ("GPT2" if arch == "gpt2" else "Mamba")


@pytest.mark.parametrize("arch", ARCHS)
def test_activation_checkpointing_gives_the_same_gradients(arch):
    torch.manual_seed(0)
    m = build_model(small(arch)).train()
    x = torch.randint(0, 64, (2, 20))
    grads = []
    for on in (False, True):
        m.zero_grad()
        m.activation_checkpointing = on
        m(x).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_presets_arms_at_280m_sweep_and_second_stage():
    from trainer.config import PRESETS

    large = count_params(PRESETS["large"].model)
    for arch in ARCHS:
        cfg = PRESETS[f"large-{arch}"]
        assert cfg.model.arch == arch and PRESETS[f"tiny-{arch}"].model.arch == arch
        assert abs(count_params(cfg.model) - large) / large < 0.01  # ~280M like LLaMA large (285M)
        assert (cfg.lr, cfg.batch_tokens) == (PRESETS["large"].lr, PRESETS["large"].batch_tokens)
    sweep = [PRESETS[f"a{i}"].model for i in range(1, 7)]
    assert {m.n_heads for m in sweep} == {8} and {m.mup_base_dim for m in sweep} == {256}
    assert all(a.dim < b.dim and a.n_layers < b.n_layers for a, b in zip(sweep, sweep[1:], strict=False))
    assert {PRESETS[f"a{i}"].lr for i in range(1, 7)} == {2.0**-7}  # the paper's μP optimum
    for name, base in (("base-256", "base"), ("large-256", "large"), ("1b-256", "1b")):
        m = PRESETS[name].model
        assert m.rope_theta == 50000.0 and (m.dim, m.n_layers) == (PRESETS[base].model.dim, PRESETS[base].model.n_layers)


def test_init_from_resizes_gpt2_positions_to_the_new_grid(tmp_path, capsys):
    from patch_data import write_pair

    from pipeline.mix import MixConfig, build_mix

    videos = [{"frames": 12, "label": "a"}, {"frames": 12, "split": "val", "label": "b"}]
    mixes = {}
    for grid in (2, 4):  # 8 px and 16 px frames of 4 px patches: 2x2 and 4x4 token grids
        tok, _ = write_pair(tmp_path / f"g{grid}", videos, dataset="k600", grid=grid)
        mixes[grid] = str(tmp_path / f"mix{grid}.json")
        build_mix(MixConfig(ratios={"k600": "1"}, inputs={"k600": tok}, frames=3, stride=2, seed=0), mixes[grid],
                  progress=False)
    common = QUIET + ["max_steps=1", "warmup_steps=0", "ckpt_every=1", "position_loss=false"]
    train(load_config("tiny-gpt2", common), mixes[2], tmp_path / "coarse")
    # lr 1e-9: one step that leaves the loaded weights as they were, to the test's tolerance.
    train(load_config("tiny-gpt2", common + ["lr=1e-9", f"init_from={tmp_path / 'coarse'}"]), mixes[4],
          tmp_path / "fine")
    coarse, cmeta = ck.load_model(tmp_path / "coarse")
    fine, fmeta = ck.load_model(tmp_path / "fine")
    assert (cmeta["grid"], fmeta["grid"]) == ([2, 2], [4, 4])
    old, new = coarse.pos_embeddings.weight.detach(), fine.pos_embeddings.weight.detach()
    assert (old.shape[0], new.shape[0]) == (12, 48)  # bos + 3 frames of 4 / of 16, less the last token
    torch.testing.assert_close(new, resize_positions(old, (2, 2), (4, 4), 48), rtol=0, atol=1e-6)
    csd = coarse.state_dict()
    for k, v in fine.state_dict().items():  # every other weight is the first stage's
        if k != "pos_embeddings.weight":
            torch.testing.assert_close(v, csd[k], rtol=0, atol=1e-6)
    assert "GPT-2 positions resized from 12 rows of 2x2 frames to 48 rows of 4x4 frames" in capsys.readouterr().err
    # Data without a recorded grid cannot say how the rows map: refused by name.
    with pytest.raises(ValueError, match="records no token grid"):
        train(load_config("tiny-gpt2", common + [f"init_from={tmp_path / 'coarse'}"]), "fake", tmp_path / "x",
              loader_factory=factory(seq_len=40))
