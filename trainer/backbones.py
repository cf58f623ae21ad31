"""GPT-2 and Mamba backbones behind the LLaMA model's interface (trainer.model.CausalLM).

Selected by `ModelConfig.arch` (the paper's Table 6 compares them at ~280M parameters). Both
expose what the trainer, probes, generation and export use: `model(tokens)` -> logits (B, T, V),
`features(tokens, layers)`, `new_cache(...)` for incremental decoding, the same parameter names
for the embedding (`tok_embeddings`) and head (`output`, padded to a multiple of 64 rows), the
blocks as `layers`, and μP (hidden matrices' lr and init scaled by width, readout multiplier).

- GPT-2 (LayerNorm, GELU-tanh MLP, learned absolute positions, biases, untied head) is written
  here like the LLaMA model: fused SDPA attention sharing the LLaMA KV cache, the μP 1/hd
  attention scale, and an exact rename to transformers' `GPT2LMHeadModel` (trainer/export.py),
  against which its logits are tested.
- Mamba uses transformers' `MambaBlock` as it is (norm, in_proj, causal depthwise conv,
  selective scan, out_proj) rather than a selective scan written here: on CUDA with `mamba-ssm`
  / `causal-conv1d` installed transformers runs their kernels; on CPU the scan is `mambapy`'s
  parallel scan when installed (a pure-PyTorch Blelloch scan), else transformers' sequential loop.
  The state cache is transformers' `DynamicCache`; export is a rename to `MambaForCausalLM`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.model import CausalLM, KVCache, ModelConfig, attention_scale, causal_attention

__all__ = ["GPT2", "Mamba", "MambaState", "BACKBONES", "mamba_hf_config", "count_params", "flops_per_token",
           "resize_positions"]


# --------------------------------------------------------------------------------------------- GPT-2
class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.hd = cfg.n_heads, cfg.head_dim
        self.c_attn = nn.Linear(cfg.dim, 3 * cfg.dim)  # rows: q, k, v
        self.c_proj = nn.Linear(cfg.dim, cfg.dim)
        self.scale = attention_scale(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_heads, self.hd).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        out = causal_attention(q, k, v, self.scale, cache, layer)
        return self.c_proj(out.transpose(1, 2).reshape(B, T, D))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.c_fc = nn.Linear(cfg.dim, cfg.ffn_dim)
        self.c_proj = nn.Linear(cfg.ffn_dim, cfg.dim)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        # GPT-2's "gelu_new" is the tanh approximation.
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2(CausalLM):
    """Causal GPT-2 over visual tokens; positions are learned, one row per context position."""

    vector_like = ("pos_embeddings.weight",)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.arch != "gpt2":
            raise ValueError(f"GPT2 built from a config with arch={cfg.arch!r}; use trainer.model.build_model")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.layers = nn.ModuleList([GPT2Block(cfg) for _ in range(cfg.n_layers)])
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.padded_vocab_size, bias=False)  # (V_pad, D)
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        hidden_std = std / math.sqrt(self.cfg.width_mult)  # μP: 1/sqrt(fan_in) scaling of hidden matrices
        out_std = hidden_std / math.sqrt(2 * self.cfg.n_layers)  # GPT-2's depth-scaled residual projections
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        nn.init.normal_(self.pos_embeddings.weight, std=std / 2)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for block in self.layers:
            for lin, s in ((block.attn.c_attn, hidden_std), (block.c_fc, hidden_std), (block.attn.c_proj, out_std),
                           (block.c_proj, out_std)):
                nn.init.normal_(lin.weight, std=s)
                nn.init.zeros_(lin.bias)
        nn.init.normal_(self.output.weight, std=std)
        with torch.no_grad():
            self.output.weight[self.cfg.vocab_size :].zero_()  # padding rows: sliced off, kept at zero

    def num_params(self, include_embedding: bool = True) -> int:
        """As CausalLM.num_params; without embeddings excludes the learned positions too (a lookup)."""
        n = super().num_params(include_embedding)
        return n if include_embedding else n - self.pos_embeddings.weight.numel()

    def _trunk(self, tokens: torch.Tensor, keep: set[int], cache: KVCache | None, stop_after: int | None):
        T = tokens.shape[1]
        start = self._start(T, cache, " (GPT-2 learns one position per slot)")
        pos = torch.arange(start, start + T, device=tokens.device)
        h = self.tok_embeddings(tokens) + self.pos_embeddings(pos)  # (B, T, D)
        h, hidden = self._run_blocks(h, keep, stop_after, cache is not None, lambda block, x, i: block(x, cache, i))
        return h, hidden


def resize_positions(weight: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                     new_len: int) -> torch.Tensor:
    """GPT-2's learned positions for a new frame grid (coarse to fine: 16x16 -> 32x32 tokens).

    weight (T_old, D) follows the training layout [start token, frame 0's h*w tokens, frame 1's, ...].
    The start token's row is kept; each frame's h x w rows are resized bilinearly to the new grid, so a
    token keeps the position of the same place in the picture; the result is cut to new_len rows ->
    (new_len, D). A last frame the table holds only in part (a model reads all but the last token of
    its sequences, so a clip's last frame lacks its last row) is completed with the previous frame's
    rows at the missing places before it is resized.
    """
    (h, w), (h2, w2) = old_grid, new_grid
    T_old, D = weight.shape
    hw = h * w
    whole, part = divmod(T_old - 1, hw)
    frames = whole + (1 if part and whole else 0)  # a partial first frame has no earlier frame to complete it
    need = -(-(new_len - 1) // (h2 * w2))
    if need > frames:
        raise ValueError(
            f"the source positions hold {frames} {h}x{w} frames but {new_len} positions of {h2}x{w2} frames "
            f"need {need}; train the first stage with a longer context or use fewer frames"
        )
    rows = weight[1 : 1 + need * hw]
    if rows.shape[0] < need * hw:  # the partial last frame: its missing rows from the frame before
        rows = torch.cat([rows, weight[1 + (need - 1) * hw - hw + part : 1 + (need - 1) * hw]])
    grid = rows.reshape(need, h, w, D).permute(0, 3, 1, 2)  # (F, D, h, w)
    grid = F.interpolate(grid.float(), size=(h2, w2), mode="bilinear", align_corners=False)
    rows = grid.permute(0, 2, 3, 1).reshape(need * h2 * w2, D).to(weight.dtype)  # (F*h2*w2, D)
    return torch.cat([weight[:1], rows])[:new_len].contiguous()


# --------------------------------------------------------------------------------------------- Mamba
def mamba_hf_config(cfg: ModelConfig, use_mambapy: bool | None = None):
    """transformers' MambaConfig for `cfg` (what Mamba's blocks are built from and export writes)."""
    from transformers import MambaConfig

    if use_mambapy is None:
        from transformers.utils.import_utils import is_mambapy_available

        use_mambapy = is_mambapy_available()
    return MambaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers, state_size=cfg.mamba_d_state,
        expand=cfg.mamba_expand, conv_kernel=cfg.mamba_d_conv, layer_norm_epsilon=cfg.norm_eps,
        initializer_range=cfg.init_std, use_bias=False, use_conv_bias=True, hidden_act="silu",
        residual_in_fp32=True, time_step_rank="auto", tie_word_embeddings=False, use_mambapy=use_mambapy,
    )


class MambaState:
    """Recurrent state for incremental decoding: conv and SSM states per layer (transformers' cache)."""

    def __init__(self, hf_config, max_len: int) -> None:
        from transformers.cache_utils import DynamicCache

        self.hf = DynamicCache(config=hf_config)
        self.pos = 0  # positions already consumed
        self.max_len = max_len


class Mamba(CausalLM):
    """Mamba over visual tokens: transformers' MambaBlocks between our embedding, final norm and head."""

    vector_like = ("A_log", "conv1d.weight")

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.arch != "mamba":
            raise ValueError(f"Mamba built from a config with arch={cfg.arch!r}; use trainer.model.build_model")
        from transformers.models.mamba.modeling_mamba import MambaBlock, MambaRMSNorm

        self.cfg = cfg
        self.hf_config = mamba_hf_config(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList([MambaBlock(self.hf_config, layer_idx=i) for i in range(cfg.n_layers)])
        self.norm = MambaRMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.padded_vocab_size, bias=False)  # (V_pad, D)
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        hidden_std = std / math.sqrt(self.cfg.width_mult)
        out_std = hidden_std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for block in self.layers:
            mixer = block.mixer
            with torch.no_grad():
                mixer.init_mamba_weights()  # the reference's S4D-real A, D = 1, dt bias from [dt_min, dt_max]
            nn.init.normal_(mixer.in_proj.weight, std=hidden_std)
            nn.init.normal_(mixer.x_proj.weight, std=hidden_std)
            nn.init.normal_(mixer.out_proj.weight, std=out_std)
            nn.init.kaiming_uniform_(mixer.conv1d.weight, a=math.sqrt(5))  # the reference's conv init
            nn.init.zeros_(mixer.conv1d.bias)
            nn.init.ones_(block.norm.weight)
        nn.init.ones_(self.norm.weight)
        nn.init.normal_(self.output.weight, std=std)
        with torch.no_grad():
            self.output.weight[self.cfg.vocab_size :].zero_()

    def new_cache(self, batch: int, max_len: int, device, dtype=torch.float32) -> MambaState:
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"state for {max_len} positions exceeds the model's max_seq_len={self.cfg.max_seq_len}")
        return MambaState(self.hf_config, max_len)

    def _trunk(self, tokens: torch.Tensor, keep: set[int], cache: MambaState | None, stop_after: int | None):
        T = tokens.shape[1]
        start = self._start(T, cache)
        if cache is not None and start > 0 and T > 1:
            # transformers' full-sequence scan starts from a zero state: only a prefill may be longer than 1.
            raise ValueError("a Mamba state continues one token at a time after its first call; feed tokens singly")
        h = self.tok_embeddings(tokens)  # (B, T, D)
        hf_cache = cache.hf if cache is not None else None
        # Each block: (B, T, D) -> (B, T, D), its residual kept in fp32 (residual_in_fp32).
        h, hidden = self._run_blocks(h, keep, stop_after, cache is not None,
                                     lambda block, x, i: block(x, cache=hf_cache))
        return h, hidden


