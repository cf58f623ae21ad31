"""MixLoader: this rank's share of each global batch of a mix, prefetched by DataLoader workers.

Order is a pure function of the mix manifest: global batch ``k`` is the global samples
``[k*G, (k+1)*G)`` (``G`` = global batch) and rank ``r`` of ``w`` gets ``[k*G + r*B, k*G + (r+1)*B)``
with ``B = G / w``. Nothing depends on the number of workers or ranks, so the state
``{version, mix_hash, consumed_samples}`` resumes exactly under any world size and worker count as
long as ``G`` is unchanged.

Workers: a map-style dataset whose item ``k`` is this rank's whole batch ``k`` (assembled with one
vectorised :meth:`MixReader.batch` call), fed by an infinite step sampler; PyTorch's DataLoader
returns worker results in sampler order, so 0 and N workers give identical batches.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.mix.access import MixReader

STATE_VERSION = 1
_TENSOR_KEYS = ("inputs", "targets", "frame_index", "sample_index")


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor over the same memory with the same strides: ``inputs``/``targets`` stay views of
    one buffer (one shared-memory transfer from a worker, not two) and a broadcast row stays a
    stride-0 expand."""
    if a.ndim == 2 and a.strides[0] == 0:
        return torch.from_numpy(np.array(a[0])).expand(a.shape)
    return torch.from_numpy(a)


def _to_torch(batch: dict[str, Any]) -> dict[str, Any]:
    out = {k: (_tensor(v) if k in _TENSOR_KEYS else v) for k, v in batch.items()}
    x, y = batch["inputs"], batch["targets"]
    seq = x.base
    if (isinstance(seq, np.ndarray) and y.base is seq and seq.shape == (x.shape[0], x.shape[1] + 1)
            and x.ctypes.data == seq.ctypes.data and y.ctypes.data == seq.ctypes.data + seq.itemsize):
        # inputs = seq[:, :-1], targets = seq[:, 1:]: slice one tensor so they share one storage
        # (torch.from_numpy of each view would make two storages over the same memory, and a
        # worker would then send the buffer twice).
        t = torch.from_numpy(seq)
        out["inputs"], out["targets"] = t[:, :-1], t[:, 1:]
    return out


class _RankBatches(Dataset):
    """Item ``k`` = this rank's part of global batch ``first_step + k``."""

    def __init__(self, reader: MixReader, start_sample: int, global_batch: int, rank: int, local_batch: int):
        self.reader, self.start = reader, start_sample
        self.g, self.rank, self.b = global_batch, rank, local_batch

    def ids(self, k: int) -> np.ndarray:
        first = self.start + k * self.g + self.rank * self.b
        return np.arange(first, first + self.b, dtype=np.int64)

    def __getitem__(self, k: int) -> dict[str, Any]:
        return _to_torch(self.reader.batch(self.ids(k)))


def _identity(x: Any) -> Any:
    return x


