"""Probe engine: peak memory flat in the number of samples, and heads nearly free next to the backbone.

1. Peak memory (ru_maxrss of a fresh process) of a probe over N = 1e3 and 1e4 samples with a tiny
   model, every layer x (attention, average) head trained at once for one epoch: the streaming
   engine (`--features stream`: tokens from a token file, features from the backbone per batch)
   against the in-memory path it replaced (every layer's features of the whole set held in RAM,
   `extract_features` + `layer_sweep`). Ratio 1e4 / 1e3 of the peak above the process's baseline
   (imports, model) and of the whole peak; the target is <= 1.2x for the whole peak.
2. Throughput: samples/s of probe training (token reads + backbone + every head's forward,
   backward and AdamW step) against the backbone's forward alone on the same batches, interleaved
   repetitions, medians. Target >= 0.8x.

    python bench/probe.py                       # dim 64, 2 layers, 64 tokens a sample, 1 thread
    python bench/probe.py --threads 2 --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from trainer.evals.features import backbone_features, extract_features  # noqa: E402
from trainer.evals.probes import ProbeConfig  # noqa: E402
from trainer.evals.stream_probe import HeadSpec, TokenSource, train_heads  # noqa: E402
from trainer.evals.sweep import layer_sweep  # noqa: E402
from trainer.model import ModelConfig, Transformer  # noqa: E402

VOCAB = 256


def tiny_model(args) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=4, vocab_size=VOCAB + 4,
                      max_seq_len=args.tokens + 1, mlp_hidden=4 * args.dim)
    return Transformer(cfg).eval()


def token_file(n: int, tokens: int, path: str, seed: int = 0) -> tuple[np.memmap, np.memmap, torch.Tensor]:
    """n samples [bos] + `tokens` codes on disk (int32 / int16 memmaps), 10 classes by code range."""
    rng = np.random.default_rng(seed)
    tok = np.memmap(path + ".i32", dtype=np.int32, mode="w+", shape=(n, tokens + 1))
    fi = np.memmap(path + ".i16", dtype=np.int16, mode="w+", shape=(n, tokens + 1))
    labels = np.arange(n) % 10
    for s in range(0, n, 1000):  # written in blocks: the generator itself stays small
        e = min(n, s + 1000)
        tok[s:e, 0] = VOCAB
        tok[s:e, 1:] = rng.integers(0, 25, size=(e - s, tokens)) + 25 * labels[s:e, None]
        fi[s:e, 0], fi[s:e, 1:] = -1, 0
    tok.flush()
    fi.flush()
    return tok, fi, torch.from_numpy(labels).long()


def memory_child(args) -> None:
    """One probe over args.n samples in this process; prints {baseline_mb, peak_mb} as JSON."""
    torch.set_num_threads(args.threads)
    model = tiny_model(args)
    layers = list(range(1, args.layers + 1))
    specs = [HeadSpec(layer, p) for layer in layers for p in ("attention", "average")]
    cfg = ProbeConfig(epochs=1, batch_size=64, lr=1e-3, num_heads=4)
    with tempfile.TemporaryDirectory() as d:
        tok, fi, y = token_file(args.n, args.tokens, os.path.join(d, "tr"))
        vtok, vfi, vy = token_file(256, args.tokens, os.path.join(d, "va"), seed=1)
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if args.mode == "stream":
            train_heads(TokenSource(model, tok, fi, layers), y, TokenSource(model, vtok, vfi, layers), vy, specs,
                        [str(i) for i in range(10)], cfg)
        else:  # the replaced path: every layer's features of the whole set in RAM
            tr = extract_features(model, torch.from_numpy(np.asarray(tok, np.int64)),
                                  torch.from_numpy(np.asarray(fi, np.int64)), layers, batch_size=64)
            va = extract_features(model, torch.from_numpy(np.asarray(vtok, np.int64)),
                                  torch.from_numpy(np.asarray(vfi, np.int64)), layers, batch_size=64)
            layer_sweep(tr, va, y, vy, [str(i) for i in range(10)], n_layers=args.layers,
                        poolings=["attention", "average"], cfg=cfg, task="bench")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"baseline_mb": baseline, "peak_mb": peak}))


def peak_memory(args, mode: str, n: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--mode", mode, "--n", str(n), "--dim", str(args.dim),
           "--layers", str(args.layers), "--tokens", str(args.tokens), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    return json.loads(out.stdout.strip().splitlines()[-1])


def throughput(args) -> dict:
    torch.set_num_threads(args.threads)
    model = tiny_model(args)
    layers = list(range(1, args.layers + 1))
    specs = [HeadSpec(layer, p) for layer in layers for p in ("attention", "average")]
    n = args.batches * 64
    cfg = ProbeConfig(epochs=1, batch_size=64, lr=1e-3, num_heads=4)
    with tempfile.TemporaryDirectory() as d:
        tok, fi, y = token_file(n, args.tokens, os.path.join(d, "tr"))
        vtok, vfi, vy = token_file(2, args.tokens, os.path.join(d, "va"), seed=1)
        src, val = TokenSource(model, tok, fi, layers), TokenSource(model, vtok, vfi, layers)
        from trainer.evals.stream_probe import _epoch_order

        order = _epoch_order(n, cfg.seed, 0)  # the batches the probe's first epoch takes
        batches = [(torch.from_numpy(np.asarray(tok[np.sort(order[i:i + 64])], np.int64)),
                    torch.from_numpy(np.asarray(fi[np.sort(order[i:i + 64])], np.int64))) for i in range(0, n, 64)]

        def backbone() -> None:
            for t, f in batches:
                backbone_features(model, t, f, layers)

        def probe() -> None:
            train_heads(src, y, val, vy, specs, [str(i) for i in range(10)], cfg)

        probe()  # warm-up of both
        backbone()
        t_b, t_p = [], []
        for _ in range(args.reps):  # interleaved so load changes hit both alike
            t0 = time.perf_counter()
            backbone()
            t_b.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            probe()
            t_p.append(time.perf_counter() - t0)
    b, p = n / statistics.median(t_b), n / statistics.median(t_p)
    return {"samples": n, "heads": len(specs), "backbone_samples_s": b, "probe_samples_s": p, "ratio": p / b}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="visual tokens a sample (an 8x8 grid)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batches", type=int, default=30, help="batches of 64 in the throughput run")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="stream", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=1000, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        memory_child(args)
        return
    mem = {mode: {n: peak_memory(args, mode, n) for n in (1000, 10000)} for mode in ("stream", "in-memory")}
    print(f"model: dim {args.dim}, {args.layers} layers, {args.tokens} tokens a sample, {args.threads} thread(s)\n")
    print("| features | peak, 1e3 samples | peak, 1e4 samples | ratio | above baseline, 1e3 / 1e4 | ratio |")
    print("|---|---|---|---|---|---|")
    res = {"memory": {}}
    for mode, by_n in mem.items():
        a, b = by_n[1000], by_n[10000]
        da, db = a["peak_mb"] - a["baseline_mb"], b["peak_mb"] - b["baseline_mb"]
        print(f"| {mode} | {a['peak_mb']:.0f} MB | {b['peak_mb']:.0f} MB | {b['peak_mb'] / a['peak_mb']:.2f}x | "
              f"{da:.0f} / {db:.0f} MB | {db / max(da, 1.0):.2f}x |")
        res["memory"][mode] = {"1e3": a, "1e4": b, "ratio": b["peak_mb"] / a["peak_mb"]}
    tp = throughput(args)
    res["throughput"] = tp
    print(f"\nthroughput over {tp['samples']} samples, {tp['heads']} heads: backbone alone "
          f"{tp['backbone_samples_s']:.0f} samples/s, probe {tp['probe_samples_s']:.0f} samples/s, "
          f"ratio {tp['ratio']:.2f}x")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
