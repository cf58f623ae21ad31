"""`toto-train generate`: continue a video frame by frame with a trained model.

The prompt (a video file, or a directory of images taken as consecutive frames) goes through the
pipeline's decode layer at the tokenizer's resolution, is subsampled with the mix's temporal
stride, tokenized with `pipeline.tokenizers.load_tokenizer(...).encode`, and laid out as in
training: `[bos_video, frame 0 tokens, frame 1 tokens, ...]`. The model then samples the next
frames token by token with a KV cache (temperature / top-k, restricted to the codebook: special
tokens never occur inside a frame), the tokenizer's decoder turns all tokens back into pixels, and
the output shows the real frames (left) beside the prompt's reconstruction followed by the
generated continuation (right).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import numpy as np
import torch

from trainer.model import CausalLM

__all__ = ["sample_tokens", "continue_frames", "read_prompt_frames", "write_side_by_side", "generate"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@torch.no_grad()
def sample_tokens(
    model: CausalLM,
    prefix: torch.Tensor,
    n_new: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    allowed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Append `n_new` sampled tokens to `prefix` (B, T0) using a KV cache; returns (B, n_new).

    temperature 0 is greedy decoding. `allowed` restricts sampling to ids < allowed (the codebook).
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: use 0 (greedy) or a positive value such as 1.0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k}: use a positive number of candidates or None for all")
    B, T0 = prefix.shape
    total = T0 + n_new
    if total > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt ({T0} tokens) + {n_new} new tokens exceed the model's context of {model.cfg.max_seq_len}; "
            "use fewer prompt or generated frames"
        )
    device = prefix.device
    dtype = next(model.parameters()).dtype
    cache = model.new_cache(B, total, device, dtype)  # KV cache (llama, gpt2) or recurrent state (mamba)
    logits = model(prefix, cache=cache)[:, -1]  # (B, V)
    out = torch.empty(B, n_new, dtype=torch.long, device=device)
    for i in range(n_new):
        logits = logits.float()
        if allowed is not None:
            logits[:, allowed:] = float("-inf")
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        out[:, i] = nxt
        if i + 1 < n_new:
            logits = model(nxt[:, None], cache=cache)[:, -1]
    return out


def continue_frames(
    model: CausalLM,
    meta: dict,
    tokenizer,
    frames: np.ndarray,
    num_new: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> dict:
    """Tokenize `frames` (uint8 (P, H, W, 3)), generate `num_new` frames; returns tokens and pixels.

    Result: {"prompt_tokens": (P, h, w), "new_tokens": (K, h, w), "prompt_recon": (P, H, W, 3),
    "generated": (K, H, W, 3)} (numpy).
    """
    specials = meta.get("specials") or {}
    if "bos_video" not in specials:
        raise ValueError("the checkpoint's meta has no 'bos_video' special token id; was it trained on a mix?")
    codebook = int(meta.get("codebook_size") or specials["bos_video"])
    if tokenizer.vocab_size != codebook:
        raise ValueError(
            f"tokenizer {tokenizer.id} has {tokenizer.vocab_size} codes but the model was trained on "
            f"{codebook}; pass the tokenizer the training data was made with"
        )
    toks = np.asarray(tokenizer.encode(frames))  # (P, h, w) uint16
    P, h, w = toks.shape
    grid = meta.get("grid")
    if grid and tuple(grid) != (h, w):
        raise ValueError(f"the prompt tokenizes to a {h}x{w} grid but the model was trained on {grid[0]}x{grid[1]}")
    device = next(model.parameters()).device
    prefix = torch.cat([
        torch.tensor([specials["bos_video"]], dtype=torch.long),
        torch.from_numpy(toks.astype(np.int64)).reshape(-1),
    ])[None].to(device)  # (1, 1 + P*h*w)
    gen = torch.Generator(device=device).manual_seed(seed)
    if model.cfg.input == "patches":  # patch -> dVAE (Table 3): the model reads pixels; codes are decoded to them
        from trainer.patches import PatchSampler

        model = PatchSampler(model, tokenizer, frames, toks)
    new = sample_tokens(model, prefix, num_new * h * w, temperature=temperature, top_k=top_k, allowed=codebook,
                        generator=gen)
    new_tokens = new.view(num_new, h, w).cpu().numpy().astype(np.uint16)
    if not hasattr(tokenizer, "decode"):
        raise ValueError(f"tokenizer {tokenizer.id} has no decoder; use one with a decoder to see pixels")
    recon = np.asarray(tokenizer.decode(np.concatenate([toks, new_tokens])))  # (P+K, H, W, 3)
    return {"prompt_tokens": toks, "new_tokens": new_tokens, "prompt_recon": recon[:P], "generated": recon[P:]}


def read_prompt_frames(path: str, resolution: int, max_frames: int, stride: int = 1,
                       storage_options: dict | None = None) -> np.ndarray:
    """Up to `max_frames` frames (uint8 (N, R, R, 3)) of a video, or of a directory of images in name order,
    taking every `stride`-th frame, through the pipeline's decode layer."""
    from pipeline.decode import DecodeConfig, iter_decode_item

    cfg = DecodeConfig(resolution=resolution)
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise ValueError(f"{path} has no images ({', '.join(IMAGE_EXTS)}); pass a video or a frames directory")
        items = [{"uri": str(f), "kind": "image", "dataset": "prompt", "split": "prompt", "video_id": f.stem,
                  "chunk": 0, "label": None} for f in files[::stride][:max_frames]]
        frames = [rec["frames"][0] for it in items for rec in iter_decode_item(it, cfg, storage_options)]
        return np.stack(frames)
    item = {"uri": str(path), "kind": "video", "dataset": "prompt", "split": "prompt", "video_id": p.stem,
            "chunk": 0, "label": None, "t_start": 0.0}
    out: list[np.ndarray] = []
    k = 0
    gen = iter_decode_item(item, cfg, storage_options)
    try:
        for rec in gen:
            for f in rec["frames"]:
                if k % stride == 0:
                    out.append(f)
                k += 1
                if len(out) >= max_frames:
                    break
            if len(out) >= max_frames:
                break
    finally:
        gen.close()  # stop decoding the rest of the video
    if not out:
        raise ValueError(f"{path}: no frames decoded")
    return np.stack(out)


