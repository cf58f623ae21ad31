"""Pre-training loop: one function for a single process, torchrun (DDP / FSDP2) and Ray Train.

`train(cfg, data, out)` reads `RANK`/`WORLD_SIZE` (torchrun) or an already initialised process
group (Ray Train's TorchTrainer), builds the loader's share of each global batch, and runs
AdamW with warmup + cosine decay. Every optimizer step consumes exactly one global batch from
the loader, split into micro-batches of `cfg.micro_batch` sequences per rank (gradient
accumulation). Loss is the sum of token losses over the global batch divided by its number of
target tokens, so it is the same whatever the world size or accumulation.

Outputs in OUT (a local directory, or an object-store URL such as s3://bucket/runs/x reached
through fsspec): step-NNNNNNNN/ checkpoints, metrics.jsonl, tb/ (TensorBoard),
position_loss/step-NNNNNNNN.{json,png} (per-position validation loss), val.jsonl, config.json.
On an object store the logs are written to a local mirror and uploaded (one PUT per file, so a
reader sees a whole file) after every checkpoint, every `LOG_SYNC_S` seconds and at the end;
checkpoints commit with meta.json last (trainer.checkpoint).

On CUDA: fused AdamW, `torch.compile` placed so DDP/FSDP still overlap gradient communication with
backward (`_compile`), and the next batch pinned and copied to the device on a side stream while
the current step runs (`DeviceFeed`).
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
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline import storage
from pipeline.mix.sequence import IGNORE_INDEX
from trainer import checkpoint as ck
from trainer.config import TrainConfig, config_to_dict
from trainer.evals.position_loss import next_losses, target_frames
from trainer.model import CausalLM, ModelConfig, build_model, flops_per_token, param_groups
from trainer.patches import pixel_losses, target_ids
from trainer.process_group import full_state_dicts, init_process_group, load_full_state_dicts

__all__ = ["train", "lr_at", "peak_flops_for", "PEAK_FLOPS", "LoaderFactory", "NonFiniteLossError", "ray_train_loop",
           "DeviceFeed", "RunOutputs"]

LOG_SYNC_S = 60.0  # remote runs: upload the logs at least this often (and at every checkpoint)

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
                       num_workers: int = 0, verify: str = "auto", model: ModelConfig | None = None,
                       pixels: str | None = None) -> LoaderLike:
    """The production loader: trainer.data.MixLoader over a mix manifest (``verify``: TrainConfig.data_verify);
    for a patch-input `model`, trainer.data.pixels.PixelMixLoader with the `pixels` datasets (TrainConfig.pixels)."""
    from trainer.data import MixLoader

    if model is not None and model.input == "patches":
        from trainer.data.pixels import PixelMixLoader

        return PixelMixLoader(data, pixels=pixels, patch_size=model.patch_size, target=model.target,
                              global_batch=global_batch, rank=rank, world=world, num_workers=num_workers, split=split,
                              verify=verify)

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
    init_process_group(device_kind)
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


def _stage_positions(weight: torch.Tensor, old_grid, new_grid, new_len: int, init_from: str, *,
                     announce: bool = False) -> torch.Tensor:
    """GPT-2's learned positions (T_old, D) of a first stage laid out for this run's grid and length
    (new_len, D): unchanged when both match, else `trainer.backbones.resize_positions` (the start row
    kept, each frame's rows resized bilinearly) from the grids the two mix manifests record."""
    from trainer.backbones import resize_positions

    same_grid = old_grid is not None and new_grid is not None and tuple(old_grid) == tuple(new_grid)
    if same_grid and weight.shape[0] == new_len:
        return weight
    if old_grid is None or new_grid is None:
        if weight.shape[0] == new_len:
            return weight  # no grid recorded (data without a mix manifest): nothing says the layout changed
        raise ValueError(
            f"init_from={init_from}: its GPT-2 positions have {weight.shape[0]} rows, this run needs {new_len}, and "
            f"the {'initial checkpoint' if old_grid is None else 'new data'} records no token grid to resize them "
            "by; train both stages on mix manifests (toto-pipeline mix)")
    out = resize_positions(weight, tuple(int(g) for g in old_grid), tuple(int(g) for g in new_grid), new_len)
    if announce:
        print(f"init_from: GPT-2 positions resized from {weight.shape[0]} rows of {old_grid[0]}x{old_grid[1]} "
              f"frames to {new_len} rows of {new_grid[0]}x{new_grid[1]} frames", file=sys.stderr, flush=True)
    return out


def _read_mix_doc(data: str) -> dict:
    """The mix manifest (for the tokenizer id, grid and frames recorded in checkpoints); {} when the
    data is not a manifest file (an injected loader in tests)."""
    if not (str(data).startswith("s3://") or Path(data).is_file()):
        return {}
    from pipeline.storage import read_json

    return read_json(str(data), "mix_manifest")


class RunOutputs:
    """Where a run's logs are written: OUT itself when local; for an object-store OUT, a local
    mirror that `sync` uploads file by file (only files changed since the last sync).

    A resume downloads metrics.jsonl and val.jsonl first, so the logs continue, not restart.
    """

    _RESUMED_LOGS = ("metrics.jsonl", "val.jsonl")

    def __init__(self, out: str, storage_options: dict | None = None) -> None:
        self.url = out
        self.so = storage_options
        self.remote = ck.is_remote(out)
        self._synced: dict[str, tuple[int, int]] = {}
        self._last_sync = time.monotonic()
        if not self.remote:
            self.local = Path(storage.local_path(out))
            self.local.mkdir(parents=True, exist_ok=True)
            return
        storage.check_writable(out, storage_options)  # fail now, with the reason, not at the first checkpoint
        self.local = Path(tempfile.mkdtemp(prefix="toto-run-logs-"))
        for name in self._RESUMED_LOGS:
            url = storage.join(out, name)
            if storage.exists(url, storage_options):
                fs, path = storage.url_to_fs(url, storage_options)
                fs.get_file(path, str(self.local / name))

    def sync(self, force: bool = True) -> None:
        """Upload new or changed files of the mirror (no-op locally; `force=False`: only when
        LOG_SYNC_S has passed since the last upload)."""
        if not self.remote or (not force and time.monotonic() - self._last_sync < LOG_SYNC_S):
            return
        for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
            rel = path.relative_to(self.local).as_posix()
            st = path.stat()
            sig = (st.st_size, st.st_mtime_ns)
            if self._synced.get(rel) == sig:
                continue
            fs, dest = storage.url_to_fs(storage.join(self.url, rel), self.so)
            fs.put_file(str(path), dest)  # one PUT: readers see the old or the new file, whole
            self._synced[rel] = sig
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self.remote:
            try:
                self.sync()
            finally:
                shutil.rmtree(self.local, ignore_errors=True)


class _Metrics:
    """metrics.jsonl (+ TensorBoard) on rank 0, in a local directory (RunOutputs.local). On resume,
    lines past the resumed step are dropped."""

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


def _sharded_state(raw: CausalLM, opt: torch.optim.Optimizer) -> dict:
    """{"model", "optim"} state dicts as this rank holds them: DTensor shards under FSDP2 (nothing
    gathered), plain tensors otherwise. The optimizer's state is created if it has not stepped yet,
    so a resume has tensors to read into."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(raw), "optim": get_optimizer_state_dict(raw, opt)}


def _load_sharded(raw: CausalLM, opt: torch.optim.Optimizer, step_dir, d: _Dist,
                  storage_options: dict | None) -> None:
    """Resume from a "dcp" checkpoint: each rank reads only the shards it owns (any world size)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _sharded_state(raw, opt)
    ck.load_sharded(step_dir, state, storage_options, no_dist=not d.enabled)
    set_model_state_dict(raw, state["model"])
    set_optimizer_state_dict(raw, opt, state["optim"])


@dataclasses.dataclass
class _FedBatch:
    inputs: torch.Tensor  # (B_rank, T) int32 token ids (or packed patches), on the device
    targets: torch.Tensor  # (B_rank, T) int32 token ids (or packed pixel targets), on the device
    host: dict  # the loader's batch as it came (host tensors, sources, labels)
    n_valid: int  # target tokens that count (not IGNORE_INDEX), counted on the host: no device sync
    state: dict  # loader state after this batch: what a checkpoint taken after this step records
    ready: Any = None  # CUDA event: the copy to the device is done


class DeviceFeed:
    """The loader's batches on the device, one batch ahead.

    `next()` returns the batch fetched earlier; `prefetch()` (called once the step's kernels are
    queued, so it overlaps them) takes the following batch from the loader, pins it and starts
    its host→device copy on a side CUDA stream. On CPU the copy is a no-op and the same code runs,
    so the bookkeeping (which loader state belongs to which step) is exercised everywhere.
    """

    def __init__(self, loader: LoaderLike, device: torch.device) -> None:
        self.loader = loader
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._it = iter(loader)
        self._next: _FedBatch | None = None
        self.wait_s = 0.0  # host time spent inside the loader (data wait, unless overlapped)

    def _fetch(self) -> _FedBatch:
        t0 = time.perf_counter()
        batch = next(self._it)
        self.wait_s += time.perf_counter() - t0
        state = self.loader.state_dict()
        x, y = batch["inputs"], batch["targets"]
        n_valid = int((target_ids(y) != IGNORE_INDEX).sum())  # positions, also for packed pixel targets
        if not self.cuda:
            return _FedBatch(x.to(self.device), y.to(self.device), batch, n_valid, state)
        # Pinned pages let the copy run asynchronously (DMA) on the side stream.
        x, y = x.pin_memory(), y.pin_memory()
        with torch.cuda.stream(self.stream):
            xd = x.to(self.device, non_blocking=True)
            yd = y.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return _FedBatch(xd, yd, batch, n_valid, state, ready)

    def prefetch(self) -> None:
        if self._next is None:
            self._next = self._fetch()

    def next(self) -> _FedBatch:
        self.prefetch()
        cur, self._next = self._next, None
        if cur.ready is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(cur.ready)
            # The tensors were allocated on the side stream; tell the allocator the main stream
            # uses them, so their memory is not reused before the step's kernels finish.
            cur.inputs.record_stream(main)
            cur.targets.record_stream(main)
        return cur


def _compile(raw: CausalLM, d: _Dist, fsdp: bool, device: torch.device,
             backend: str = "inductor") -> torch.nn.Module:
    """The module the step calls, with torch.compile where it keeps gradient communication
    overlapped with backward, and DDP around it when data-parallel:

    - one process: the whole model compiled in place (`Module.compile`: parameter names unchanged);
    - DDP: `torch.compile(DDP(model))`. Dynamo's DDP optimizer splits the graph at DDP's bucket
      boundaries, so each bucket's all-reduce starts while backward continues (compiling the
      inner module instead would give one backward graph whose gradients all appear at its end);
    - FSDP2: each block compiled in place before `fully_shard` (the caller's order), so the
      per-block all-gather / reduce-scatter hooks run between compiled blocks.
    """
    if fsdp:
        return raw  # blocks were compiled before sharding
    if not d.enabled:
        raw.compile(backend=backend)
        return raw
    from torch.nn.parallel import DistributedDataParallel as DDP

    return torch.compile(DDP(raw, device_ids=[device.index] if device.type == "cuda" else None), backend=backend)


def train(
    cfg: TrainConfig,
    data: str,
    out: str | os.PathLike,
    *,
    loader_factory: LoaderFactory | None = None,
    on_log: Callable[[dict], None] | None = None,
    storage_options: dict | None = None,
) -> dict:
    """Run (or resume) pre-training. Returns a summary {"step", "loss", "out", ...} on every rank.

    OUT is a local directory or an fsspec URL (s3://bucket/prefix; `storage_options` reach the
    filesystem, e.g. {"client_kwargs": {"endpoint_url": ...}}). Restarting the same call resumes
    from OUT's newest complete checkpoint: model, optimizer, schedule, RNG and loader position, so
    the per-step losses equal an uninterrupted run's.
    """
    factory = loader_factory or functools.partial(mix_loader_factory, verify=cfg.data_verify, model=cfg.model,
                                                  pixels=cfg.pixels)
    out = _out_url(out)
    devkind = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    d = _setup_dist(devkind)
    outputs = None
    try:
        if d.rank == 0:
            outputs = RunOutputs(out, storage_options)
        return _train(cfg, data, out, factory, d, on_log, storage_options, outputs)
    finally:
        if outputs is not None:
            outputs.close()  # remote: the logs so far are uploaded even when training failed
        if d.owns_group:
            dist.destroy_process_group()


def _out_url(out: str | os.PathLike) -> str:
    """OUT as a string: a local path, or a URL kept intact (never through pathlib, which would turn
    "s3://b/x" into a local folder "s3:/b/x")."""
    s = os.fspath(out)
    if "://" in s:
        import fsspec

        proto = s.split("://", 1)[0]
        if proto != "file" and proto not in fsspec.available_protocols():
            raise ValueError(f"--out {storage.redact(s)}: unknown storage protocol {proto!r}; use a local "
                             "directory or an fsspec URL such as s3://bucket/runs/name")
    return s


def _train(cfg, data, out: str, factory, d: _Dist, on_log, so: dict | None, outputs: RunOutputs | None) -> dict:
    device = _pick_device(cfg, d)
    amp_dtype = _autocast_dtype(cfg, device)
    is_main = d.rank == 0
    if is_main:
        ck.clean_tmp(out, so)
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
    raw = build_model(mcfg)  # model.arch: llama, gpt2 or mamba
    raw.activation_checkpointing = cfg.activation_checkpointing

    resume_dir = ck.latest_checkpoint(out, so)
    # tokens_seen / flops_seen count every stage: a run started with init_from carries its initial
    # checkpoint's totals, so logs, checkpoints and `toto-train scaling` see the whole compute spent.
    start_step, tokens_seen, flops_seen = 0, 0, None
    init_sd = None
    fsdp = d.enabled and cfg.parallel == "fsdp"
    resume_fmt = None
    if resume_dir is not None:
        meta = ck.read_meta(resume_dir, so)
        resume_fmt = ck.state_format(meta)
        model_sd, opt_sd = {}, {}
        # "dcp": read after sharding, each rank its own shards. "full" under FSDP2: rank 0 reads
        # and broadcasts (one copy of the full state in host memory).
        if resume_fmt == "full" and (not fsdp or d.rank == 0):
            model_sd, opt_sd, _ = ck.load_state(resume_dir, so)
            rows = model_sd["output.weight"].shape[0]
            if rows != raw.output.weight.shape[0]:  # padded vocabulary (P*P*3 for a pixel head)
                raise ValueError(
                    f"cannot resume {resume_dir}: its lm-head has {rows} rows, this code pads the vocabulary "
                    f"to {mcfg.padded_vocab_size}; start a new --out with init_from={resume_dir} (weights only)"
                )
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
        flops_seen = meta.get("flops_seen")  # None in checkpoints older than this field: tokens_seen · fpt below
    elif cfg.init_from:
        # Coarse to fine: weights only (RoPE tables are rebuilt from this run's config).
        init_model, init_meta = ck.load_model(cfg.init_from)
        init_sd = init_model.state_dict()
        tokens_seen = int(init_meta.get("tokens_seen", 0))
        flops_seen = init_meta.get("flops_seen")
        if flops_seen is None:  # a first stage written before flops_seen: its own FLOPs per token throughout
            icfg = init_model.cfg
            flops_seen = tokens_seen * flops_per_token(
                icfg, int(init_meta.get("seq_len") or icfg.max_seq_len), init_model.num_params(include_embedding=False))
        del init_model
        shapes = {k: tuple(v.shape) for k, v in raw.state_dict().items()}
        if "pos_embeddings.weight" in init_sd:  # GPT-2: one learned row per slot of the first stage's layout
            init_sd["pos_embeddings.weight"] = _stage_positions(
                init_sd["pos_embeddings.weight"], init_meta.get("grid"), mix_doc.get("grid"),
                shapes["pos_embeddings.weight"][0], cfg.init_from, announce=d.rank == 0)
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
            if cfg.compile:
                block.compile()  # in place, before sharding: see _compile
            fully_shard(block, mp_policy=mp)
        fully_shard(raw, mp_policy=mp)
    # Fused AdamW on CUDA: one kernel for the whole update instead of a handful per parameter.
    opt_kw = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(
        param_groups(raw, cfg.lr, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        **opt_kw,
    )
    if resume_dir is not None:
        if resume_fmt == "dcp":
            _load_sharded(raw, opt, resume_dir, d, so)
        else:
            load_full_state_dicts(raw, opt, model_sd, opt_sd, broadcast_from_rank0=fsdp)
        if meta.get("loader_state") is not None:
            loader.load_state_dict(meta["loader_state"])
        rng = ck.load_rng(resume_dir, d.rank, so)
        if rng is not None:
            ck.restore_rng(rng)
        del model_sd, opt_sd
    elif init_sd is not None:
        load_full_state_dicts(raw, None, init_sd, None, broadcast_from_rank0=False)

    model: torch.nn.Module = raw
    if cfg.compile:
        model = _compile(raw, d, fsdp, device)
    elif d.enabled and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None)

    n_params = raw.num_params()  # global sizes under FSDP2 too; lm-head padding not counted
    # 6N counts every matmul weight: all parameters except the lookups (input embedding, learned positions).
    fpt = flops_per_token(mcfg, seq_len, raw.num_params(include_embedding=False))
    peak = peak_flops_for(device, cfg.peak_flops)
    flops_seen = float(tokens_seen * fpt if flops_seen is None else flops_seen)

    logs = outputs.local if outputs is not None else None
    metrics = _Metrics(logs, start_step, cfg.tensorboard) if is_main else None
    if is_main:
        (logs / "config.json").write_text(json.dumps({
            "train_config": config_to_dict(cfg), "model_config": mcfg.to_dict(), "data": str(data),
            "world_size": d.world, "global_batch": global_batch, "seq_len": seq_len, "accum_steps": accum,
            "params": n_params, "flops_per_token": fpt,
        }, indent=2) + "\n")

    def save(step: int) -> None:
        if is_main:
            ck.CheckpointWriter(out, step, storage_options=so)  # creates the temp dir before other ranks write
        _barrier(d, device)
        writer = ck.CheckpointWriter(out, step, create=False, storage_options=so)
        if fsdp:
            writer.write_sharded(_sharded_state(raw, opt))  # collective; every rank writes its own shards
            model_sd = opt_sd = None
        else:
            model_sd, opt_sd = full_state_dicts(raw, opt, distributed=d.enabled)
        writer.write_rng(d.rank, ck.capture_rng())
        _barrier(d, device)
        if is_main:
            if not fsdp:
                writer.write_model(model_sd)
                writer.write_optimizer(opt_sd)
            writer.commit({
                "state_format": "dcp" if fsdp else "full",
                "tokens_seen": tokens_seen,
                "flops_seen": flops_seen,
                "model_config": mcfg.to_dict(),
                "train_config": config_to_dict(cfg),
                "scheduler": {"kind": "warmup_cosine", "step": step, "lr": lr_at(step, cfg),
                              "warmup_steps": cfg.warmup_steps, "max_steps": cfg.max_steps},
                "loader_state": state_now,  # the loader position after the last batch a step consumed
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
            ck.prune(out, cfg.keep_last, so)
            outputs.sync()
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
                tok, valid = next_losses(logits, y)  # (B, T) each
                tok, valid = tok.double().cpu(), valid.cpu()
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
        # Compute so far (all stages) on each point: what `toto-train scaling` reads.
        rec = {"step": step, "val_loss": loss, "tokens_seen": tokens_seen, "flops": flops_seen}
        if is_main:
            if cfg.position_loss:
                doc = _write_position_loss(logs, step, pos_sum.numpy(), pos_cnt.numpy(), fr_sum.numpy(),
                                           fr_cnt.numpy(), len(val_cache) * cfg.micro_batch * d.world)
                if doc["frame_loss"]:
                    rec["val_first_frame_loss"] = doc["frame_loss"][0]
            metrics.log(rec, file="val.jsonl")
        return rec

    # --- loop -----------------------------------------------------------------------------------
    model.train()
    feed = DeviceFeed(loader, device)
    state_now = loader.state_dict()
    last_loss = float("nan")
    pbar = None
    if is_main and cfg.progress:
        from tqdm import tqdm

        pbar = tqdm(total=cfg.max_steps, initial=start_step, desc="pretrain", unit="step", file=sys.stderr,
                    dynamic_ncols=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_last = t_start = time.perf_counter()
    wait_last = feed.wait_s
    last_step = cfg.max_steps
    for step in range(start_step + 1, cfg.max_steps + 1):
        fed = feed.next()
        state_now = fed.state
        inputs, targets = fed.inputs, fed.targets  # (B_rank, T), on the device
        if inputs.shape[:2] != (global_batch // d.world, seq_len):  # (B, T[, 1 + P*P*3 packed patches])
            raise RuntimeError(
                f"loader gave inputs of shape {tuple(inputs.shape)}, expected {(global_batch // d.world, seq_len)}"
            )
        n_valid = _all_reduce_sum(torch.tensor(float(fed.n_valid), dtype=torch.float64), d, device)
        # Gradient of sum(loss)/n_valid over the global batch; DDP/FSDP average over ranks, hence * world.
        scale = d.world / float(n_valid)
        loss_acc = torch.zeros((), dtype=torch.float64, device=device)  # summed on device: no sync per micro-batch
        for j in range(accum):
            sl = slice(j * cfg.micro_batch, (j + 1) * cfg.micro_batch)
            x, y = inputs[sl], targets[sl]
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
                if y.ndim == 3:  # patch -> patch: MSE on the next patch's normalised pixels (trainer.patches)
                    loss = pixel_losses(logits, y).sum()
                else:
                    # The loader's int32 ids widen here, on the device (cross-entropy takes int64).
                    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten().long(), ignore_index=IGNORE_INDEX,
                                           reduction="sum")
                (loss * scale).backward()
            loss_acc += loss.detach().double()
        feed.prefetch()  # the next batch's loading and copy overlap this step's queued kernels
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
        flops_seen += global_batch * seq_len * fpt
        last_loss = step_loss

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            steps_done = cfg.log_every if step % cfg.log_every == 0 else (step % cfg.log_every)
            dt = (now - t_last) / max(1, steps_done)
            t_last = now
            tps = global_batch * seq_len / dt
            wait = (feed.wait_s - wait_last) / max(1, steps_done)
            wait_last = feed.wait_s
            rec = {
                "step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
                "tokens_seen": tokens_seen, "flops_seen": flops_seen, "step_time_s": dt,
                # Host seconds per step inside the loader (overlapped with queued GPU work on CUDA).
                "data_wait_s": wait,
                "mfu": (fpt * tps / (peak * d.world)) if peak else None,
                "memory_gb": _memory_gb(device),
            }
            if is_main:
                metrics.log(rec)
                outputs.sync(force=False)
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
    shared by all workers (a shared filesystem or an object-store URL), optional "loader_factory":
    a picklable LoaderFactory, optional "storage_options" for OUT}. Ray initialises the process
    group; train() picks it up.
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

    train(cfg, config["data"], config["out"], on_log=report, loader_factory=config.get("loader_factory"),
          storage_options=config.get("storage_options"))


def run_with_ray(cfg: TrainConfig, data: str, out: str, *, num_workers: int, use_gpu: bool,
                 address: str | None = None, cpus_per_worker: float = 1.0,
                 loader_factory: LoaderFactory | None = None, storage_options: dict | None = None) -> dict:
    """Run `train` on a Ray cluster with Ray Train's TorchTrainer (one worker per GPU).

    OUT must be storage every worker sees (a shared filesystem or an s3:// URL): checkpoints are
    ours, written exactly as under torchrun, so a Ray run and a torchrun run resume each other.
    Ray's own run records go to OUT/ray when OUT is local, else to Ray's default local folder.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init(address=address)
    out = _out_url(out)
    out_abs = out if ck.is_remote(out) else str(Path(storage.local_path(out)).resolve())
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={"train_config": config_to_dict(cfg), "data": str(data), "out": out_abs,
                           "loader_factory": loader_factory, "storage_options": storage_options},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=f"toto-{cfg.name}",
                             storage_path=None if ck.is_remote(out_abs) else str(Path(out_abs) / "ray")),
    )
    result = trainer.fit()
    latest = ck.latest_checkpoint(out_abs, storage_options)
    return {"out": out_abs, "step": ck.read_meta(latest, storage_options)["step"] if latest else 0,
            "ray_metrics": dict(result.metrics or {})}
