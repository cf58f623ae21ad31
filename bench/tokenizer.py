"""Tokenizer throughput: our dVAE encoder vs the `dall-e` reference Encoder, demo tokenizer, FLOPs.

Same random weights, same uint8 batch, same thread count, interleaved repetitions in one run; both
paths include the pixel mapping and the argmax over the code logits. Prints a Markdown table and a
JSON line. On a GPU, also bench/tokenizer_gpu.py's measure() at 128 px (bf16 and tf32: frames/s,
fraction of the device's bf16 peak, agreement with fp32).

    python bench/tokenizer.py                      # CPU: 128 px, batch 2, 2 threads
    python bench/tokenizer.py --resolution 64 --reps 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.tokenizers import DVAEArch, load_tokenizer  # noqa: E402
from pipeline.tokenizers.convert import convert_dalle  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tokenizer_gpu import encoder_flops, measure, table  # noqa: E402


def _time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def compare_reference(ref, tok, args) -> dict:
    import dall_e

    frames = np.random.default_rng(0).integers(0, 256, (args.batch, args.resolution, args.resolution, 3), np.uint8)

    def run_ref() -> np.ndarray:
        with torch.no_grad():
            x = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous().float() / 255.0
            return ref(dall_e.map_pixels(x)).argmax(1).numpy().astype(np.uint16)

    def run_ours() -> np.ndarray:
        return tok.encode(frames, batch_size=args.batch)

    same = float((run_ref() == run_ours()).mean())  # also the warm-up call of each
    assert same >= 0.999, f"ours and the reference disagree on {1 - same:.2%} of the benchmark codes"
    t_ref, t_ours = [], []
    for _ in range(args.reps):  # interleaved so load changes hit both alike
        t_ref += _time(run_ref, 1)
        t_ours += _time(run_ours, 1)
    ref_fps = args.batch / statistics.median(t_ref)
    ours_fps = args.batch / statistics.median(t_ours)
    return {"resolution": args.resolution, "batch": args.batch, "ref_frames_per_s": ref_fps,
            "ours_frames_per_s": ours_fps, "speedup": ours_fps / ref_fps,
            "ours_gflops_per_s": ours_fps * encoder_flops(args.resolution) / 1e9}


def bench_demo(args) -> dict:
    demo = load_tokenizer("demo")
    frames = np.random.default_rng(1).integers(0, 256, (args.demo_batch, 64, 64, 3), np.uint8)
    codes = demo.encode(frames)
    demo.decode(codes)
    enc_fps = args.demo_batch / statistics.median(_time(lambda: demo.encode(frames), args.reps))
    dec_fps = args.demo_batch / statistics.median(_time(lambda: demo.decode(codes), args.reps))
    return {"demo_encode_frames_per_s": enc_fps, "demo_decode_frames_per_s": dec_fps,
            "demo_encoder_gflop_per_frame_64px": encoder_flops(64, DVAEArch(**demo.config["arch"])) / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--demo-batch", type=int, default=64)
    ap.add_argument("--skip-reference", action="store_true", help="skip the CPU comparison with dall_e")
    ap.add_argument("--skip-demo", action="store_true", help="skip the demo tokenizer")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak of the GPU (default: by name)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import dall_e

    torch.manual_seed(0)
    ref = dall_e.Encoder().eval()  # OpenAI's architecture: n_hid 256, 2 blocks/group, 8192 codes
    with tempfile.TemporaryDirectory() as d:
        torch.save(ref, os.path.join(d, "encoder.pkl"))
        convert_dalle(os.path.join(d, "encoder.pkl"), os.path.join(d, "tok"), resolution=args.resolution)
        tok = load_tokenizer(f"dalle:{os.path.join(d, 'tok')}")
    flops = {r: encoder_flops(r) for r in (128, 256)}
    from pipeline.tokenizers import base

    res: dict = {"threads": args.threads, "reps": args.reps, "bf16_screened_argmax": base._BF16_SCREEN,
                 "encoder_gflop_per_frame": {str(r): f / 1e9 for r, f in flops.items()}}
    if not args.skip_reference:
        res.update(compare_reference(ref, tok, args))
    if not args.skip_demo:
        res.update(bench_demo(args))
    if torch.cuda.is_available():
        res["gpu"] = measure("cuda", (128,), ("bf16", "tf32"), peak=args.peak_tflops)

    print("| what | value |\n|---|---|")
    if "speedup" in res:
        print(f"| reference dall_e Encoder, {args.resolution} px, batch {args.batch}, {args.threads} threads | "
              f"{res['ref_frames_per_s']:.3f} frames/s |")
        screen = "bf16-screened exact argmax" if res["bf16_screened_argmax"] else "fp32 logits + argmax"
        print(f"| our dVAE encoder (same weights/batch/threads; {screen}) | {res['ours_frames_per_s']:.3f} frames/s "
              f"(**{res['speedup']:.2f}×**, {res['ours_gflops_per_s']:.0f} GFLOP/s of fp32-equivalent work) |")
    if "demo_encode_frames_per_s" in res:
        print(f"| demo tokenizer, 64 px, batch {args.demo_batch}: encode / decode | "
              f"{res['demo_encode_frames_per_s']:.0f} / {res['demo_decode_frames_per_s']:.0f} frames/s |")
        print(f"| demo encoder FLOPs per 64 px frame | {res['demo_encoder_gflop_per_frame_64px']:.3f} GFLOP |")
    print(f"| dVAE encoder FLOPs per frame | 128 px: {flops[128] / 1e9:.1f} GFLOP; 256 px: {flops[256] / 1e9:.1f} GFLOP |")
    if "gpu" in res:
        print()
        print(table(res["gpu"]))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
