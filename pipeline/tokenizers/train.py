"""`toto-pipeline train-tokenizer`: train our own DALL·E-family dVAE with the Gumbel-softmax relaxation.

As in the DALL·E paper (Ramesh et al. 2021, sec. 2.1 and appendix A): the encoder's logits are
relaxed with Gumbel-softmax at a temperature annealed from 1 toward 1/16, the decoder models pixels
with the logit-Laplace distribution, and the KL to a uniform prior over the codebook enters the
ELB with a weight β ramped up from 0. Frames come through the pipeline's decode layer (images and
videos alike), so whatever `tokenize` reads, this trains on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass

import click
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.tokenizers.base import WEIGHTS_FILE, make_config, save_tokenizer, state_dict_of
from pipeline.tokenizers.dalle import (
    DVAEArch,
    DVAEDecoder,
    DVAEEncoder,
    decoder_mean,
    logit_laplace_nll,
    map_pixels,
)

CKPT_FILE = "train-state.pt"


@dataclass
class TrainConfig:
    data: str
    out: str
    dataset: str = "folder"
    codebook: int = 8192
    width: int = 64
    blocks: int = 1
    n_init: int = 128
    resolution: int = 128
    steps: int = 2000
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    tau_start: float = 1.0
    tau_end: float = 1.0 / 16
    anneal_frac: float = 0.8
    kl_weight: float = 6.6
    kl_ramp_frac: float = 0.2
    recon_loss: str = "logit-laplace"
    usage_weight: float = 0.0
    frame_stride: int = 4
    max_frames: int = 20000
    val_fraction: float = 0.05
    seed: int = 0
    threads: int = 0
    ckpt_every: int = 200
    name: str = "dvae"
    weights_name: str = "model"

    def __post_init__(self) -> None:
        def bad(field: str, fix: str) -> None:
            raise ValueError(f"TrainConfig.{field}={getattr(self, field)!r} is invalid: {fix}")

        if not 2 <= self.codebook <= 65536:
            bad("codebook", "use 2..65536 codes (tokens are uint16)")
        if self.width < 4 or self.width % 4:
            bad("width", "use a positive multiple of 4, e.g. 64")
        if self.resolution % 8 or self.resolution < 8:
            bad("resolution", "use a multiple of 8 (the dVAE downsamples by 8), e.g. 64 or 128")
        for f in ("steps", "batch", "blocks", "n_init", "frame_stride", "max_frames", "ckpt_every"):
            if getattr(self, f) < 1:
                bad(f, "use a positive integer")
        if self.warmup < 0:
            bad("warmup", "use >= 0")
        if not 0 < self.tau_end <= self.tau_start:
            bad("tau_end", f"use 0 < tau_end <= tau_start ({self.tau_start})")
        if not 0 < self.anneal_frac <= 1 or not 0 <= self.kl_ramp_frac <= 1:
            bad("anneal_frac", "anneal_frac in (0, 1] and kl_ramp_frac in [0, 1]")
        if not 0 < self.val_fraction < 1:
            bad("val_fraction", "use a fraction in (0, 1), e.g. 0.05")
        if self.recon_loss not in ("logit-laplace", "mse"):
            bad("recon_loss", "use 'logit-laplace' (DALL·E) or 'mse'")
        if self.usage_weight < 0:
            bad("usage_weight", "use >= 0")
        if self.lr <= 0 or self.kl_weight < 0:
            bad("lr", "lr must be > 0 and kl_weight >= 0")
        if not self.weights_name.replace("-", "").replace("_", "").isalnum():
            bad("weights_name", "use letters, digits, - and _")

    def arch(self) -> DVAEArch:
        return DVAEArch(vocab_size=self.codebook, n_hid=self.width, n_blk_per_group=self.blocks, n_init=self.n_init)

    def model_fields(self) -> dict:
        """Fields that must match for a checkpoint to be resumed. `steps` may change on resume
        (to extend or shorten a run); the schedules then follow the new length from that step on."""
        d = asdict(self)
        for k in ("out", "threads", "ckpt_every", "name", "weights_name", "steps"):
            d.pop(k)
        return d


def temperature(step: int, cfg: TrainConfig) -> float:
    """Cosine anneal from tau_start to tau_end over the first anneal_frac of the steps, then flat."""
    t = min(1.0, step / max(1, cfg.anneal_frac * cfg.steps))
    return cfg.tau_end + 0.5 * (cfg.tau_start - cfg.tau_end) * (1 + math.cos(math.pi * t))


def kl_weight(step: int, cfg: TrainConfig) -> float:
    """β ramped linearly from 0 over the first kl_ramp_frac of the steps."""
    ramp = cfg.kl_ramp_frac * cfg.steps
    return cfg.kl_weight if ramp <= 0 else cfg.kl_weight * min(1.0, step / ramp)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def list_training_items(cfg: TrainConfig) -> list[dict]:
    from pipeline.sources import list_items, load_worklist
    from pipeline.sources.worklist import WORKLIST_JSON

    if os.path.isfile(os.path.join(cfg.data, WORKLIST_JSON)):
        return list(load_worklist(cfg.data).items)
    items, _ = list_items(cfg.dataset, cfg.data)
    if not items:
        raise ValueError(f"{cfg.data} lists no images or videos as dataset {cfg.dataset!r}; check --data/--dataset")
    return items


def _is_val(key: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return h / 2**64 < fraction


def load_frames(cfg: TrainConfig, progress: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """Decode frames (every frame_stride-th video frame, every image) → (train, val) uint8 (N, R, R, 3).

    Items go to the held-out set by a hash of their key, so the split does not depend on order."""
    from tqdm import tqdm

    from pipeline.decode import DecodeConfig, decode_items

    items = list_training_items(cfg)
    dcfg = DecodeConfig(resolution=cfg.resolution)
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    errors = 0
    n_train = 0
    bar = tqdm(total=len(items), desc="decode", unit="item", file=sys.stderr, disable=not progress)
    seen_items: set[str] = set()
    for rec in decode_items(items, dcfg):
        if rec.get("type") == "error":
            errors += 1
            bar.update(1)
            continue
        frames = rec["frames"][:: cfg.frame_stride] if rec["num_frames"] > 1 else rec["frames"]
        if _is_val(rec["uri"], cfg.val_fraction):
            val.append(frames)
        elif n_train < cfg.max_frames:
            train.append(frames[: cfg.max_frames - n_train])
            n_train += len(train[-1])
        if rec["uri"] not in seen_items:
            seen_items.add(rec["uri"])
            bar.update(1)
    bar.close()
    if not train or not val:
        raise ValueError(f"{cfg.data}: decoding gave {len(train)} train and {len(val)} held-out frame groups "
                         f"({errors} inputs failed); need both — add data or raise --val-fraction")
    tr, va = np.concatenate(train), np.concatenate(val)
    return tr, va, {"items": len(items), "errors": errors, "train_frames": len(tr), "val_frames": len(va)}


# ---------------------------------------------------------------------------------------------
# Model step and evaluation
# ---------------------------------------------------------------------------------------------
def _to_input(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(frames).permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W) in [0, 1]
    return map_pixels(x).contiguous(memory_format=torch.channels_last)


def train_loss(enc: DVAEEncoder, dec: DVAEDecoder, x: torch.Tensor, tau: float, beta: float,
               generator: torch.Generator, recon_loss: str = "logit-laplace",
               usage_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Negative ELB per pixel channel: reconstruction NLL + β · KL(q ‖ uniform) · (tokens / pixel channels).

    recon_loss "logit-laplace" is DALL·E's; "mse" (on the decoded mean) trains faster in short runs.
    usage_weight > 0 adds (log V − H(mean posterior over the batch)): it penalises a batch that
    puts its mass on few codes, which short runs otherwise do (codebook collapse)."""
    logits = enc(x)  # (B, V, h, w)
    # Gumbel-softmax with an explicit generator so training is reproducible and resumable.
    u = torch.rand(logits.shape, generator=generator).clamp_(1e-10, 1 - 1e-10)
    g = -torch.log(-torch.log(u))
    z = F.softmax((logits + g) / tau, dim=1)  # (B, V, h, w) relaxed one-hot
    stats = dec(z)  # (B, 6, H, W)
    mean = decoder_mean(stats)  # (B, 3, H, W) in [0, 1]
    target = (x - 0.1) / 0.8
    nll = logit_laplace_nll(stats, x) if recon_loss == "logit-laplace" else F.mse_loss(mean, target)
    logq = F.log_softmax(logits, dim=1)
    v = logits.shape[1]
    q = logq.exp()
    kl = (q * (logq + math.log(v))).sum(1).mean()  # nats per token
    tokens_per_channel = logits.shape[2] * logits.shape[3] / (x.shape[1] * x.shape[2] * x.shape[3])
    loss = nll + beta * kl * tokens_per_channel
    avg = q.mean(dim=(0, 2, 3))  # (V,) batch-average posterior
    usage_deficit = math.log(v) + (avg * torch.log(avg.clamp_min(1e-12))).sum()
    if usage_weight:
        loss = loss + usage_weight * usage_deficit
    with torch.no_grad():
        mse = F.mse_loss(mean, target)
    return loss, {"nll": float(nll.detach()), "kl": float(kl.detach()), "usage_deficit": float(usage_deficit.detach()),
                  "psnr": float(-10 * torch.log10(mse.clamp_min(1e-10)))}


