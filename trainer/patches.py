"""Patch input and pixel targets for every backbone: the paper's tokenizer ablation (Table 3).

Two arms beside the dVAE-token model, selected by `ModelConfig.input` / `ModelConfig.target`:

- patch -> patch (input=patches, target=pixels): each position reads its P x P pixel patch through a
  linear patch embedding (P*P*3 -> dim) and predicts the NEXT patch's pixels, normalised per patch
  (mean 0, std 1 over its P*P*3 values, as MAE's norm_pix_loss and AIM do), with an MSE loss;
- patch -> dVAE (input=patches, target=tokens): the same input, the next patch's dVAE code as a
  cross-entropy target (the token model's head and loss).

One input tensor keeps the CausalLM interface (`model(x)`, `features(x, layers)`, caches, DDP /
FSDP / compile) unchanged: a patch model reads `x` packed as int32 (B, T, 1 + P*P*3), channel 0
the position's token id (only used to tell special positions, e.g. bos, which get a learned
vector) and channels 1.. the patch's uint8 pixels in (row, column, RGB) order (pack_inputs). A
pixel target is packed the same way (pack_pixel_targets), with channel 0 = IGNORE_INDEX where the
next position is no patch. The token model's modules keep their names: the patch embedding is
`tok_embeddings` (its lookup part, the special vectors, is the only embedding excluded from
6N FLOPs) and the pixel head is `output`, so checkpoints, param groups and μP apply as they are.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from pipeline.mix.sequence import IGNORE_INDEX, SPECIAL_NAMES
from trainer.backbones import GPT2, Mamba
from trainer.model import ModelConfig, Transformer

__all__ = ["PatchEmbedding", "build_patch_model", "count_params", "pack_inputs", "pack_pixel_targets", "target_ids",
           "pixel_losses", "normalise_patches", "patch_dim", "NORM_EPS", "PackedRows", "check_input_dataset",
           "image_inputs"]

N_SPECIAL = len(SPECIAL_NAMES)  # bos_video, bos_image, eos, pad: the top N_SPECIAL ids of the vocabulary
NORM_EPS = 1e-6  # MAE's per-patch normalisation: (x - mean) / sqrt(var + eps), pixels in [0, 1]


def patch_dim(cfg: ModelConfig) -> int:
    """Values per patch: P * P * 3."""
    return 3 * cfg.patch_size * cfg.patch_size


# ------------------------------------------------------------------------------------------ packing
def pack_inputs(tokens: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """tokens (B, T) int, pixels (B, T, P*P*3) uint8 -> int32 (B, T, 1 + P*P*3), the patch model's input."""
    out = np.empty((*tokens.shape, 1 + pixels.shape[-1]), dtype=np.int32)
    out[..., 0] = tokens
    out[..., 1:] = pixels
    return out


def image_inputs(frames: np.ndarray, patch: int, bos: int) -> np.ndarray:
    """frames (B, R, R, 3) uint8 -> the patch model's packed single-image sequences (B, 1 + hw, 1 + P*P*3):
    bos, then each frame's patches in raster order (what `trainer.data.iter_clips` gives for images)."""
    from pipeline.tokenizers.patch import patchify

    px = patchify(np.asarray(frames), patch).reshape(len(frames), -1, 3 * patch * patch)  # (B, hw, P*P*3)
    tok = np.zeros(px.shape[:2], dtype=np.int64)
    return pack_inputs(np.concatenate([np.full((len(px), 1), bos), tok], axis=1),
                       np.concatenate([np.zeros_like(px[:, :1]), px], axis=1))


class PackedRows:
    """Token ids (N, T) and their patches (N, T, P*P*3) uint8 (e.g. memmaps of a probe's token file) seen as
    the packed int32 (N, T, 1 + P*P*3) a patch model reads, packed only for the rows read: 4x less disk and
    page cache than storing packed int32. ``rows[idx]`` packs those rows; ``rows[:, cols]`` (a tuple key)
    is a narrower view, as numpy slicing of both arrays."""

    ndim = 3
    dtype = np.dtype(np.int32)

    def __init__(self, tokens: np.ndarray, pixels: np.ndarray) -> None:
        if tokens.shape != pixels.shape[:2]:
            raise ValueError(f"tokens {tokens.shape} and pixels {pixels.shape} do not hold the same positions")
        self.tokens, self.pixels = tokens, pixels

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.tokens.shape, 1 + self.pixels.shape[2])

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return PackedRows(self.tokens[key], self.pixels[key])
        return pack_inputs(np.asarray(self.tokens[key]), np.asarray(self.pixels[key]))


