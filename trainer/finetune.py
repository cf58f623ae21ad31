"""Full fine-tuning (the paper's Table 13): the whole backbone and a pooling head trained end to end.

`toto-train finetune CKPT --train DATA --val DATA --head attention` loads a pre-trained checkpoint,
puts the attention-pooling head of the probes (`trainer.evals.probes.AttentionPoolingHead`, or the
average-pooling one) on the residual stream after block `layer` (default: the last), and trains
both on a labelled token dataset: images as single-frame sequences, videos as clips (as the probe
reads them, `trainer.data.iter_clips`).

Recipe (MAE / BEiT ImageNet fine-tuning, which the paper follows; its own hyper-parameters are not
in PAPER_NUMBERS.md, so these are MAE ViT-L's): AdamW β=(0.9, 0.999), weight decay 0.05 except on
norms, biases, the embedding and the head's query; layer-wise lr decay 0.75 (block i of L gets
lr·0.75^(L+1-i), the embedding lr·0.75^(L+1), the head lr); 5 warmup epochs then cosine to
min_lr; label smoothing 0.1; 50 epochs; global batch 1024 at lr 4e-3 (MAE's base lr 1e-3 ·
1024/256). MAE's drop path, mixup and cutmix act on pixels or on ViT blocks this backbone does not
have and are not used. bf16 autocast on CUDA.

Distribution and resumption: torchrun, with `parallel` "ddp" (DDP) or "fsdp" (FSDP2 `fully_shard`
on every backbone block and on the whole model: parameters, gradients and AdamW state sharded over
the ranks, all-gathered in bf16 under bf16 autocast as in pre-training, for backbones whose fp32
weights + AdamW state (16 bytes a parameter) do not fit one GPU beside the activations). Either way every rank takes a strided share
of each global batch, so a global batch is the same at any world size; the head's BatchNorm takes
its statistics over all ranks (the probes' `trainer.evals.probes.GlobalBatchNorm1d`), so a step
equals one process's up to rounding. With --micro-batch they are per micro-batch, as gradient
accumulation with BatchNorm always is. The order of samples is a pure function of (seed, epoch); a
checkpoint (trainer.checkpoint: atomic step-NNNNNNNN/ directories) holds the full (unsharded)
model + head + optimizer state, RNG, the position (global step) and the running epoch's loss, so a
rerun after an interruption, at any world size and with either parallelism, gives the result of an
uninterrupted run (bit-for-bit on CPU in one process). Each epoch's top-1/top-5 on --val goes to
OUT/finetune.json (schema finetune_result), rewritten atomically after every epoch.

Memory: the labelled token sequences are held in host memory as int32 (ImageNet-1k at 257 tokens
is 1.3 GB); the backbone runs on every batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline import storage
from trainer import checkpoint as ck
from trainer.evals.probes import AttentionPoolingHead, AveragePoolingHead
from trainer.model import no_weight_decay
from trainer.process_group import full_state_dicts, load_full_state_dicts

__all__ = ["HEADS", "PARALLEL", "FinetuneConfig", "PRESETS", "FinetuneModel", "LabelledSet", "load_labelled_set",
           "layer_decay_groups", "lr_at_step", "finetune", "PAPER_TOP1"]

HEADS = ("attention", "average")
PARALLEL = ("ddp", "fsdp")
PAPER_TOP1 = 82.6  # Toto's full fine-tuning on ImageNet-1k (PAPER_NUMBERS.md)
RESULT_FILE = "finetune.json"


@dataclasses.dataclass
class FinetuneConfig:
    """How a fine-tuning run is set up; the defaults are the MAE/BEiT recipe (see the module doc)."""

    head: str = "attention"
    layer: int | None = None  # block whose output the head reads; None: the last block
    epochs: int = 50
    warmup_epochs: float = 5.0
    global_batch: int = 1024
    micro_batch: int | None = None  # sequences per rank per forward; None: the whole per-rank share
    lr: float = 4e-3
    min_lr: float = 1e-6
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    label_smoothing: float = 0.1
    grad_clip: float = 0.0  # 0: off (MAE fine-tuning does not clip)
    num_heads: int = 16  # attention head of the pooling (must divide the width)
    frames: int = 16  # video clips: frames and temporal stride (the paper's 16 at stride 4)
    stride: int = 4
    clips: int = 1  # clips per training video; validation uses val_clips averaged per video
    val_clips: int = 4
    train_split: str | None = "train"
    val_split: str | None = "val"
    max_samples: int | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    ckpt_every_epochs: int = 1
    keep_last: int = 2
    exit_after_steps: int | None = None  # leave (with a checkpoint) after this many steps: tests, preemption
    parallel: str = "ddp"  # under torchrun: ddp or fsdp (FSDP2 fully_shard); ignored in one process

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"FinetuneConfig.head={self.head!r} is invalid: use one of {', '.join(HEADS)}")
        for name in ("epochs", "global_batch", "num_heads", "frames", "stride", "clips", "val_clips",
                     "ckpt_every_epochs", "keep_last"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"FinetuneConfig.{name}={v!r} is invalid: use a positive integer")
        if self.micro_batch is not None and (self.micro_batch < 1 or self.global_batch % self.micro_batch):
            raise ValueError(f"FinetuneConfig.micro_batch={self.micro_batch!r} is invalid: use a positive divisor of "
                             f"the global batch {self.global_batch} (per rank), or None")
        if not (0 <= self.warmup_epochs <= self.epochs):
            raise ValueError(f"FinetuneConfig.warmup_epochs={self.warmup_epochs!r} is invalid: use 0..epochs")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"FinetuneConfig.lr={self.lr!r}, min_lr={self.min_lr!r}: use lr > 0 and 0 <= min_lr <= lr")
        if not (0 < self.layer_decay <= 1):
            raise ValueError(f"FinetuneConfig.layer_decay={self.layer_decay!r} is invalid: use 0 < decay <= 1 "
                             "(1 turns layer-wise decay off)")
        if not (0 <= self.label_smoothing < 1):
            raise ValueError(f"FinetuneConfig.label_smoothing={self.label_smoothing!r} is invalid: use [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("FinetuneConfig.weight_decay and grad_clip must be >= 0")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"FinetuneConfig.dtype={self.dtype!r} is invalid: use auto, bf16 or fp32")
        if self.parallel not in PARALLEL:
            raise ValueError(f"FinetuneConfig.parallel={self.parallel!r} is invalid: use one of {', '.join(PARALLEL)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"FinetuneConfig.device={self.device!r} is invalid: use auto, cpu or cuda")
        if self.max_samples is not None and self.max_samples < 2:
            raise ValueError(f"FinetuneConfig.max_samples={self.max_samples!r} is invalid: use >= 2 or None")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


PRESETS: dict[str, dict] = {
    # The recipe as in the module doc (ImageNet-1k, a GPU node).
    "paper": {},
    # CI / the demo: a few seconds on the demo tokens on one CPU core.
    "tiny": {"epochs": 3, "warmup_epochs": 1.0, "global_batch": 8, "lr": 2e-3, "min_lr": 0.0, "num_heads": 2,
             "frames": 4, "stride": 1, "val_clips": 2, "label_smoothing": 0.1},
}


class FinetuneModel(nn.Module):
    """Backbone blocks 1..layer and a pooling head: tokens (B, T) -> logits (B, C).

    The head sees the residual stream after block `layer` at the visual-token positions
    `visual` (P indices into T: the same layout for every sample of a dataset)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, layer: int, visual: torch.Tensor) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.layer = layer
        self.register_buffer("visual", visual.long(), persistent=False)  # (P,)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.backbone.features(tokens, [self.layer])[0]  # (B, T, D); blocks above `layer` never run
        return self.head(h[:, self.visual].float())  # (B, P, D) -> (B, C)


