"""Probe heads trained on frozen features: attention pooling, average pooling, linear on concatenation.

Heads train on frozen features of shape (N, T, D); `trainer.evals.stream_probe` is the engine that
trains many of them at once from one backbone pass per batch (`train_probe` runs it on in-memory
features).

Heads
- ``attention``: as in the paper and AIM (El-Nouby et al. 2024). Non-affine BatchNorm over the
  tokens, one learnable query, key/value projections, multi-head attention of the query over
  the layer's tokens, then a linear classifier.
- ``average``: mean over tokens, non-affine BatchNorm (the usual linear-probe normaliser, MAE),
  linear classifier.
- ``linear``: non-affine BatchNorm over the flattened (T·D) features, linear classifier. Only for
  short token sequences (T·D parameters per class).
- ``cross-attn-mlp``: the paper's Table 16 head (as V-JEPA's attentive probe): non-affine BatchNorm,
  one learnable query cross-attends over the tokens (query/key/value/output projections, residual),
  then a residual MLP block (LayerNorm, D -> 4D -> D, GELU) and a LayerNorm + linear classifier.

Every BatchNorm is a non-affine `GlobalBatchNorm1d`: under torch.distributed it normalises with
statistics of the whole global batch (an all-reduce on the features' device), so a data-parallel
probe trains the same heads as one process.

Training: AdamW, linear warmup then cosine decay to zero, cross-entropy. Evaluation reports top-1
and top-5 (top-k with k capped at the number of classes); when ``groups`` are given (several
clips of one video), class probabilities are averaged per group before scoring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "POOLINGS",
    "ProbeConfig",
    "FeatureSet",
    "ProbeResult",
    "AttentionPoolingHead",
    "AveragePoolingHead",
    "LinearConcatHead",
    "CrossAttentionMLPHead",
    "GlobalBatchNorm1d",
    "build_head",
    "train_probe",
    "evaluate_probe",
    "topk_accuracy",
    "labels_to_ids",
    "torch_threads",
]

POOLINGS = ("attention", "average", "linear", "cross-attn-mlp")


@dataclass
class ProbeConfig:
    """How one probe head is built and trained. Validated on construction."""

    pooling: str = "attention"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    num_heads: int = 4  # attention pooling only; must divide the feature width
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"ProbeConfig.pooling={self.pooling!r} is invalid: use one of {', '.join(POOLINGS)}")
        for name in ("epochs", "batch_size", "num_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"ProbeConfig.{name}={v!r} is invalid: use a positive integer")
        if not (self.lr > 0):
            raise ValueError(f"ProbeConfig.lr={self.lr!r} is invalid: use a positive learning rate such as 1e-3")
        if not (self.weight_decay >= 0):
            raise ValueError(f"ProbeConfig.weight_decay={self.weight_decay!r} is invalid: use a value >= 0")
        if not (0 <= self.warmup_epochs <= self.epochs):
            raise ValueError(
                f"ProbeConfig.warmup_epochs={self.warmup_epochs!r} is invalid: use 0 <= warmup_epochs <= epochs"
            )


@dataclass
class FeatureSet:
    """Frozen features of N samples: ``feats`` (N, T, D), integer ``labels`` (N,), class names.

    ``groups`` (length N, optional) names the video each clip comes from; evaluation averages
    class probabilities over a group and scores each group once.
    """

    feats: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    groups: list[str] | None = None

    def __post_init__(self) -> None:
        if self.feats.ndim != 3:
            raise ValueError(f"FeatureSet.feats has shape {tuple(self.feats.shape)}: expected (N, T, D)")
        if self.labels.ndim != 1 or self.labels.shape[0] != self.feats.shape[0]:
            raise ValueError(
                f"FeatureSet.labels has shape {tuple(self.labels.shape)}: expected ({self.feats.shape[0]},)"
            )
        if self.feats.shape[0] == 0:
            raise ValueError("FeatureSet is empty: the dataset produced no labelled samples")
        if self.labels.numel() and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise ValueError(f"FeatureSet.labels must lie in [0, {len(self.classes)}) (one per class name)")
        if self.groups is not None and len(self.groups) != self.feats.shape[0]:
            raise ValueError(f"FeatureSet.groups has {len(self.groups)} entries for {self.feats.shape[0]} samples")

    def __len__(self) -> int:
        return int(self.feats.shape[0])


@dataclass
class ProbeResult:
    top1: float  # percent
    top5: float  # percent (top-k with k = min(5, classes))
    train_loss: list[float] = field(default_factory=list)  # mean loss per epoch
    num_train: int = 0
    num_eval: int = 0  # samples (or groups) scored
    # Top-1 right (1) or wrong (0) per scored sample (groups in sorted order): pairs two heads'
    # scores on the same validation set (paired tests, trainer.evals.report.paired_accuracy_diff).
    correct: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "top1": self.top1,
            "top5": self.top5,
            "train_loss": self.train_loss,
            "num_train": self.num_train,
            "num_eval": self.num_eval,
            "correct": self.correct,
        }


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics span every data-parallel rank (the probes' heads and
    the fine-tuned head, `trainer.finetune`); x (N, C) -> (N, C).

    Under torch.distributed (gloo or NCCL) the sums of x and x² and the count are all-reduced, so
    each rank normalises its slice with the global batch's mean and variance: exactly BatchNorm
    over the global batch. The all-reduce is the autograd-aware one, so when gradients flow into x
    (fine-tuning) they are those of one process on the global batch too; frozen features (probes)
    have none and it is a plain sum. It runs on x.device: NCCL reduces only CUDA tensors, so the
    module and its input must be on the rank's GPU there. torch's SyncBatchNorm is GPU-only, hence
    this. One process (or eval mode): torch's BatchNorm1d unchanged. Same state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _world() == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xd = x.double()  # sums of squares in fp64: var = E[x²] - E[x]² loses digits in fp32
        stats = torch.cat([xd.sum(0), (xd * xd).sum(0), xd.new_full((1,), float(x.shape[0]))])  # (2C+1,) on x.device
        stats = all_reduce(stats)
        count = stats[-1]
        mean = stats[:c] / count
        var = (stats[c : 2 * c] / count - mean * mean).clamp(min=0)  # biased, as BatchNorm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var.dtype))
        xf = x.float()
        y = (xf - mean.float()) / torch.sqrt(var.float() + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


class AttentionPoolingHead(nn.Module):
    """One learnable query attends over the tokens; (B, T, D) -> logits (B, C)."""

    def __init__(self, dim: int, num_classes: int, num_heads: int = 4) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention probe: num_heads={num_heads} must divide the feature width {dim}")
        self.num_heads = num_heads
        # Non-affine: the probe only re-centres and re-scales features, it learns no shift of its own.
        self.norm = GlobalBatchNorm1d(dim, affine=False)
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Exactly q·k-softmax-v attention of the one query, computed without projecting every token:
        the query's logits are x_t · (W_k,hᵀ q_h) (the key bias adds a constant per head, which the
        softmax cancels) and, as the weights sum to one, Σ_t a_t (W_v x_t + b_v) = W_v (Σ_t a_t x_t) + b_v.
        That is D / heads times fewer multiply-adds than projecting T tokens (same parameters and
        gradients as the plain form, `forward_reference`)."""
        B, T, D = x.shape
        H = self.num_heads
        hd = D // H
        x = self.norm(x.reshape(B * T, D)).reshape(B, T, D)  # BatchNorm statistics over all tokens
        q = self.query.reshape(H, hd)  # (H, hd)
        u = torch.einsum("hk,hkd->hd", q, self.k.weight.reshape(H, hd, D))  # (H, D)
        att = torch.softmax(torch.einsum("btd,hd->bht", x, u) / math.sqrt(hd), dim=-1)  # (B, H, T)
        pooled = torch.einsum("bht,btd->bhd", att, x)  # (B, H, D)
        out = torch.einsum("bhd,hkd->bhk", pooled, self.v.weight.reshape(H, hd, D)) + self.v.bias.reshape(H, hd)
        return self.classifier(out.reshape(B, D))  # (B, C)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The plain form: project every token to keys and values, attend, classify."""
        B, T, D = x.shape
        H = self.num_heads
        x = self.norm(x.reshape(B * T, D)).reshape(B, T, D)
        q = self.query.expand(B, 1, D).reshape(B, 1, H, D // H).transpose(1, 2)  # (B, H, 1, hd)
        k = self.k(x).reshape(B, T, H, D // H).transpose(1, 2)  # (B, H, T, hd)
        v = self.v(x).reshape(B, T, H, D // H).transpose(1, 2)  # (B, H, T, hd)
        pooled = F.scaled_dot_product_attention(q, k, v)  # (B, H, 1, hd)
        return self.classifier(pooled.transpose(1, 2).reshape(B, D))


class AveragePoolingHead(nn.Module):
    """Mean over tokens, non-affine BatchNorm, linear; (B, T, D) -> (B, C)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = GlobalBatchNorm1d(dim, affine=False)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(x.mean(dim=1)))  # (B, D) -> (B, C)


class LinearConcatHead(nn.Module):
    """Linear classifier on the concatenation of all token features; (B, T, D) -> (B, C)."""

    def __init__(self, dim: int, tokens: int, num_classes: int) -> None:
        super().__init__()
        self.tokens = tokens
        self.norm = GlobalBatchNorm1d(dim * tokens, affine=False)
        self.classifier = nn.Linear(dim * tokens, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        if T != self.tokens:
            raise ValueError(f"linear probe was built for {self.tokens} tokens, got {T}")
        return self.classifier(self.norm(x.reshape(B, T * D)))  # (B, T·D) -> (B, C)


class CrossAttentionMLPHead(nn.Module):
    """The paper's Table 16 head: a learnable query cross-attends over the tokens, then an MLP block;
    (B, T, D) -> logits (B, C).

    query (1, 1, D) -> q + Attn(q, BN(x)) -> q + MLP(LN(q)) -> LN -> linear. Unlike the attention
    probe it has an output projection and a 4x MLP, so it can combine what the heads pooled."""

    def __init__(self, dim: int, num_classes: int, num_heads: int = 4, mlp_ratio: int = 4) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"cross-attn-mlp probe: num_heads={num_heads} must divide the feature width {dim}")
        self.num_heads = num_heads
        self.norm = GlobalBatchNorm1d(dim, affine=False)
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.q = nn.Linear(dim, dim)
        # No key bias: the softmax over keys cancels it, so its gradient is rounding noise that
        # AdamW would amplify into steps of size lr (harmless, but not reproducible across ranks).
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.out_norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        H = self.num_heads
        x = self.norm(x.reshape(B * T, D)).reshape(B, T, D)
        query = self.query.expand(B, 1, D)  # (B, 1, D)
        q = self.q(query).reshape(B, 1, H, D // H).transpose(1, 2)  # (B, H, 1, hd)
        k = self.k(x).reshape(B, T, H, D // H).transpose(1, 2)  # (B, H, T, hd)
        v = self.v(x).reshape(B, T, H, D // H).transpose(1, 2)  # (B, H, T, hd)
        pooled = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, D)  # (B, D)
        h = query[:, 0] + self.proj(pooled)  # residual around the cross-attention
        h = h + self.mlp(self.mlp_norm(h))  # residual MLP block
        return self.classifier(self.out_norm(h))  # (B, C)


def build_head(pooling: str, dim: int, tokens: int, num_classes: int, num_heads: int = 4) -> nn.Module:
    if pooling == "cross-attn-mlp":
        head: nn.Module = CrossAttentionMLPHead(dim, num_classes, num_heads)
    elif pooling == "attention":
        head = AttentionPoolingHead(dim, num_classes, num_heads)
    elif pooling == "average":
        head = AveragePoolingHead(dim, num_classes)
    elif pooling == "linear":
        head = LinearConcatHead(dim, tokens, num_classes)
    else:
        raise ValueError(f"unknown pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
    # Small classifier init (MAE's linear-probe practice): start near uniform predictions so the
    # random init does not outweigh what the probe learns in a short schedule.
    nn.init.normal_(head.classifier.weight, std=0.01)
    nn.init.zeros_(head.classifier.bias)
    return head


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def topk_accuracy(probs: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Percent of rows whose label is among the k highest scores. probs (N, C), labels (N,)."""
    k = min(k, probs.shape[1])
    top = probs.topk(k, dim=1).indices  # (N, k)
    return 100.0 * (top == labels[:, None]).any(dim=1).float().mean().item()


def evaluate_probe(head: nn.Module, data: FeatureSet, batch_size: int = 256) -> tuple[float, float, int]:
    """(top-1 %, top-5 %, number scored); clip probabilities averaged per group when groups exist."""
    from trainer.evals.stream_probe import HeadSpec, TensorSource, _evaluate

    [(top1, top5, correct)] = _evaluate([head], [HeadSpec(0, "given")], TensorSource({0: data.feats}), data.labels,
                                        data.groups, batch_size, _one_process())
    return top1, top5, len(correct)


def _one_process():
    from trainer.evals.stream_probe import Dist

    d = Dist()
    d.on, d.rank, d.world = False, 0, 1  # scoring one head here is local even inside a process group
    return d


class torch_threads:
    """Temporarily set torch's intra-op thread count (None: leave it).

    Probe heads are tiny and latency-bound: intra-op threads only add synchronisation. On a
    loaded 2-core machine we measured 1 thread 10-50x faster than 2 for probe training and 17x
    faster for feature extraction of short sequences (threads spin waiting for a busy core)."""

    def __init__(self, n: int | None = 1) -> None:
        self.want = n

    def __enter__(self):
        self.n = torch.get_num_threads()
        if self.want is not None:
            torch.set_num_threads(self.want)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def train_probe(train: FeatureSet, val: FeatureSet, cfg: ProbeConfig) -> tuple[ProbeResult, nn.Module]:
    """Train one head on in-memory features and score it on ``val`` (the probe engine,
    `trainer.evals.stream_probe.train_heads`, with the features given)."""
    from trainer.evals.stream_probe import HeadSpec, TensorSource, train_heads

    if train.feats.shape[2] != val.feats.shape[2]:
        raise ValueError("train and val features have different widths; extract them from the same layer")
    if cfg.pooling == "linear" and train.feats.shape[1:] != val.feats.shape[1:]:
        raise ValueError(
            f"linear probe needs equal token counts: train {tuple(train.feats.shape[1:])} vs "
            f"val {tuple(val.feats.shape[1:])}"
        )
    with torch_threads(1):
        [(res, head)] = train_heads(TensorSource({0: train.feats}), train.labels, TensorSource({0: val.feats}),
                                    val.labels, [HeadSpec(0, cfg.pooling)], train.classes, cfg, val_groups=val.groups,
                                    dist=_one_process())
    return res, head


def labels_to_ids(labels: list[str], classes: list[str] | None = None) -> tuple[torch.Tensor, list[str]]:
    """Map string labels to ids over a sorted class list (or a given one); unknown labels raise."""
    if classes is None:
        classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    missing = sorted(set(labels) - set(index))
    if missing:
        raise ValueError(f"labels {missing[:5]} are not among the training classes; probe on the same label set")
    return torch.tensor(np.array([index[x] for x in labels], dtype=np.int64)), classes
