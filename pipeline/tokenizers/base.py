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
from pipeline.tokenizers.numerics import check_precision, default_precision, exact_fp32, numerics
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

    encode(frames): uint8 (N, H, W, 3) numpy or torch (or a list of such arrays, taken as their
    concatenation) → uint16 numpy (N, H/f, W/f), the argmax of the code logits (no softmax), in
    forwards of `batch_size` frames under inference_mode, channels-last, at `precision`
    (pipeline/tokenizers/numerics.py: fp32 on CPU, bf16 on CUDA unless told otherwise). decode(codes)
    → uint8 (N, H, W, 3) where the tokenizer has a decoder (`hasattr(tok, "decode")` is False otherwise).

    On CUDA every forward has exactly `batch_size` frames (at least GPU_MIN_FORWARD; the last one
    padded with black frames), so the kernels, hence the codes of a frame, do not depend on which
    frames happened to share its batch.
    """

    GPU_MIN_FORWARD = 256
    # Run CUDA's feeding path (padded fixed-shape batches through two staging buffers) on CPU too;
    # the tests set it to exercise that path without a GPU.
    stage_on_cpu = False

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
        self._screened: ScreenedArgmax | None = None  # fp32 argmax of the code logits, screened in bf16
        self._decoder = decoder.eval().requires_grad_(False) if decoder is not None else None
        self.device = torch.device("cpu")
        self.precision = "fp32"
        self.batch_size = 32
        self._to_channels_last()

    def __repr__(self) -> str:
        return (f"VisualTokenizer({self.id}, vocab={self.vocab_size}, /{self.downsample}, device={self.device}, "
                f"precision={self.precision})")

    # -- placement ---------------------------------------------------------------------------
    def _to_channels_last(self) -> None:
        self._encoder.to(memory_format=torch.channels_last)
        if self._decoder is not None:
            self._decoder.to(memory_format=torch.channels_last)

    def to(self, device: str | torch.device, precision: str | None = None) -> VisualTokenizer:
        """Move to `device` and compute at `precision` (fp32 | tf32 | bf16; default bf16 on CUDA, fp32 on CPU)."""
        device = torch.device(device)
        precision = check_precision(precision or default_precision(device), device)
        self._encoder.to(device)
        if self._decoder is not None:
            self._decoder.to(device)
        self._to_channels_last()
        self.device = device
        self.precision = precision
        self._screened = None
        if device.type == "cuda":
            self.batch_size = max(self.batch_size, self.GPU_MIN_FORWARD)
        return self

    def _autocast(self) -> contextlib.AbstractContextManager:
        return numerics(self.precision, self.device)

    def forward_frames(self, batch_size: int | None = None) -> int:
        """Frames per encoder forward: `batch_size` (default self.batch_size), at least GPU_MIN_FORWARD on CUDA."""
        bs = int(batch_size or self.batch_size)
        if bs < 1:
            raise ValueError(f"batch_size={bs} must be >= 1")
        return max(bs, self.GPU_MIN_FORWARD) if self.device.type == "cuda" else bs

    # -- encode --------------------------------------------------------------------------------
    def _check_frames(self, frames: Any) -> _Frames:
        parts = list(frames) if isinstance(frames, (list, tuple)) else [frames]
        tensors = []
        for p in parts:
            x = torch.from_numpy(np.ascontiguousarray(p)) if isinstance(p, np.ndarray) else p
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"frames must be a numpy array or torch tensor, got {type(p).__name__}")
            if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
                raise ValueError(
                    f"frames must be uint8 [N, H, W, 3] RGB, got {x.dtype} {tuple(x.shape)}; decode frames with "
                    "pipeline.decode (RGB uint8) first"
                )
            tensors.append(x)
        if not tensors:
            raise ValueError("frames is an empty list; pass at least one uint8 [N, H, W, 3] array")
        h, w = tensors[0].shape[1], tensors[0].shape[2]
        if any(t.shape[1:] != tensors[0].shape[1:] for t in tensors):
            raise ValueError(f"frames of one call must share one size; got {sorted({tuple(t.shape[1:]) for t in tensors})}")
        if h % self.downsample or w % self.downsample:
            raise ValueError(
                f"frame size {h}x{w} is not a multiple of {self.id}'s downsampling {self.downsample}; "
                "choose a resolution that is"
            )
        return _Frames(tensors)

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

    def _uses_screen(self) -> bool:
        """Whether the dVAE's logit layer goes through the screened fp32 argmax (else plain fp32 logits)."""
        if self.kind == "vqgan" or not hasattr(self._encoder, "features"):
            return False
        # bf16/tf32 features: the fp32 argmax at bf16 GEMM speed. fp32 on CPU: where bf16 dots are fast.
        return self.precision != "fp32" or (self.device.type == "cpu" and _BF16_SCREEN)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """Model input (n, 3, H, W) → what the fp32 last step takes: VQGAN z (n, D, h, w), the dVAE's
        features (n, C, h, w) when screened, else its fp32 code logits (n, V, h, w). No host sync."""
        if self.kind == "vqgan":
            return self._encoder.quant_conv(self._encoder.encoder(x))  # type: ignore[union-attr]
        if self._uses_screen():
            return self._encoder.features(x)  # type: ignore[operator]
        return self._encoder(x)

    def _argmax(self, f: torch.Tensor) -> torch.Tensor:
        """`_features` output → codes (n, h, w) int64, computed in fp32, ties to the lowest index."""
        with exact_fp32(self.device):
            if self.kind == "vqgan":
                return self._encoder.quantize.codes(f.float())  # type: ignore[union-attr]
            if not self._uses_screen():
                return f.float().argmax(1)  # logits (n, V, h, w) → (n, h, w)
            if self._screened is None:
                conv = self._encoder.logits_conv  # type: ignore[union-attr]
                self._screened = ScreenedArgmax(conv.w.view(conv.w.shape[0], -1), conv.b)
            n, c, h, w = f.shape
            return self._screened(f.float().permute(0, 2, 3, 1).reshape(n * h * w, c)).view(n, h, w)

    def encode(self, frames: np.ndarray | torch.Tensor | list, batch_size: int | None = None) -> np.ndarray:
        src = self._check_frames(frames)
        n, h, w = src.n, src.frame_shape[0] // self.downsample, src.frame_shape[1] // self.downsample
        out = np.empty((n, h, w), dtype=np.uint16)
        if n == 0:
            return out
        staged = self.device.type == "cuda" or self.stage_on_cpu
        bs = self.forward_frames(batch_size)
        if not staged:
            bs = min(bs, n)  # no padding on CPU: a short last batch costs only its own frames
        slices = [slice(i, min(n, i + bs)) for i in range(0, n, bs)]
        feed = _DeviceFeed(self.device, bs, src.frame_shape, staged)
        codes_host = feed.codes_buffer(n, h, w)  # int32 (n, h, w), pinned on CUDA
        with torch.inference_mode(), self._autocast():
            slot = feed.put(src, slices[0])
            for k, sl in enumerate(slices):
                xb = feed.get(slot)  # (bs, H, W, 3) uint8 on device
                f = self._features(self._pixels(xb))  # queued on the GPU
                feed.release(slot)
                if k + 1 < len(slices):
                    # Staging and copying the next batch runs while the GPU computes this one.
                    slot = feed.put(src, slices[k + 1])
                codes = self._argmax(f)  # (bs, h, w) int64
                # One device→host copy of this batch's codes (asynchronous into pinned memory on CUDA).
                codes_host[sl].copy_(codes[: sl.stop - sl.start].to(torch.int32), non_blocking=True)
            feed.finish()
        out[:] = codes_host.numpy()
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