def check_input_dataset(cfg: ModelConfig, manifest: dict, url: str) -> None:
    """Refuse a dataset the model cannot read, naming the one to pass: a patch-input model reads the
    pixel dataset of its patch size (`--tokenizer patch:P`), a token model a dataset of codes."""
    tok = manifest.get("tokenizer") or {}
    vpt = int(tok.get("values_per_token", 1))
    if cfg.input == "patches":
        p = cfg.patch_size
        if vpt != patch_dim(cfg):
            what = "dVAE codes" if vpt == 1 else f"{vpt} values per position ({tok.get('id')})"
            raise ValueError(f"{url} holds {what}, but this model reads {p}x{p} pixel patches (model.input=patches): "
                             f"pass the pixel dataset made by `toto-pipeline tokenize --tokenizer patch:{p}` on the "
                             "same input")
    elif vpt != 1:
        raise ValueError(f"{url} is a pixel dataset ({tok.get('id')}: {vpt} values per position) but this model reads "
                         "dVAE codes: pass the token dataset made with the model's tokenizer")


def pack_pixel_targets(targets: np.ndarray, pixels: np.ndarray, first_special: int) -> np.ndarray:
    """Next-patch targets: targets (B, T) token ids, pixels (B, T, P*P*3) of the next position ->
    int32 (B, T, 1 + P*P*3), channel 0 = IGNORE_INDEX where the target is no patch (a special token or
    padding), else 0."""
    out = pack_inputs(targets, pixels)
    no_patch = (targets < 0) | (targets >= first_special)
    out[..., 0] = np.where(no_patch, IGNORE_INDEX, 0)
    return out


def target_ids(y: torch.Tensor) -> torch.Tensor:
    """(B, T) ids whose IGNORE_INDEX entries mark positions without a target: y itself for token
    targets, channel 0 of a packed pixel target."""
    return y[..., 0] if y.ndim == 3 else y


def normalise_patches(pixels: torch.Tensor) -> torch.Tensor:
    """(..., P*P*3) pixel values 0..255 -> float32, each patch at mean 0 and std 1 (MAE / AIM)."""
    x = pixels.float() / 255.0
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True)  # unbiased, as MAE's norm_pix_loss
    return (x - mean) / (var + NORM_EPS).sqrt()