class MixLoader:
    """Infinite iterator over this rank's share of each global batch of a mix.

    >>> loader = MixLoader("mix.json", global_batch=8, rank=0, world=2, num_workers=2)
    >>> batch = next(iter(loader)); batch["inputs"].shape      # (4, seq_len)
    >>> sd = loader.state_dict()   # save with the checkpoint; load_state_dict(sd) to resume

    Batch keys: ``inputs``/``targets`` int32 [B, T] (views of one [B, T+1] buffer: targets are
    the inputs shifted by one; widen targets with ``.long()`` on the device for cross-entropy,
    see ``pipeline.mix.sequence.SEQ_DTYPE``); ``source`` list[str]; ``label`` list[str|None]; ``frame_index``
    int64 [B, T] (frame of each input, -1 on specials/padding; an ``expand`` of one row when all
    samples share a layout, so treat it as read-only); ``sample_index`` int64 [B]. The frame of target ``t`` is ``frame_index[:, t+1]`` (targets are the inputs shifted
    by one); for the last position it is ``frame_index[:, -1]`` whenever ``seq_len`` ≤ frames × tokens
    per frame (the default layout, where the sequence is cut inside the last frame).
    Targets on padding are -100 (``ignore_index``), which only occurs when ``seq_len`` exceeds a
    sample's length.
    """

    def __init__(
        self,
        mix_path: str,
        *,
        global_batch: int,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 0,
        split: str = "train",
        storage_options: dict | None = None,
        verify: str = "auto",
        prefetch_factor: int = 4,
        cache_mb: int = 256,
        read_slack: float = 0.5,
    ):
        """``verify``: "auto" (per-frame checksums on what is read from remote shards, sha256 of
        local shards once per process), "sha256" (whole files, once per process) or "off"; see
        docs/mixing.md. ``cache_mb``: the process-wide budget for remote reads; ``read_slack``:
        extra bytes per byte read allowed to merge nearby frames into one request."""
        if not isinstance(world, int) or world < 1:
            raise ValueError(f"world={world!r}: must be an integer ≥ 1 (the number of data-parallel ranks)")
        if not isinstance(rank, int) or not 0 <= rank < world:
            raise ValueError(f"rank={rank!r}: must be in [0, world={world})")
        if not isinstance(global_batch, int) or global_batch < 1 or global_batch % world:
            raise ValueError(
                f"global_batch={global_batch!r}: must be a positive multiple of world={world} so every rank gets "
                f"the same share; use e.g. {world * max(1, (global_batch or 1) // world)}"
            )
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers={num_workers!r}: must be an integer ≥ 0 (0 = load in this process)")
        if prefetch_factor < 1:
            raise ValueError(f"prefetch_factor={prefetch_factor}: must be ≥ 1")
        self.mix_path = mix_path
        self.global_batch, self.rank, self.world = global_batch, rank, world
        self.local_batch = global_batch // world
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.reader = MixReader(mix_path, split=split, storage_options=storage_options,
                                verify=verify, read_slack=read_slack, cache_mb=cache_mb)
        self.split = split
        self.seq_len: int = self.reader.seq_len
        self.vocab_size: int = self.reader.vocab_size
        self.specials: dict[str, int] = dict(self.reader.specials)
        self.sources: list[str] = list(self.reader.sources)
        self.mix_hash: str = self.reader.mix_hash
        self.consumed_samples = 0

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "mix_hash": self.mix_hash, "consumed_samples": int(self.consumed_samples)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if not isinstance(sd, dict) or "version" not in sd:
            raise ValueError(f"not a MixLoader state (expected keys version, mix_hash, consumed_samples): {sd!r}")
        if sd["version"] != STATE_VERSION:
            raise ValueError(
                f"MixLoader state version {sd['version']} is not readable by this Toto (reads {STATE_VERSION}); "
                "resume with the Toto version that wrote the checkpoint"
            )
        if sd["mix_hash"] != self.mix_hash:
            raise ValueError(
                f"the checkpoint's data state belongs to mix {sd['mix_hash']} but {self.mix_path} is mix "
                f"{self.mix_hash}: resuming would not continue the same sample order. Point the run at the "
                "original mix manifest, or start the data order afresh deliberately (do not load this state)"
            )
        consumed = int(sd["consumed_samples"])
        if consumed < 0:
            raise ValueError(f"consumed_samples={consumed} must be ≥ 0")
        self.consumed_samples = consumed

    # -- iteration ---------------------------------------------------------------------------
    def batch_at(self, step: int) -> dict[str, Any]:
        """This rank's part of global batch ``step`` (counted from sample 0), without moving the state."""
        return _RankBatches(self.reader, 0, self.global_batch, self.rank, self.local_batch)[step]

    def sequence(self, i: int) -> dict[str, Any]:
        """Global sample ``i`` as one sequence (numpy; see :meth:`MixReader.sequence`)."""
        return self.reader.sequence(i)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        start = self.consumed_samples
        ds = _RankBatches(self.reader, start, self.global_batch, self.rank, self.local_batch)
        if self.num_workers == 0:
            it: Iterator[dict[str, Any]] = (ds[k] for k in itertools.count())
        else:
            it = iter(DataLoader(
                ds, batch_size=None, sampler=itertools.count(), num_workers=self.num_workers,
                prefetch_factor=self.prefetch_factor, collate_fn=_identity, persistent_workers=False,
            ))
        for k, batch in enumerate(it):
            # Counted when handed out: a checkpoint taken after training on this batch resumes after it.
            self.consumed_samples = start + (k + 1) * self.global_batch
            yield batch