class _Frames:
    """The frames of one encode call: uint8 tensors (n_i, H, W, 3) taken as one (N, H, W, 3) sequence,
    so that callers with many small arrays (one per token row) need not concatenate them first."""

    def __init__(self, parts: list[torch.Tensor]) -> None:
        self.parts = parts
        self.starts = np.cumsum([0] + [int(p.shape[0]) for p in parts]).tolist()
        self.n = self.starts[-1]
        self.frame_shape = (int(parts[0].shape[1]), int(parts[0].shape[2]))
        self.on_cuda = parts[0].device.type == "cuda"

    def _pieces(self, sl: slice) -> Iterator[tuple[int, torch.Tensor]]:
        """(offset in the slice, frames) for the parts that overlap `sl`."""
        for p, a in zip(self.parts, self.starts[:-1], strict=True):
            lo, hi = max(sl.start, a), min(sl.stop, a + int(p.shape[0]))
            if lo < hi:
                yield lo - sl.start, p[lo - a : hi - a]

    def slice(self, sl: slice) -> torch.Tensor:
        pieces = [t for _, t in self._pieces(sl)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def copy_into(self, dst: torch.Tensor, sl: slice) -> None:
        for at, t in self._pieces(sl):
            dst[at : at + t.shape[0]].copy_(t)


class _DeviceFeed:
    """Frames → device batches of exactly `rows` frames, each batch k+1 copied while batch k computes.

    Staged (always on CUDA): two host buffers (pinned on CUDA) and two device buffers; frames are
    staged into a host buffer, copied to the device on a side stream, and the compute stream waits
    on that copy's event; the side stream in turn waits until the compute has finished reading a
    device buffer before it refills it. Short batches are padded with black frames (fixed shapes:
    the same kernels every time). On CPU the staged path runs the same calls without streams or
    events (tests use it); unstaged (the CPU default), each batch is a slice of the frames.
    """

    def __init__(self, device: torch.device, rows: int, frame_shape: tuple[int, int], staged: bool) -> None:
        self.device = device
        self.rows = rows
        self.cuda = device.type == "cuda"
        self.staged = staged or self.cuda
        if self.staged:
            shape = (rows, *frame_shape, 3)
            self.host = [torch.empty(shape, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(2)]
            self.dev = [torch.empty(shape, dtype=torch.uint8, device=device) for _ in range(2)]
            self.k = 0
        if self.cuda:
            self.stream = torch.cuda.Stream(device)
            self.copied = [torch.cuda.Event() for _ in range(2)]  # the copy into dev[s] is done
            self.used = [torch.cuda.Event() for _ in range(2)]  # the compute has read dev[s]

    def codes_buffer(self, n: int, h: int, w: int) -> torch.Tensor:
        """Where the codes of the call land: int32 (n, h, w) on the host, pinned on CUDA."""
        return torch.empty((n, h, w), dtype=torch.int32, pin_memory=self.cuda)

    def put(self, src: _Frames, sl: slice) -> Any:
        """Start moving frames `sl` to the device; returns the handle `get` takes."""
        if not self.staged:
            return src.slice(sl)
        s, m = self.k % 2, sl.stop - sl.start
        self.k += 1
        if src.on_cuda:
            # Frames already on the GPU: one device-to-device copy on the compute stream, ordered
            # after whatever the caller queued to produce them and before the compute reading dev[s].
            src.copy_into(self.dev[s], sl)
            if m < self.rows:
                self.dev[s][m:].zero_()
            self.copied[s].record(torch.cuda.current_stream(self.device))
            return s
        if self.cuda:
            self.copied[s].synchronize()  # host[s] is free once its previous copy has left it
        src.copy_into(self.host[s], sl)
        if m < self.rows:
            self.host[s][m:].zero_()
        if not self.cuda:
            self.dev[s].copy_(self.host[s])
            return s
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.used[s])  # the compute has finished reading dev[s]
            self.dev[s].copy_(self.host[s], non_blocking=True)
            self.copied[s].record(self.stream)
        return s

    def get(self, handle: Any) -> torch.Tensor:
        """The batch as uint8 (rows, H, W, 3) on the device, ordered after its copy."""
        if not self.staged:
            return handle.to(self.device)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.copied[handle])
        return self.dev[handle]

    def release(self, handle: Any) -> None:
        """The compute queued so far is all that reads this batch's device buffer."""
        if self.cuda:
            self.used[handle].record(torch.cuda.current_stream(self.device))

    def finish(self) -> None:
        """Wait for the queued compute and the codes' copies to the host."""
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()


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
    """`dalle:DIR`, `vqgan:DIR`, `dvae:DIR` (a folder made by convert-tokenizer / train-tokenizer),
    `demo` (the small dVAE bundled in the package: 64 px frames → 8×8 codes of 512) or `patch:P`
    (P x P pixel patches, no weights: pipeline/tokenizers/patch.py)."""
    if spec.startswith("patch:"):  # pixels at the patch grid (Table 3's patch arms): pipeline/tokenizers/patch.py
        from pipeline.tokenizers.patch import load_patch_tokenizer

        return load_patch_tokenizer(spec)  # type: ignore[return-value]
    if spec == "demo":
        if not os.path.isfile(DEMO_CONFIG):
            raise RuntimeError(f"the bundled demo tokenizer is missing ({DEMO_CONFIG}); reinstall toto")
        return load_tokenizer_files(DEMO_CONFIG, device)
    kind, sep, path = spec.partition(":")
    if not sep or kind not in KINDS or not path:
        raise ValueError(f"tokenizer spec {spec!r} is not one of dalle:DIR, vqgan:DIR, dvae:DIR, demo or patch:8")
    config_path = os.path.join(os.path.expanduser(path), CONFIG_FILE)
    config = load_config(config_path)
    if config["kind"] != kind:
        raise ValueError(f"{path} holds a {config['kind']!r} tokenizer; use the spec {config['kind']}:{path}")
    return load_tokenizer_files(config_path, device)
