"""The evaluation jobs behind `toto-train probe|track|scaling`, callable without the CLI (the demo
study uses them directly): a checkpoint's model, a labelled token dataset or DAVIS root in,
validated JSON + PNG out."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from trainer.evals.context import context_limit, fit_probe_inputs, uses_bos
from trainer.evals.features import extract_features, stack_clips
from trainer.evals.probes import POOLINGS, ProbeConfig, labels_to_ids
from trainer.evals.sweep import layer_sweep, write_sweep

__all__ = ["ProbeJob", "parse_layers", "load_labelled", "probe_job", "default_track_layer"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """'all' -> 1..n; '6' -> [6]; '2,4,6' -> [2, 4, 6]; 'half' -> [round(n/2)]."""
    spec = str(spec).strip().lower()
    if spec == "all":
        return list(range(1, n_layers + 1))
    if spec == "half":
        return [max(1, round(n_layers / 2))]
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--layers {spec!r}: use 'all', 'half', one block number or a comma list such as 2,4,6") from None
    bad = [x for x in layers if not 1 <= x <= n_layers]
    if not layers or bad:
        raise ValueError(f"--layers {spec!r}: blocks are numbered 1..{n_layers} for this model")
    return layers


def default_track_layer(n_layers: int) -> int:
    """The paper reads tracking features, like probes, near the middle of the network."""
    return max(1, round(n_layers / 2))


@dataclass
class ProbeJob:
    """What `toto-train probe` runs. Validated on construction."""

    train: str
    val: str
    layers: str = "all"
    poolings: tuple[str, ...] = ("attention",)
    train_split: str | None = None
    val_split: str | None = None
    frames: int = 16
    stride: int = 4
    clips: int = 4  # clips per video; val clips of one video are averaged
    max_samples: int | None = None  # per split, for quick runs
    pool_tokens: int = 1
    batch_size: int = 16  # feature extraction
    task: str = "probe"
    context: str = "auto"  # trainer.evals.context rule for clips longer than the trained context

    def __post_init__(self) -> None:
        for p in self.poolings:
            if p not in POOLINGS:
                raise ValueError(f"ProbeJob.poolings has {p!r}: use any of {', '.join(POOLINGS)}")
        for name in ("frames", "stride", "clips", "pool_tokens", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ProbeJob.{name}={v!r} is invalid: use a positive integer")
        if self.max_samples is not None and self.max_samples < 2:
            raise ValueError(f"ProbeJob.max_samples={self.max_samples!r} is invalid: use at least 2 (or None for all)")
        uses_bos(self.context)  # validates the rule name


def load_labelled(
    url: str,
    *,
    specials: dict[str, int],
    frames: int,
    stride: int,
    clips: int,
    split: str | None,
    max_samples: int | None,
    max_seq_len: int,
    storage_options: dict | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """Labelled sequences of a token dataset: images as single-frame sequences, videos as clips.

    Returns tokens (N, T), frame_index (N, T), labels, video ids. Unlabelled rows are dropped;
    ``max_samples`` keeps a seeded random subset of videos (images) of about that many samples.
    """
    from trainer.data import iter_clips

    items = []
    for c in iter_clips(url, frames=frames, stride=stride, images_per_seq=1, clips_per_video=clips,
                        specials=specials, split=split, storage_options=storage_options):
        if c["label"] is None:
            continue
        if len(c["tokens"]) > max_seq_len:
            raise ValueError(
                f"{url}: a clip of {frames} frames is {len(c['tokens'])} tokens, more than the model's context of "
                f"{max_seq_len}; pass fewer --frames or --context auto (extends the context for evaluation)"
            )
        items.append(c)
    if max_samples is not None and len(items) > max_samples:
        # Datasets are stored class by class: a prefix would hold a few classes only. Take a seeded
        # random subset of whole videos (all clips of a chosen video, so per-video averaging holds).
        videos = sorted({c["video_id"] for c in items})
        order = np.random.default_rng(seed).permutation(len(videos))
        per_video = max(1, len(items) // len(videos))
        keep = {videos[i] for i in order[: max(1, max_samples // per_video)]}
        items = [c for c in items if c["video_id"] in keep]
    if not items:
        raise ValueError(
            f"{url} (split {split or 'all'}) has no labelled samples to probe (videos shorter than one clip of "
            f"{frames} frames at stride {stride} are skipped)"
        )
    return stack_clips(items)


def probe_job(
    model: torch.nn.Module,
    meta: dict,
    job: ProbeJob,
    cfg: ProbeConfig,
    out_dir: str,
    *,
    storage_options: dict | None = None,
    log: Callable[[str], None] = _log,
) -> tuple[dict, str, str]:
    """Extract features once per layer, train every (layer, pooling) probe; write JSON + PNG."""
    n_layers = int(model.cfg.n_layers)
    layers = parse_layers(job.layers, n_layers)
    specials = meta["specials"]
    common = dict(specials=specials, frames=job.frames, stride=job.stride, clips=job.clips,
                  max_samples=job.max_samples, max_seq_len=context_limit(model, job.context),
                  storage_options=storage_options)
    tr_tok, tr_fi, tr_lab, _ = load_labelled(job.train, split=job.train_split, **common)
    va_tok, va_fi, va_lab, va_vid = load_labelled(job.val, split=job.val_split, **common)
    train_y, classes = labels_to_ids(tr_lab)
    val_keep = [i for i, lab in enumerate(va_lab) if lab in set(classes)]
    if len(val_keep) < len(va_lab):
        log(f"{len(va_lab) - len(val_keep)} validation samples have labels unseen in training; they are not scored")
    if not val_keep:
        raise ValueError("no validation label occurs in the training set; probe train and val on the same classes")
    va_tok, va_fi = va_tok[val_keep], va_fi[val_keep]
    va_lab, va_vid = [va_lab[i] for i in val_keep], [va_vid[i] for i in val_keep]
    val_y, _ = labels_to_ids(va_lab, classes)
    is_video = bool((tr_fi.max(dim=1).values > 0).any())
    model, context, (tr_tok, tr_fi), (va_tok, va_fi) = fit_probe_inputs(model, job.context, (tr_tok, tr_fi),
                                                                         (va_tok, va_fi))
    log(f"features: {len(tr_lab)} train / {len(va_lab)} val samples, {len(classes)} classes, layers {layers}")
    tr_f = extract_features(model, tr_tok, tr_fi, layers, batch_size=job.batch_size, pool_tokens=job.pool_tokens)
    va_f = extract_features(model, va_tok, va_fi, layers, batch_size=job.batch_size, pool_tokens=job.pool_tokens)
    doc = layer_sweep(tr_f, va_f, train_y, val_y, classes, n_layers=n_layers, poolings=list(job.poolings), cfg=cfg,
                      task=job.task, val_groups=va_vid if is_video else None, progress=log)
    doc["checkpoint"] = str(meta.get("step_dir", ""))
    doc["context"] = context
    json_path, png_path = write_sweep(doc, out_dir, name=f"probe-{job.task}")
    return doc, json_path, png_path


def resolution_from_meta(meta: dict) -> int:
    """Training frame size of a checkpoint: recorded, or token grid × tokenizer downsampling."""
    if meta.get("resolution"):
        return int(meta["resolution"])
    grid, down = meta.get("grid"), (meta.get("tokenizer") or {}).get("downsample")
    if grid and down:
        return int(grid[0]) * int(down)
    raise ValueError("the checkpoint records neither its frame resolution nor grid and downsampling; pass --resolution")


def tokenizer_spec_for(meta: dict, spec: str | None) -> str:
    """The `load_tokenizer` spec for a checkpoint: the one given, or "demo" for demo-tokenizer runs."""
    if spec:
        return spec
    info = meta.get("tokenizer") or {}
    if info.get("spec"):
        return str(info["spec"])
    if str(info.get("id", "")).startswith("demo"):
        return "demo"
    raise ValueError(
        f"the checkpoint was trained on tokenizer {info.get('id')!r}; pass --tokenizer SPEC "
        "(dalle:DIR, vqgan:DIR, dvae:DIR or demo) pointing at the same weights"
    )


def frame_tokenizer_from_meta(meta: dict, spec: str | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """frames (F, R, R, 3) uint8 -> tokens (F, h, w) with the tokenizer the checkpoint was trained on."""
    spec = tokenizer_spec_for(meta, spec)
    try:
        from pipeline.tokenizers import load_tokenizer
    except ImportError as e:
        raise RuntimeError(
            "tracking needs the checkpoint's frame tokenizer, but pipeline.tokenizers.load_tokenizer is not "
            f"available in this build ({e}); install a Toto with the tokenizers module"
        ) from e
    tok = load_tokenizer(spec)
    want = (meta.get("tokenizer") or {}).get("id")
    if want and getattr(tok, "id", want) != want:
        raise ValueError(
            f"tokenizer {spec!r} has id {tok.id!r} but the checkpoint was trained on {want!r}: features of other "
            "tokens would be meaningless; pass the tokenizer the model was trained with"
        )

    def encode(frames: np.ndarray) -> np.ndarray:
        return np.asarray(tok.encode(frames))

    return encode


def features_fn_for(
    model: torch.nn.Module, meta: dict, layer: int, tokenize: Callable[[np.ndarray], np.ndarray], *,
    layers: list[int] | None = None, context: str = "auto", record: dict | None = None,
) -> Callable[[np.ndarray], torch.Tensor | dict[int, torch.Tensor]]:
    """frames (F, R, R, 3) -> features (F, h, w, D) of `layer`, or {layer: ...} for each of `layers`
    (one backbone pass per window).

    Windows hold as many whole frames as the trained context does (at least one); when one frame
    (plus bos) is longer, `context` (trainer.evals.context) fits the model to it, and `record` is
    updated with what was done.
    """
    from trainer.evals.context import fit_context, trained_length, uses_bos
    from trainer.evals.davis import patch_features

    bos = int(meta["specials"]["bos_video"]) if uses_bos(context) else None
    trained_grid = tuple(meta["grid"]) if meta.get("grid") else None

    def fn(frames: np.ndarray) -> torch.Tensor | dict[int, torch.Tensor]:
        tokens = tokenize(frames)  # (F, h, w)
        _, h, w = tokens.shape
        head = 0 if bos is None else 1
        window = max(1, (trained_length(model) - head) // (h * w))
        fitted, rec = fit_context(model, head + window * h * w, context, grid=(h, w), trained_grid=trained_grid)
        if record is not None:
            record.update(rec)
        # A sweep keeps every layer's features of a sequence: fp16 halves that memory.
        feats = patch_features(fitted, tokens, bos=bos, layers=layers or [layer], window=window,
                               dtype=torch.float16 if layers else torch.float32)
        return feats if layers else feats[layer]

    return fn


def track_job(
    model: torch.nn.Module,
    meta: dict,
    davis_root: str,
    out_dir: str,
    *,
    tokenize: Callable[[np.ndarray], np.ndarray],
    resolution: int,
    layer: int | None = None,
    split: str | None = "val",
    max_frames: int | None = None,
    sequences: list[str] | None = None,
    cfg=None,
    log: Callable[[str], None] = _log,
    layers: str | None = None,
    context: str = "auto",
) -> tuple[dict, str]:
    """Label propagation on a DAVIS-layout root; writes track.json (validated track_result).

    `layers` ('all', '2,4,6', ...) sweeps those blocks from one backbone pass per window and reports
    the peak layer (also as track-layers.png); else `layer` (default: the middle block). `context` is
    the trainer.evals.context rule for frames longer than the trained context (512 px).
    """
    from pipeline.storage import write_json
    from trainer.evals.davis import list_sequences, load_sequence, plot_track_layers, track_sequences

    n_layers = int(model.cfg.n_layers)
    if layers is not None and layer is not None:
        raise ValueError("pass either --layer N or --layers SPEC, not both")
    sweep = parse_layers(layers, n_layers) if layers is not None else None
    layer = layer or default_track_layer(n_layers)
    parse_layers(str(layer), n_layers)
    down = (meta.get("tokenizer") or {}).get("downsample")
    if not isinstance(resolution, int) or resolution < 1 or (down and resolution % int(down)):
        raise ValueError(f"--resolution {resolution!r}: use a positive multiple of the tokenizer's {down} px "
                         "patches (the paper: 256 or 512)")
    names = sequences or list_sequences(davis_root, split)
    seqs = [load_sequence(davis_root, n, max_frames=max_frames) for n in names]
    record: dict = {}
    body = track_sequences(seqs, features_fn_for(model, meta, layer, tokenize, layers=sweep, context=context,
                                                 record=record),
                           resolution=resolution, cfg=cfg, progress=log, n_layers=n_layers)
    doc = {"schema": "track_result", "version": 1, "checkpoint": str(meta.get("step_dir", "")),
           "davis_root": davis_root, "layer": body.get("peak_layer", layer), "resolution": resolution,
           "context": record, **body}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "track.json")
    write_json(path, doc, "track_result")
    if sweep is not None:
        plot_track_layers(doc, os.path.join(out_dir, "track-layers.png"))
    return doc, path
