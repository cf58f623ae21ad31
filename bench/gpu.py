"""The device check: one script, one process, the GPU figures of issue 15 in one table + JSON.

Sections (each measured in this run; targets printed beside):
  1. dVAE encoder (OpenAI's architecture, random weights) at 128 and 256 px through
     VisualTokenizer.encode, as a tokenizer actor runs it (bench/tokenizer_gpu.py measure()):
     frames/s at fp32, tf32 and bf16, the fraction of the device's dense bf16 peak, the share of
     code positions equal to fp32's, and whether repeated / re-batched encodes are identical.
     Target: bf16 >= 60% of peak at 128 px.
  2. The trainer's step (trainer.model + fused AdamW on CUDA + bf16 autocast + clipping, compiled
     where trainer.train._compile puts it) for `base` and `1b` at 4096 tokens per step, compile
     off and on: tokens/s and MFU = (6N + 12·L·d·T) · tokens/s / peak, the formula the trainer
     logs. Target: 1b with compile >= 50% MFU.
  3. The tokenize job on embedded Ray (pipeline.jobs.run_tokenize: one GPU tokenizer actor, the
     machine's other cores decoding generated 480p clips) against the same tokenizer alone on the
     same decoded frames: job tokens/s ÷ tokenizer-only tokens/s. Target: >= 0.85.
  4. The mix loader (trainer.data.MixLoader over generated token shards) feeding a 100-step
     `base` run through trainer.train.train: the step time lost to data = 1 - (steps fed from
     batches already in memory) / (steps fed by the loader), and the host time spent inside the
     loader per step (the trainer's `data_wait_s`). Target: <= 1%.

    python bench/gpu.py --json gpu.json                 # on one H100/H200: about 6-8 minutes
    python bench/gpu.py --device cpu --json cpu.json    # smoke run: small sizes, end to end on CPU

`--device cpu` swaps in small sizes (a narrower encoder, the `tiny` model, a few short clips, the
demo tokenizer) so that every code path runs; its numbers say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from tokenizer_gpu import measure  # noqa: E402  bench/tokenizer_gpu.py: section 1
from train import matmul_peak  # noqa: E402  bench/train.py

from trainer.model import PRESETS, Transformer, flops_per_token, param_groups  # noqa: E402
from trainer.train import _compile, _Dist, peak_flops_for  # noqa: E402

TARGETS = {"tokenizer_peak_fraction_128": 0.60, "mfu_1b_compiled": 0.50, "job_over_tokenizer": 0.85,
           "data_wait_fraction": 0.01}

# Sizes per device: the GPU sizes are the issue's; the CPU ones only make every path run.
PROFILES = {
    "cuda": dict(enc_n_hid=256, enc_res=[128, 256], enc_frames=1024, enc_batch=256, enc_agree=256, enc_reps=3,
                 presets=["base", "1b"], seq=4096, vocab=8196, train_steps=10, job_clips=24, job_frames=150, job_size=(480, 640), job_res=128,
                 job_tokenizer="dalle-random", job_batch=256, loader_preset="base", loader_steps=100,
                 loader_batch=8, loader_seq=4096, loader_dtype="bf16"),
    # CPU bf16 is emulated on most CPUs (~0.4 GFLOP/s on the 2-core development machine): tiny.
    "cpu": dict(enc_n_hid=16, enc_res=[32], enc_frames=16, enc_batch=8, enc_agree=16, enc_reps=1,
                presets=["tiny"], seq=32, vocab=516, train_steps=1, job_clips=2, job_frames=6, job_size=(72, 96), job_res=64, job_tokenizer="demo", job_batch=16,
                loader_preset="tiny", loader_steps=10, loader_batch=2, loader_seq=256, loader_dtype="fp32"),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, reps: int, device: torch.device) -> float:
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def bf16_peak(device: torch.device, override: float | None) -> tuple[float, str]:
    """Dense bf16 peak FLOP/s: --peak-flops, the datasheet for known GPUs, else a matmul measured now."""
    p = peak_flops_for(device, override)
    if p is not None:
        src = "--peak-flops" if override else f"datasheet ({torch.cuda.get_device_name(device)})"
        return p, src
    n = 2048 if device.type == "cuda" else 512  # CPU bf16 GEMMs can be slow without AMX: keep it short
    return matmul_peak(device, torch.bfloat16, n=n, reps=3), f"bf16 {n}^3 matmul measured in this run"


def section_tokenizer(device: torch.device, prof: dict, peak: float) -> dict:
    """Section 1: bench/tokenizer_gpu.py's measure(), through VisualTokenizer.encode as a tokenizer
    actor calls it (pinned staging, overlapped copies, fixed-shape forwards, fp32 argmax)."""
    return measure(device, tuple(prof["enc_res"]), ("bf16", "tf32"), frames=prof["enc_frames"],
                   batch=prof["enc_batch"], agree_frames=prof["enc_agree"], reps=prof["enc_reps"],
                   n_hid=prof["enc_n_hid"], peak=peak / 1e12)


def _train_step(model, raw, opt, x, y, device):
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logits = model(x)  # (B, T, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def section_trainer(device: torch.device, prof: dict, peak: float, compile_modes: list[bool],
                    backend: str) -> list[dict]:
    rows = []
    for preset in prof["presets"]:
        cfg = dataclasses.replace(PRESETS[preset], vocab_size=prof["vocab"], max_seq_len=prof["seq"])
        for comp in compile_modes:
            torch.manual_seed(0)
            raw = Transformer(cfg).to(device)
            model = _compile(raw, _Dist(), False, device, backend=backend) if comp else raw
            opt = torch.optim.AdamW(param_groups(raw, 3e-4, 0.1), lr=3e-4, betas=(0.9, 0.95),
                                    **({"fused": True} if device.type == "cuda" else {}))
            seq = torch.randint(0, cfg.vocab_size, (1, prof["seq"] + 1), device=device)
            x, y = seq[:, :-1], seq[:, 1:]
            t0 = time.perf_counter()
            for _ in range(2):  # warm-up: compilation, allocator, optimizer state
                _train_step(model, raw, opt, x, y, device)
            _sync(device)
            warm = time.perf_counter() - t0
            t = _best_time(functools.partial(_train_step, model, raw, opt, x, y, device), prof["train_steps"], device)
            fpt = flops_per_token(cfg, prof["seq"], raw.num_params(include_embedding=False))
            tps = prof["seq"] / t
            rows.append({"preset": preset, "compile": comp, "tokens_per_step": prof["seq"], "step_s": t,
                         "tokens_per_s": tps, "flops_per_token": fpt, "mfu": fpt * tps / peak,
                         "warmup_s": warm, "params": raw.num_params(),
                         "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9
                         if device.type == "cuda" else None})
            del model, raw, opt
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            torch._dynamo.reset()
    return rows


def _job_tokenizer(kind: str, tmp: str, res: int) -> str:
    """A tokenizer spec for the job: the bundled demo, or OpenAI's dVAE architecture with random
    weights converted exactly as real weights are (dall_e.Encoder -> pipeline.tokenizers.convert)."""
    if kind == "demo":
        return "demo"
    import dall_e

    from pipeline.tokenizers.convert import convert_dalle

    torch.manual_seed(0)
    pkl = os.path.join(tmp, "encoder.pkl")
    torch.save(dall_e.Encoder().eval(), pkl)
    convert_dalle(pkl, os.path.join(tmp, "tok"), resolution=res)
    return f"dalle:{os.path.join(tmp, 'tok')}"


def section_job(device: torch.device, prof: dict, tmp: str) -> dict:
    from tokenize_job import decode_only, make_videos  # bench/tokenize_job.py

    from pipeline.jobs import TokenizeConfig, run_tokenize
    from pipeline.sources import list_items
    from pipeline.tokenizers import load_tokenizer

    data = os.path.join(tmp, "clips")
    make_videos(data, prof["job_clips"], prof["job_frames"], prof["job_size"])
    spec = _job_tokenizer(prof["job_tokenizer"], tmp, prof["job_res"])
    cpus = os.cpu_count() or 2
    gpus = 1 if device.type == "cuda" else 0
    cfg = TokenizeConfig(dataset="folder", input=data, output=os.path.join(tmp, "tokens"), tokenizer=spec,
                         resolution=prof["job_res"], items_per_shard=2, num_cpus=cpus, num_gpus=gpus,
                         decode_concurrency=max(1, cpus - 1), decode_threads=1, batch_size=prof["job_batch"],
                         progress=False)
    import ray

    own_ray = not ray.is_initialized()  # a caller's Ray (tests share one) is left running
    t0 = time.perf_counter()
    summary = run_tokenize(cfg)
    job_wall = time.perf_counter() - t0
    if own_ray:
        ray.shutdown()
    # The tokenizer alone on the same frames (decoded here, untimed), same device and batch.
    items, _ = list_items("folder", data, chunk_seconds=cfg.decode_config().chunk_seconds)
    _, _, chunks = decode_only(items, cfg.decode_config(), max(1, min(4, cpus - 1)))
    frames = np.concatenate(chunks, 0)
    tok = load_tokenizer(spec)
    if device.type == "cuda":
        tok = tok.to(device)
    else:
        torch.set_num_threads(max(1, int(round(cfg.tokenizer_cpus))))  # what the job's CPU actor gets
    bs = prof["job_batch"]

    def encode_all() -> None:
        for i in range(0, len(frames), bs):
            tok.encode(frames[i : i + bs], batch_size=bs)

    encode_all()  # warm-up
    t = _best_time(encode_all, 2, device)
    torch.set_num_threads(os.cpu_count() or 1)
    tpf = (prof["job_res"] // tok.downsample) ** 2
    tok_tps = len(frames) * tpf / t
    job_tps = float(summary["steady_tokens_per_s"] or summary["tokens_per_s"])
    return {"clips": prof["job_clips"], "source_size": list(prof["job_size"]), "resolution": prof["job_res"],
            "tokenizer": spec if spec == "demo" else "dalle (OpenAI architecture, random weights)",
            "frames": int(summary["counts"]["frames"]), "tokenizer_frames": int(len(frames)),
            "job_tokens_per_s": job_tps, "job_tokens_per_s_incl_start": float(summary["tokens_per_s"]),
            "tokenizer_only_tokens_per_s": tok_tps, "ratio": job_tps / tok_tps, "job_wall_s": job_wall,
            "num_gpus": gpus, "decode_actors": cfg.decode_concurrency}


class _Replay:
    """A LoaderLike serving batches already in memory (the no-data-cost baseline of section 4)."""

    def __init__(self, batches: list[dict], like) -> None:
        self.batches, self.seq_len, self.vocab_size = batches, like.seq_len, like.vocab_size
        self.specials = dict(getattr(like, "specials", {}) or {})
        self.consumed = 0

    def state_dict(self) -> dict:
        return {"version": 1, "mix_hash": "replay", "consumed_samples": self.consumed}

    def load_state_dict(self, sd: dict) -> None:
        self.consumed = int(sd["consumed_samples"])

    def __iter__(self):
        k = 0
        while True:
            b = self.batches[k % len(self.batches)]
            self.consumed += b["inputs"].shape[0]
            k += 1
            yield b


def section_loader(device: torch.device, prof: dict, tmp: str, compile_on: bool) -> dict:
    from loader import write_dataset  # bench/loader.py: random-token shards, 16x16 grid

    from pipeline.mix import MixConfig, build_mix
    from trainer.config import load_config
    from trainer.data import MixLoader
    from trainer.train import train

    d = os.path.join(tmp, "mix")
    seq = prof["loader_seq"]
    frames = seq // 256  # 16x16 tokens per frame
    write_dataset(f"{d}/video", dataset="k600", items=[300] * 40, chunk=64, rows_per_shard=32, seed=0)
    write_dataset(f"{d}/image", dataset="imagenet", items=[1] * 2000, chunk=1, rows_per_shard=1000, seed=1)
    build_mix(MixConfig(ratios={"video": "0.8", "image": "0.2"}, inputs={"video": f"{d}/video", "image": f"{d}/image"},
                        frames=frames, stride=4, images_per_seq=frames, seq_len=seq), f"{d}/mix.json", progress=False)
    gb, steps = prof["loader_batch"], prof["loader_steps"]
    overrides = ["progress=false", "tensorboard=false", f"max_steps={steps}", f"global_batch={gb}",
                 f"micro_batch={gb}", "ckpt_every=0", "val_every=0", "warmup_steps=1", f"dtype={prof['loader_dtype']}",
                 f"compile={'true' if compile_on else 'false'}", f"device={device.type}", "log_every=1"]
    cfg = load_config(prof["loader_preset"], overrides)
    real = MixLoader(f"{d}/mix.json", global_batch=gb)
    it = iter(real)
    cached = [next(it) for _ in range(min(steps, 100))]

    def run(name: str, factory) -> list[dict]:
        out = os.path.join(tmp, f"run-{name}")
        train(cfg, f"{d}/mix.json", out, loader_factory=factory)
        torch._dynamo.reset()
        return [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]

    def replay_factory(data, *, global_batch, rank, world, split, num_workers=0):
        return _Replay(cached, real)

    skip = max(1, steps // 10)  # first steps: compilation, allocator, page cache
    recs = {}
    for name, factory in (("replay", replay_factory), ("loader", None)):
        recs[name] = run(name, factory)[skip:]
    # Medians over the steps after warm-up (the second run also finds compiled kernels cached).
    t_loader = float(np.median([r["step_time_s"] for r in recs["loader"]]))
    t_replay = float(np.median([r["step_time_s"] for r in recs["replay"]]))
    wait = float(np.mean([r["data_wait_s"] for r in recs["loader"]]))
    return {"preset": prof["loader_preset"], "steps": steps, "global_batch": gb, "seq_len": seq,
            "compile": compile_on, "step_s_loader": t_loader, "step_s_replay": t_replay,
            "data_wait_fraction": max(0.0, 1.0 - t_replay / t_loader), "loader_host_s_per_step": wait,
            "loader_host_fraction": wait / t_loader,
            "tokens_per_s": gb * seq / t_loader}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--sections", default="1,2,3,4", help="comma-separated subset of 1,2,3,4")
    ap.add_argument("--compile", default="off,on", help="trainer step variants: off, on or off,on")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: no C++ build)")
    ap.add_argument("--peak-flops", type=float, default=None, help="dense bf16 peak of the device, FLOP/s")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is visible; use --device cpu for the smoke run")
    if device.type == "cuda":
        # Fixed algorithms: the figures are for what the job and the trainer run (no autotuning).
        torch.backends.cudnn.benchmark = False
    sections = {int(s) for s in args.sections.split(",") if s}
    compile_modes = [{"off": False, "on": True}[m] for m in args.compile.split(",")]
    prof = PROFILES[device.type]
    peak, peak_src = bf16_peak(device, args.peak_flops)
    res: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "cpus": os.cpu_count(), "peak_flops_bf16": peak,
                 "peak_source": peak_src, "targets": TARGETS, "profile": device.type}
    tmp = tempfile.mkdtemp(prefix="toto-bench-gpu-")
    t_all = time.perf_counter()
    try:
        for s, name, fn in (
            (1, "tokenizer", lambda: section_tokenizer(device, prof, peak)),
            (2, "trainer", lambda: section_trainer(device, prof, peak, compile_modes, args.compile_backend)),
            (3, "job", lambda: section_job(device, prof, tmp)),
            (4, "loader", lambda: section_loader(device, prof, tmp, device.type == "cuda")),
        ):
            if s in sections:
                t0 = time.perf_counter()
                res[name] = fn()
                res.setdefault("section_s", {})[name] = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["total_s"] = time.perf_counter() - t_all
    print_table(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return res


def print_table(res: dict) -> None:
    def ok(v, target, ge=True) -> str:
        return "met" if (v >= target if ge else v <= target) else "missed"

    print(f"device: {res['device']}  torch {res['torch']}  bf16 peak {res['peak_flops_bf16'] / 1e12:.1f} TFLOP/s "
          f"({res['peak_source']})")
    print("| section | measurement | value | target |\n|---|---|---|---|")
    tok = res.get("tokenizer", {})
    for r in tok.get("rows", []):
        tgt = ""
        if r["precision"] == "bf16" and r["resolution"] == 128:
            tgt = f">= {TARGETS['tokenizer_peak_fraction_128']:.0%} of peak: {ok(r['fraction_of_bf16_peak'], TARGETS['tokenizer_peak_fraction_128'])}"
        print(f"| 1 dVAE encoder | {r['resolution']} px {r['precision']}, batch {tok['batch']} | "
              f"{r['frames_per_s']:,.1f} frames/s, {r['fraction_of_bf16_peak']:.1%} of bf16 peak, "
              f"codes = fp32 on {r['agreement_with_fp32']:.2%}, deterministic {r['deterministic']} | {tgt} |")
    for r in tok.get("skipped", []):
        print(f"| 1 dVAE encoder | {r['resolution']} px {r['precision']} | skipped: {r['why']} | |")
    for r in res.get("trainer", []):
        tgt = ""
        if r["preset"] == "1b" and r["compile"]:
            tgt = f">= {TARGETS['mfu_1b_compiled']:.0%}: {ok(r['mfu'], TARGETS['mfu_1b_compiled'])}"
        print(f"| 2 trainer step | {r['preset']}, {r['tokens_per_step']} tokens, bf16, compile "
              f"{'on' if r['compile'] else 'off'} | {r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.1%} | {tgt} |")
    if "job" in res:
        j = res["job"]
        print(f"| 3 tokenize job | {j['clips']} clips {j['source_size'][0]}p -> {j['resolution']} px, "
              f"{j['num_gpus']} GPU actor, {j['decode_actors']} decode actors | job {j['job_tokens_per_s']:,.0f} / "
              f"tokenizer alone {j['tokenizer_only_tokens_per_s']:,.0f} tokens/s = {j['ratio']:.2f} | "
              f">= {TARGETS['job_over_tokenizer']}: {ok(j['ratio'], TARGETS['job_over_tokenizer'])} |")
    if "loader" in res:
        lo = res["loader"]
        print(f"| 4 loader | {lo['steps']} steps {lo['preset']}, {lo['global_batch']}x{lo['seq_len']} tokens | "
              f"data wait {lo['data_wait_fraction']:.2%} of step time (loader host time "
              f"{lo['loader_host_fraction']:.2%}) | <= {TARGETS['data_wait_fraction']:.0%}: "
              f"{ok(lo['data_wait_fraction'], TARGETS['data_wait_fraction'], ge=False)} |")
    print(f"total {res['total_s']:.0f} s")


if __name__ == "__main__":
    main()
