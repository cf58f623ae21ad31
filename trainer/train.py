"""Pre-training loop: one function for a single process, torchrun (DDP / FSDP2) and Ray Train.

`train(cfg, data, out)` reads `RANK`/`WORLD_SIZE` (torchrun) or an already initialised process
group (Ray Train's TorchTrainer), builds the loader's share of each global batch, and runs
AdamW with warmup + cosine decay. Every optimizer step consumes exactly one global batch from
the loader, split into micro-batches of `cfg.micro_batch` sequences per rank (gradient
accumulation). Loss is the sum of token losses over the global batch divided by its number of
target tokens, so it is the same whatever the world size or accumulation.

Outputs in OUT: step-NNNNNNNN/ checkpoints, metrics.jsonl, tb/ (TensorBoard),
position_loss/step-NNNNNNNN.{json,png} (per-position validation loss), val.jsonl.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import functools
import json
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.mix.sequence import IGNORE_INDEX
from trainer import checkpoint as ck
from trainer.config import TrainConfig, config_to_dict
from trainer.evals.position_loss import target_frames, token_losses
from trainer.model import ModelConfig, Transformer, flops_per_token, param_groups

__all__ = ["train", "lr_at", "peak_flops_for", "PEAK_FLOPS", "LoaderFactory", "NonFiniteLossError", "ray_train_loop"]

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) from the vendors' datasheets.
PEAK_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; the optimizer step was not taken."""


class LoaderLike(Protocol):
    seq_len: int
    vocab_size: int
    specials: dict

    def __iter__(self) -> Iterator[dict]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, sd: dict) -> None: ...


LoaderFactory = Callable[..., LoaderLike]


def mix_loader_factory(data: str, *, global_batch: int, rank: int, world: int, split: str,
                       num_workers: int = 0, verify: str = "auto") -> LoaderLike:
    """The production loader: trainer.data.MixLoader over a mix manifest (``verify``: TrainConfig.data_verify)."""
    from trainer.data import MixLoader

    return MixLoader(data, global_batch=global_batch, rank=rank, world=world, num_workers=num_workers, split=split,
                     verify=verify)


def peak_flops_for(device: torch.device, override: float | None) -> float | None:
    """Peak FLOP/s of one device: the override, else the GPU's table entry, else None (CPU)."""
    if override is not None:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):  # most specific name first
        if key.lower() in name.lower():
            return PEAK_FLOPS[key]
    return None


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine decay to lr * min_lr_ratio at max_steps."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclasses.dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1


def _setup_dist(device_kind: str) -> _Dist:
    if dist.is_available() and dist.is_initialized():  # Ray Train or a caller set it up
        return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    backend = "nccl" if device_kind == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=30))
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), True)


def _pick_device(cfg: TrainConfig, d: _Dist) -> torch.device:
    kind = cfg.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("TrainConfig.device='cuda' but no CUDA device is visible; use device=cpu or auto")
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def _autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.dtype == "fp32":
        return None
    if cfg.dtype == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" else None


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    # ru_maxrss is in KiB on Linux: peak resident memory of this process.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def _all_reduce_sum(t: torch.Tensor, d: _Dist, device: torch.device) -> torch.Tensor:
    """Sum a CPU tensor over ranks in place (through the device: NCCL only reduces CUDA tensors)."""
    if d.enabled:
        on_dev = t.to(device)
        dist.all_reduce(on_dev, op=dist.ReduceOp.SUM)
        t.copy_(on_dev.cpu())
    return t


def _barrier(d: _Dist, device: torch.device) -> None:
    if d.enabled:
        if device.type == "cuda":
            dist.barrier(device_ids=[device.index])
        else:
            dist.barrier()


def _read_mix_doc(data: str) -> dict:
    """The mix manifest (for the tokenizer id, grid and frames recorded in checkpoints); {} when the
    data is not a manifest file (an injected loader in tests)."""
    if not (str(data).startswith("s3://") or Path(data).is_file()):
        return {}
    from pipeline.storage import read_json

    return read_json(str(data), "mix_manifest")


