"""Token datasets and checkpoints made at test time for the evaluation, fine-tuning and figure commands."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.shards import ShardWriter, write_manifest

CODEBOOK = 64
TOK = {"id": "test-labelled", "sha256": "0" * 64, "vocab_size": CODEBOOK, "downsample": 8}


def write_labelled(out: str, *, video: bool, per_class: int, seed: int, classes: int = 3, frames: int = 6,
                   codebook: int = CODEBOOK, tokenizer: dict | None = None) -> str:
    """Class c's tokens come from codes [4c, 4c + 4): separable by content. Images: one 4x4 frame per
    row; videos: `frames` frames per row, one row per video. Splits train and val."""
    rng = np.random.default_rng(seed)
    w = ShardWriter(out, 0, codebook_size=codebook, tokenizer=tokenizer or TOK, resolution=32)
    n = 0
    for split in ("train", "val"):
        for c in range(classes):
            for i in range(per_class):
                nf = frames if video else 1
                tok = (4 * c + rng.integers(0, 4, size=(nf, 4, 4))).astype(np.uint16)
                vid = f"{split}{c}{i:03d}"
                w.add({"key": f"toy/{vid}/00000", "dataset": "toy", "split": split, "video_id": vid, "chunk": 0,
                       "t_start": 0.0, "fps": 30.0, "num_frames": nf, "grid_h": 4, "grid_w": 4, "label": f"class{c}",
                       "tokens": tok})
                n += 1
    w.commit(input_shard={"id": 0, "worklist_sha256": "0" * 64, "num_items": n}, errors=[])
    write_manifest(out)
    return out


def make_checkpoint(run_dir: str, *, n_layers: int = 2, max_seq_len: int = 80, step: int = 10) -> str:
    """A randomly initialised dim-32 Transformer saved as a pre-training checkpoint (at `step`)."""
    from pipeline.mix.sequence import make_specials
    from trainer import checkpoint as ck
    from trainer.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=n_layers, n_heads=2, vocab_size=CODEBOOK + 4, max_seq_len=max_seq_len,
                      mlp_hidden=64)
    model = Transformer(cfg)
    w = ck.CheckpointWriter(run_dir, step)
    w.write_model(model.state_dict())
    w.commit({
        "model_config": cfg.to_dict(), "train_config": {"name": "test"},
        "scheduler": {"kind": "warmup_cosine", "step": step},
        "loader_state": {"version": 1, "mix_hash": "x", "consumed_samples": 40}, "world_size": 1,
        "specials": make_specials(CODEBOOK), "tokenizer": dict(TOK, resolution=32), "grid": [4, 4],
    })
    return run_dir