@torch.inference_mode()
def evaluate(enc: DVAEEncoder, dec: DVAEDecoder, frames: np.ndarray, vocab: int, batch: int = 64) -> dict:
    """Hard codes (argmax) → decoder → PSNR against the frames; codebook usage and unigram entropy."""
    enc.eval()
    dec.eval()
    se, n_px = 0.0, 0
    counts = np.zeros(vocab, dtype=np.int64)
    recon = []
    for i in range(0, len(frames), batch):
        fb = frames[i: i + batch]
        codes = enc(_to_input(fb)).argmax(1)  # (b, h, w)
        counts += np.bincount(codes.flatten().numpy(), minlength=vocab)
        img = (decoder_mean(dec.from_codes(codes)) * 255).round().permute(0, 2, 3, 1).numpy()  # (b, H, W, 3)
        se += float(((img - fb.astype(np.float64)) ** 2).sum())
        n_px += fb.size
        if len(recon) < 1:
            recon.append(img.astype(np.uint8))
    enc.train()
    dec.train()
    mse = se / max(1, n_px)
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * np.log2(p)).sum())
    return {"psnr": float(10 * math.log10(255.0**2 / max(mse, 1e-10))), "codebook_usage": float((counts > 0).mean()),
            "codes_used": int((counts > 0).sum()), "unigram_entropy_bits": entropy,
            "unigram_entropy_max_bits": float(math.log2(vocab)), "frames": int(len(frames))}