BACKBONES = {"gpt2": GPT2, "mamba": Mamba}


# ---------------------------------------------------------------------------------- sizes and FLOPs
def _mamba_sizes(cfg: ModelConfig) -> tuple[int, int]:
    """(inner width E, time-step rank R) as transformers derives them."""
    return cfg.mamba_expand * cfg.dim, math.ceil(cfg.dim / 16)


def count_params(cfg: ModelConfig, include_embedding: bool = True) -> int:
    """Parameters of a gpt2 / mamba model (lm-head padding excluded). Without embeddings: no token
    embedding, and for GPT-2 no learned positions either (both are lookups, not matmuls)."""
    d, V, L = cfg.dim, cfg.vocab_size, cfg.n_layers
    if cfg.arch == "gpt2":
        f = cfg.ffn_dim
        per_layer = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
        n = L * per_layer + 2 * d + V * d  # + final LayerNorm + head
        return n + (V * d + cfg.max_seq_len * d if include_embedding else 0)
    if cfg.arch == "mamba":
        E, R = _mamba_sizes(cfg)
        N, k = cfg.mamba_d_state, cfg.mamba_d_conv
        per_layer = d + d * 2 * E + (E * k + E) + E * (R + 2 * N) + (R * E + E) + E * N + E + E * d
        n = L * per_layer + d + V * d
        return n + (V * d if include_embedding else 0)
    raise ValueError(f"count_params: arch={cfg.arch!r} is not a backbone of this module (gpt2, mamba)")


def flops_per_token(cfg: ModelConfig, seq_len: int, n_params: int | None = None) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward).

    gpt2: 6·N + 12·L·d·T as for LLaMA; `n_params` is `model.num_params(include_embedding=False)`, which
    leaves out the learned positions as well as the token embedding (both are lookups).
    mamba: 6·N + 27·L·E·S: the selective scan is ~9·E·S FLOPs per token and layer forward
    (discretise exp(ΔA) and ΔB·x, the state update, the C·h readout; Gu & Dao's count), E the inner
    width and S the state size; the depthwise conv is in 6·N with its weights.
    """
    if cfg.arch == "gpt2":
        n = count_params(cfg, False) if n_params is None else n_params
        return 6.0 * n + 12.0 * cfg.n_layers * cfg.dim * seq_len
    if cfg.arch == "mamba":
        n = count_params(cfg, False) if n_params is None else n_params
        E, _ = _mamba_sizes(cfg)
        return 6.0 * n + 27.0 * cfg.n_layers * E * cfg.mamba_d_state
    raise ValueError(f"flops_per_token: arch={cfg.arch!r} is not a backbone of this module (gpt2, mamba)")