def _freeze_unused(backbone: nn.Module, layer: int) -> None:
    """Parameters that never reach the head (lm-head, final norm, blocks above `layer`) are frozen:
    they get no optimizer state, and DDP does not wait for their gradients. Everything the features
    pass through (embeddings, positions, blocks up to `layer`) trains."""
    for name, p in backbone.named_parameters():
        parts = name.split(".")
        above = parts[0] == "layers" and int(parts[1]) >= layer
        # Everything else below the head's block trains: the embeddings, GPT-2's learned positions.
        if above or parts[0] in ("norm", "output"):
            p.requires_grad_(False)


def layer_decay_groups(model: FinetuneModel, *, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with layer-wise lr decay (BEiT): the head is layer L+1 (scale 1), block i is
    layer i (scale decay^(L+1-i)), the embeddings (and GPT-2's positions) layer 0. No weight decay on
    vectors (norm weights, biases), the head's query token, and what pre-training does not decay
    (`trainer.model.no_weight_decay`: the embedding, the backbone's vector-like matrices).

    Each group carries `lr_scale` (multiplied into the scheduled lr) and `name`."""
    n = model.layer
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("head."):
            depth = n + 1
        elif name.startswith("backbone.layers."):
            depth = int(name.split(".")[2]) + 1
        else:
            depth = 0  # tok_embeddings (and anything else below the first block)
        # The backbone decays what pre-training decayed (model.no_weight_decay, with its vector_like).
        no_decay = p.ndim < 2 or name.endswith("head.query") or (
            name.startswith("backbone.") and no_weight_decay(model.backbone, name, p))
        g = groups.setdefault((depth, no_decay), {
            "params": [], "weight_decay": 0.0 if no_decay else weight_decay,
            "lr_scale": layer_decay ** (n + 1 - depth), "name": f"layer{depth:03d}_{'no_decay' if no_decay else 'decay'}",
        })
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def lr_at_step(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warmup over `warmup` steps then half-cosine from lr to min_lr at `total` (step 0-based:
    the lr of the step about to be taken)."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclasses.dataclass
class LabelledSet:
    tokens: torch.Tensor  # (N, T) int32
    labels: torch.Tensor  # (N,) int64
    groups: list[str]  # video id of each sample (images: their own id); validation averages per group
    visual: torch.Tensor  # (P,) positions of visual tokens (the same for every sample)
    classes: list[str]
    frames: int  # frames per sample: 1 for images


def load_labelled_set(url: str, *, specials: dict, frames: int, stride: int, clips: int, split: str | None,
                      max_seq_len: int, classes: list[str] | None = None, max_samples: int | None = None,
                      seed: int = 0, storage_options: dict | None = None) -> LabelledSet:
    """Labelled sequences of a token dataset as `iter_clips` yields them (images: one frame each)."""
    from trainer.data import iter_clips

    toks, labs, groups, layout = [], [], [], None
    for c in iter_clips(url, frames=frames, stride=stride, images_per_seq=1, clips_per_video=clips,
                        specials=specials, split=split, storage_options=storage_options):
        if c["label"] is None:
            continue
        if len(c["tokens"]) > max_seq_len:
            raise ValueError(f"{url}: a sample is {len(c['tokens'])} tokens, more than the checkpoint's context of "
                             f"{max_seq_len}; pass fewer --frames")
        vis = np.flatnonzero(np.asarray(c["frame_index"]) >= 0)
        if layout is None:
            layout, n_frames = vis, int(np.asarray(c["frame_index"]).max()) + 1
        elif len(vis) != len(layout) or not np.array_equal(vis, layout):
            raise ValueError(f"{url}: samples have different layouts (visual tokens {len(vis)} vs {len(layout)}); "
                             "fine-tune on one kind of data (images or clips of one length) at a time")
        toks.append(np.asarray(c["tokens"], dtype=np.int32))
        labs.append(c["label"])
        groups.append(c["video_id"])
    if not toks:
        raise ValueError(f"{url} (split {split or 'all'}) has no labelled samples (videos shorter than "
                         f"{frames} frames at stride {stride} are skipped)")
    if max_samples is not None and len(toks) > max_samples:
        # Rows are stored class by class, so a prefix would hold few classes: a seeded subset instead.
        keep = np.sort(np.random.default_rng(seed).permutation(len(toks))[:max_samples])
        toks, labs, groups = [toks[i] for i in keep], [labs[i] for i in keep], [groups[i] for i in keep]
    if classes is None:
        classes = sorted(set(labs))
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labs) - set(index))
    if unknown:
        raise ValueError(f"{url}: labels {unknown[:5]} do not occur in the training set; fine-tune and score on the "
                         "same classes")
    return LabelledSet(torch.from_numpy(np.stack(toks)), torch.tensor([index[x] for x in labs], dtype=torch.long),
                       groups, torch.from_numpy(layout), classes, n_frames)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of one epoch: a pure function of (seed, epoch), the same on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def _topk(probs: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, probs.shape[1])
    return 100.0 * (probs.topk(k, dim=1).indices == labels[:, None]).any(dim=1).float().mean().item()


def _evaluate(model: nn.Module, data: LabelledSet, *, rank: int, world: int, device: torch.device,
              amp: torch.dtype | None, batch: int) -> dict:
    """Top-1/top-5 on `data`, clip probabilities averaged per video. Each rank scores a strided share;
    the per-group sums are all-reduced, so every rank gets the same numbers. Every rank runs the same
    number of forwards (a rank whose share ran out scores sample 0 and drops it): under FSDP2 each
    forward is a collective."""
    order = sorted(set(data.groups))
    gidx = {g: i for i, g in enumerate(order)}
    gid = torch.tensor([gidx[g] for g in data.groups])
    sums = torch.zeros(len(order), len(data.classes), dtype=torch.float64)  # (G, C)
    model.eval()
    mine = torch.arange(rank, len(data.groups), world)
    longest = -(-len(data.groups) // world)  # the largest share: ranks 0.. get one more
    with torch.no_grad():
        for i in range(0, longest, batch):
            idx = mine[i : i + batch]
            x = data.tokens[idx if len(idx) else torch.zeros(1, dtype=torch.long)].long().to(device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(x)
            if len(idx):
                sums.index_add_(0, gid[idx], logits.float().softmax(-1).double().cpu())
    if world > 1:
        t = sums.to(device)
        dist.all_reduce(t)
        sums = t.cpu()
    labels = torch.full((len(order),), -1, dtype=torch.long)
    labels[gid] = data.labels
    model.train()
    return {"top1": _topk(sums, labels, 1), "top5": _topk(sums, labels, 5), "num_eval": len(order)}


def _resume_key(cfg: FinetuneConfig, train_url: str, val_url: str) -> dict:
    """The settings and data a resume must share with the interrupted run (not where, on how many
    ranks, with which parallelism or for how long it runs)."""
    key = {k: v for k, v in cfg.to_dict().items() if k not in ("device", "exit_after_steps", "keep_last", "parallel")}
    return {**key, "train": str(train_url), "val": str(val_url)}


def _device(cfg: FinetuneConfig, local_rank: int) -> torch.device:
    kind = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is visible; use --device cpu or auto")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def finetune(ckpt: str, train_url: str, val_url: str, out: str, cfg: FinetuneConfig, *,
             storage_options: dict | None = None, log: Callable[[str], None] = _log) -> dict:
    """Fine-tune CKPT end to end (or resume OUT's newest checkpoint); returns the finetune_result doc.

    Under torchrun (WORLD_SIZE > 1) the process group is set up here (NCCL on CUDA, gloo on CPU)."""
    owns = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        from trainer.process_group import init_process_group

        init_process_group(cfg.device)
        owns = True
    try:
        return _finetune(ckpt, train_url, val_url, out, cfg, storage_options, log)
    finally:
        if owns:
            dist.destroy_process_group()


def _finetune(ckpt, train_url, val_url, out, cfg: FinetuneConfig, so, log) -> dict:
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = _device(cfg, int(os.environ.get("LOCAL_RANK", 0)))
    amp = torch.bfloat16 if cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda") else None
    if cfg.global_batch % world:
        raise ValueError(f"--global-batch {cfg.global_batch} must be a multiple of the world size {world}")
    per_rank = cfg.global_batch // world
    micro = cfg.micro_batch or per_rank
    if per_rank % micro:
        raise ValueError(f"--micro-batch {micro} must divide the per-rank batch {per_rank} (global / world)")

    backbone, meta = ck.load_model(ckpt, storage_options=so)
    n_layers = int(backbone.cfg.n_layers)
    layer = cfg.layer or n_layers
    if not 1 <= layer <= n_layers:
        raise ValueError(f"--layer {layer}: the checkpoint's blocks are numbered 1..{n_layers}")
    common = dict(specials=meta["specials"], frames=cfg.frames, stride=cfg.stride,
                  max_seq_len=int(backbone.cfg.max_seq_len), max_samples=cfg.max_samples, seed=cfg.seed,
                  storage_options=so)
    train = load_labelled_set(train_url, clips=cfg.clips, split=cfg.train_split, **common)
    val = load_labelled_set(val_url, clips=cfg.val_clips, split=cfg.val_split, classes=train.classes, **common)
    if not torch.equal(train.visual, val.visual):
        raise ValueError("--train and --val have different sample layouts (images vs clips, or other grids)")
    n = len(train.labels)
    steps_per_epoch = n // cfg.global_batch  # the last partial batch is dropped (MAE)
    if steps_per_epoch < 1:
        raise ValueError(f"--train has {n} samples, fewer than one global batch of {cfg.global_batch}; "
                         "lower --global-batch")
    total = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))

    dim = int(backbone.cfg.dim)
    torch.manual_seed(cfg.seed)  # the same head on every rank
    if cfg.head == "attention":
        head: nn.Module = AttentionPoolingHead(dim, len(train.classes), cfg.num_heads)
    else:
        head = AveragePoolingHead(dim, len(train.classes))
    nn.init.trunc_normal_(head.classifier.weight, std=2e-5)  # MAE's fine-tuning head init
    nn.init.zeros_(head.classifier.bias)
    if isinstance(head, AttentionPoolingHead):
        # The key bias adds one constant per head to the query's logits, which the softmax cancels: it
        # never gets a gradient, and DDP would wait for one.
        head.k.bias.requires_grad_(False)
    _freeze_unused(backbone, layer)
    raw = FinetuneModel(backbone.train(), head, layer, train.visual).to(device)
    fsdp = world > 1 and cfg.parallel == "fsdp"
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # One unit per block (its parameters are gathered just for its forward and backward), and the
        # root for the embeddings, final norm and head. The policy of pre-training (trainer.train):
        # under bf16 the shards are all-gathered as bf16 (half the traffic of fp32) and gradients
        # reduced in fp32; the fp32 master weights and AdamW state stay sharded. In fp32 nothing is
        # cast, and FSDP trains the same model as DDP.
        mp = MixedPrecisionPolicy(param_dtype=amp or torch.float32, reduce_dtype=torch.float32)
        for block in backbone.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(raw, mp_policy=mp)
    groups = layer_decay_groups(raw, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, **({"fused": True} if device.type == "cuda" else {}))

    start, history = 0, []
    loss_sum, loss_n = 0.0, 0  # the running epoch's training loss: carried through a resume
    key = _resume_key(cfg, train_url, val_url)
    resume = ck.latest_checkpoint(out, so)
    if rank == 0:
        ck.clean_tmp(out, so)
    if resume is not None:
        rmeta = ck.read_meta(resume, so)
        saved = rmeta.get("finetune", {})
        old = saved.get("config") or {}
        if old != key or saved.get("init") != str(ckpt):
            diff = sorted(k for k in set(key) | set(old) if key.get(k) != old.get(k))
            what = ", ".join(diff) if diff else f"the CKPT ({saved.get('init')})"
            raise ValueError(f"cannot resume {resume}: it was started with another {what}; rerun with the same "
                             "settings, or use a new --out")
        # Under FSDP2 rank 0 alone reads the weights and the optimizer state and sends each rank its shards.
        model_sd, opt_sd = ck.load_state(resume, so)[:2] if not fsdp or rank == 0 else ({}, {})
        load_full_state_dicts(raw, opt, model_sd, opt_sd, broadcast_from_rank0=fsdp)
        del model_sd, opt_sd
        rng = ck.load_rng(resume, rank, so)
        if rng is not None:
            ck.restore_rng(rng)
        start, history = int(rmeta["step"]), list(saved["history"])
        loss_sum, loss_n = saved.get("epoch_loss", [0.0, 0])
        log(f"resumed {resume} at step {start} (epoch {start // steps_per_epoch})")
    model: nn.Module = raw
    if world > 1 and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None)

    def doc_now(final: bool) -> dict:
        last = history[-1] if history else None
        return {
            "schema": "finetune_result", "version": 1, "checkpoint": str(meta.get("step_dir", ckpt)),
            "train": train_url, "val": val_url, "head": cfg.head, "layer": layer, "n_layers": n_layers,
            "classes": len(train.classes), "num_train": n, "num_val": len(val.labels),
            "kind": "video" if train.frames > 1 else "image", "frames": train.frames,
            "world_size": world, "steps_per_epoch": steps_per_epoch, "config": cfg.to_dict(), "epochs": history,
            "final": ({"top1": last["top1"], "top5": last["top5"], "best_top1": max(h["top1"] for h in history),
                       "epoch": last["epoch"]} if final and last else None),
            "paper": {"imagenet_top1": PAPER_TOP1},
        }

    def save(step: int) -> None:
        if rank == 0:
            ck.CheckpointWriter(out, step, storage_options=so)
        if world > 1:
            dist.barrier()
        w = ck.CheckpointWriter(out, step, create=False, storage_options=so)
        w.write_rng(rank, ck.capture_rng())
        # Gathered by every rank under FSDP2 (a collective); otherwise rank 0's replica is the state.
        model_sd, opt_sd = full_state_dicts(raw, opt, distributed=world > 1) if fsdp or rank == 0 else (None, None)
        if world > 1:
            dist.barrier()
        if rank == 0:
            w.write_model(model_sd)
            w.write_optimizer(opt_sd)
            w.commit({
                "model_config": backbone.cfg.to_dict(), "train_config": {"name": "finetune"},
                "scheduler": {"kind": "warmup_cosine", "step": step, "warmup_steps": warmup, "max_steps": total},
                "loader_state": {"kind": "finetune", "step": step, "epoch": step // steps_per_epoch},
                "world_size": world, "global_batch": cfg.global_batch, "specials": meta["specials"],
                "tokenizer": meta.get("tokenizer"), "init_from": str(ckpt),
                "finetune": {"config": key, "init": str(ckpt), "history": history,
                             "classes": train.classes, "layer": layer, "epoch_loss": [loss_sum, loss_n]},
            })
            ck.prune(out, cfg.keep_last, so)
        if world > 1:
            dist.barrier()

    model.train()
    ran = 0
    for step in range(start, total):
        epoch, b = divmod(step, steps_per_epoch)
        order = _epoch_order(n, cfg.seed, epoch)
        glob = order[b * cfg.global_batch : (b + 1) * cfg.global_batch]
        mine = torch.from_numpy(glob[rank::world].copy())  # (per_rank,) this rank's share
        lr = lr_at_step(step, total, warmup, cfg.lr, cfg.min_lr)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        step_loss = torch.zeros((), dtype=torch.float64)
        for j in range(0, per_rank, micro):
            idx = mine[j : j + micro]
            x, y = train.tokens[idx].long().to(device), train.labels[idx].to(device)
            # Gradients are reduced once per step, after the last micro-batch.
            last = j + micro >= per_rank
            if fsdp:
                model.set_requires_gradient_sync(last)
            sync = model.no_sync() if world > 1 and not fsdp and not last else contextlib.nullcontext()
            with sync:
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    logits = model(x)  # (b, C)
                # Mean over the global batch: each micro-batch's sum / global batch (DDP averages over ranks).
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing, reduction="sum")
                (loss * world / cfg.global_batch).backward()
            step_loss += loss.detach().double().cpu()
        if world > 1:
            dist.all_reduce(step_loss)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(step_loss) / cfg.global_batch
        if not math.isfinite(value):
            raise RuntimeError(f"non-finite fine-tuning loss at step {step + 1}; lower --lr")
        loss_sum, loss_n = loss_sum + value, loss_n + 1
        ran += 1
        if b == steps_per_epoch - 1:  # an epoch ends: score it
            ev = _evaluate(raw, val, rank=rank, world=world, device=device, amp=amp, batch=max(micro, 64))
            history.append({"epoch": epoch + 1, "step": step + 1, "train_loss": loss_sum / loss_n, "lr": lr, **ev})
            loss_sum, loss_n = 0.0, 0
            log(f"epoch {epoch + 1}/{cfg.epochs}  loss {history[-1]['train_loss']:.4f}  top-1 {ev['top1']:.2f}  "
                f"top-5 {ev['top5']:.2f}")
            if rank == 0:
                if not ck.is_remote(out):
                    os.makedirs(out, exist_ok=True)
                storage.write_json(storage.join(out, RESULT_FILE), doc_now(step + 1 == total), "finetune_result", so)
        leave = cfg.exit_after_steps is not None and ran >= cfg.exit_after_steps and step + 1 < total
        if step + 1 == total or leave or (b == steps_per_epoch - 1 and (epoch + 1) % cfg.ckpt_every_epochs == 0):
            save(step + 1)
        if leave:
            log(f"leaving after {ran} steps at step {step + 1} (resume: run the same command again)")
            return doc_now(False)
    return doc_now(True)