def reconstruction_png(enc: DVAEEncoder, dec: DVAEDecoder, frames: np.ndarray, path: str, n: int = 8) -> None:
    """Top row: held-out frames; bottom row: their reconstructions from the argmax codes."""
    from PIL import Image

    with torch.inference_mode():
        codes = enc.eval()(_to_input(frames[:n])).argmax(1)
        rec = (decoder_mean(dec.eval().from_codes(codes)) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    enc.train()
    dec.train()
    top = np.concatenate(list(frames[:n]), axis=1)
    bottom = np.concatenate(list(rec), axis=1)
    grid = np.concatenate([top, bottom], axis=0)
    scale = max(1, 256 // frames.shape[1])
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


# ---------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------
def _save_state(path: str, step: int, enc, dec, opt, gen: torch.Generator, cfg: TrainConfig) -> None:
    state = {"step": step, "encoder": enc.state_dict(), "decoder": dec.state_dict(), "optimizer": opt.state_dict(),
             "generator": gen.get_state(), "config": json.dumps(cfg.model_fields(), sort_keys=True)}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_tokenizer(cfg: TrainConfig, *, progress: bool = True, command: str | None = None,
                    exit_after_steps: int | None = None) -> dict | None:
    """Train (or resume) and write the tokenizer folder; returns the final config (with metrics).

    exit_after_steps: stop (after checkpointing) once this many steps ran in this call and return
    None — for time-limited jobs; the next call resumes."""
    from tqdm import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.out, exist_ok=True)
    t0 = time.time()
    train, val, data_info = load_frames(cfg, progress)
    t_decode = time.time() - t0
    torch.manual_seed(cfg.seed)
    arch = cfg.arch()
    enc = DVAEEncoder(arch).to(memory_format=torch.channels_last)
    dec = DVAEDecoder(arch).to(memory_format=torch.channels_last)
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = 0
    ckpt = os.path.join(cfg.out, CKPT_FILE)
    if os.path.isfile(ckpt):
        st = torch.load(ckpt, map_location="cpu", weights_only=True)
        saved = json.loads(st["config"])
        saved.pop("steps", None)
        if saved != cfg.model_fields():
            raise ValueError(f"{ckpt} was made with other settings ({st['config']}); use another --out or the "
                             "same options to resume")
        enc.load_state_dict(st["encoder"])
        dec.load_state_dict(st["decoder"])
        opt.load_state_dict(st["optimizer"])
        gen.set_state(st["generator"])
        start = int(st["step"])
        if start > cfg.steps:
            raise ValueError(f"{ckpt} is at step {start}, past --steps {cfg.steps}; raise --steps or use another --out")
    n = len(train)
    rng_seed = cfg.seed
    bar = tqdm(total=cfg.steps, initial=start, desc="train-tokenizer", unit="step", file=sys.stderr,
               disable=not progress)
    t_train = time.time()
    stats: dict = {}
    for step in range(start, cfg.steps):
        # Batch = a slice of a per-epoch permutation: a pure function of (seed, step), so resuming
        # picks up exactly where an uninterrupted run would be.
        epoch, pos = divmod(step * cfg.batch, n)
        perm = np.random.default_rng([rng_seed, epoch]).permutation(n)
        idx = perm[pos: pos + cfg.batch]
        if len(idx) < cfg.batch:
            idx = np.concatenate([idx, np.random.default_rng([rng_seed, epoch + 1]).permutation(n)[: cfg.batch - len(idx)]])
        x = _to_input(train[np.sort(idx)])
        for gr in opt.param_groups:
            gr["lr"] = learning_rate(step, cfg)
        tau, beta = temperature(step, cfg), kl_weight(step, cfg)
        loss, stats = train_loss(enc, dec, x, tau, beta, gen, cfg.recon_loss, cfg.usage_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(nll=f"{stats['nll']:.3f}", kl=f"{stats['kl']:.2f}", use=f"{stats['usage_deficit']:.2f}", psnr=f"{stats['psnr']:.1f}",
                            tau=f"{tau:.3f}")
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps:
            _save_state(ckpt, step + 1, enc, dec, opt, gen, cfg)
        if exit_after_steps is not None and step + 1 - start >= exit_after_steps and step + 1 < cfg.steps:
            _save_state(ckpt, step + 1, enc, dec, opt, gen, cfg)
            bar.close()
            return None
    bar.close()
    steps_run = cfg.steps - start
    train_s = time.time() - t_train
    _save_state(ckpt, cfg.steps, enc, dec, opt, gen, cfg)
    metrics = evaluate(enc, dec, val, arch.vocab_size)
    train_usage = evaluate(enc, dec, train[: min(len(train), 2000)], arch.vocab_size)
    png = os.path.join(cfg.out, "reconstructions.png")
    reconstruction_png(enc, dec, val, png)
    source = {
        "trained_with": "toto-pipeline train-tokenizer",
        "steps": cfg.steps,
        "resumed_from_step": start,
        "command": command or "",
        "settings": cfg.model_fields(),
        "data": data_info,
        "heldout": metrics,
        "train_sample_codebook_usage": train_usage["codebook_usage"],
        "train_steps_per_s": steps_run / train_s if steps_run else None,
        "train_seconds": train_s,
        "decode_seconds": t_decode,
    }
    config = make_config("dvae", cfg.name, arch, resolution=cfg.resolution, has_decoder=True, source=source,
                         weights=f"{cfg.weights_name}.safetensors" if cfg.weights_name != "model" else WEIGHTS_FILE)
    return save_tokenizer(cfg.out, config, state_dict_of(enc, dec, "dvae"))


@click.command("train-tokenizer")
@click.option("--data", required=True, help="Dataset folder (listed with --dataset) or a frozen work-list folder.")
@click.option("--dataset", default="folder", show_default=True,
              help="Adapter that lists --data (folder, imagenet, kinetics600, ...).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: config.json + model.safetensors, reconstructions.png, train-state.pt (resume).")
@click.option("--codebook", default=8192, show_default=True, help="Number of codes.")
@click.option("--width", default=64, show_default=True, help="n_hid: base width (OpenAI's dVAE: 256).")
@click.option("--blocks", default=1, show_default=True, help="Residual blocks per group (OpenAI's: 2).")
@click.option("--n-init", default=128, show_default=True, help="Decoder input width (OpenAI's: 128).")
@click.option("--resolution", default=128, show_default=True, help="Frame size (multiple of 8).")
@click.option("--steps", default=2000, show_default=True, help="Optimizer steps.")
@click.option("--batch", default=32, show_default=True, help="Frames per step.")
@click.option("--lr", default=1e-3, show_default=True, help="Peak AdamW learning rate (warmup, then cosine to 5%).")
@click.option("--warmup", default=100, show_default=True, help="Linear learning-rate warmup steps.")
@click.option("--kl-weight", default=6.6, show_default=True, help="Final β on the KL to the uniform prior (paper: 6.6).")
@click.option("--recon-loss", type=click.Choice(["logit-laplace", "mse"]), default="logit-laplace",
              show_default=True, help="logit-laplace (DALL·E) or mse on the decoded mean (faster in short runs).")
@click.option("--usage-weight", default=0.0, show_default=True,
              help="Weight of the batch codebook-usage entropy penalty (0: off, as in DALL·E).")
@click.option("--tau-end", default=1.0 / 16, show_default=True, help="Final Gumbel-softmax temperature.")
@click.option("--frame-stride", default=4, show_default=True, help="Keep every k-th decoded video frame.")
@click.option("--max-frames", default=20000, show_default=True, help="Most training frames held in memory.")
@click.option("--val-fraction", default=0.05, show_default=True, help="Share of inputs held out for the report.")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=0, show_default=True, help="torch threads (0: torch's default).")
@click.option("--ckpt-every", default=200, show_default=True, help="Steps between resumable checkpoints.")
@click.option("--name", default="dvae", show_default=True, help="Name in the tokenizer id.")
@click.option("--weights-name", default="model", show_default=True,
              help="Base name of the weights file (the bundled demo uses 'demo': demo.safetensors + demo.json).")
def train_tokenizer_cmd(**kw: object) -> None:
    """Train a Gumbel-softmax dVAE (DALL·E family) on frames read through the decode layer.

    Resumes from OUT/train-state.pt when it exists (same options required). Ends with a report of
    held-out PSNR, codebook usage and unigram entropy, and writes OUT/reconstructions.png.

    \b
    Example (the bundled demo tokenizer, ~5 min on 2 cores):
      toto-pipeline demo-data --out demo/data
      toto-pipeline train-tokenizer --data demo/data --out tok/demo --resolution 64 \\
          --codebook 512 --width 32 --n-init 64 --steps 1500 --batch 32
      then: --tokenizer dvae:tok/demo
    """
    try:
        cfg = TrainConfig(**{k.replace("-", "_"): v for k, v in kw.items()})  # type: ignore[arg-type]
        command = "toto-pipeline train-tokenizer " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        result = train_tokenizer(cfg, command=command)
        assert result is not None
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    m = result["source"]["heldout"]
    click.echo(
        f"held-out PSNR {m['psnr']:.2f} dB on {m['frames']} frames; codebook usage {m['codebook_usage']:.1%} "
        f"({m['codes_used']}/{result['vocab_size']}); unigram entropy {m['unigram_entropy_bits']:.2f} of "
        f"{m['unigram_entropy_max_bits']:.2f} bits; {result['source']['train_steps_per_s']:.2f} steps/s",
        file=sys.stderr,
    )
    click.echo(f"dvae:{cfg.out}")
