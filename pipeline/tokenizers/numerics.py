"""The tokenizer's arithmetic precision: part of what a token *is*, so it is named, recorded and checked.

    fp32  IEEE fp32 everywhere (TF32 off for cuDNN convs and cuBLAS matmuls). Default on CPU.
    tf32  convs and matmuls of the encoder in TF32 on tensor cores (CUDA only).
    bf16  the encoder under bf16 autocast (CUDA; on CPU `torch.autocast("cpu")`). Default on CUDA.

Whatever the precision, the last step is computed in fp32: the VQGAN nearest-code distances and
the dVAE's code logits (from the encoder's features upcast to fp32), with the argmax taking the
lowest index on ties as on CPU. Only the encoder's features carry the precision's rounding.

On CUDA, `numerics()` also makes the result a function of the input and the device type alone:
cuDNN deterministic with benchmarking off (the algorithm is picked by heuristics from the shape,
never by timing), and no reduced-precision reductions in bf16 GEMMs (the screened argmax's error
bound assumes fp32 accumulation). The flags are set for the duration of the call and restored,
so a process that also trains (bench/gpu.py) keeps its own settings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS = ("fp32", "tf32", "bf16")


def default_precision(device: str | torch.device) -> str:
    """bf16 on CUDA, fp32 elsewhere."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def check_precision(precision: str, device: str | torch.device) -> str:
    """`precision` if it is one this device can run; a ValueError that says what to use otherwise."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
    if precision == "tf32" and device.type != "cuda":
        raise ValueError(f"precision 'tf32' needs a CUDA GPU (tensor cores) but the tokenizer runs on {device}; "
                         "use --precision fp32 (or bf16)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"the tokenizer was asked to run on {device}, but this torch sees no CUDA GPU; use the CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision 'bf16' needs a GPU with bf16 support; {torch.cuda.get_device_name(device)} "
                         "has none: use --precision fp32 or tf32")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"the tokenizer runs on CUDA or CPU, not {device}")
    return precision


@contextlib.contextmanager
def numerics(precision: str, device: torch.device) -> Iterator[None]:
    """Autocast and (on CUDA) the backend flags of `precision`, restored on exit."""
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    if device.type != "cuda":
        with amp:
            yield
        return
    cudnn, mm = torch.backends.cudnn, torch.backends.cuda.matmul
    # The fp32_precision API only: reading the legacy allow_tf32 flags raises once anything in
    # the process has used the new one.
    saved = (cudnn.deterministic, cudnn.benchmark, cudnn.conv.fp32_precision, mm.fp32_precision,
             mm.allow_bf16_reduced_precision_reduction)
    fp32 = "tf32" if precision == "tf32" else "ieee"
    try:
        cudnn.deterministic, cudnn.benchmark = True, False
        cudnn.conv.fp32_precision = fp32
        mm.fp32_precision = fp32
        mm.allow_bf16_reduced_precision_reduction = False
        with amp:
            yield
    finally:
        (cudnn.deterministic, cudnn.benchmark, cudnn.conv.fp32_precision, mm.fp32_precision,
         mm.allow_bf16_reduced_precision_reduction) = saved


@contextlib.contextmanager
def exact_fp32(device: torch.device) -> Iterator[None]:
    """fp32 arithmetic inside a `numerics()` block: autocast off and, on CUDA, TF32 matmuls off."""
    with torch.autocast(device.type, enabled=False):
        if device.type != "cuda":
            yield
            return
        mm = torch.backends.cuda.matmul
        saved = mm.fp32_precision
        try:
            mm.fp32_precision = "ieee"
            yield
        finally:
            mm.fp32_precision = saved
