"""Joining torchrun's process group: one backend rule and one timeout for every job.

Pre-training (`trainer.train`), fine-tuning (`trainer.finetune`) and the probes
(`trainer.evals.stream_probe.Dist`) all join the group here, so the collective backend follows the
device the job runs on (NCCL reduces CUDA tensors only, gloo CPU ones) and every job waits the
same time for a slow rank before giving up.
"""

from __future__ import annotations

import datetime as _dt

import torch
import torch.distributed as dist

__all__ = ["PROCESS_GROUP_TIMEOUT", "backend_for", "init_process_group"]

# A rank that writes a checkpoint or builds a token file while the others wait at a collective can
# take minutes; torch's default (10 min for NCCL) aborts long evaluations and checkpoint writes.
PROCESS_GROUP_TIMEOUT = _dt.timedelta(minutes=30)


def backend_for(device: str | torch.device) -> str:
    """The collective backend for a job on ``device`` ("cuda", "cuda:N", "cpu", or "auto": CUDA when visible)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    if kind == "cuda":
        return "nccl"
    if kind == "cpu":
        return "gloo"
    raise ValueError(f"no process-group backend for device {str(device)!r}: use cpu or cuda")


def init_process_group(device: str | torch.device) -> None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR in the environment)."""
    dist.init_process_group(backend=backend_for(device), timeout=PROCESS_GROUP_TIMEOUT)
