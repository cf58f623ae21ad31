"""VisualTokenizer (frames ⇄ codes), tokenizer folders (config.json + safetensors) and load_tokenizer."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import schemas
from pipeline.tokenizers.argmax import ScreenedArgmax, bf16_matmul_is_fast
from pipeline.tokenizers.dalle import (
    LOGIT_LAPLACE_EPS,
    DVAEArch,
    DVAEDecoder,
    DVAEEncoder,
    decoder_mean,
)
from pipeline.tokenizers.vqgan import VQGAN, VQGANArch

# Screen the CPU argmax in bf16 where the CPU has bf16 dot products (see tokenizers/argmax.py);
# TOTO_BF16_SCREEN=0 turns it off (the plain fp32 logits + argmax).
_BF16_SCREEN = os.environ.get("TOTO_BF16_SCREEN", "1") != "0" and bf16_matmul_is_fast()

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
KINDS = ("dalle", "dvae", "vqgan")
WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
DEMO_CONFIG = os.path.join(WEIGHTS_DIR, "demo.json")


def sha256_path(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class VisualTokenizer:
    """Frames ⇄ discrete codes.

    encode(frames): uint8 (N, H, W, 3) numpy or torch → uint16 numpy (N, H/f, W/f), the argmax of the
    code logits (no softmax), in batches of `batch_size` under inference_mode, channels-last, with
    bf16 (or fp16) autocast on CUDA and fp32 on CPU. decode(codes) → uint8 (N, H, W, 3) where the
    tokenizer has a decoder (`hasattr(tok, "decode")` is False otherwise).
    """

    def __init__(self, config: dict, encoder: nn.Module, decoder: nn.Module | None, sha256: str) -> None:
        self.config = config
        self.kind: str = config["kind"]
        self.name: str = config["name"]
        self.vocab_size: int = int(config["vocab_size"])
        self.downsample: int = int(config["downsample"])
        self.resolution: int = int(config["resolution"])
        self.sha256 = sha256
        self.id = f"{self.kind}:{self.name}:{sha256}"
        self._encoder = encoder.eval().requires_grad_(False)
        if hasattr(encoder, "fold_for_inference"):
            # This module only ever encodes: fold what inference allows (DALL·E-style dVAE).
            encoder.fold_for_inference()
        self._screened: ScreenedArgmax | None = None  # CPU fp32 argmax of the code logits
        self._decoder = decoder.eval().requires_grad_(False) if decoder is not None else None
        self.device = torch.device("cpu")
        self.amp_dtype: torch.dtype | None = None
        self.batch_size = 32
        self._to_channels_last()

    def __repr__(self) -> str:
        return f"VisualTokenizer({self.id}, vocab={self.vocab_size}, /{self.downsample}, device={self.device})"

    # -- placement ---------------------------------------------------------------------------
    def _to_channels_last(self) -> None:
        self._encoder.to(memory_format=torch.channels_last)
        if self._decoder is not None:
            self._decoder.to(memory_format=torch.channels_last)

    def to(self, device: str | torch.device, amp_dtype: torch.dtype | None = None) -> VisualTokenizer:
        """Move to `device`. On CUDA, autocast to `amp_dtype` (default bf16 where supported, else fp16)."""
        device = torch.device(device)
        self._encoder.to(device)
        if self._decoder is not None:
            self._decoder.to(device)
        self._to_channels_last()
        self.device = device
        self._screened = None
        if device.type == "cuda":
            if amp_dtype is None:
                amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            self.amp_dtype = amp_dtype
            self.batch_size = max(self.batch_size, 256)
        else:
            self.amp_dtype = None
        return self

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda" and self.amp_dtype is not None:
            return torch.autocast("cuda", dtype=self.amp_dtype)
        return contextlib.nullcontext()

    # -- encode --------------------------------------------------------------------------------
    def _check_frames(self, frames: Any) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"frames must be a numpy array or torch tensor, got {type(frames).__name__}")
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"frames must be uint8 [N, H, W, 3] RGB, got {x.dtype} {tuple(x.shape)}; decode frames with "
                "pipeline.decode (RGB uint8) first"
            )
        h, w = x.shape[1], x.shape[2]
        if h % self.downsample or w % self.downsample:
            raise ValueError(
                f"frame size {h}x{w} is not a multiple of {self.id}'s downsampling {self.downsample}; "
                "choose a resolution that is"
            )
        return x

    def _batches(self, n: int, batch_size: int | None) -> Iterator[slice]:
        bs = int(batch_size or self.batch_size)
        if bs < 1:
            raise ValueError(f"batch_size={bs} must be >= 1")
        for i in range(0, n, bs):
            yield slice(i, min(n, i + bs))

    def _pixels(self, xb: torch.Tensor) -> torch.Tensor:
        """uint8 (n, H, W, 3) on device → model input (n, 3, H, W) float, channels-last strides."""
        x = xb.permute(0, 3, 1, 2).float()  # permuting NHWC gives NCHW with channels-last strides
        if self.kind == "vqgan":
            return x.mul_(2.0 / 255.0).sub_(1.0)  # taming: [-1, 1]
        # DALL·E: [0, 1] then map_pixels into [ε, 1-ε], fused into one multiply-add.
        return x.mul_((1 - 2 * LOGIT_LAPLACE_EPS) / 255.0).add_(LOGIT_LAPLACE_EPS)

    def _codes(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "vqgan":
            return self._encoder.encode_codes(x)  # type: ignore[operator]
        enc = self._encoder
        if self.device.type == "cpu" and hasattr(enc, "features") and _BF16_SCREEN:
            # fp32 on CPU, but the (V × C) logit layer screened in bf16: the exact argmax anyway.
            if self._screened is None:
                conv = enc.logits_conv
                self._screened = ScreenedArgmax(conv.w.view(conv.w.shape[0], -1), conv.b)
            f = enc.features(x)  # (n, C, h, w), channels-last
            n, c, h, w = f.shape
            return self._screened(f.permute(0, 2, 3, 1).reshape(n * h * w, c)).view(n, h, w)
        return enc(x).argmax(1)  # logits (n, V, h, w) → (n, h, w)

    def encode(self, frames: np.ndarray | torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        x = self._check_frames(frames)
        n, h, w = x.shape[0], x.shape[1] // self.downsample, x.shape[2] // self.downsample
        out = np.empty((n, h, w), dtype=np.uint16)
        with torch.inference_mode(), self._autocast():
            for sl in self._batches(n, batch_size):
                xb = x[sl].to(self.device, non_blocking=True)
                codes = self._codes(self._pixels(xb))  # (n, h, w) int64
                out[sl] = codes.to(torch.int32).cpu().numpy()
        return out

    # -- decode --------------------------------------------------------------------------------
    @property
    def has_decoder(self) -> bool:
        return self._decoder is not None

    def __getattr__(self, name: str) -> Any:
        # `decode` exists only when a decoder does, so hasattr(tok, "decode") answers the question.
        if name == "decode" and self.__dict__.get("_decoder") is not None:
            return self._decode
        if name == "decode":
            raise AttributeError(
                f"tokenizer {self.__dict__.get('id')} has no decoder; convert it with its decoder "
                "(convert-tokenizer --decoder / a taming checkpoint with decoder weights)"
            )
        raise AttributeError(name)

    def _decode(self, codes: np.ndarray | torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """codes (N, h, w) integer → uint8 (N, h·f, w·f, 3)."""
        c = torch.from_numpy(np.asarray(codes).astype(np.int64)) if isinstance(codes, np.ndarray) else codes.long()
        if c.ndim != 3:
            raise ValueError(f"codes must be [N, h, w], got shape {tuple(c.shape)}")
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= self.vocab_size):
            raise ValueError(f"codes must lie in [0, {self.vocab_size}), got [{int(c.min())}, {int(c.max())}]")
        n, h, w = c.shape
        f = self.downsample
        out = np.empty((n, h * f, w * f, 3), dtype=np.uint8)
        assert self._decoder is not None
        with torch.inference_mode(), self._autocast():
            for sl in self._batches(n, batch_size):
                cb = c[sl].to(self.device)
                if self.kind == "vqgan":
                    img = ((self._decoder.decode_codes(cb).float().clamp(-1, 1) + 1) * 0.5)  # type: ignore[operator]
                else:
                    img = decoder_mean(self._decoder.from_codes(cb))  # type: ignore[operator]
                out[sl] = (img * 255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return out


# ---------------------------------------------------------------------------------------------
# Tokenizer folders
# ---------------------------------------------------------------------------------------------
def arch_from_config(config: dict) -> DVAEArch | VQGANArch:
    return VQGANArch(**config["arch"]) if config["kind"] == "vqgan" else DVAEArch(**config["arch"])


def build_modules(config: dict) -> tuple[nn.Module, nn.Module | None]:
    """Empty (randomly initialised) encoder and decoder modules for a config."""
    arch = arch_from_config(config)
    if isinstance(arch, VQGANArch):
        model = VQGAN(arch, with_decoder=config["has_decoder"])
        return model, model if config["has_decoder"] else None
    return DVAEEncoder(arch), (DVAEDecoder(arch) if config["has_decoder"] else None)


def state_dict_of(encoder: nn.Module, decoder: nn.Module | None, kind: str) -> dict[str, torch.Tensor]:
    if kind == "vqgan":
        return {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
    sd = {f"encoder.{k}": v.detach().contiguous() for k, v in encoder.state_dict().items()}
    if decoder is not None:
        sd.update({f"decoder.{k}": v.detach().contiguous() for k, v in decoder.state_dict().items()})
    return sd


def make_config(kind: str, name: str, arch: DVAEArch | VQGANArch, *, resolution: int, has_decoder: bool,
                source: dict, weights: str = WEIGHTS_FILE) -> dict:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not a tokenizer kind; choose one of {KINDS}")
    vocab = arch.n_embed if isinstance(arch, VQGANArch) else arch.vocab_size
    doc = schemas.new_document("tokenizer_config")
    doc.update(
        kind=kind, name=name, arch=arch.to_dict(), vocab_size=int(vocab),
        downsample=int(arch.downsample), resolution=int(resolution), has_decoder=bool(has_decoder),
        weights=weights, weights_sha256="0" * 64, source=source,
    )
    return doc


def save_tokenizer(out_dir: str, config: dict, state_dict: dict[str, torch.Tensor]) -> dict:
    """Write `out_dir/<weights>` (safetensors) then `out_dir/config.json` (validated) atomically.

    Returns the final config (with the weights' sha256 filled in)."""
    os.makedirs(out_dir, exist_ok=True)
    wpath = os.path.join(out_dir, config["weights"])
    tmp = wpath + ".tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, tmp,
              metadata={"kind": config["kind"], "name": config["name"]})
    os.chmod(tmp, 0o644)  # safetensors creates it owner-only; weights are shipped and shared
    os.replace(tmp, wpath)
    config = dict(config, weights_sha256=sha256_path(wpath))
    schemas.validate(config, "tokenizer_config")
    cfg_name = CONFIG_FILE if config["weights"] == WEIGHTS_FILE else config["weights"].rsplit(".", 1)[0] + ".json"
    cpath = os.path.join(out_dir, cfg_name)
    with open(cpath + ".tmp", "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(cpath + ".tmp", cpath)
    return config


def load_config(config_path: str) -> dict:
    if not os.path.isfile(config_path):
        raise ValueError(f"{config_path} does not exist; a tokenizer folder holds {CONFIG_FILE} + {WEIGHTS_FILE} "
                         "(make one with `toto-pipeline convert-tokenizer` or `train-tokenizer`)")
    with open(config_path) as f:
        doc = json.load(f)
    return schemas.validate(doc, "tokenizer_config", source=config_path)


def load_tokenizer_files(config_path: str, device: str | torch.device = "cpu") -> VisualTokenizer:
    config = load_config(config_path)
    wpath = os.path.join(os.path.dirname(config_path), config["weights"])
    if not os.path.isfile(wpath):
        raise ValueError(f"{config_path} names weights {config['weights']!r}, which are missing beside it")
    sha = sha256_path(wpath)
    if sha != config["weights_sha256"]:
        raise ValueError(f"{wpath}: sha256 {sha} differs from {config['weights_sha256']} in {config_path}; "
                         "the weights are corrupt or were replaced — convert/train the tokenizer again")
    encoder, decoder = build_modules(config)
    sd = load_file(wpath)
    if config["kind"] == "vqgan":
        _load_strict(encoder, sd, wpath)
    else:
        _load_strict(encoder, {k[8:]: v for k, v in sd.items() if k.startswith("encoder.")}, wpath, "encoder.")
        if decoder is not None:
            _load_strict(decoder, {k[8:]: v for k, v in sd.items() if k.startswith("decoder.")}, wpath, "decoder.")
    return VisualTokenizer(config, encoder, decoder, sha).to(device)


def _load_strict(module: nn.Module, sd: dict[str, torch.Tensor], where: str, prefix: str = "") -> None:
    want = module.state_dict()
    missing = sorted(set(want) - set(sd))
    extra = sorted(set(sd) - set(want))
    bad = sorted(k for k in set(want) & set(sd) if tuple(want[k].shape) != tuple(sd[k].shape))
    if missing or extra or bad:
        raise ValueError(
            f"{where}: weights do not fit the config's architecture: missing {[prefix + k for k in missing[:5]]}, "
            f"unexpected {[prefix + k for k in extra[:5]]}, wrong shape {[prefix + k for k in bad[:5]]}"
        )
    module.load_state_dict(sd, strict=True)


def load_tokenizer(spec: str, device: str | torch.device = "cpu") -> VisualTokenizer:
    """`dalle:DIR`, `vqgan:DIR`, `dvae:DIR` (a folder made by convert-tokenizer / train-tokenizer) or
    `demo` (the small dVAE bundled in the package: 64 px frames → 8×8 codes of 512)."""
    if spec == "demo":
        if not os.path.isfile(DEMO_CONFIG):
            raise RuntimeError(f"the bundled demo tokenizer is missing ({DEMO_CONFIG}); reinstall toto")
        return load_tokenizer_files(DEMO_CONFIG, device)
    kind, sep, path = spec.partition(":")
    if not sep or kind not in KINDS or not path:
        raise ValueError(f"tokenizer spec {spec!r} is not one of dalle:DIR, vqgan:DIR, dvae:DIR or demo")
    config_path = os.path.join(os.path.expanduser(path), CONFIG_FILE)
    config = load_config(config_path)
    if config["kind"] != kind:
        raise ValueError(f"{path} holds a {config['kind']!r} tokenizer; use the spec {config['kind']}:{path}")
    return load_tokenizer_files(config_path, device)
