"""LLaMA over visual tokens: one dependency-light file (RMSNorm pre-norm, SwiGLU, RoPE, no biases).

`CausalLM` is the interface every backbone offers (logits, features(layers), new_cache); `ModelConfig.arch`
selects LLaMA (here) or GPT-2 / Mamba (trainer/backbones.py) through `build_model`.

Layout choices that matter beyond this file:
- Rotary embeddings use Hugging Face's half-split layout (rotate the first half of each head
  against the second half), so exporting to `LlamaForCausalLM` is a pure rename of weights.
- Input and output embeddings are untied, as in LLaMA.
- Attention is PyTorch's `scaled_dot_product_attention` (flash / memory-efficient kernels on GPU).
- Optional μP (maximal update parameterisation, Tensor Programs V): hidden matrices get their
  Adam learning rate scaled by base_dim / dim, logits are multiplied by base_dim / dim and
  attention uses 1 / head_dim instead of 1 / sqrt(head_dim). With `mup_base_dim == dim` the
  model is identical to standard parameterisation, so one learning rate tuned at the base width
  transfers to wider models (the paper's width sweep).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["ModelConfig", "PRESETS", "SWEEP_SIZES", "MUP_BASE_DIM", "VOCAB_MULTIPLE", "ARCHS", "CausalLM", "Transformer", "KVCache", "build_model",
           "param_groups", "flops_per_token", "count_params"]

VOCAB_MULTIPLE = 64
# Backbones behind one interface (CausalLM): llama here, gpt2 and mamba in trainer/backbones.py.
ARCHS = ("llama", "gpt2", "mamba")


@dataclass
class ModelConfig:
    """Architecture of the causal transformer. Validated on construction."""

    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    vocab_size: int = 8196  # 8192 dVAE codes + bos_video, bos_image, eos, pad (trainer.data)
    max_seq_len: int = 4096
    mlp_hidden: int | None = None  # SwiGLU hidden width; None -> 4 * dim (the paper's base/large)
    n_kv_heads: int | None = None  # grouped-query attention; None -> n_heads (the paper: MHA)
    rope_theta: float = 10000.0  # 50 000 for the 256 px stage
    norm_eps: float = 1e-5
    init_std: float = 0.02
    mup_base_dim: int | None = None  # set to enable μP relative to this width
    # Backbone (the paper's Table 6). gpt2: LayerNorm, GELU MLP of ffn_dim, learned absolute positions,
    # biases; mamba: transformers' Mamba blocks (no attention: n_heads is unused) with these sizes.
    arch: str = "llama"
    mamba_d_state: int = 16  # SSM state size N per channel
    mamba_expand: int = 2  # inner width = expand * dim
    mamba_d_conv: int = 4  # causal depthwise conv kernel
    # Tokenizer ablation (Table 3, trainer/patches.py): input=patches reads each position's P x P pixel
    # patch through a linear embedding (bos/specials: learned vectors); target=pixels predicts the next
    # patch's per-patch-normalised pixels with an MSE loss, target=tokens its dVAE code (cross-entropy).
    input: str = "tokens"
    target: str = "tokens"
    patch_size: int = 8  # P: must equal the token grid's downsampling (the dVAE's 8)
    extra: dict = field(default_factory=dict)  # free-form notes carried into checkpoints

    def __post_init__(self) -> None:
        def bad(name: str, fix: str) -> ValueError:
            return ValueError(f"ModelConfig.{name}={getattr(self, name)!r} is invalid: {fix}")

        for name in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len", "mamba_d_state", "mamba_expand",
                     "mamba_d_conv"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(name, "use a positive integer")
        if self.arch not in ARCHS:
            raise bad("arch", f"choose one of {ARCHS} (model.arch=gpt2)")
        if self.dim % self.n_heads:
            raise bad("n_heads", f"dim={self.dim} must be divisible by n_heads; pick a divisor of dim")
        if self.arch != "llama" and self.n_kv_heads is not None:
            raise bad("n_kv_heads", f"grouped-query attention is a llama option; use None with arch={self.arch}")
        if self.arch == "llama" and (self.dim // self.n_heads) % 2:
            raise bad("n_heads", f"head_dim={self.dim // self.n_heads} must be even for rotary embeddings")
        # None stays None (so overriding dim or n_heads re-derives them); read ffn_dim / kv_heads.
        if self.mlp_hidden is not None and (not isinstance(self.mlp_hidden, int) or self.mlp_hidden <= 0):
            raise bad("mlp_hidden", "use a positive integer or None for 4 * dim")
        kv = self.n_kv_heads
        if kv is not None and (not isinstance(kv, int) or kv <= 0 or self.n_heads % kv):
            raise bad("n_kv_heads", f"use a positive divisor of n_heads={self.n_heads} (or None)")
        if not (self.rope_theta > 0):
            raise bad("rope_theta", "use a positive base, e.g. 10000 (50000 for the 256 px stage)")
        if not (0 < self.norm_eps < 1):
            raise bad("norm_eps", "use a small positive number such as 1e-5")
        if not (self.init_std > 0):
            raise bad("init_std", "use a positive standard deviation such as 0.02")
        if self.mup_base_dim is not None and (not isinstance(self.mup_base_dim, int) or self.mup_base_dim <= 0):
            raise bad("mup_base_dim", "use a positive width (e.g. 256) or None to disable μP")
        if self.input not in ("tokens", "patches"):
            raise bad("input", "choose tokens (dVAE codes) or patches (pixel patches: model.input=patches)")
        if self.target not in ("tokens", "pixels"):
            raise bad("target", "choose tokens (the next dVAE code) or pixels (the next patch, MSE)")
        if self.target == "pixels" and self.input != "patches":
            raise bad("target", "pixel targets are the patch -> patch arm: also set model.input=patches")
        if not isinstance(self.patch_size, int) or isinstance(self.patch_size, bool) or self.patch_size < 1:
            raise bad("patch_size", "use the patch side in pixels, e.g. 8 (the dVAE's token grid)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """SwiGLU hidden width: mlp_hidden, or 4 * dim when unset (the paper's base and large)."""
        return self.mlp_hidden if self.mlp_hidden is not None else 4 * self.dim

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the lm-head matrix: vocab_size rounded up to a multiple of VOCAB_MULTIPLE, so the
        head GEMM's N dimension tiles evenly on tensor cores (8196 -> 8256). The padding rows' logits
        are sliced off in forward: never predicted, never in a loss, never exported."""
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def width_mult(self) -> float:
        """dim / base_dim under μP; 1.0 otherwise."""
        return 1.0 if self.mup_base_dim is None else self.dim / self.mup_base_dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    # For unit tests: a few hundred thousand parameters.
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=516, max_seq_len=1024, mlp_hidden=256),
    # The CPU demo: ~1.9M parameters, ~21 MFLOP/token at 1024 tokens: ~5 minutes for 120 steps of
    # 8k tokens on 2 cores.
    "demo": ModelConfig(dim=160, n_layers=5, n_heads=5, vocab_size=516, max_seq_len=1024, mlp_hidden=512),
    # The paper's models (Table 9): SwiGLU hidden 4d for base and large; 5504 for 1b.
    "base": ModelConfig(dim=768, n_layers=12, n_heads=12),
    "large": ModelConfig(dim=1024, n_layers=16, n_heads=16),
    "1b": ModelConfig(dim=2048, n_layers=22, n_heads=16, mlp_hidden=5504),
    # The architecture ablation (Table 6) at the paper's ~280M (large: 285M parameters): GPT-2 at large's
    # width with 21 blocks (285M), Mamba at large's width with 40 blocks (283M); tiny ones for tests.
    "large-gpt2": ModelConfig(arch="gpt2", dim=1024, n_layers=21, n_heads=16),
    "large-mamba": ModelConfig(arch="mamba", dim=1024, n_layers=40, n_heads=16),
    "tiny-gpt2": ModelConfig(arch="gpt2", dim=64, n_layers=2, n_heads=4, vocab_size=516, max_seq_len=1024,
                             mlp_hidden=256),
    "tiny-mamba": ModelConfig(arch="mamba", dim=64, n_layers=2, n_heads=4, vocab_size=516, max_seq_len=1024),
    # The CPU demo's size (1.8M non-embedding parameters) as the other backbones: 6 GPT-2 blocks (1.7M), 10 Mamba (1.9M).
    "demo-gpt2": ModelConfig(arch="gpt2", dim=160, n_layers=6, n_heads=5, vocab_size=516, max_seq_len=1024,
                             mlp_hidden=512),
    "demo-mamba": ModelConfig(arch="mamba", dim=160, n_layers=10, n_heads=5, vocab_size=516, max_seq_len=1024),
}
# The tokenizer ablation (Table 3, trainer/patches.py) at the paper's large size and the tiny/demo ones:
# `-patch` is patch -> patch (8x8 pixel patches in, the next patch's normalised pixels out, MSE),
# `-patch-dvae` is patch -> dVAE (patches in, the next patch's dVAE code out, cross-entropy).
for _size in ("tiny", "demo", "large"):
    PRESETS[f"{_size}-patch"] = dataclasses.replace(PRESETS[_size], input="patches", target="pixels", patch_size=8)
    PRESETS[f"{_size}-patch-dvae"] = dataclasses.replace(PRESETS[_size], input="patches", target="tokens", patch_size=8)
# The width/depth sweep (Figures 9 and 11): heads fixed at 8, width and depth growing together, μP
# relative to one base width (a1's 256), so one learning rate serves every size.
SWEEP_SIZES = {"a1": (256, 4), "a2": (384, 6), "a3": (512, 8), "a4": (640, 10), "a5": (768, 12), "a6": (1024, 16)}
MUP_BASE_DIM = 256
for _name, (_dim, _layers) in SWEEP_SIZES.items():
    PRESETS[_name] = ModelConfig(dim=_dim, n_layers=_layers, n_heads=8, mup_base_dim=MUP_BASE_DIM)


def flops_per_token(cfg: ModelConfig, seq_len: int, n_params: int | None = None) -> float:
    """Training FLOPs per token: 6·N (forward + backward matmuls) + 12·L·d·T (attention scores).

    N counts the non-embedding parameters plus the output head (the input embedding is a lookup):
    `n_params` is `model.num_params(include_embedding=False)` for every backbone (None: from the config).
    Other backbones: trainer.backbones.flops_per_token (GPT-2 adds nothing for its learned positions,
    Mamba replaces the attention term by its selective scan's).
    """
    if cfg.arch != "llama":
        from trainer.backbones import flops_per_token as other

        return other(cfg, seq_len, n_params)
    if n_params is None:
        n_params = count_params(cfg, include_embedding=False)
    return 6.0 * n_params + 12.0 * cfg.n_layers * cfg.dim * seq_len


def count_params(cfg: ModelConfig, include_embedding: bool = True) -> int:
    """Parameters of the model `cfg` describes (lm-head padding excluded); without the input embedding
    when include_embedding is False."""
    if cfg.input != "tokens" or cfg.target != "tokens":
        from trainer.patches import count_params as patch_params

        return patch_params(cfg, include_embedding)
    if cfg.arch != "llama":
        from trainer.backbones import count_params as other

        return other(cfg, include_embedding)
    d, h, kv = cfg.dim, cfg.head_dim, cfg.kv_heads
    attn = d * d * 2 + 2 * d * kv * h  # wq, wo, wk, wv
    mlp = 3 * d * cfg.ffn_dim
    per_layer = attn + mlp + 2 * d
    n = cfg.n_layers * per_layer + d + cfg.vocab_size * d  # + final norm + output head
    if include_embedding:
        n += cfg.vocab_size * d
    return n


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, exactly like Hugging Face's LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_cache(head_dim: int, max_seq_len: int, theta: float,
               position_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_seq_len, head_dim) in the half-split layout.

    position_scale < 1 is position interpolation (trainer.evals.context): position t is rotated as t·scale."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    t = torch.arange(max_seq_len, dtype=torch.int64).float()
    if position_scale != 1.0:
        t = t * position_scale
    freqs = torch.outer(t, inv_freq)  # (T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, hd); cos/sin: (T, hd)
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


class KVCache:
    """Pre-allocated keys/values for incremental decoding; one (B, kvH, max_len, hd) pair per layer."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype=torch.float32) -> None:
        if max_len > cfg.max_seq_len:
            raise ValueError(f"KVCache max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
        shape = (batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.pos = 0  # number of positions already filled
        self.max_len = max_len


def attention_scale(cfg: ModelConfig) -> float:
    """Softmax scale of the attention scores: 1/sqrt(hd), or under μP sqrt(base_hd)/hd.

    μP: 1/hd keeps attention logits O(1) as width grows; it equals 1/sqrt(hd) at the base width.
    """
    if cfg.mup_base_dim is None:
        return 1.0 / math.sqrt(cfg.head_dim)
    base_hd = cfg.mup_base_dim // cfg.n_heads if cfg.mup_base_dim % cfg.n_heads == 0 else cfg.head_dim
    return math.sqrt(base_hd) / cfg.head_dim


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        # q, k and v in one matmul (rows: q heads, then k heads, then v heads): one larger GEMM
        # instead of three; export splits it into q_proj/k_proj/v_proj.
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.scale = attention_scale(cfg)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.wqkv(x)  # (B, T, (H + 2 kvH) * hd)
        q, k, v = qkv.split([self.n_heads * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        q = q.view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, kvH, T, hd)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = causal_attention(q, k, v, self.scale, cache, layer)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)  # (B, T, D)
        return self.wo(out)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
    """Causal scaled-dot-product attention, q (B, H, T, hd), k/v (B, kvH, T, hd) -> (B, H, T, hd).

    With a cache, k/v are written at positions cache.pos.. of `layer` and the queries attend to every
    cached position up to their own (the caller advances cache.pos once all layers ran).
    """
    B, H, T, _ = q.shape
    past = 0
    if cache is not None:
        past = cache.pos
        cache.k[layer][:B, :, past : past + T] = k
        cache.v[layer][:B, :, past : past + T] = v
        k = cache.k[layer][:B, :, : past + T]
        v = cache.v[layer][:B, :, : past + T]
    if k.shape[1] != H:
        rep = H // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    # Queries at positions past..past+T-1 see keys 0..their own position.
    qpos = torch.arange(past, past + T, device=q.device)[:, None]
    kpos = torch.arange(past + T, device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=kpos <= qpos, scale=scale)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(gate x) * up x), gate and up computed by one matmul (w13 = [gate; up])."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.hidden = cfg.ffn_dim
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)  # rows: gate, then up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.hidden, dim=-1)  # (B, T, F) each
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x))


