"""The DALL·E discrete VAE (OpenAI's dVAE) architecture, written for inference speed and training.

Parameter names follow OpenAI's published modules (`blocks.group_1.block_1.res_path.conv_1.w`, ...)
so that converted state dicts load with no renaming. Our own dVAE (`train-tokenizer`) is the same
family at a configurable width.

Architecture (encoder): 7×7 input conv → 4 groups of `n_blk_per_group` residual blocks at widths
1,2,4,8 × n_hid with a 2×2 max-pool after groups 1-3 (downsampling 8) → ReLU → 1×1 conv to
`vocab_size` logits. Each block is `id_path(x) + post_gain * res_path(x)` with post_gain =
1 / n_layers² and res_path = ReLU-conv3×3 ×3 then ReLU-conv1×1 (hidden width n_out / 4).
The decoder mirrors it with nearest-neighbour upsampling and emits 2×3 channels: the location
and log-scale of a logit-Laplace distribution over pixels squeezed into [ε, 1-ε] (ε = 0.1).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

LOGIT_LAPLACE_EPS = 0.1


@dataclass
class DVAEArch:
    """Shape of a DALL·E-family dVAE. OpenAI's released model: n_hid=256, n_init=128, 2 blocks, 8192 codes."""

    vocab_size: int = 8192
    n_hid: int = 256
    n_blk_per_group: int = 2
    n_init: int = 128
    input_channels: int = 3
    group_count: int = 4

    def __post_init__(self) -> None:
        if not 2 <= self.vocab_size <= 65536:
            raise ValueError(f"DVAEArch.vocab_size={self.vocab_size} must be in [2, 65536] (tokens are uint16)")
        if self.n_hid < 4 or self.n_hid % 4:
            raise ValueError(f"DVAEArch.n_hid={self.n_hid} must be a positive multiple of 4 (blocks use n_out/4)")
        if self.n_blk_per_group < 1:
            raise ValueError(f"DVAEArch.n_blk_per_group={self.n_blk_per_group} must be >= 1")
        if self.n_init < 1:
            raise ValueError(f"DVAEArch.n_init={self.n_init} must be >= 1")
        if self.input_channels != 3:
            raise ValueError(f"DVAEArch.input_channels={self.input_channels}: only RGB (3) frames are supported")
        if self.group_count != 4:
            raise ValueError(f"DVAEArch.group_count={self.group_count}: the architecture has 4 groups (downsample 8)")

    @property
    def downsample(self) -> int:
        return 2 ** (self.group_count - 1)

    def to_dict(self) -> dict:
        return asdict(self)


def _seq(mods: dict[str, nn.Module]) -> nn.Sequential:
    return nn.Sequential(OrderedDict(mods))


