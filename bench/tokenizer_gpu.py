"""The dVAE encoder (OpenAI's architecture, random weights) at each precision: frames/s, TFLOP/s,
fraction of the device's bf16 dense peak, agreement of its codes with fp32, determinism.

`measure()` is section 1 of bench/gpu.py (the one-process device check); this file also runs alone:

    python bench/tokenizer_gpu.py                                   # CUDA: 128 and 256 px, bf16 and tf32
    python bench/tokenizer_gpu.py --device cpu --resolutions 32 --precisions bf16 --n-hid 16 --frames 16 --batch 8

Every figure goes through `VisualTokenizer.encode` from host uint8 frames, the way a tokenizer actor
calls it: pinned staging, the copy of batch k+1 overlapping the compute of batch k, fixed-shape
forwards, the fp32 argmax of the code logits. The baseline is fp32 on the same device in the same
run (`speedup_vs_fp32`). Frames are synthetic but photo-like (smooth random walks along rows: codes
of random weights on white noise would agree trivially); the agreement on real crops of a trained
tokenizer is what docs/tokenizers.md quotes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.tokenizers import DVAEArch, DVAEEncoder, VisualTokenizer, make_config  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, by a substring of torch.cuda.get_device_name().
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0,
                    "A10G": 70.0, "L4": 121.0}


def encoder_flops(resolution: int, arch: DVAEArch | None = None) -> float:
    """FLOPs (2 × MACs) of one frame through the encoder, counted by torch's FlopCounterMode on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        enc = DVAEEncoder(arch or DVAEArch())
        x = torch.empty(1, 3, resolution, resolution)
    with FlopCounterMode(display=False) as fc:
        enc(x)
    return float(fc.get_total_flops())


def photo_like_frames(n: int, resolution: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, R, R, 3): random walks along rows plus a vertical gradient (edges and smooth areas)."""
    rng = np.random.default_rng(seed)
    walk = np.cumsum(rng.normal(0, 6, (n, resolution, resolution, 3)), axis=2)
    grad = np.linspace(-60, 60, resolution)[None, :, None, None]
    return np.clip(walk + grad + 128, 0, 255).astype(np.uint8)


def random_dalle_tokenizer(resolution: int, n_hid: int = 256, seed: int = 0) -> VisualTokenizer:
    """OpenAI's dVAE encoder shape (n_hid 256, 2 blocks per group, 8192 codes) with random weights."""
    torch.manual_seed(seed)
    arch = DVAEArch(n_hid=n_hid)
    cfg = make_config("dalle", f"random-{n_hid}", arch, resolution=resolution, has_decoder=False,
                      source={"made_by": "bench/tokenizer_gpu.py"})
    return VisualTokenizer(cfg, DVAEEncoder(arch), None, sha256="0" * 64)


def peak_tflops(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def _frames_per_s(tok: VisualTokenizer, frames: np.ndarray, batch: int, reps: int) -> float:
    tok.encode(frames[:batch], batch_size=batch)  # warm-up: kernels chosen, pinned blocks cached
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        tok.encode(frames, batch_size=batch)
        best = min(best, time.perf_counter() - t0)
    return len(frames) / best


def measure(device: str | torch.device, resolutions: tuple[int, ...] = (128, 256),
            precisions: tuple[str, ...] = ("bf16", "tf32"), *, frames: int = 1024, batch: int = 256,
            agree_frames: int = 256, reps: int = 3, n_hid: int = 256,
            peak: float | None = None) -> dict[str, Any]:
    """Section 1 of the device check. Returns
    `{"device", "bf16_peak_tflops", "rows": [{resolution, precision, frames_per_s, tflops,
    fraction_of_bf16_peak, agreement_with_fp32, speedup_vs_fp32, deterministic}, ...]}`, one row per
    (resolution, precision) with fp32 itself first as the baseline. `frames` frames are timed per
    repetition (best of `reps`), encoded `batch` frames per forward (at least 256 on CUDA).
    Precisions the device cannot run (tf32 on CPU) are left out and listed under "skipped"."""
    device = torch.device(device)
    name, auto_peak = peak_tflops(device)
    peak = peak or auto_peak
    out: dict[str, Any] = {"device": name, "bf16_peak_tflops": peak, "n_hid": n_hid, "frames": frames,
                           "batch": batch, "rows": [], "skipped": []}
    for res in resolutions:
        flops = encoder_flops(res, DVAEArch(n_hid=n_hid))
        timed = photo_like_frames(frames, res, seed=1)
        probe = photo_like_frames(agree_frames, res, seed=2)
        base = random_dalle_tokenizer(res, n_hid).to(device, "fp32")
        ref_codes = base.encode(probe, batch_size=batch)
        fp32_fps = _frames_per_s(base, timed[: max(batch, frames // 4)], batch, max(1, reps - 1))
        del base
        for precision in ("fp32", *[p for p in precisions if p != "fp32"]):
            try:
                tok = random_dalle_tokenizer(res, n_hid).to(device, precision)
            except ValueError as e:
                out["skipped"].append({"resolution": res, "precision": precision, "why": str(e)})
                continue
            codes = tok.encode(probe, batch_size=batch)
            # Same codes again, and with the frames shifted across batch boundaries (other neighbours).
            shifted = tok.encode(np.concatenate([probe[-3:], probe]), batch_size=batch)[3:]
            deterministic = bool(np.array_equal(tok.encode(probe, batch_size=batch), codes)
                                 and np.array_equal(shifted, codes))
            fps = fp32_fps if precision == "fp32" else _frames_per_s(tok, timed, batch, reps)
            tflops = fps * flops / 1e12
            out["rows"].append({
                "resolution": res, "precision": precision, "frames_per_s": fps, "tflops": tflops,
                "fraction_of_bf16_peak": tflops / peak if peak else None,
                "agreement_with_fp32": float((codes == ref_codes).mean()),
                "speedup_vs_fp32": fps / fp32_fps, "deterministic": deterministic,
                "gflop_per_frame": flops / 1e9,
            })
            del tok
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def table(res: dict[str, Any]) -> str:
    """Markdown table of `measure()`'s result."""
    lines = [f"dVAE encoder (OpenAI architecture, n_hid {res['n_hid']}, random weights) on {res['device']}; "
             f"bf16 dense peak {res['bf16_peak_tflops'] or 'unknown'} TFLOP/s",
             "", "| px | precision | frames/s | TFLOP/s | of bf16 peak | × fp32 | codes = fp32 | deterministic |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        frac = f"{r['fraction_of_bf16_peak']:.0%}" if r["fraction_of_bf16_peak"] is not None else "n/a"
        lines.append(f"| {r['resolution']} | {r['precision']} | {r['frames_per_s']:.0f} | {r['tflops']:.1f} | {frac} | "
                     f"{r['speedup_vs_fp32']:.2f} | {r['agreement_with_fp32']:.2%} | {'yes' if r['deterministic'] else 'NO'} |")
    for s in res["skipped"]:
        lines.append(f"| {s['resolution']} | {s['precision']} | skipped: {s['why']} | | | | | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--precisions", nargs="+", default=["bf16", "tf32"])
    ap.add_argument("--frames", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--agree-frames", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-hid", type=int, default=256, help="encoder width (256 = OpenAI's; small for CPU smoke runs)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak (default: by GPU name)")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    res = measure(args.device, tuple(args.resolutions), tuple(args.precisions), frames=args.frames, batch=args.batch,
                  agree_frames=args.agree_frames, reps=args.reps, n_hid=args.n_hid, peak=args.peak_tflops)
    print(table(res))
    print(json.dumps(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
