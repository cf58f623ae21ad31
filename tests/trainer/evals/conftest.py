"""A stand-in backbone with the `trainer.model.Transformer` feature API, for tests that must not
depend on training a real model: `features(tokens, layers)` returns (B, T, D) per 1-based layer."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn


class ToyBackbone(nn.Module):
    """Layer l's feature = embedding of the token, scaled by l, plus l-dependent noise."""

    def __init__(self, vocab: int = 40, dim: int = 8, n_layers: int = 4, max_seq_len: int = 200) -> None:
        super().__init__()
        self.cfg = types.SimpleNamespace(n_layers=n_layers, dim=dim, max_seq_len=max_seq_len, vocab_size=vocab,
                                         input="tokens", target="tokens")
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Parameter(torch.randn(vocab, dim, generator=g))
        self.head = nn.Linear(dim, vocab)

    def features(self, tokens: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        e = self.emb[tokens]  # (B, T, D)
        return [e * layer + 0.01 * layer for layer in layers]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb[tokens])  # (B, T, V)


@pytest.fixture
def toy_backbone() -> ToyBackbone:
    return ToyBackbone()


def _make_track_setup(root, *, max_seq_len: int, codebook: int = 64, n_hid: int = 8) -> dict:
    """A `toto-train track` workspace under `root`: a random dVAE with 8 px patches (fully
    convolutional, so any multiple of 8 px goes in), a 2-block LLaMA checkpoint of width 32 trained
    (nominally) on its 4x4 grid at 32 px, and one DAVIS-layout sequence of 5 frames (48x64) with a
    red square moving right as object 1. Returns paths, the tokenizer config and the CLI's arguments."""
    import numpy as np
    from PIL import Image

    from pipeline.mix.sequence import make_specials
    from pipeline.tokenizers import load_tokenizer
    from pipeline.tokenizers.base import build_modules, make_config, save_tokenizer, state_dict_of
    from pipeline.tokenizers.dalle import DVAEArch
    from trainer import checkpoint as ck
    from trainer.model import ModelConfig, Transformer

    torch.manual_seed(0)
    tcfg = make_config("dvae", "t", DVAEArch(vocab_size=codebook, n_hid=n_hid, n_blk_per_group=1, n_init=8),
                       resolution=32, has_decoder=False, source={"test": True})
    enc, _ = build_modules(tcfg)
    save_tokenizer(str(root / "tok"), tcfg, state_dict_of(enc, None, "dvae"))
    tok_id = load_tokenizer(f"dvae:{root / 'tok'}").id
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, vocab_size=codebook + 4, max_seq_len=max_seq_len, mlp_hidden=64)
    w = ck.CheckpointWriter(str(root / "run"), 1)
    w.write_model(Transformer(cfg).state_dict())
    w.commit({"model_config": cfg.to_dict(), "train_config": {}, "scheduler": {"kind": "warmup_cosine", "step": 1},
              "loader_state": {"version": 1, "mix_hash": "x", "consumed_samples": 1}, "world_size": 1,
              "specials": make_specials(codebook), "tokenizer": {"id": tok_id, "downsample": 8}, "grid": [4, 4]})
    davis = root / "davis"
    for d in ("JPEGImages/480p/s", "Annotations/480p/s"):
        (davis / d).mkdir(parents=True)
    for t in range(5):
        img = np.full((48, 64, 3), 60, dtype=np.uint8)
        m = np.zeros((48, 64), dtype=np.uint8)
        img[8:40, 10 + 2 * t : 40 + 2 * t] = (230, 30, 30)
        m[8:40, 10 + 2 * t : 40 + 2 * t] = 1
        Image.fromarray(img).save(davis / "JPEGImages/480p/s" / f"{t:05d}.jpg")
        p = Image.fromarray(m, mode="P")
        p.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
        p.save(davis / "Annotations/480p/s" / f"{t:05d}.png")
    spec = f"dvae:{root / 'tok'}"
    return {"root": root, "run": str(root / "run"), "davis": str(davis), "spec": spec, "tcfg": tcfg,
            "args": ["track", str(root / "run"), "--davis", str(davis), "--tokenizer", spec, "--threads", "1"]}


@pytest.fixture(scope="session")
def make_track_setup():
    """The `_make_track_setup(root, max_seq_len=...)` builder, for module- and function-scoped setups."""
    return _make_track_setup


def write_demo_checkpoint(run_dir: str, *, max_seq_len: int, grid: tuple[int, int], resolution: int | None = None,
                          spec: bool = True) -> str:
    """A random dim-32, 2-block LLaMA checkpoint over the demo tokenizer's 512 codes, recorded as
    trained on `grid` (8 px patches); `spec` records the tokenizer spec "demo" (else only its id)."""
    from pipeline.mix.sequence import make_specials
    from pipeline.tokenizers import load_tokenizer
    from trainer import checkpoint as ck
    from trainer.model import ModelConfig, Transformer

    torch.manual_seed(0)
    tok = load_tokenizer("demo", device="cpu")
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, vocab_size=tok.vocab_size + 4, max_seq_len=max_seq_len,
                      mlp_hidden=64)
    info = {"id": tok.id, "downsample": 8} | ({"spec": "demo"} if spec else {})
    if resolution is not None:
        info["resolution"] = resolution
    w = ck.CheckpointWriter(run_dir, 1)
    w.write_model(Transformer(cfg).state_dict())
    w.commit({"model_config": cfg.to_dict(), "train_config": {}, "scheduler": {"kind": "warmup_cosine", "step": 1},
              "loader_state": {"version": 1, "mix_hash": "x", "consumed_samples": 1}, "world_size": 1,
              "specials": make_specials(tok.vocab_size), "grid": list(grid), "tokenizer": info})
    return run_dir


@pytest.fixture
def demo_checkpoint():
    """`write_demo_checkpoint`, for tests of commands that load a checkpoint with its tokenizer."""
    return write_demo_checkpoint
