"""An in-test loader with MixLoader's interface (trainer.data is built in parallel).

Sequences look like tiny videos: a start token, then frames of `tpf` tokens where each frame is
the previous one with a few codes changed, so a model can learn something in a few steps.
Sample i is a pure function of (seed, i); step k's global batch is samples [k*G, (k+1)*G) and
rank r gets its contiguous share, like the real loader.
"""

from __future__ import annotations

import time

import numpy as np
import torch

CODES = 64
SPECIALS = {"bov": CODES, "boi": CODES + 1, "eov": CODES + 2}


def make_sequence(i: int, seq_len: int, tpf: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, i])
    frame = rng.integers(0, CODES, tpf)
    toks, frames = [SPECIALS["bov"]], [-1]
    f = 0
    while len(toks) < seq_len + 1:
        toks.extend(frame.tolist())
        frames.extend([f] * tpf)
        frame = frame.copy()
        j = rng.integers(0, tpf, 2)
        frame[j] = rng.integers(0, CODES, 2)
        f += 1
    return np.asarray(toks[: seq_len + 1]), np.asarray(frames[: seq_len + 1])


class FakeLoader:
    version = 1

    def __init__(self, data: str = "fake", *, global_batch: int, rank: int = 0, world: int = 1, split: str = "train",
                 num_workers: int = 0, seq_len: int = 32, tpf: int = 8, seed: int = 0, delay_s: float = 0.0,
                 fixed_batch: bool = False) -> None:
        self.global_batch, self.rank, self.world = global_batch, rank, world
        self.seq_len, self.tpf, self.delay_s, self.fixed_batch = seq_len, tpf, delay_s, fixed_batch
        self.seed = seed if split == "train" else seed + 10_000
        self.vocab_size = CODES + len(SPECIALS)
        self.specials = dict(SPECIALS)
        self.sources = ["fake"]
        self.mix_hash = f"fake-{self.seed}-{seq_len}-{tpf}"
        self.consumed = 0

    def state_dict(self) -> dict:
        return {"version": self.version, "mix_hash": self.mix_hash, "consumed_samples": self.consumed}

    def load_state_dict(self, sd: dict) -> None:
        if sd["mix_hash"] != self.mix_hash:
            raise ValueError(f"mix hash {sd['mix_hash']} != {self.mix_hash}")
        self.consumed = int(sd["consumed_samples"])

    def __iter__(self):
        b = self.global_batch // self.world
        while True:
            if self.delay_s:
                time.sleep(self.delay_s)
            start = 0 if self.fixed_batch else self.consumed
            ids = range(start + self.rank * b, start + (self.rank + 1) * b)
            seqs = [make_sequence(i, self.seq_len, self.tpf, self.seed) for i in ids]
            toks = torch.as_tensor(np.stack([s for s, _ in seqs]), dtype=torch.int64)  # (B, T+1)
            fr = torch.as_tensor(np.stack([f for _, f in seqs]), dtype=torch.int64)
            self.consumed += self.global_batch
            yield {
                "inputs": toks[:, :-1],
                "targets": toks[:, 1:],
                "source": ["fake"] * b,
                "label": [None] * b,
                "frame_index": fr[:, :-1],
                "sample_index": torch.as_tensor(list(ids), dtype=torch.int64),
            }


def factory(**fixed):
    """A loader_factory for trainer.train.train with extra FakeLoader options."""

    def make(data, *, global_batch, rank, world, split, num_workers=0):
        return FakeLoader(data, global_batch=global_batch, rank=rank, world=world, split=split,
                          num_workers=num_workers, **fixed)

    return make
