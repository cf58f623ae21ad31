"""Training-step throughput: each backbone against its transformers reference.

--arch llama: our Transformer vs LlamaForCausalLM; gpt2: our GPT2 vs GPT2LMHeadModel; mamba: our
Mamba (transformers' blocks, mambapy's parallel scan on CPU) vs MambaForCausalLM on transformers'
own CPU path (its per-token scan loop). Both get identical weights through the export mapping.
Same configuration, batch, sequence length, dtype and optimizer (AdamW, clipping) for both; the
two are timed in alternating rounds in one process so machine noise hits both alike. Reports
tokens/s, the ratio ours / reference (target >= 1.0), FLOPs per token (6N + 12·L·d·T) and MFU
against a peak: on CPU the fp32 matmul rate measured in this run, on CUDA the datasheet peak
(or --peak-flops).

    python bench/train.py                      # CPU: d=256, 4 layers, T=1024, batch 4, fp32
    python bench/train.py --arch mamba         # the same size as a Mamba
    python bench/train.py --device cuda --preset base --seq 4096 --batch 8 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.export import hf_config, to_hf_state_dict  # noqa: E402
from trainer.model import ARCHS, PRESETS, ModelConfig, build_model, flops_per_token  # noqa: E402
from trainer.train import peak_flops_for  # noqa: E402


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10, clock: str = "wall") -> float:
    """Sustained FLOP/s of one large square matmul: the practical peak of this device (same clock as the steps)."""
    now = time.perf_counter if clock == "wall" else time.process_time
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = now()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, now() - t)
    return 2 * n**3 / best


def make_models(cfg: ModelConfig, device: torch.device):
    import transformers

    torch.manual_seed(0)
    ours = build_model(cfg).to(device)
    hf_cfg = {k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    conf, cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
                 "mamba": ("MambaConfig", "MambaForCausalLM")}[cfg.arch]
    ref = getattr(transformers, cls)(getattr(transformers, conf)(**hf_cfg)).to(device)
    ref.load_state_dict(to_hf_state_dict(ours))  # identical weights, so identical work
    ref.config.use_cache = False
    return ours, ref


def step_fn(model, opt, x, y, is_ref: bool, amp: torch.dtype | None, device: torch.device):
    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            if is_ref:
                logits = model(input_ids=x, use_cache=False).logits
            else:
                logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def time_steps(step, n: int, device: torch.device, clock: str = "wall") -> float:
    """Seconds per step by wall clock, or by this process's CPU time (`clock="cpu"`, meant for
    --threads 1 on a shared machine: other processes' load then does not inflate the figure)."""
    now = time.perf_counter if clock == "wall" else time.process_time
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = now()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (now() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="model preset (default: d=256, 4 layers, 4 heads)")
    ap.add_argument("--arch", default=None, choices=ARCHS, help="backbone (default: the preset's, else llama)")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8196)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds")
    ap.add_argument("--steps", type=int, default=3, help="steps per round (timed one at a time, interleaved)")
    ap.add_argument("--compile", action="store_true", help="torch.compile our model (not the reference)")
    ap.add_argument("--peak-flops", type=float, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or process CPU time (use with --threads 1 on a loaded machine)")
    ap.add_argument("--ours-only", action="store_true", help="skip the reference (e.g. MFU of base on a GPU)")
    args = ap.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and device.type == "cuda":
        ap.error("--clock cpu measures CPU work; use the wall clock on a GPU")
    if args.preset:
        import dataclasses

        cfg = dataclasses.replace(PRESETS[args.preset], vocab_size=args.vocab, max_seq_len=args.seq)
        if args.arch:
            cfg = dataclasses.replace(cfg, arch=args.arch)
    else:
        cfg = ModelConfig(dim=256, n_layers=4, n_heads=4, vocab_size=args.vocab, max_seq_len=args.seq,
                          arch=args.arch or "llama")
    amp = torch.bfloat16 if args.dtype == "bf16" else None
    ours, ref = make_models(cfg, device) if not args.ours_only else (build_model(cfg).to(device), None)
    n_nonemb = ours.num_params(include_embedding=False)
    fpt = flops_per_token(cfg, args.seq, n_nonemb)
    torch.manual_seed(1)
    seq = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    x, y = seq[:, :-1], seq[:, 1:]
    runners = {}
    fwd = torch.compile(ours) if args.compile else ours
    runners["ours"] = step_fn(fwd, torch.optim.AdamW(ours.parameters(), lr=1e-4, betas=(0.9, 0.95)), x, y, False,
                              amp, device)
    if ref is not None:
        runners["transformers"] = step_fn(ref, torch.optim.AdamW(ref.parameters(), lr=1e-4, betas=(0.9, 0.95)),
                                          x, y, True, amp, device)
    for r in runners.values():  # warm-up (allocator, kernels, compile)
        r()
    times: dict[str, list[float]] = {k: [] for k in runners}
    order = list(runners)
    for i in range(args.rounds * args.steps):
        for k in order if i % 2 == 0 else order[::-1]:  # one step each, alternating who goes first
            times[k].append(time_steps(runners[k], 1, device, args.clock))
    tokens = args.batch * args.seq
    if args.peak_flops:
        peak, peak_src = args.peak_flops, "--peak-flops"
    elif device.type == "cuda" and peak_flops_for(device, None):
        peak, peak_src = peak_flops_for(device, None), f"datasheet ({torch.cuda.get_device_name(device)})"
    else:
        peak = matmul_peak(device, torch.bfloat16 if amp else torch.float32, clock=args.clock)
        peak_src = f"measured 2048^3 matmul in this run ({args.clock} clock, {torch.get_num_threads()} threads)"
    res = {
        "config": {"arch": cfg.arch, "dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "mlp": cfg.ffn_dim,
                   "vocab": cfg.vocab_size, "seq": args.seq, "batch": args.batch, "dtype": args.dtype,
                   "device": str(device), "threads": torch.get_num_threads(), "compile": args.compile,
                   "clock": args.clock},
        "params": ours.num_params(),
        "flops_per_token": fpt,
        "peak_flops": peak,
        "peak_source": peak_src,
    }
    for k, ts in times.items():
        # Best step: the shared machine only ever adds time, so the minimum is the least noisy
        # estimate of each implementation's cost; the median is reported alongside.
        t = min(ts)
        res[k] = {"step_s": t, "median_step_s": statistics.median(ts), "tokens_per_s": tokens / t,
                  "achieved_flops": fpt * tokens / t, "mfu": fpt * tokens / t / peak}
    if "transformers" in res:
        res["ratio_ours_over_transformers"] = res["ours"]["tokens_per_s"] / res["transformers"]["tokens_per_s"]
    print(json.dumps(res, indent=2))
    if "transformers" in res:
        ok = res["ratio_ours_over_transformers"] >= 1.0
        print(f"ours {res['ours']['tokens_per_s']:.0f} tok/s vs transformers "
              f"{res['transformers']['tokens_per_s']:.0f} tok/s: {res['ratio_ours_over_transformers']:.2f}x "
              f"(target >= 1.0: {'met' if ok else 'missed'}); {fpt / 1e6:.1f} MFLOP/token, "
              f"MFU {100 * res['ours']['mfu']:.1f}% of {peak / 1e9:.0f} GFLOP/s ({peak_src})")


if __name__ == "__main__":
    main()