class _Metrics:
    """metrics.jsonl (+ TensorBoard) on rank 0. On resume, lines past the resumed step are dropped."""

    def __init__(self, out: Path, resume_step: int, tensorboard: bool) -> None:
        self.path = out / "metrics.jsonl"
        for path in (self.path, out / "val.jsonl"):
            if path.exists():  # steps past the checkpoint are run (and logged) again
                kept = [ln for ln in path.read_text().splitlines()
                        if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
                path.write_text("".join(ln + "\n" for ln in kept))
        self.f = open(self.path, "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, rec: dict, file: str | None = None) -> None:
        line = json.dumps(rec, sort_keys=True) + "\n"
        if file is None:
            self.f.write(line)
            self.f.flush()
        else:
            with open(self.path.parent / file, "a") as f:
                f.write(line)
        if self.tb is not None:
            prefix = "train" if file is None else file.split(".")[0]
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                    self.tb.add_scalar(f"{prefix}/{k}", v, rec["step"])

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()


def _write_position_loss(out: Path, step: int, pos_sum: np.ndarray, pos_cnt: np.ndarray, frame_sum: np.ndarray,
                         frame_cnt: np.ndarray, n_seq: int) -> dict:
    """Per-position (and per-frame) mean validation loss as JSON + PNG (the paper's Figure 10)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        pos = np.where(pos_cnt > 0, pos_sum / np.maximum(pos_cnt, 1), np.nan)
        frm = np.where(frame_cnt > 0, frame_sum / np.maximum(frame_cnt, 1), np.nan)
    doc = {
        "schema": "position_loss",
        "version": 1,
        "step": step,
        "seq_len": int(len(pos)),
        "num_sequences": int(n_seq),
        "mean_loss": float(pos_sum.sum() / max(pos_cnt.sum(), 1)),
        "position_loss": [None if not np.isfinite(v) else round(float(v), 6) for v in pos],
        "frame_loss": [None if not np.isfinite(v) else round(float(v), 6) for v in frm],
    }
    import schemas

    schemas.validate(doc, "position_loss")
    d = out / "position_loss"
    d.mkdir(exist_ok=True)
    stem = d / ck.step_dir_name(step)
    (stem.with_suffix(".json")).write_text(json.dumps(doc) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    axes[0].plot(np.arange(len(pos)), pos, lw=0.7)
    axes[0].set(xlabel="token position", ylabel="validation loss", title=f"loss by position (step {step})")
    if np.isfinite(frm).any():
        axes[1].bar(np.arange(len(frm)), np.nan_to_num(frm))
    axes[1].set(xlabel="frame of the clip", ylabel="mean loss", title="loss by frame")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=100)
    plt.close(fig)
    return doc


def _state_dicts(raw: Transformer, opt: torch.optim.Optimizer, d: _Dist, fsdp: bool):
    """Full (unsharded, CPU) model and optimizer state dicts keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=d.enabled)
    return get_model_state_dict(raw, options=opts), get_optimizer_state_dict(raw, opt, options=opts)


def _load_state_dicts(raw: Transformer, opt: torch.optim.Optimizer | None, model_sd: dict, opt_sd: dict | None,
                      d: _Dist, fsdp: bool) -> None:
    """Load full state dicts. Under FSDP2 only rank 0's copy is read; it is broadcast and sharded."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=fsdp)
    set_model_state_dict(raw, model_sd, options=opts)
    if opt is not None and opt_sd is not None:
        set_optimizer_state_dict(raw, opt, opt_sd, options=opts)


def train(
    cfg: TrainConfig,
    data: str,
    out: str | os.PathLike,
    *,
    loader_factory: LoaderFactory | None = None,
    on_log: Callable[[dict], None] | None = None,
) -> dict:
    """Run (or resume) pre-training. Returns a summary {"step", "loss", "out", ...} on every rank.

    Restarting the same call resumes from OUT's newest complete checkpoint: model, optimizer,
    schedule, RNG and loader position, so the per-step losses equal an uninterrupted run's.
    """
    factory = loader_factory or functools.partial(mix_loader_factory, verify=cfg.data_verify)
    out = Path(out)
    devkind = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    d = _setup_dist(devkind)
    try:
        return _train(cfg, data, out, factory, d, on_log)
    finally:
        if d.owns_group:
            dist.destroy_process_group()


def _train(cfg, data, out: Path, factory, d: _Dist, on_log) -> dict:
    device = _pick_device(cfg, d)
    amp_dtype = _autocast_dtype(cfg, device)
    is_main = d.rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        ck.clean_tmp(out)
    _barrier(d, device)

    # --- data: one loader iteration = this rank's share of one global batch ---------------------
    per_rank_unit = cfg.micro_batch * d.world
    if cfg.global_batch is not None:
        global_batch = cfg.global_batch
    else:
        probe = factory(data, global_batch=per_rank_unit, rank=d.rank, world=d.world, split="train",
                        num_workers=0)
        global_batch = max(1, cfg.batch_tokens // probe.seq_len // per_rank_unit) * per_rank_unit
        del probe
    if global_batch % per_rank_unit:
        raise ValueError(
            f"TrainConfig.global_batch={global_batch} is invalid: it must be a multiple of "
            f"micro_batch x world = {cfg.micro_batch} x {d.world}; change global_batch or micro_batch"
        )
    accum = global_batch // per_rank_unit
    loader = factory(data, global_batch=global_batch, rank=d.rank, world=d.world, split="train",
                     num_workers=cfg.num_workers)
    seq_len, vocab = int(loader.seq_len), int(loader.vocab_size)
    specials = {str(k): int(v) for k, v in dict(getattr(loader, "specials", {}) or {}).items()}
    mix_doc = _read_mix_doc(data)
    tokenizer = getattr(loader, "tokenizer", None) or mix_doc.get("tokenizer")

    # --- model ----------------------------------------------------------------------------------
    mcfg = dataclasses.replace(cfg.model, vocab_size=vocab, max_seq_len=seq_len)
    torch.manual_seed(cfg.seed)  # same init on every rank
    raw = Transformer(mcfg)
    raw.activation_checkpointing = cfg.activation_checkpointing

    resume_dir = ck.latest_checkpoint(out)
    start_step, tokens_seen = 0, 0
    init_sd = None
    fsdp = d.enabled and cfg.parallel == "fsdp"
    if resume_dir is not None:
        model_sd, opt_sd, meta = ck.load_state(resume_dir)
        if fsdp and d.rank != 0:
            model_sd, opt_sd = {}, {}  # rank 0 broadcasts: one copy of the full state in host memory
        saved = ModelConfig.from_dict(meta["model_config"])
        if saved != mcfg:
            raise ValueError(
                f"cannot resume {resume_dir}: its model config {saved} differs from this run's {mcfg}; "
                "use a new --out or the original config"
            )
        if meta.get("global_batch") not in (None, global_batch):
            raise ValueError(
                f"cannot resume {resume_dir}: it used global_batch={meta['global_batch']} sequences, this run "
                f"{global_batch}; the loader position is only exact at a constant global batch"
            )
        start_step, tokens_seen = int(meta["step"]), int(meta.get("tokens_seen", 0))
    elif cfg.init_from:
        # Coarse to fine: weights only (RoPE tables are rebuilt from this run's config).
        init_model, init_meta = ck.load_model(cfg.init_from)
        init_sd = init_model.state_dict()
        del init_model
        shapes = {k: tuple(v.shape) for k, v in raw.state_dict().items()}
        wrong = [k for k, v in init_sd.items() if shapes.get(k) != tuple(v.shape)]
        if wrong:
            raise ValueError(
                f"init_from={cfg.init_from}: parameter shapes differ ({wrong[:3]}...); the initial checkpoint "
                "needs the same dim/layers/heads/vocabulary as this run"
            )

    raw.to(device)
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=amp_dtype or torch.float32, reduce_dtype=torch.float32)
        for block in raw.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(raw, mp_policy=mp)
    opt = torch.optim.AdamW(
        param_groups(raw, cfg.lr, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        foreach=device.type == "cuda" or None,
    )
    if resume_dir is not None:
        _load_state_dicts(raw, opt, model_sd, opt_sd, d, fsdp)
        if meta.get("loader_state") is not None:
            loader.load_state_dict(meta["loader_state"])
        rng = ck.load_rng(resume_dir, d.rank)
        if rng is not None:
            ck.restore_rng(rng)
        del model_sd, opt_sd
    elif init_sd is not None:
        _load_state_dicts(raw, None, init_sd, None, d, False)

    model: torch.nn.Module = raw
    if cfg.compile:
        model = torch.compile(model)
    if d.enabled and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    n_params = raw.num_params() if not fsdp else sum(p.numel() for p in raw.parameters())
    # 6N counts every matmul weight: all parameters except the input embedding (a lookup).
    fpt = flops_per_token(mcfg, seq_len, n_params - mcfg.vocab_size * mcfg.dim)
    peak = peak_flops_for(device, cfg.peak_flops)

    metrics = _Metrics(out, start_step, cfg.tensorboard) if is_main else None
    if is_main:
        (out / "config.json").write_text(json.dumps({
            "train_config": config_to_dict(cfg), "model_config": mcfg.to_dict(), "data": str(data),
            "world_size": d.world, "global_batch": global_batch, "seq_len": seq_len, "accum_steps": accum,
            "params": n_params, "flops_per_token": fpt,
        }, indent=2) + "\n")

    def save(step: int) -> None:
        if is_main:
            ck.CheckpointWriter(out, step)  # creates the temp dir before other ranks write into it
        _barrier(d, device)
        writer = ck.CheckpointWriter(out, step, create=False)
        model_sd, opt_sd = _state_dicts(raw, opt, d, fsdp)  # collective under FSDP
        writer.write_rng(d.rank, ck.capture_rng())
        _barrier(d, device)
        if is_main:
            writer.write_model(model_sd)
            writer.write_optimizer(opt_sd)
            writer.commit({
                "tokens_seen": tokens_seen,
                "model_config": mcfg.to_dict(),
                "train_config": config_to_dict(cfg),
                "scheduler": {"kind": "warmup_cosine", "step": step, "lr": lr_at(step, cfg),
                              "warmup_steps": cfg.warmup_steps, "max_steps": cfg.max_steps},
                "loader_state": loader.state_dict(),
                "world_size": d.world,
                "global_batch": global_batch,
                "seq_len": seq_len,
                "specials": specials,
                "tokenizer": tokenizer,
                "grid": mix_doc.get("grid"),
                "frames": mix_doc.get("frames"),
                "stride": mix_doc.get("stride"),
                "codebook_size": mix_doc.get("codebook_size"),
                "data": str(data),
                "init_from": cfg.init_from,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            })
            ck.prune(out, cfg.keep_last)
        _barrier(d, device)

    val_cache: list[dict] | None = None
    val_loader = None
    if cfg.val_every:
        try:  # fail now, not after hours of training, when the mix has no held-out split
            val_loader = factory(data, global_batch=per_rank_unit, rank=d.rank, world=d.world,
                                 split=cfg.val_split, num_workers=0)
        except ValueError as e:
            raise ValueError(
                f"validation needs split {cfg.val_split!r} of {data}: {e}. Set val_every=0 to train without "
                "validation, or val_split=NAME for another held-out split"
            ) from e

    def validate(step: int) -> dict:
        nonlocal val_cache
        if val_cache is None:
            # Fixed held-out batches: the first val_batches micro-batches of each rank.
            it = iter(val_loader)
            val_cache = [next(it) for _ in range(cfg.val_batches)]
        model.eval()
        pos_sum = torch.zeros(seq_len, dtype=torch.float64)
        pos_cnt = torch.zeros(seq_len, dtype=torch.float64)
        n_frames = 1 + max(int(b["frame_index"].max()) for b in val_cache) if "frame_index" in val_cache[0] else 0
        fr_sum = torch.zeros(max(n_frames, 1), dtype=torch.float64)
        fr_cnt = torch.zeros(max(n_frames, 1), dtype=torch.float64)
        with torch.no_grad():
            for b in val_cache:
                x, y = b["inputs"].to(device), b["targets"].to(device)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = raw(x)  # (b, T, V); no DDP wrapper needed without gradients
                tok = token_losses(logits, y).double().cpu()  # (B, T)
                valid = (y != IGNORE_INDEX).cpu()
                pos_sum += (tok * valid).sum(0)
                pos_cnt += valid.sum(0)
                if n_frames:
                    tf = target_frames(b["frame_index"].cpu())
                    m = valid & (tf >= 0)
                    fr_sum.index_add_(0, tf[m], tok[m])
                    fr_cnt.index_add_(0, tf[m], torch.ones_like(tok[m]))
        for t in (pos_sum, pos_cnt, fr_sum, fr_cnt):
            _all_reduce_sum(t, d, device)
        model.train()
        loss = float(pos_sum.sum() / pos_cnt.sum().clamp(min=1))
        rec = {"step": step, "val_loss": loss}
        if is_main:
            if cfg.position_loss:
                doc = _write_position_loss(out, step, pos_sum.numpy(), pos_cnt.numpy(), fr_sum.numpy(),
                                           fr_cnt.numpy(), len(val_cache) * cfg.micro_batch * d.world)
                if doc["frame_loss"]:
                    rec["val_first_frame_loss"] = doc["frame_loss"][0]
            metrics.log(rec, file="val.jsonl")
        return rec

    # --- loop -----------------------------------------------------------------------------------
    model.train()
    batches = iter(loader)
    last_loss = float("nan")
    pbar = None
    if is_main and cfg.progress:
        from tqdm import tqdm

        pbar = tqdm(total=cfg.max_steps, initial=start_step, desc="pretrain", unit="step", file=sys.stderr,
                    dynamic_ncols=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_last = t_start = time.perf_counter()
    last_step = cfg.max_steps
    for step in range(start_step + 1, cfg.max_steps + 1):
        batch = next(batches)
        inputs, targets = batch["inputs"], batch["targets"]  # (B_rank, T)
        if inputs.shape != (global_batch // d.world, seq_len):
            raise RuntimeError(
                f"loader gave inputs of shape {tuple(inputs.shape)}, expected {(global_batch // d.world, seq_len)}"
            )
        n_valid = _all_reduce_sum(torch.tensor((targets != IGNORE_INDEX).sum().item(), dtype=torch.float64), d, device)
        # Gradient of sum(loss)/n_valid over the global batch; DDP/FSDP average over ranks, hence * world.
        scale = d.world / float(n_valid)
        loss_acc = torch.zeros((), dtype=torch.float64, device=device)  # summed on device: no sync per micro-batch
        for j in range(accum):
            sl = slice(j * cfg.micro_batch, (j + 1) * cfg.micro_batch)
            x = inputs[sl].to(device, non_blocking=True)
            y = targets[sl].to(device, non_blocking=True)
            last = j == accum - 1
            if d.enabled and not fsdp and not last:
                sync = model.no_sync()
            else:
                sync = contextlib.nullcontext()
            if fsdp:
                raw.set_requires_gradient_sync(last)
            with sync:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = model(x)  # (b, T, V)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                                       reduction="sum")
                (loss * scale).backward()
            loss_acc += loss.detach().double()
        loss_sum = _all_reduce_sum(loss_acc.cpu(), d, device)
        step_loss = float(loss_sum / n_valid)
        if not math.isfinite(step_loss):
            opt.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"non-finite loss {step_loss} at step {step}; the optimizer step was not taken. Resume from "
                f"{ck.latest_checkpoint(out) or 'scratch'} with a lower lr (now {lr_at(step, cfg):.3g}) or "
                "check the data"
            )
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        if not math.isfinite(grad_norm):
            opt.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"non-finite gradient norm {grad_norm} at step {step} (loss {step_loss:.4f}); the optimizer "
                "step was not taken. Lower the lr or enable grad_clip"
            )
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens_seen += global_batch * seq_len
        last_loss = step_loss

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            steps_done = cfg.log_every if step % cfg.log_every == 0 else (step % cfg.log_every)
            dt = (now - t_last) / max(1, steps_done)
            t_last = now
            tps = global_batch * seq_len / dt
            rec = {
                "step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
                "tokens_seen": tokens_seen, "step_time_s": dt,
                "mfu": (fpt * tps / (peak * d.world)) if peak else None,
                "memory_gb": _memory_gb(device),
            }
            if is_main:
                metrics.log(rec)
            if on_log is not None:
                on_log(rec)
        if pbar is not None:
            pbar.update(1)
            pbar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
        if cfg.val_every and step % cfg.val_every == 0:
            validate(step)
        ran = step - start_step
        leave = cfg.exit_after_steps is not None and ran >= cfg.exit_after_steps
        if cfg.exit_after_minutes is not None:
            # Every rank must agree, so rank 0's clock decides.
            flag = torch.tensor(float(time.perf_counter() - t_start >= 60 * cfg.exit_after_minutes), device=device)
            if d.enabled:
                dist.broadcast(flag, 0)
            leave = leave or bool(flag.item())
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.max_steps or leave:
            save(step)
        if leave and step < cfg.max_steps:
            last_step = step
            break
    if pbar is not None:
        pbar.close()
    if metrics is not None:
        metrics.close()
    return {"step": last_step, "loss": last_loss, "out": str(out), "global_batch": global_batch,
            "seq_len": seq_len, "accum_steps": accum, "params": n_params, "resumed_from": start_step}


def ray_train_loop(config: dict[str, Any]) -> None:
    """Entry for Ray Train's TorchTrainer: `TorchTrainer(ray_train_loop, train_loop_config={...})`.

    config: {"train_config": dict (config_to_dict), "data": mix path, "out": run dir on storage
    shared by all workers, optional "loader_factory": a picklable LoaderFactory}. Ray initialises the process group; train() picks it up.
    """
    from ray import train as ray_train

    from trainer.config import config_from_dict

    cfg = config_from_dict(config["train_config"])
    import ray.train.torch as ray_torch

    # Ray pins each worker's GPU; train() selects cuda:LOCAL_RANK, so point it at Ray's choice.
    dev = ray_torch.get_device()
    os.environ["LOCAL_RANK"] = str(dev.index if dev.type == "cuda" else ray_train.get_context().get_local_rank())

    def report(rec: dict) -> None:
        ray_train.report({k: v for k, v in rec.items() if v is not None})

    train(cfg, config["data"], config["out"], on_log=report, loader_factory=config.get("loader_factory"))


def run_with_ray(cfg: TrainConfig, data: str, out: str, *, num_workers: int, use_gpu: bool,
                 address: str | None = None, cpus_per_worker: float = 1.0,
                 loader_factory: LoaderFactory | None = None) -> dict:
    """Run `train` on a Ray cluster with Ray Train's TorchTrainer (one worker per GPU).

    OUT must be storage every worker sees (a shared filesystem): checkpoints are ours, written by
    rank 0 exactly as under torchrun, so a Ray run and a torchrun run resume each other.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init(address=address)
    out_abs = str(Path(out).resolve())
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={"train_config": config_to_dict(cfg), "data": str(data), "out": out_abs,
                           "loader_factory": loader_factory},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=f"toto-{cfg.name}", storage_path=str(Path(out_abs) / "ray")),
    )
    result = trainer.fit()
    latest = ck.latest_checkpoint(out_abs)
    return {"out": out_abs, "step": ck.read_meta(latest)["step"] if latest else 0,
            "ray_metrics": dict(result.metrics or {})}