class Conv(nn.Module):
    """Conv with OpenAI's parameter names `w` (out, in, k, k) and `b` (out,), 'same' padding."""

    def __init__(self, n_in: int, n_out: int, kw: int) -> None:
        super().__init__()
        self.kw = kw
        self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw))
        self.b = nn.Parameter(torch.zeros(n_out))
        nn.init.normal_(self.w, std=1 / math.sqrt(n_in * kw * kw))
        # Inference-only options, set by DVAEEncoder.fold_for_inference:
        self.relu_after = False  # apply the ReLU that follows this conv (fused on CPU)
        self.cpu_prepack = False  # use oneDNN with the weights reordered once, not on every call
        self._packed: tuple[int, torch.Tensor] | None = None  # (weight data_ptr, packed weight)

    def _packed_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        ptr = self.w.data_ptr()
        if self._packed is None or self._packed[0] != ptr:
            p = (self.kw - 1) // 2
            try:
                # oneDNN's own layout for these weights (the op PyTorch's compiler uses when it
                # freezes a CPU model); eager conv2d redoes this reorder on every call.
                packed = torch.ops.mkldnn._reorder_convolution_weight(self.w, [p, p], [1, 1], [1, 1], 1, list(x.shape))
            except (RuntimeError, AttributeError):  # a build without oneDNN: plain conv2d
                self.cpu_prepack = False
                return None
            self._packed = (ptr, packed)
        return self._packed[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = (self.kw - 1) // 2
        # The oneDNN call is fp32 only and bypasses autocast: under CPU autocast (the bf16 precision)
        # the plain conv2d runs, the same op CUDA runs.
        if (self.cpu_prepack and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
                and not torch.is_autocast_enabled("cpu") and x.is_contiguous(memory_format=torch.channels_last)):
            w = self._packed_weight(x)
            if w is not None:
                return torch.ops.mkldnn._convolution_pointwise(
                    x, w, self.b, [p, p], [1, 1], [1, 1], 1, "relu" if self.relu_after else "none", [], "")
        y = F.conv2d(x, self.w, self.b, padding=p)
        return F.relu_(y) if self.relu_after else y


class _Block(nn.Module):
    """Residual block; `kernels` are the res_path conv sizes (encoder 3,3,3,1; decoder 1,3,3,3)."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]) -> None:
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1.0 / n_layers**2
        self.id_path = Conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        self.res_path = nn.ModuleDict(
            {f"conv_{i + 1}": Conv(widths[i], widths[i + 1], kernels[i]) for i in range(4)}
        )
        self.folded = False

    @torch.no_grad()
    def fold_for_inference(self) -> None:
        """Scale the last conv by ``post_gain`` (so the block output is ``id + res``, summed in
        place) and let the block overwrite its input. Inference only: the weights no longer match
        the state dict the block was loaded from, and autograd could not go through the in-place
        ops."""
        if not self.folded:
            last = self.res_path["conv_4"]
            last.w.mul_(self.post_gain)
            last.b.mul_(self.post_gain)
            for name in ("conv_1", "conv_2", "conv_3"):  # each is followed by a ReLU
                self.res_path[name].relu_after = True
            self.folded = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        convs = self.res_path
        if self.folded:
            # At 128 px a block's activations are tens of MB: every buffer not allocated is a
            # round of page faults saved. A conv id_path reads x first, so x may then be ReLU'd in
            # place; an identity id_path needs x intact.
            idn = self.id_path(x)
            h = convs["conv_1"](F.relu(x) if idn is x else F.relu_(x))  # conv_1..3 apply their ReLU
            h = convs["conv_3"](convs["conv_2"](h))
            return convs["conv_4"](h).add_(idn)
        # Only the first ReLU must keep x intact (id_path reads it); later ones run in place.
        h = convs["conv_1"](F.relu(x))
        h = convs["conv_2"](F.relu_(h))
        h = convs["conv_3"](F.relu_(h))
        h = convs["conv_4"](F.relu_(h))
        # One fused multiply-add instead of a scale pass and an add pass.
        return torch.add(self.id_path(x), h, alpha=self.post_gain)


class DVAEEncoder(nn.Module):
    """Pixels mapped to [ε, 1-ε] (N, 3, H, W) float → code logits (N, vocab, H/8, W/8)."""

    def __init__(self, arch: DVAEArch) -> None:
        super().__init__()
        self.arch = arch
        n, nb = arch.n_hid, arch.n_blk_per_group
        n_layers = arch.group_count * nb
        widths = [1 * n, 1 * n, 2 * n, 4 * n, 8 * n]
        blocks: dict[str, nn.Module] = {"input": Conv(arch.input_channels, n, 7)}
        for g in range(1, 5):
            grp: dict[str, nn.Module] = {}
            for i in range(nb):
                n_in = widths[g - 1] if i == 0 else widths[g]
                grp[f"block_{i + 1}"] = _Block(n_in, widths[g], n_layers, (3, 3, 3, 1))
            if g < 4:
                grp["pool"] = nn.MaxPool2d(kernel_size=2)
            blocks[f"group_{g}"] = _seq(grp)
        blocks["output"] = _seq({"relu": nn.ReLU(), "conv": Conv(8 * n, arch.vocab_size, 1)})
        self.blocks = _seq(blocks)

    def fold_for_inference(self) -> None:
        """Inference-only rewrite (see ``_Block.fold_for_inference``): ReLUs fused into the convs
        before them, the final one in place, and on CPU the conv weights reordered for oneDNN once."""
        for m in self.modules():
            if isinstance(m, _Block):
                m.fold_for_inference()
            if isinstance(m, Conv):
                m.cpu_prepack = True
        self.blocks.output.relu.inplace = True

    @property
    def logits_conv(self) -> Conv:
        """The last layer: 1×1 conv from the features to the code logits."""
        return self.blocks.output.conv

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Everything but the logit layer: ReLU'd features (N, 8·n_hid, H/8, W/8)."""
        for name, mod in self.blocks.named_children():
            if name != "output":
                x = mod(x)
        return F.relu(x) if torch.is_grad_enabled() else F.relu_(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class DVAEDecoder(nn.Module):
    """Codes → logit-Laplace parameters (N, 6, H, W): channels 0-2 location μ, 3-5 log-scale ln b.

    `forward` takes a (soft) one-hot (N, vocab, h, w) as in training; `from_codes` takes integer codes
    (N, h, w) and replaces the 1×1 input conv over a one-hot by a column gather (same result).
    """

    def __init__(self, arch: DVAEArch) -> None:
        super().__init__()
        self.arch = arch
        n, nb = arch.n_hid, arch.n_blk_per_group
        n_layers = arch.group_count * nb
        widths = [arch.n_init, 8 * n, 4 * n, 2 * n, 1 * n]
        blocks: dict[str, nn.Module] = {"input": Conv(arch.vocab_size, arch.n_init, 1)}
        for g in range(1, 5):
            grp: dict[str, nn.Module] = {}
            for i in range(nb):
                n_in = widths[g - 1] if i == 0 else widths[g]
                grp[f"block_{i + 1}"] = _Block(n_in, widths[g], n_layers, (1, 3, 3, 3))
            if g < 4:
                grp["upsample"] = nn.Upsample(scale_factor=2, mode="nearest")
            blocks[f"group_{g}"] = _seq(grp)
        blocks["output"] = _seq({"relu": nn.ReLU(), "conv": Conv(n, 2 * arch.input_channels, 1)})
        self.blocks = _seq(blocks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)

    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        inp = self.blocks.input
        emb = inp.w[:, :, 0, 0]  # (n_init, vocab)
        h = F.embedding(codes.long(), emb.t()) + inp.b  # (N, h, w, n_init)
        h = h.permute(0, 3, 1, 2)  # (N, n_init, h, w), channels-last strides
        for name, mod in self.blocks.named_children():
            if name != "input":
                h = mod(h)
        return h


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] → [ε, 1-ε] (the logit-Laplace support)."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    """[ε, 1-ε] → [0, 1], clamped."""
    return torch.clamp((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


def decoder_mean(stats: torch.Tensor) -> torch.Tensor:
    """Decoder output (N, 6, H, W) → reconstructed pixels in [0, 1] (N, 3, H, W): unmap(sigmoid(μ))."""
    return unmap_pixels(torch.sigmoid(stats[:, :3].float()))


def logit_laplace_nll(stats: torch.Tensor, x_mapped: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of mapped pixels x ∈ [ε, 1-ε] (N, 3, H, W) under the logit-Laplace
    distribution with location μ = stats[:, :3] and log-scale ln b = stats[:, 3:6]:
    p(x) = exp(-|logit(x) - μ| / b) / (2 b x (1 - x))."""
    mu, log_b = stats[:, :3], stats[:, 3:6].clamp(min=-7.0)
    y = torch.logit(x_mapped)
    nll = (y - mu).abs() * torch.exp(-log_b) + log_b + math.log(2.0) + torch.log(x_mapped * (1 - x_mapped))
    return nll.mean()
