"""The taming-transformers VQGAN (Esser et al. 2021): encoder, quant_conv, nearest-code quantizer,
post_quant_conv and decoder, with the parameter names of taming's checkpoints.

Released ImageNet models: ch=128, ch_mult=(1,1,2,2,4), 2 res blocks, attention at 16 px, z=256,
embed_dim=256, 1024 or 16384 codes, downsampling 16. Pixels enter in [-1, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VQGANArch:
    n_embed: int = 1024
    embed_dim: int = 256
    z_channels: int = 256
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3

    def __post_init__(self) -> None:
        self.ch_mult = [int(m) for m in self.ch_mult]
        self.attn_resolutions = [int(r) for r in self.attn_resolutions]
        if not 2 <= self.n_embed <= 65536:
            raise ValueError(f"VQGANArch.n_embed={self.n_embed} must be in [2, 65536] (tokens are uint16)")
        if self.ch < 32 or self.ch % 32:
            raise ValueError(f"VQGANArch.ch={self.ch} must be a multiple of 32 (GroupNorm uses 32 groups)")
        if not self.ch_mult:
            raise ValueError("VQGANArch.ch_mult is empty; use e.g. [1, 1, 2, 2, 4]")
        if self.num_res_blocks < 1:
            raise ValueError(f"VQGANArch.num_res_blocks={self.num_res_blocks} must be >= 1")
        if self.in_channels != 3 or self.out_ch != 3:
            raise ValueError(f"VQGANArch in_channels/out_ch={self.in_channels}/{self.out_ch}: only RGB (3) is supported")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        return asdict(self)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1×1 q/k/v/proj convs (taming's names)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = _norm(c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q = self.q(h).flatten(2).transpose(1, 2)  # (B, HW, C)
        k = self.k(h).flatten(2).transpose(1, 2)
        v = self.v(h).flatten(2).transpose(1, 2)
        # Fused attention (flash / memory-efficient kernels on GPU); same math as softmax(qkᵀ/√c)v.
        o = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        o = o.transpose(1, 2).reshape(b, c, hh, ww)
        return x + self.proj_out(o)


class Downsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming pads right/bottom only


class Upsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` and `attn` lists plus an optional resampler (taming's layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()

    def run(self, h: torch.Tensor) -> torch.Tensor:
        for i, blk in enumerate(self.block):
            h = blk(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(c, c)
        self.attn_1 = AttnBlock(c)
        self.block_2 = ResnetBlock(c, c)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class VQGANEncoder(nn.Module):
    """Pixels in [-1, 1] (N, 3, H, W) → z (N, z_channels, H/f, W/f)."""

    def __init__(self, a: VQGANArch) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(a.in_channels, a.ch, 3, padding=1)
        in_mult = [1, *a.ch_mult]
        res = a.resolution
        self.down = nn.ModuleList()
        c = a.ch
        for lvl, mult in enumerate(a.ch_mult):
            level = _Level()
            c_in, c_out = a.ch * in_mult[lvl], a.ch * mult
            for _ in range(a.num_res_blocks):
                level.block.append(ResnetBlock(c_in, c_out))
                c_in = c_out
                if res in a.attn_resolutions:
                    level.attn.append(AttnBlock(c_out))
            if lvl != len(a.ch_mult) - 1:
                level.downsample = Downsample(c_out)
                res //= 2
            self.down.append(level)
            c = c_out
        self.mid = _Mid(c)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, a.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQGANDecoder(nn.Module):
    """Quantized z (N, z_channels, h, w) → pixels in about [-1, 1] (N, 3, h·f, w·f)."""

    def __init__(self, a: VQGANArch) -> None:
        super().__init__()
        c = a.ch * a.ch_mult[-1]
        res = a.resolution // a.downsample
        self.conv_in = nn.Conv2d(a.z_channels, c, 3, padding=1)
        self.mid = _Mid(c)
        levels: list[_Level] = []
        for lvl in reversed(range(len(a.ch_mult))):
            level = _Level()
            c_out = a.ch * a.ch_mult[lvl]
            for _ in range(a.num_res_blocks + 1):
                level.block.append(ResnetBlock(c, c_out))
                c = c_out
                if res in a.attn_resolutions:
                    level.attn.append(AttnBlock(c))
            if lvl != 0:
                level.upsample = Upsample(c)
                res *= 2
            levels.insert(0, level)  # taming indexes up[] by level, lowest resolution last
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, a.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.run(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Quantizer(nn.Module):
    """Nearest codebook entry by Euclidean distance; `embedding.weight` (n_embed, embed_dim)."""

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, D, h, w) → codes (N, h, w): argmax of the logits -‖z - e‖² (‖z‖² is constant per
        position, so argmax(2 z·e - ‖e‖²) gives the same code without forming it)."""
        n, d, h, w = z.shape
        # Distances in fp32 whatever the encoder ran in (autocast would make this addmm bf16 and
        # its argmax a coin toss among near ties); argmax takes the lowest index on ties.
        with torch.autocast(z.device.type, enabled=False):
            zf = z.permute(0, 2, 3, 1).reshape(-1, d).float()  # (NHW, D)
            e = self.embedding.weight.float()  # (K, D)
            logits = torch.addmm((e * e).sum(1).neg(), zf, e.t(), beta=1.0, alpha=2.0)  # (NHW, K)
            return logits.argmax(1).view(n, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, h, w) → z_q (N, D, h, w)."""
        return self.embedding(codes.long()).permute(0, 3, 1, 2)


class VQGAN(nn.Module):
    def __init__(self, a: VQGANArch, with_decoder: bool = True) -> None:
        super().__init__()
        self.arch = a
        self.encoder = VQGANEncoder(a)
        self.quant_conv = nn.Conv2d(a.z_channels, a.embed_dim, 1)
        self.quantize = Quantizer(a.n_embed, a.embed_dim)
        if with_decoder:
            self.post_quant_conv = nn.Conv2d(a.embed_dim, a.z_channels, 1)
            self.decoder = VQGANDecoder(a)

    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize.codes(self.quant_conv(self.encoder(x)))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(self.quantize.lookup(codes)))
