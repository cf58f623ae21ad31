"""Joining torchrun's process group: one backend rule and one timeout for every job; and the full
(unsharded) state dicts that pre-training and fine-tuning checkpoint, whatever the parallelism.

Pre-training (`trainer.train`), fine-tuning (`trainer.finetune`) and the probes
(`trainer.evals.stream_probe.Dist`) all join the group here, so the collective backend follows the
device the job runs on (NCCL reduces CUDA tensors only, gloo CPU ones) and every job waits the
same time for a slow rank before giving up.
"""

from __future__ import annotations

import datetime as _dt

import torch
import torch.distributed as dist

__all__ = ["PROCESS_GROUP_TIMEOUT", "backend_for", "init_process_group", "full_state_dicts", "load_full_state_dicts"]

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


def full_state_dicts(model: torch.nn.Module, opt: torch.optim.Optimizer, *, distributed: bool) -> tuple[dict, dict]:
    """Full model and optimizer state dicts keyed by parameter name, on the CPU. Under FSDP2 this is
    a collective (every rank calls it) that gathers the shards; only rank 0's copy is filled then.
    Single process and DDP: the parameters as they are (no collective)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=distributed)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, opt, options=opts)


def load_full_state_dicts(model: torch.nn.Module, opt: torch.optim.Optimizer | None, model_sd: dict,
                          opt_sd: dict | None, *, broadcast_from_rank0: bool) -> None:
    """Load full state dicts (as :func:`full_state_dicts` returns them) into a plain, DDP or FSDP2
    model: under FSDP2 each rank keeps its shard. With ``broadcast_from_rank0`` only rank 0's dicts
    are read and sent to the others (theirs may be empty)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast_from_rank0)
    set_model_state_dict(model, model_sd, options=opts)
    if opt is not None and opt_sd is not None:
        set_optimizer_state_dict(model, opt, opt_sd, options=opts)