class CausalLM(nn.Module, abc.ABC):
    """What every backbone offers the trainer, probes, generation and export.

    A subclass sets `cfg`, `tok_embeddings` (V, D), `layers` (the blocks: FSDP shards each), `norm`,
    `output` (V_pad, D) and `activation_checkpointing`, and implements `_trunk` and `new_cache`.
    """

    cfg: ModelConfig

    @property
    def output_mult(self) -> float:
        """μP readout multiplier (1 / width_mult); 1.0 in standard parameterisation."""
        return 1.0 / self.cfg.width_mult

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameters of the model as configured (count_params): the lm-head's padding rows are not counted."""
        n = sum(p.numel() for p in self.parameters())  # global sizes under FSDP2 (DTensor.numel)
        n -= (self.cfg.padded_vocab_size - self.cfg.vocab_size) * self.cfg.dim
        return n if include_embedding else n - self.tok_embeddings.weight.numel()

    def new_cache(self, batch: int, max_len: int, device, dtype=torch.float32):
        """Incremental-decoding state for up to `max_len` positions: a KV cache (attention
        backbones); a recurrent backbone overrides it."""
        return KVCache(self.cfg, batch, max_len, device, dtype)

    @abc.abstractmethod
    def _trunk(self, tokens: torch.Tensor, keep: set[int], cache, stop_after: int | None):
        """(B, T) tokens -> final residual stream (B, T, D) and {block: (B, T, D)} for blocks in `keep`.

        Reads `cache.pos` (via `_start`) but does not advance it: `forward` does, once."""

    def _start(self, T: int, cache, why: str = "") -> int:
        """The position the T new tokens start at (the cache's, else 0), checked against the cache's
        max_len or, without a cache, max_seq_len."""
        start = cache.pos if cache is not None else 0
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"{start + T} positions exceed the cache's max_len={cache.max_len}; "
                             "make the cache with new_cache(batch, max_len) for the whole sequence")
        if start + T > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}{why}; "
                "raise ModelConfig.max_seq_len or shorten the input"
            )
        return start

    def _run_blocks(self, h: torch.Tensor, keep: set[int], stop_after: int | None, cached: bool, step):
        """h (B, T, D) through the blocks as `step(block, h, i)`; returns the last stream and the kept ones.

        Training without a cache recomputes each block in backward when activation_checkpointing is on.
        """
        hidden: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.layers):
            if self.activation_checkpointing and self.training and not cached:
                h = checkpoint(step, block, h, i, use_reentrant=False)
            else:
                h = step(block, h, i)
            if i + 1 in keep:
                hidden[i + 1] = h
            if stop_after is not None and i + 1 >= stop_after:
                break
        return h, hidden

    def _check_layers(self, layers) -> list[int]:
        layers = [int(i) for i in layers]
        for i in layers:
            if not 1 <= i <= self.cfg.n_layers:
                raise ValueError(f"layer {i} is out of range: blocks are numbered 1..{self.cfg.n_layers}")
        return layers

    def forward(
        self,
        tokens: torch.Tensor,
        return_hidden: list[int] | None = None,
        cache=None,
    ):
        """tokens (B, T) int64 -> logits (B, T, V) [, list of (B, T, D) after the given 1-based blocks]."""
        layers = self._check_layers(return_hidden or [])
        h, hidden = self._trunk(tokens, set(layers), cache, None)
        if cache is not None:
            cache.pos += tokens.shape[1]
        # (B, T, V_pad) -> (B, T, V): the padding columns are dropped before anything sees them.
        logits = self.output(self.norm(h))[..., : self.cfg.vocab_size]
        if self.cfg.mup_base_dim is not None:
            logits = logits * self.output_mult
        if return_hidden is None:
            return logits
        return logits, [hidden[i] for i in layers]

    def features(self, tokens: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """Residual stream after each requested block (1-based), (B, T, D) each; skips the head."""
        layers = self._check_layers(layers)
        if not layers:
            raise ValueError("features(layers=[]) asks for nothing; pass block numbers such as [6]")
        _, hidden = self._trunk(tokens, set(layers), None, max(layers))
        return [hidden[i] for i in layers]


class Transformer(CausalLM):
    """Causal LLaMA. `model(tokens)` -> logits; `return_hidden=[i, ...]` adds residual streams."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.padded_vocab_size, bias=False)  # (V_pad, D)
        cos, sin = rope_cache(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Not saved in checkpoints: rebuilt from the config (and in fp32 regardless of the model dtype).
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        # μP: hidden matrices' init scales as 1/sqrt(fan_in), i.e. std / sqrt(width_mult).
        hidden_std = std / math.sqrt(self.cfg.width_mult)
        # Residual projections are scaled down with depth (GPT-2) so the stream's variance stays O(1).
        out_std = hidden_std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for block in self.layers:
            for lin in (block.attention.wqkv, block.feed_forward.w13):
                nn.init.normal_(lin.weight, std=hidden_std)
            nn.init.normal_(block.attention.wo.weight, std=out_std)
            nn.init.normal_(block.feed_forward.w2.weight, std=out_std)
            nn.init.ones_(block.attention_norm.weight)
            nn.init.ones_(block.ffn_norm.weight)
        nn.init.ones_(self.norm.weight)
        nn.init.normal_(self.output.weight, std=std)
        with torch.no_grad():
            self.output.weight[self.cfg.vocab_size :].zero_()  # padding rows: sliced off, kept at zero
        cos, sin = rope_cache(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def _trunk(self, tokens: torch.Tensor, keep: set[int], cache: KVCache | None, stop_after: int | None):
        T = tokens.shape[1]
        start = self._start(T, cache)
        cos = self.rope_cos[start : start + T]  # (T, hd)
        sin = self.rope_sin[start : start + T]
        h = self.tok_embeddings(tokens)  # (B, T, D)
        h, hidden = self._run_blocks(h, keep, stop_after, cache is not None,
                                     lambda block, x, i: block(x, cos, sin, cache, i))
        return h, hidden


def build_model(cfg: ModelConfig) -> CausalLM:
    """The backbone `cfg.arch` names, freshly initialised (with patch input / pixel head: trainer/patches.py)."""
    if cfg.input != "tokens" or cfg.target != "tokens":
        from trainer.patches import build_patch_model

        return build_patch_model(cfg)
    if cfg.arch == "llama":
        return Transformer(cfg)
    from trainer.backbones import BACKBONES

    return BACKBONES[cfg.arch](cfg)


def no_weight_decay(model: nn.Module, name: str, p: torch.Tensor) -> bool:
    """Pre-training's rule for a parameter of `model` (named as model.named_parameters() names it,
    or with a prefix): no weight decay on vectors (norm weights, biases), the input embedding, and
    matrices whose fan-in does not grow with width (the backbone's `vector_like`: GPT-2's
    positions, Mamba's A_log and depthwise conv), as in their reference code; μP treats those as
    vector-like too."""
    vector_like = tuple(getattr(model, "vector_like", ()))
    return name.endswith("tok_embeddings.weight") or p.ndim < 2 or bool(vector_like and name.endswith(vector_like))


def param_groups(model: CausalLM, lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: decay only on hidden/output matrices; μP scales hidden matrices' lr.

    Norm weights and the input embedding get no weight decay (LLaMA practice). Each group
    carries `lr_scale` so a scheduler can set lr = base_lr(step) * lr_scale.
    """
    hidden, vectors, output = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if no_weight_decay(model, name, p):
            vectors.append(p)
        elif name.endswith("output.weight"):
            output.append(p)
        else:
            hidden.append(p)
    hidden_scale = 1.0 / model.cfg.width_mult  # Adam μP: matrix-like params' lr ∝ 1/width
    groups = [
        {"params": hidden, "weight_decay": weight_decay, "lr_scale": hidden_scale, "name": "hidden"},
        {"params": output, "weight_decay": weight_decay, "lr_scale": 1.0, "name": "output"},
        {"params": vectors, "weight_decay": 0.0, "lr_scale": 1.0, "name": "no_decay"},
    ]
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return [g for g in groups if g["params"]]