def write_side_by_side(out: str | os.PathLike, real: np.ndarray, model_frames: np.ndarray, fps: float = 4.0,
                       num_prompt: int | None = None) -> Path:
    """Write [real | model] frame pairs as a GIF or MP4 (by extension). Missing real frames are black.

    The 2 px separator is white beside prompt frames and red beside generated ones, with a dark
    marker moving down it as a timeline (which also keeps GIF writers from merging equal frames).
    """
    out = Path(out)
    n, H, W, _ = model_frames.shape
    left = np.zeros_like(model_frames)
    m = min(n, len(real))
    left[:m] = real[:m]
    gap = np.full((n, H, 2, 3), 255, np.uint8)
    if num_prompt is not None:
        gap[num_prompt:, :, :, 1:] = 0  # red beside generated frames
    for i in range(n):
        gap[i, (i * H) // n] = 0
    pairs = np.concatenate([left, gap, model_frames], axis=2)  # (n, H, 2W+2, 3)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".gif":
        from PIL import Image

        imgs = [Image.fromarray(f) for f in pairs]
        imgs[0].save(out, save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
    elif out.suffix.lower() == ".mp4":
        import av

        # H.264 wants even sizes.
        h2, w2 = pairs.shape[1] + pairs.shape[1] % 2, pairs.shape[2] + pairs.shape[2] % 2
        with av.open(str(out), "w") as c:
            s = c.add_stream("libx264", rate=int(round(fps)))
            s.width, s.height, s.pix_fmt = w2, h2, "yuv420p"
            for f in pairs:
                buf = np.zeros((h2, w2, 3), np.uint8)
                buf[: f.shape[0], : f.shape[1]] = f
                for pkt in s.encode(av.VideoFrame.from_ndarray(buf, format="rgb24")):
                    c.mux(pkt)
            for pkt in s.encode():
                c.mux(pkt)
    else:
        raise ValueError(f"output {out} must end in .gif or .mp4")
    return out


def _load_tokenizer(meta: dict, spec: str | None, device: str):
    """The tokenizer named by `spec`, else the bundled demo one when it is the one the data was made with."""
    import warnings

    from pipeline.tokenizers import load_tokenizer

    tok_meta = meta.get("tokenizer") or {}
    tid = tok_meta.get("id", "") if isinstance(tok_meta, dict) else str(tok_meta)
    if spec:
        tok = load_tokenizer(spec, device)
        if tid and tok.id != tid:
            warnings.warn(f"tokenizer {tok.id} differs from the one the training data was made with ({tid})",
                          stacklevel=2)
        return tok
    tok = load_tokenizer("demo", device)
    if tok.id != tid:
        raise ValueError(
            f"the checkpoint was trained on tokens of {tid!r}; pass --tokenizer SPEC (dalle:DIR, vqgan:DIR, "
            "dvae:DIR or demo) to load that tokenizer"
        )
    return tok


def generate(
    ckpt: str,
    prompt: str,
    out: str,
    *,
    frames: int,
    prompt_frames: int | None = None,
    tokenizer_spec: str | None = None,
    tokenizer=None,
    temperature: float = 1.0,
    top_k: int | None = 100,
    stride: int | None = None,
    seed: int = 0,
    fps: float = 4.0,
    device: str = "cpu",
) -> dict:
    """Continue `prompt` by `frames` frames with checkpoint `ckpt`; write `out` (.gif/.mp4) + `out`.json."""
    from trainer.checkpoint import load_model

    if frames < 1:
        raise ValueError(f"--frames {frames}: generate at least one frame")
    model, meta = load_model(ckpt, device=device)
    if tokenizer is None:
        tokenizer = _load_tokenizer(meta, tokenizer_spec, device)
    grid = meta.get("grid")
    if not grid:
        raise ValueError("the checkpoint records no token grid (meta 'grid'); it was not trained from a mix manifest")
    hw = grid[0] * grid[1]
    resolution = grid[0] * int(tokenizer.downsample)
    # Context budget: 1 start token + (prompt + new) frames of hw tokens.
    fit = (model.cfg.max_seq_len - 1) // hw - frames
    if fit < 1:
        raise ValueError(
            f"{frames} new frames of {hw} tokens leave no room for a prompt in the {model.cfg.max_seq_len}-token "
            f"context; ask for at most {(model.cfg.max_seq_len - 1) // hw - 1} frames"
        )
    n_prompt = min(fit, prompt_frames) if prompt_frames else fit
    stride = stride or int(meta.get("stride") or 1)
    real = read_prompt_frames(prompt, resolution, n_prompt + frames, stride)
    if len(real) < n_prompt:
        n_prompt = len(real)
    res = continue_frames(model, meta, tokenizer, real[:n_prompt], frames, temperature=temperature, top_k=top_k,
                          seed=seed)
    model_frames = np.concatenate([res["prompt_recon"], res["generated"]])
    path = write_side_by_side(out, real, model_frames, fps=fps, num_prompt=n_prompt)
    summary = {
        "checkpoint": meta.get("step_dir"), "prompt": str(prompt), "out": str(path), "prompt_frames": n_prompt,
        "generated_frames": int(len(res["generated"])), "grid": list(grid), "stride": stride,
        "temperature": temperature, "top_k": top_k, "seed": seed, "tokenizer": getattr(tokenizer, "id", None),
        "new_tokens": res["new_tokens"].reshape(len(res["new_tokens"]), -1).tolist(),
    }
    Path(str(path) + ".json").write_text(json.dumps(summary) + "\n")
    return summary


@click.command("generate")
@click.argument("ckpt", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", required=True, type=click.Path(exists=True),
              help="Video file, or a directory of images read as consecutive frames (name order).")
@click.option("--frames", "frames", type=int, default=4, show_default=True, help="Frames to generate.")
@click.option("--prompt-frames", type=int, default=None,
              help="Prompt frames to condition on (default: as many as fit the context).")
@click.option("--out", required=True, help="Output .gif or .mp4: real frames left, model frames right.")
@click.option("--tokenizer", "tokenizer_spec", default=None,
              help="Tokenizer spec for load_tokenizer (default: the bundled 'demo' one when the checkpoint's data "
                   "was made with it).")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=100, show_default=True, help="Sample among the k most likely codes.")
@click.option("--stride", type=int, default=None, help="Temporal stride of the prompt (default: the mix's).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--fps", type=float, default=4.0, show_default=True, help="Frame rate of the output file.")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
def generate_command(ckpt, prompt, frames, prompt_frames, out, tokenizer_spec, temperature, top_k, stride, seed, fps,
                     device) -> None:
    """Continue the clip PROMPT by --frames frames with checkpoint CKPT (step dir or run dir).

    Example: toto-train generate runs/demo --prompt demo-out/videos/v0001.mp4 --frames 4 --out gen.gif
    """
    try:
        s = generate(ckpt, prompt, out, frames=frames, prompt_frames=prompt_frames, tokenizer_spec=tokenizer_spec,
                     temperature=temperature, top_k=top_k, stride=stride, seed=seed, fps=fps, device=device)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    click.echo(f"{s['prompt_frames']} prompt + {s['generated_frames']} generated frames -> {s['out']}")