def pixel_losses(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """pred (B, T, P*P*3), y packed (B, T, 1 + P*P*3) -> per-position MSE (B, T) float32, 0 where no target."""
    if y.ndim != 3 or pred.shape[:2] != y.shape[:2] or pred.shape[-1] != y.shape[-1] - 1:
        raise ValueError(f"pixel targets {tuple(y.shape)} do not fit predictions {tuple(pred.shape)}: pack them with "
                         "trainer.patches.pack_pixel_targets (B, T, 1 + P*P*3)")
    err = (pred.float() - normalise_patches(y[..., 1:])).pow(2).mean(dim=-1)  # (B, T)
    return err * (y[..., 0] != IGNORE_INDEX)


# -------------------------------------------------------------------------------------------- model
class PatchEmbedding(nn.Module):
    """Packed (B, T, 1 + P*P*3) -> (B, T, D): Linear(P*P*3 -> D) of the pixels scaled to [-1, 1];
    a learned vector per special token (bos_video, bos_image, eos, pad) at special positions."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pd = patch_dim(cfg)
        self.first_special = cfg.vocab_size - N_SPECIAL
        self.proj = nn.Linear(self.pd, cfg.dim)
        self.special = nn.Embedding(N_SPECIAL, cfg.dim)

    @property
    def weight(self) -> torch.Tensor:
        # The backbones' reset_parameters initialise `tok_embeddings.weight`: here the projection's.
        return self.proj.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != 1 + self.pd:
            raise ValueError(
                f"a patch-input model reads packed patches (B, T, {1 + self.pd}), got {tuple(x.shape)}: build the "
                "input with trainer.patches.pack_inputs(tokens, pixels) (the pixel loader, trainer.data.pixels, does)")
        tok = x[..., 0].long()  # (B, T)
        px = x[..., 1:].to(self.proj.weight.dtype) * (2.0 / 255.0) - 1.0  # (B, T, P*P*3) in [-1, 1]
        h = self.proj(px)  # (B, T, D)
        is_special = tok >= self.first_special
        sp = self.special((tok - self.first_special).clamp(0, N_SPECIAL - 1)).to(h.dtype)  # (B, T, D)
        return torch.where(is_special[..., None], sp, h)


class PatchIO:
    """Mixed in before a backbone class: swaps its token embedding and/or head for the patch ones."""

    cfg: ModelConfig

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)  # the backbone, built and initialised with its token modules
        if cfg.input == "patches":
            self.tok_embeddings = PatchEmbedding(cfg)
        if cfg.target == "pixels":
            self.output = nn.Linear(cfg.dim, patch_dim(cfg))  # (P*P*3, D): no vocabulary, no padding rows
        self._reset_patch_io()

    @property
    def vector_like(self) -> tuple[str, ...]:
        # μP: the patch projection's fan-in (P*P*3) does not grow with width: an input layer, like the
        # token embedding it replaces (no weight decay, no 1/width learning-rate scaling).
        return (*getattr(super(), "vector_like", ()), "tok_embeddings.proj.weight")

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self._reset_patch_io()

    def _reset_patch_io(self) -> None:
        """Initialise the patch modules (a no-op while the backbone's __init__ still holds its token ones)."""
        std = self.cfg.init_std
        if isinstance(self.tok_embeddings, PatchEmbedding):
            nn.init.normal_(self.tok_embeddings.proj.weight, std=std)
            nn.init.zeros_(self.tok_embeddings.proj.bias)
            nn.init.normal_(self.tok_embeddings.special.weight, std=std)
        if self.cfg.target == "pixels" and self.output.bias is not None:
            nn.init.normal_(self.output.weight, std=std)
            nn.init.zeros_(self.output.bias)

    def num_params(self, include_embedding: bool = True) -> int:
        """All parameters (token heads' padding rows not counted); without embeddings only the lookups
        are left out (token or special-vector tables, GPT-2's positions): the patch embedding is a matmul."""
        n = sum(p.numel() for p in self.parameters())
        if self.cfg.target == "tokens":
            n -= (self.cfg.padded_vocab_size - self.cfg.vocab_size) * self.cfg.dim
        if include_embedding:
            return n
        emb = self.tok_embeddings
        n -= emb.special.weight.numel() if isinstance(emb, PatchEmbedding) else emb.weight.numel()
        pos = getattr(self, "pos_embeddings", None)
        return n - (pos.weight.numel() if pos is not None else 0)

    def forward(self, tokens: torch.Tensor, return_hidden: list[int] | None = None, cache=None):
        """As CausalLM.forward; with target=pixels the head gives (B, T, P*P*3) normalised next patches."""
        if self.cfg.target != "pixels":
            return super().forward(tokens, return_hidden, cache)
        layers = self._check_layers(return_hidden or [])
        h, hidden = self._trunk(tokens, set(layers), cache, None)
        if cache is not None:
            cache.pos += tokens.shape[1]
        pred = self.output(self.norm(h))  # (B, T, P*P*3)
        if self.cfg.mup_base_dim is not None:
            pred = pred * self.output_mult
        return pred if return_hidden is None else (pred, [hidden[i] for i in layers])


class PatchTransformer(PatchIO, Transformer):
    """LLaMA with patch input / pixel head."""


class PatchGPT2(PatchIO, GPT2):
    """GPT-2 with patch input / pixel head."""


class PatchMamba(PatchIO, Mamba):
    """Mamba with patch input / pixel head."""


_CLASSES = {"llama": PatchTransformer, "gpt2": PatchGPT2, "mamba": PatchMamba}


def build_patch_model(cfg: ModelConfig):
    """The backbone `cfg.arch` names with the input/target `cfg` asks for (trainer.model.build_model calls it)."""
    if cfg.vocab_size <= N_SPECIAL:
        raise ValueError(f"ModelConfig.vocab_size={cfg.vocab_size} leaves no codes below the {N_SPECIAL} special tokens")
    return _CLASSES[cfg.arch](cfg)


def count_params(cfg: ModelConfig, include_embedding: bool = True) -> int:
    """trainer.model.count_params for patch input / pixel targets: the token model's count with the
    token embedding replaced by the patch projection (+ special vectors, a lookup) and the vocabulary
    head by the P*P*3 pixel head."""
    from trainer.model import count_params as token_params

    n = token_params(dataclasses.replace(cfg, input="tokens", target="tokens"), include_embedding)
    d, v, pd = cfg.dim, cfg.vocab_size, patch_dim(cfg)
    if cfg.input == "patches":
        n += pd * d + d  # the projection is a matmul: counted with or without embeddings
        if include_embedding:
            n += N_SPECIAL * d - v * d
    if cfg.target == "pixels":
        n += d * pd + pd - v * d
    return n


# ----------------------------------------------------------------------------------------- generation
class PatchSampler:
    """A patch -> dVAE model as `trainer.generate.sample_tokens` drives it: codes in, code logits out.

    The model reads pixels, but sampling yields codes, so each sampled code is turned into the pixels
    the model reads next with the tokenizer's decoder: the frame being generated is kept as a code
    grid (started from the previous frame's codes), the new code is written at its position, the grid
    decoded and the patch at that position cut out. The prompt is read as its real pixels. A decoded
    patch depends on its neighbours' codes (the decoder is convolutional), so the later codes of the
    frame are the previous frame's until they are generated; that is the closest the model's input
    can come to the pixels it was trained on without a pixel-space sampler.
    """

    def __init__(self, model, tokenizer, frames: np.ndarray, codes: np.ndarray) -> None:
        cfg = model.cfg
        if cfg.target == "pixels":
            raise ValueError("a patch -> patch model regresses the next patch's per-patch-normalised pixels (MSE): "
                             "it has no distribution to sample and the normalisation drops each patch's mean and "
                             "contrast, so it cannot continue a video; generate with the patch -> dVAE arm instead")
        if not hasattr(tokenizer, "decode"):
            raise ValueError(f"tokenizer {tokenizer.id} has no decoder: a patch-input model reads pixels, so every "
                             "generated code must be decoded to its patch before the model can read it; pass a "
                             "tokenizer with a decoder (--tokenizer)")
        p = cfg.patch_size
        if int(tokenizer.downsample) != p:
            raise ValueError(f"tokenizer {tokenizer.id} downsamples by {tokenizer.downsample} but the model reads "
                             f"{p}x{p} patches; pass the tokenizer the training data was made with")
        from pipeline.tokenizers.patch import patchify

        self.model, self.tokenizer, self.cfg, self.p = model, tokenizer, cfg, p
        self._patchify = patchify
        n, gh, gw = codes.shape
        self.hw = gh * gw
        # The prompt: bos, then every frame's patches in raster order (1, 1 + n*hw, P*P*3).
        body = patchify(np.asarray(frames), p).reshape(1, n * self.hw, -1)
        self.prompt = np.concatenate([np.zeros_like(body[:, :1]), body], axis=1)
        self.canvas = np.asarray(codes[-1:], dtype=np.int64).copy()  # (1, gh, gw) codes of the frame in progress
        self.made = 0  # codes generated so far

    def parameters(self):
        return self.model.parameters()

    def new_cache(self, *a, **kw):
        return self.model.new_cache(*a, **kw)

    def __call__(self, tokens: torch.Tensor, cache=None) -> torch.Tensor:
        b, t = tokens.shape
        if self.made == 0 and t == self.prompt.shape[1]:
            px = np.repeat(self.prompt, b, axis=0)  # (B, T0, P*P*3)
        elif t == 1:
            if b != 1:
                raise ValueError("PatchSampler decodes one sequence at a time; sample with batch 1")
            k = self.made % self.hw
            self.canvas.reshape(-1)[k] = int(tokens[0, 0])
            frame = np.asarray(self.tokenizer.decode(self.canvas))  # (1, H, W, 3)
            px = self._patchify(frame, self.p).reshape(1, self.hw, -1)[:, k : k + 1]  # (1, 1, P*P*3)
            self.made += 1
        else:
            raise ValueError(f"PatchSampler got {t} tokens after the prompt; it continues one code at a time")
        x = torch.from_numpy(pack_inputs(tokens.cpu().numpy(), px)).to(tokens.device)
        return self.model(x, cache=cache)
