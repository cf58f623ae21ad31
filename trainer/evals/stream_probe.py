"""The probe engine: every (layer, pooling) head trained at once on features computed batch by batch.

AIM-style multi-head probing: one frozen-backbone pass per batch feeds every requested layer x
pooling head (`trainer.evals.features.backbone_features`), so a sweep over all layers costs one
backbone pass per batch and memory is bounded by a batch, not by the dataset. Heads train in fp32
(one AdamW over all heads: its update is per parameter, so this is the same as one optimizer per
head); on CUDA the backbone runs under bf16 autocast.

Feature sources (what a batch of sample indices turns into: {layer: (b, P, D) float32})
- `TokenSource` ("stream"): token sequences are read once from the token dataset
  (`trainer.data.iter_clips`) into a token file on disk (int32, N x T: 4 bytes a token against
  2·D bytes a token for one layer's fp16 feature), and every epoch re-reads batches of tokens in
  a fresh global shuffle and runs the backbone on them. The shuffle has to be global: datasets are
  stored class by class, so a bounded shuffle buffer over the stream would give one-class batches.
  For a patch-input model (a pixel dataset) the file also holds each position's patch (uint8, N x T x
  P*P*3), packed for the model as batches are read (`trainer.patches.PackedRows`).
- `CacheSource` ("cache"): features of every layer computed once into fp16 `.npy` memmaps on disk
  and read back by batch; cheaper when the set is small (one backbone pass in all).
- `TensorSource`: features already in memory (`train_probe` and unit tests).
Features are rounded to fp16 in every source, as the cache stores them, so "stream" and "cache"
train on the same numbers.

Resume: with ``state_path`` the heads, the optimizer and the data position (epoch, batch) are
written atomically every ``checkpoint_every`` steps and at the end; a rerun continues from there and
gives the result of an uninterrupted run (each epoch's order is a function of seed and epoch).

Data parallel (torchrun; gloo on CPU, nccl on CUDA): every rank walks the same global batches and
takes a disjoint contiguous slice of each; the backbone pass (the cost) is split, the heads'
gradients and losses are all-reduced in one flat buffer (each rank's loss is its summed loss over
the global batch size, so the sum is the global mean) and BatchNorm uses global statistics
(`ProbeNorm`). Validation probabilities of each batch are gathered; rank 0 writes.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.evals.features import backbone_features, visual_count
from trainer.evals.probes import ProbeConfig, ProbeResult, _lr_at, build_head

__all__ = [
    "Dist",
    "TensorSource",
    "TokenSource",
    "CacheSource",
    "HeadSpec",
    "build_token_file",
    "build_feature_cache",
    "cache_bytes",
    "train_heads",
    "FEATURE_MODES",
]

FEATURE_MODES = ("stream", "cache", "auto")
STATE_VERSION = 1


# ----------------------------------------------------------------------------- distributed


class Dist:
    """This process's place in a data-parallel probe: rank, world size and the few collectives used."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1
        self.device = torch.device("cpu")
        if self.on and dist.get_backend() == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())

    @staticmethod
    def init_from_env(device: str | torch.device) -> Dist:
        """Join the process group torchrun describes (WORLD_SIZE > 1), else run alone.

        The backend follows ``device``, the device the probe runs on (NCCL for cuda, gloo for cpu):
        NCCL cannot reduce the CPU tensors of a ``--device cpu`` probe on a machine that has GPUs."""
        import torch.distributed as dist

        from trainer.process_group import backend_for, init_process_group

        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            if backend_for(device) == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            init_process_group(device)
        return Dist()

    def mine(self, idx: np.ndarray) -> np.ndarray:
        """This rank's contiguous slice of a global batch (sizes differ by at most one)."""
        return np.array_split(idx, self.world)[self.rank] if self.world > 1 else idx

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            moved = t.to(self.device)
            dist.all_reduce(moved)
            t.copy_(moved.to(t.device))
        return t

    def gather_rows(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate every rank's rows (dim 1 of (H, m, C)) in rank order; ``sizes`` per rank."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        pad = max(sizes)
        buf = torch.zeros(t.shape[0], pad, *t.shape[2:], dtype=t.dtype, device=self.device)
        buf[:, : t.shape[1]] = t.to(self.device)
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(parts, buf)
        return torch.cat([p[:, :s].cpu() for p, s in zip(parts, sizes, strict=True)], dim=1)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


# ----------------------------------------------------------------------------- feature sources


class TensorSource:
    """Features already in memory: {layer: (N, P, D)}; rounded to fp16 like the other sources."""

    def __init__(self, feats: dict[int, torch.Tensor]) -> None:
        self.feats = feats
        first = next(iter(feats.values()))
        self.n, self.tokens, self.dim = (int(x) for x in first.shape)

    def features(self, idx: np.ndarray, epoch: int) -> dict[int, torch.Tensor]:
        t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        return {layer: f[t].to(torch.float16).float() for layer, f in self.feats.items()}


class TokenSource:
    """Runs the frozen backbone on a batch of token sequences read from a token file (stream mode).

    tokens (N, T) int32, or for a patch model packed (N, T, 1 + P*P*3) (`PackedRows`), and frame_index
    (N, T) int16 (np.memmap or arrays); ``rows`` maps sample i to its row (a subset of the file).
    Returns {layer: (b, P, D) float32 on the model's device}."""

    def __init__(self, model: nn.Module, tokens: np.ndarray, frame_index: np.ndarray, layers: list[int], *,
                 rows: np.ndarray | None = None, pool_tokens: int = 1) -> None:
        self.model, self.tok, self.fi, self.layers, self.pool_tokens = model, tokens, frame_index, list(layers), pool_tokens
        self.rows = np.arange(tokens.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
        self.n = int(self.rows.shape[0])
        p = visual_count(torch.from_numpy(np.asarray(frame_index[:1], dtype=np.int64)))
        if pool_tokens < 1 or p % pool_tokens:
            raise ValueError(f"pool_tokens={pool_tokens} must be >= 1 and divide the {p} visual tokens per sample")
        self.tokens, self.dim = p // pool_tokens, int(model.cfg.dim)

    def features(self, idx: np.ndarray, epoch: int) -> dict[int, torch.Tensor]:
        rows = self.rows[np.asarray(idx, dtype=np.int64)]
        order = np.argsort(rows, kind="stable")  # read the file in ascending rows, return in idx order
        tok = np.empty((len(rows), *self.tok.shape[1:]), dtype=np.int64 if self.tok.ndim == 2 else np.int32)
        fi = np.empty((len(rows), self.tok.shape[1]), dtype=np.int64)
        tok[order] = self.tok[rows[order]]
        fi[order] = self.fi[rows[order]]
        feats = backbone_features(self.model, torch.from_numpy(tok), torch.from_numpy(fi), self.layers,
                                  pool_tokens=self.pool_tokens)
        return {layer: f.to(torch.float16).float() for layer, f in feats.items()}


class CacheSource:
    """Features of every layer in fp16 `.npy` files (N, P, D) under ``cache_dir`` (cache mode)."""

    def __init__(self, cache_dir: str, layers: list[int], rows: np.ndarray | None = None) -> None:
        self.arrays = {layer: np.load(os.path.join(cache_dir, f"layer-{layer}.npy"), mmap_mode="r") for layer in layers}
        first = self.arrays[layers[0]]
        self.rows = np.arange(first.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
        self.n, self.tokens, self.dim = int(self.rows.shape[0]), int(first.shape[1]), int(first.shape[2])

    def features(self, idx: np.ndarray, epoch: int) -> dict[int, torch.Tensor]:
        rows = self.rows[np.asarray(idx, dtype=np.int64)]
        return {layer: torch.from_numpy(np.ascontiguousarray(a[rows])).float() for layer, a in self.arrays.items()}


def cache_bytes(n: int, tokens: int, dim: int, layers: int) -> int:
    """Disk a feature cache takes: fp16 (n, tokens, dim) per layer."""
    return 2 * n * tokens * dim * layers


def build_token_file(clips, out_dir: str, *, max_seq_len: int, what: str, key: dict | None = None) -> dict:
    """Write the token sequences of an `iter_clips` stream to OUT/tokens.i32 and frames.i16 (raw, row-major),
    and the patches of a pixel dataset's clips to OUT/pixels.u8, and return {"n", "seq_len", "labels",
    "video_ids", "patch_values"}: one pass, memory bounded by one clip.

    A finished file carries index.json; an unfinished one (a killed run) is rebuilt."""
    os.makedirs(out_dir, exist_ok=True)
    index_path = os.path.join(out_dir, "index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            return json.load(f)
    labels, videos, seq_len, values = [], [], None, 0
    with (open(os.path.join(out_dir, "tokens.i32"), "wb") as ft, open(os.path.join(out_dir, "frames.i16"), "wb") as ff,
          contextlib.ExitStack() as stack):
        fp = None  # pixels.u8, opened at a pixel dataset's first clip
        for c in clips:
            if c["label"] is None:
                continue
            t = np.asarray(c["tokens"], dtype=np.int32)
            if len(t) > max_seq_len:
                raise ValueError(f"{what}: a clip is {len(t)} tokens, more than the model's context of {max_seq_len}; "
                                 "pass fewer --frames")
            if seq_len is None:
                seq_len = len(t)
            elif len(t) != seq_len:
                raise ValueError(f"{what}: sequences of {seq_len} and {len(t)} tokens; use clips of one length")
            ft.write(t.tobytes())
            ff.write(np.asarray(c["frame_index"], dtype=np.int16).tobytes())
            if "pixels" in c:
                px = np.asarray(c["pixels"], dtype=np.uint8)  # (T, P*P*3)
                values = int(px.shape[1])
                if fp is None:
                    fp = stack.enter_context(open(os.path.join(out_dir, "pixels.u8"), "wb"))
                fp.write(px.tobytes())
            labels.append(c["label"])
            videos.append(c["video_id"])
    info = {"n": len(labels), "seq_len": seq_len or 0, "labels": labels, "video_ids": videos, "key": key,
            "patch_values": values}
    from pipeline.storage import atomic_write_bytes

    atomic_write_bytes(index_path, json.dumps(info).encode())
    return info


def open_token_file(out_dir: str, info: dict) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (N, T) int32 memmap, or `PackedRows` of a pixel dataset's file; frame_index (N, T) int16 memmap)."""
    shape = (int(info["n"]), int(info["seq_len"]))
    tok = np.memmap(os.path.join(out_dir, "tokens.i32"), dtype=np.int32, mode="r", shape=shape)
    fi = np.memmap(os.path.join(out_dir, "frames.i16"), dtype=np.int16, mode="r", shape=shape)
    values = int(info.get("patch_values", 0))
    if values:
        from trainer.patches import PackedRows

        px = np.memmap(os.path.join(out_dir, "pixels.u8"), dtype=np.uint8, mode="r", shape=(*shape, values))
        tok = PackedRows(tok, px)
    return tok, fi


def build_feature_cache(source: TokenSource, cache_dir: str, *, batch_size: int, dist: Dist | None = None,
                        log: Callable[[str], None] | None = None) -> None:
    """One backbone pass over ``source`` into fp16 memmaps layer-L.npy (N, P, D); ranks split the
    batches and write disjoint rows of the same files (OUT on a filesystem every rank sees)."""
    dist = dist or Dist()
    done = os.path.join(cache_dir, "done")
    if os.path.exists(done):
        return
    os.makedirs(cache_dir, exist_ok=True)
    paths = {layer: os.path.join(cache_dir, f"layer-{layer}.npy") for layer in source.layers}
    shape = (source.n, source.tokens, source.dim)
    if dist.rank == 0:
        for p in paths.values():
            np.lib.format.open_memmap(p, mode="w+", dtype=np.float16, shape=shape).flush()
    dist.barrier()
    arrays = {layer: np.load(p, mmap_mode="r+") for layer, p in paths.items()}
    starts = list(range(0, source.n, batch_size))
    for k, s in enumerate(starts):
        if k % dist.world != dist.rank:
            continue
        idx = np.arange(s, min(source.n, s + batch_size))
        for layer, f in source.features(idx, -1).items():
            arrays[layer][s : s + len(idx)] = f.cpu().numpy().astype(np.float16)
    for a in arrays.values():
        a.flush()
    dist.barrier()
    if dist.rank == 0:
        with open(done, "w") as f:
            f.write(json.dumps({"shape": list(shape)}))
        if log is not None:
            log(f"feature cache: {len(paths)} layers x {shape} fp16 in {cache_dir}")
    dist.barrier()


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class HeadSpec:
    layer: int
    pooling: str


def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of epoch ``epoch``: the epoch-th randperm of a generator seeded once (the
    order the in-memory probes always used), replayed so a resumed run needs no saved RNG state."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epoch):
        torch.randperm(n, generator=gen)
    return torch.randperm(n, generator=gen).numpy()


def _steps_per_epoch(n: int, batch_size: int) -> int:
    # BatchNorm in training mode needs two samples: a last batch of one is dropped.
    return max(1, n // batch_size if n % batch_size == 1 else math.ceil(n / batch_size))


def _fingerprint(specs, cfg: ProbeConfig, n_train: int, n_val: int, classes: list[str], world: int,
                 extra: dict | None) -> dict:
    return {"version": STATE_VERSION, "specs": [[s.layer, s.pooling] for s in specs], "cfg": asdict(cfg),
            "n_train": n_train, "n_val": n_val, "classes": list(classes), "world": world, "data": extra}


def _save_state(path: str, state: dict) -> None:
    from pipeline.storage import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def train_heads(
    train: TensorSource | TokenSource | CacheSource,
    train_labels: torch.Tensor,
    val: TensorSource | TokenSource | CacheSource,
    val_labels: torch.Tensor,
    specs: list[HeadSpec],
    classes: list[str],
    cfg: ProbeConfig,
    *,
    val_groups: list[str] | None = None,
    eval_batch_size: int | None = None,
    state_path: str | None = None,
    checkpoint_every: int = 0,
    state_key: dict | None = None,
    restart_other: bool = False,
    on_step: Callable[[int], None] | None = None,
    dist: Dist | None = None,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = None,
) -> list[tuple[ProbeResult, nn.Module]]:
    """Train one head per spec on ``train`` and score each on ``val``; one result per spec.

    labels (N,) int64 class ids; ``val_groups`` (one name per val sample) averages class
    probabilities per group (clips of one video) and scores each group once, in sorted order.
    ``state_key`` (what the training data is: dataset, split, clip layout) joins the heads, config,
    sizes and world size in the fingerprint a saved state must match to be resumed; a state that
    does not match is refused, or with ``restart_other`` ignored and overwritten.
    ``on_step(step)`` runs after every optimizer step (a test stops a run there).
    The heads, their BatchNorm statistics and the optimizer live on ``device`` (the backbone's, so
    streamed features stay where they were computed); every batch of features and labels is moved
    there, whichever device its source yields it on (a cache's are on the CPU)."""
    dist = dist or Dist()
    device = torch.device(device)
    n = train.n
    if n < 2:
        raise ValueError(f"a probe needs at least 2 training samples, got {n}")
    if train_labels.shape != (n,) or val_labels.shape != (val.n,):
        raise ValueError(f"labels {tuple(train_labels.shape)}/{tuple(val_labels.shape)} for {n}/{val.n} samples")
    if train.dim != val.dim or train.tokens != val.tokens and any(s.pooling == "linear" for s in specs):
        raise ValueError(f"train features (P={train.tokens}, D={train.dim}) and val (P={val.tokens}, D={val.dim}) "
                         "differ; extract both with the same model, clip length and --pool-tokens")
    heads = []
    for s in specs:
        torch.manual_seed(cfg.seed)  # every head starts as it would trained alone
        # Built on the CPU (the same initial weights on any device), then moved.
        heads.append(build_head(s.pooling, train.dim, train.tokens, len(classes), cfg.num_heads).to(device))
    params = [p for h in heads for p in h.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = _steps_per_epoch(n, cfg.batch_size)
    total, warmup = steps * cfg.epochs, int(round(cfg.warmup_epochs * steps))
    min_batch = max(2, dist.world)  # BatchNorm needs 2 samples, and every rank at least one
    fp = _fingerprint(specs, cfg, n, val.n, classes, dist.world, state_key)
    epoch, batch, step = 0, 0, 0
    losses: list[list[float]] = [[] for _ in heads]
    acc, seen = torch.zeros(len(heads), dtype=torch.float64, device=device), 0  # summed loss per head
    st = None
    if state_path and os.path.exists(state_path):
        st = torch.load(state_path, map_location="cpu", weights_only=True)
    if st is not None and st["fingerprint"] != fp:
        if not restart_other:
            raise ValueError(f"{state_path} is the state of another probe run (heads, config, data or world size "
                             "differ); delete it or pass another --out to start afresh")
        if log is not None:
            log(f"{state_path} is the state of another probe run (heads, config, data or world size differ): "
                "starting afresh; it is overwritten")
        st = None
    if st is not None:
        for h, sd in zip(heads, st["heads"], strict=True):
            h.load_state_dict(sd)
        opt.load_state_dict(st["optimizer"])
        epoch, batch, step, losses, seen = st["epoch"], st["batch"], st["step"], st["losses"], st["seen"]
        acc = st["acc"].to(device)
        if log is not None:
            log(f"resuming probes at epoch {epoch}, batch {batch} (step {step}) from {state_path}")

    def save() -> None:
        if state_path and dist.rank == 0:
            _save_state(state_path, {"fingerprint": fp, "heads": [h.state_dict() for h in heads],
                                     "optimizer": opt.state_dict(), "epoch": epoch, "batch": batch, "step": step,
                                     "losses": losses, "acc": acc, "seen": seen})

    ys = train_labels.long().to(device)
    while epoch < cfg.epochs:
        order = _epoch_order(n, cfg.seed, epoch)
        for h in heads:
            h.train()
        while batch < steps:
            idx = order[batch * cfg.batch_size : (batch + 1) * cfg.batch_size]
            batch += 1
            if len(idx) < min_batch:
                continue
            lr = _lr_at(step, total, warmup, cfg.lr)
            for g in opt.param_groups:
                g["lr"] = lr
            mine = dist.mine(idx)
            feats = {layer: f.to(device, non_blocking=True) for layer, f in train.features(mine, epoch).items()}
            y = ys[torch.from_numpy(mine).to(device)]
            # Summed over this rank's slice, divided by the global batch: the all-reduced sum is the mean.
            per_head = [F.cross_entropy(h(feats[s.layer]), y, reduction="sum") / len(idx)
                        for h, s in zip(heads, specs, strict=True)]
            opt.zero_grad(set_to_none=False)
            torch.stack(per_head).sum().backward()
            loss_vec = torch.stack([x.detach() for x in per_head]).double()
            if dist.world > 1:
                # Parameters the loss does not reach (the attention probe's key bias, which the softmax
                # cancels) have no gradient on any rank and stay untouched, as in one process.
                graded = [p for p in params if p.grad is not None]
                flat = torch.cat([p.grad.reshape(-1).double() for p in graded] + [loss_vec])
                dist.all_reduce_(flat)
                off = 0
                for p in graded:
                    p.grad.copy_(flat[off : off + p.numel()].view_as(p.grad))
                    off += p.numel()
                loss_vec = flat[off:]
            opt.step()
            step += 1
            acc += loss_vec * len(idx)
            seen += len(idx)
            if checkpoint_every and step % checkpoint_every == 0:
                save()
            if on_step is not None:
                on_step(step)
        for i in range(len(heads)):
            losses[i].append(float(acc[i] / max(1, seen)))
        acc, seen = torch.zeros(len(heads), dtype=torch.float64, device=device), 0
        epoch, batch = epoch + 1, 0
        if log is not None:
            log(f"probe epoch {epoch}/{cfg.epochs}: mean loss over heads {np.mean([v[-1] for v in losses]):.4f}")
    save()
    scored = _evaluate(heads, specs, val, val_labels.long(), val_groups, eval_batch_size or max(cfg.batch_size, 256),
                       dist)
    return [(ProbeResult(top1=t1, top5=t5, train_loss=loss, num_train=n, num_eval=len(c), correct=c), h)
            for (t1, t5, c), loss, h in zip(scored, losses, heads, strict=True)]


def _evaluate(heads, specs, val, labels: torch.Tensor, groups: list[str] | None, batch_size: int,
              dist: Dist) -> list[tuple[float, float, list[int]]]:
    """Top-1 %, top-5 % and per-scored-sample top-1 right/wrong of every head, batch by batch.

    Without groups every sample is scored (in order); with groups, a group's probabilities are
    summed until its last sample has been seen, then averaged and scored (groups in sorted order).
    Memory: a batch of probabilities plus the open groups (clips of a video are consecutive).
    Features go to the heads' device; probabilities are scored on the CPU."""
    # A head without parameters (a fixed scorer) runs on the CPU.
    device = next(heads[0].parameters(), torch.empty(0)).device
    for h in heads:
        h.eval()
    n, n_heads = val.n, len(heads)
    if groups is not None and len(groups) != n:
        raise ValueError(f"val_groups has {len(groups)} names for {n} samples")
    last = {g: i for i, g in enumerate(groups)} if groups is not None else None
    open_sum: dict[str, torch.Tensor] = {}
    open_count: dict[str, int] = {}
    scored: dict = {}  # key (sample index or group) -> (label, top1 right (H,), top-k hit (H,))
    k = None
    with torch.no_grad():
        for s in range(0, n, batch_size):
            idx = np.arange(s, min(n, s + batch_size))
            sizes = [len(x) for x in np.array_split(idx, dist.world)]
            mine = dist.mine(idx)
            if len(mine):
                feats = val.features(mine, -1)
                probs = torch.stack([h(feats[sp.layer].to(device)).softmax(dim=-1)
                                     for h, sp in zip(heads, specs, strict=True)])  # (H, m, C)
            else:
                probs = torch.zeros(n_heads, 0, len(heads[0].classifier.bias), device=device)
            probs = dist.gather_rows(probs, sizes).cpu()  # (H, b, C) in sample order
            k = min(5, probs.shape[2])
            for j, i in enumerate(idx.tolist()):
                if groups is None:
                    scored[i] = _score(probs[:, j], int(labels[i]), k)
                    continue
                g = groups[i]
                open_sum[g] = open_sum[g] + probs[:, j] if g in open_sum else probs[:, j].clone()
                open_count[g] = open_count.get(g, 0) + 1
                if last[g] == i:  # the group's label is its last sample's (they agree for clips of a video)
                    scored[g] = _score(open_sum.pop(g) / open_count.pop(g), int(labels[i]), k)
    keys = sorted(scored)
    out = []
    for hi in range(n_heads):
        right = [int(scored[key][0][hi]) for key in keys]
        hit = [int(scored[key][1][hi]) for key in keys]
        out.append((100.0 * sum(right) / len(keys), 100.0 * sum(hit) / len(keys), right))
    return out


def _score(probs: torch.Tensor, label: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """probs (H, C) of one scored item -> (top-1 right (H,), label among the top k (H,)), ties as topk breaks them."""
    top = probs.topk(k, dim=1).indices  # (H, k)
    return top[:, 0] == label, (top == label).any(dim=1)
