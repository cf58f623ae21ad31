"""Loss by position on a video token dataset (the paper's Figure 10), behind `toto-train position-loss`.

Clips of `frames` frames at `stride` (`trainer.data.iter_clips`, `clips` per video, evenly spaced)
are scored by the checkpoint; `trainer.evals.position_loss` gives the mean next-token loss at every
position and per target frame. A clip of F frames is `1 + F·HW` tokens (bos + frames); the model reads
all but the last token and predicts all but the bos, so a 16-frame clip of 256-token frames (4097
tokens) fits the paper's 4096-token context.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch

from trainer.evals.position_loss import per_position_loss, plot_position_loss, summarize_position_loss

__all__ = ["check_video_dataset", "clip_batches", "position_loss_job"]


def check_video_dataset(url: str, storage_options: dict | None = None) -> None:
    """Refuse an image-only dataset: loss by position inside a clip needs videos."""
    from pipeline.mix.tables import detect_kind, read_row_table
    from pipeline.shards import read_manifest

    m = read_manifest(url, storage_options)
    if detect_kind(read_row_table(url, m, storage_options)) != "video":
        raise ValueError(f"{url} is an image dataset (one frame per row): loss by position compares frames of a "
                         "clip, so pass a video token dataset such as Kinetics-400's")


def clip_batches(url: str, *, specials: dict, frames: int, stride: int, clips: int, split: str | None,
                 batch_size: int, max_clips: int | None, max_seq_len: int,
                 storage_options: dict | None = None, codes: str | None = None,
                 first_special: int | None = None) -> Iterator[dict]:
    """Batches {"inputs", "targets", "target_frame_index"} of clips, streamed: int64 codes (B, T-1) of a
    token dataset; of a pixel dataset (a patch-input model) packed patches (B, T-1, 1 + P*P*3) as inputs
    and as targets the next codes of the same clip in the token dataset ``codes`` (patch -> dVAE) or,
    without ``codes``, the next patches packed with ``first_special`` (patch -> patch, trainer/patches.py)."""
    from trainer.data import iter_clips

    kw = dict(frames=frames, stride=stride, clips_per_video=clips, specials=specials, split=split,
              storage_options=storage_options, max_items=max_clips, kind="video")
    code_clips = iter_clips(codes, **kw) if codes is not None else None
    buf: list[dict] = []
    n = 0
    for c in iter_clips(url, **kw):
        if len(c["tokens"]) - 1 > max_seq_len:
            raise ValueError(f"{url}: a clip of {frames} frames needs {len(c['tokens']) - 1} input positions, more "
                             f"than the checkpoint's context of {max_seq_len}; pass fewer --frames")
        if code_clips is not None:
            c = {**c, "codes": _same_clip(next(code_clips, None), c, codes, url)["tokens"]}
        buf.append(c)
        n += 1
        if len(buf) == batch_size:
            yield _batch(buf, first_special)
            buf = []
    if code_clips is not None and next(code_clips, None) is not None:
        raise ValueError(f"{codes} holds more clips than {url}: {_REMAKE}")
    if buf:
        yield _batch(buf, first_special)
    if n == 0:
        raise ValueError(f"{url} (split {split or 'all'}) has no video as long as one clip of {frames} frames at "
                         f"stride {stride}; pass fewer --frames or a smaller --stride")


_REMAKE = ("pass the token dataset made from the same input with the same settings as the pixel dataset "
           "(`toto-pipeline tokenize` with the model's tokenizer, then with --tokenizer patch:P)")


def _same_clip(code: dict | None, pix: dict, codes: str, url: str) -> dict:
    """The codes dataset's clip, checked to be the pixel dataset's (same video, split and first frame)."""
    where = (pix["video_id"], pix["split"], pix["first_frame"])
    if code is None or (code["video_id"], code["split"], code["first_frame"]) != where:
        got = None if code is None else (code["video_id"], code["split"], code["first_frame"])
        raise ValueError(f"{codes} and {url} do not hold the same clips (pixels {where}, codes {got}): {_REMAKE}")
    return code


def _batch(items: list[dict], first_special: int | None) -> dict:
    tok = np.stack([np.asarray(c["tokens"], dtype=np.int64) for c in items])  # (B, T)
    fi = np.stack([np.asarray(c["frame_index"], dtype=np.int64) for c in items])  # (B, T)
    # Input t predicts token t+1, whose frame is frame_index[t+1].
    out = {"inputs": torch.from_numpy(tok[:, :-1]), "targets": torch.from_numpy(tok[:, 1:]),
           "target_frame_index": fi[:, 1:]}
    if "pixels" in items[0]:
        from trainer.patches import pack_inputs, pack_pixel_targets

        px = np.stack([c["pixels"] for c in items])  # (B, T, P*P*3) uint8
        out["inputs"] = torch.from_numpy(pack_inputs(tok[:, :-1], px[:, :-1]))
        if "codes" in items[0]:  # patch -> dVAE: the next code
            out["targets"] = torch.from_numpy(np.stack([np.asarray(c["codes"], dtype=np.int64) for c in items])[:, 1:])
        else:  # patch -> patch: the next patch
            if first_special is None:
                raise ValueError("pixel targets need first_special (the model's vocab_size - 4)")
            out["targets"] = torch.from_numpy(pack_pixel_targets(tok[:, 1:], px[:, 1:], first_special))
    return out


def position_loss_job(model: torch.nn.Module, meta: dict, data: str, out_dir: str, *, frames: int = 16,
                      stride: int = 4, clips: int = 1, split: str | None = "val", batch_size: int = 8,
                      max_clips: int | None = None, storage_options: dict | None = None,
                      codes: str | None = None) -> tuple[dict, str, str]:
    """Per-position and per-frame loss of a checkpoint on a video dataset; writes position_loss.{json,png}.

    A patch-input model is scored on its pixel dataset ``data``: MSE on the next per-patch-normalised
    patch (patch -> patch) or, with ``codes`` (the token dataset of the same input), cross-entropy on
    the next code (patch -> dVAE), as its training and validation losses are."""
    from pipeline.shards import read_manifest
    from pipeline.storage import write_json
    from trainer.patches import N_SPECIAL, check_input_dataset

    cfg = model.cfg
    check_video_dataset(data, storage_options)
    manifest = read_manifest(data, storage_options)
    check_input_dataset(cfg, manifest, data)
    pixel_target = cfg.input == "patches" and cfg.target == "pixels"
    if cfg.input == "patches" and cfg.target == "tokens":
        if codes is None:
            raise ValueError(f"a patch -> dVAE model reads {data}'s pixels and predicts codes: pass the token dataset "
                             "of the same input as --codes")
        cm = read_manifest(codes, storage_options)
        if int((cm.get("tokenizer") or {}).get("values_per_token", 1)) != 1:
            raise ValueError(f"--codes {codes} is a pixel dataset: pass the token dataset of {data}'s input")
    elif codes is not None:
        raise ValueError("--codes is for a patch -> dVAE model (model.input=patches, model.target=tokens); "
                         f"this model reads {cfg.input} and predicts {cfg.target}")
    grid = manifest["grid"]
    hw = int(grid[0]) * int(grid[1]) // int((manifest.get("tokenizer") or {}).get("values_per_token", 1))
    batches = clip_batches(data, specials=meta["specials"], frames=frames, stride=stride, clips=clips, split=split,
                           batch_size=batch_size, max_clips=max_clips, max_seq_len=int(cfg.max_seq_len),
                           storage_options=storage_options, codes=codes,
                           first_special=int(cfg.vocab_size) - N_SPECIAL)
    counted: list[int] = []

    def counting():
        for b in batches:
            counted.append(int(b["inputs"].shape[0]))
            yield b

    device = next(model.parameters()).device
    amp = torch.bfloat16 if device.type == "cuda" else None
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        loss, tframe = per_position_loss(model, counting())
    doc = summarize_position_loss(loss, tframe)
    doc.update({"checkpoint": str(meta.get("step_dir", "")), "data": data, "split": split or "all", "frames": frames,
                "loss": "mse_next_patch" if pixel_target else "cross_entropy", **({"codes": codes} if codes else {}),
                "stride": stride, "tokens_per_frame": hw, "num_clips": sum(counted),
                "paper": "Kinetics val, 16 frames x 256 tokens: the first frame's loss is clearly higher than the "
                         "following frames'"})
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "position_loss.json")
    write_json(json_path, doc, "clip_loss")
    png = plot_position_loss(doc, hw, os.path.join(out_dir, "position_loss.png"))
    return doc, json_path, png
