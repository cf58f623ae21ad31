"""The evaluation jobs behind `toto-train probe|track|scaling`, callable without the CLI (the demo
study uses them directly): a checkpoint's model, a labelled token dataset or DAVIS root in,
validated JSON + PNG out."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from trainer.evals.context import context_limit, fit_probe_inputs, trained_context, uses_bos
from trainer.evals.features import stack_clips
from trainer.evals.probes import POOLINGS, ProbeConfig, labels_to_ids
from trainer.evals.sweep import write_sweep

__all__ = ["ProbeJob", "TASK_PRESETS", "preset_settings", "parse_layers", "load_labelled", "probe_job", "default_track_layer"]


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
    batch_size: int = 16  # backbone batch of the feature cache and of validation
    task: str = "probe"
    features: str = "auto"  # stream | cache | auto (cache when the fp16 features fit cache_limit_gb)
    cache_limit_gb: float = 4.0
    checkpoint_every: int = 500  # optimizer steps between saved probe states (0: only at the end)
    # Raw training images (e.g. ImageNet's train/{wnid}/*.JPEG) re-tokenized every epoch after a random
    # resized crop + flip (trainer.evals.augment); None: train on the token dataset `train` as it is.
    train_images: str | None = None
    images_layout: str = "imagenet"  # pipeline.sources.adapters layout of train_images
    context: str = "auto"  # trainer.evals.context rule for clips longer than the trained context
    classes: tuple[str, ...] | None = None  # a fixed class list (a task preset's); None: the training labels

    def __post_init__(self) -> None:
        for p in self.poolings:
            if p not in POOLINGS:
                raise ValueError(f"ProbeJob.poolings has {p!r}: use any of {', '.join(POOLINGS)}")
        for name in ("frames", "stride", "clips", "pool_tokens", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ProbeJob.{name}={v!r} is invalid: use a positive integer")
        from trainer.evals.stream_probe import FEATURE_MODES

        if self.features not in FEATURE_MODES:
            raise ValueError(f"ProbeJob.features={self.features!r} is invalid: use one of {', '.join(FEATURE_MODES)}")
        if not self.cache_limit_gb >= 0 or self.checkpoint_every < 0:
            raise ValueError(f"ProbeJob.cache_limit_gb={self.cache_limit_gb!r} and checkpoint_every="
                             f"{self.checkpoint_every!r} must be >= 0")
        if self.max_samples is not None and self.max_samples < 2:
            raise ValueError(f"ProbeJob.max_samples={self.max_samples!r} is invalid: use at least 2 (or None for all)")
        uses_bos(self.context)  # validates the rule name


# `toto-train probe --task NAME`: the paper's evaluation settings for a named task. They are that
# task's defaults; options given explicitly win (trainer/evals/cli.py). docs/evaluation.md#cater.
TASK_PRESETS: dict[str, dict] = {
    # CATER snitch localisation (Table 12): 16- and 32-frame clips, attention pooling, top-1 / top-5 over
    # the 36 cells of the 6x6 grid (a fixed class list, so a cell absent from training is still a class).
    # The label is where the snitch is at the END of the 300-frame video, so one clip spans (nearly) the
    # whole video: stride 18 for 16 frames (271 frames), 9 for 32 (280); other frame counts 288 // frames.
    "cater": {"frames": 16, "strides": {16: 18, 32: 9}, "stride_span": 288, "clips": 1,
              "poolings": ("attention",), "classes": tuple(str(c) for c in range(36)),
              "paper": {"model": "large", "top1": {"16": 62.8, "32": 72.9}}},
}


def preset_settings(task: str, frames: int | None = None) -> dict:
    """The preset's frames, stride, clips, poolings and classes for `task` ({} for a task without a
    preset); ``frames`` given explicitly picks the stride for that many frames."""
    p = TASK_PRESETS.get(task)
    if p is None:
        return {}
    f = frames or p["frames"]
    stride = p["strides"].get(f, max(1, p["stride_span"] // f))
    return {"frames": f, "stride": stride, "clips": p["clips"], "poolings": p["poolings"], "classes": p["classes"]}


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
    keep = subset_rows([c["video_id"] for c in items], max_samples, seed)
    items = [items[i] for i in keep]
    if not items:
        raise ValueError(
            f"{url} (split {split or 'all'}) has no labelled samples to probe (videos shorter than one clip of "
            f"{frames} frames at stride {stride} are skipped)"
        )
    return stack_clips(items)


def subset_rows(video_ids: list[str], max_samples: int | None, seed: int = 0) -> list[int]:
    """Rows kept by ``max_samples``: all, or a seeded random subset of whole videos of about that many.

    Datasets are stored class by class: a prefix would hold a few classes only. All clips of a
    chosen video are kept, so per-video averaging holds."""
    if max_samples is None or len(video_ids) <= max_samples:
        return list(range(len(video_ids)))
    videos = sorted(set(video_ids))
    order = np.random.default_rng(seed).permutation(len(videos))
    per_video = max(1, len(video_ids) // len(videos))
    keep = {videos[i] for i in order[: max(1, max_samples // per_video)]}
    return [i for i, v in enumerate(video_ids) if v in keep]


def _token_file(url: str, split: str | None, work: str, job: ProbeJob, specials: dict, max_seq_len: int,
                storage_options: dict | None, dist) -> tuple[dict, np.ndarray, np.ndarray]:
    """The token sequences of one dataset split on disk (rank 0 writes, the others wait and read)."""
    import json
    import shutil

    from trainer.data import iter_clips
    from trainer.evals.stream_probe import build_token_file, open_token_file

    key = {"url": url, "split": split, "frames": job.frames, "stride": job.stride, "clips": job.clips}
    if dist.rank == 0:
        index = os.path.join(work, "index.json")
        if os.path.exists(index):
            with open(index) as f:
                if json.load(f).get("key") != key:  # another dataset or clip layout: rebuild
                    shutil.rmtree(work)
        clips = iter_clips(url, frames=job.frames, stride=job.stride, images_per_seq=1, clips_per_video=job.clips,
                           specials=specials, split=split, storage_options=storage_options)
        info = build_token_file(clips, work, max_seq_len=max_seq_len, what=url, key=key)
    dist.barrier()
    if dist.rank != 0:
        with open(os.path.join(work, "index.json")) as f:
            info = json.load(f)
    if info["n"] == 0:
        raise ValueError(
            f"{url} (split {split or 'all'}) has no labelled samples to probe (videos shorter than one clip of "
            f"{job.frames} frames at stride {job.stride} are skipped)"
        )
    tok, fi = open_token_file(work, info)
    return info, tok, fi


def probe_job(
    model: torch.nn.Module,
    meta: dict,
    job: ProbeJob,
    cfg: ProbeConfig,
    out_dir: str,
    *,
    storage_options: dict | None = None,
    tokenize: Callable[[np.ndarray], np.ndarray] | None = None,
    resolution: int | None = None,
    log: Callable[[str], None] = _log,
) -> tuple[dict, str, str]:
    """Train every (layer, pooling) probe at once on the frozen model's features; write JSON + PNG.

    Token sequences go to OUT/probe-work/TASK/ once; features are streamed from the backbone every
    epoch or cached there (``job.features``); the probe state there makes a rerun resume. Under
    torch.distributed each rank does its share and rank 0 writes (OUT must be shared by the ranks).
    With ``job.train_images`` the heads train on those raw images, augmented and re-tokenized with
    ``tokenize`` (the checkpoint's tokenizer) at ``resolution`` (default: the checkpoint's)."""
    from trainer.evals.stream_probe import (
        CacheSource,
        Dist,
        TokenSource,
        build_feature_cache,
        cache_bytes,
        train_heads,
    )
    from trainer.evals.sweep import sweep_doc, sweep_specs

    dist = Dist()
    n_layers = int(model.cfg.n_layers)
    layers = parse_layers(job.layers, n_layers)
    specs = sweep_specs(layers, list(job.poolings), n_layers)
    work = os.path.join(out_dir, "probe-work", job.task)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # The checkpoint the features come from: the probe state and feature cache are keyed by it.
    ckpt_id = hashlib.sha256(f"{meta.get('step_dir', '')}|{meta.get('step', '')}".encode()).hexdigest()[:12]
    check_probe_data(model, job, storage_options)
    with trained_context(model):  # the caller's model is as trained again afterwards
        args = dict(job=job, specials=meta["specials"], max_seq_len=context_limit(model, job.context),
                    storage_options=storage_options, dist=dist)
        va_info, va_tok, va_fi = _token_file(job.val, job.val_split, os.path.join(work, "val"), **args)
        if job.train_images is not None:
            if not uses_bos(job.context):
                raise ValueError("--context drop_bos does not apply to --train-images (the crops are tokenized with bos); "
                                 "use --context auto")
            # The crops are single images like the validation set, so fitting the context to it covers them.
            model, context, (va_tok, va_fi) = fit_probe_inputs(model, job.context, (va_tok, va_fi))
            from trainer.evals.augment import ImageSource, list_probe_images

            if tokenize is None and model.cfg.input != "patches":  # a patch model reads the crops' own pixels
                raise ValueError("probing on raw images needs the checkpoint's tokenizer: pass --tokenizer SPEC")
            if job.features == "cache":
                raise ValueError("augmented images are new crops every epoch and cannot be cached: use --features stream")
            items = list_probe_images(job.train_images, job.images_layout, job.train_split, storage_options)
            items = [items[i] for i in subset_rows([it["video_id"] for it in items], job.max_samples)]
            tr_lab = [it["label"] for it in items]
            train_src = ImageSource(model, items, tokenize, bos=int(meta["specials"]["bos_image"]), layers=layers,
                                    resolution=resolution or resolution_from_meta(meta), seed=cfg.seed,
                                    pool_tokens=job.pool_tokens, storage_options=storage_options)
        else:
            tr_info, tr_tok, tr_fi = _token_file(job.train, job.train_split, os.path.join(work, "train"), **args)
            # Extends the model's context where the clips need it (recorded in the result); drop_bos views
            # the token files without their first column.
            model, context, (tr_tok, tr_fi), (va_tok, va_fi) = fit_probe_inputs(model, job.context, (tr_tok, tr_fi),
                                                                                 (va_tok, va_fi))
            tr_rows = subset_rows(tr_info["video_ids"], job.max_samples)
            tr_lab = [tr_info["labels"][i] for i in tr_rows]
            train_src = TokenSource(model, tr_tok, tr_fi, layers, rows=np.asarray(tr_rows), pool_tokens=job.pool_tokens)
        is_video = bool(np.asarray(va_fi[0]).max() > 0)  # clips of one validation video are averaged
        va_rows = subset_rows(va_info["video_ids"], job.max_samples)
        train_y, classes = labels_to_ids(tr_lab, list(job.classes) if job.classes else None)
        known = set(classes)
        va_all = len(va_rows)
        va_rows = [i for i in va_rows if va_info["labels"][i] in known]
        if len(va_rows) < va_all:
            log(f"{va_all - len(va_rows)} validation samples have labels unseen in training; they are not scored")
        if not va_rows:
            raise ValueError("no validation label occurs in the training set; probe train and val on the same classes")
        val_y, _ = labels_to_ids([va_info["labels"][i] for i in va_rows], classes)
        va_vid = [va_info["video_ids"][i] for i in va_rows]
        # Validation is read once (at the end), so it always streams; only training epochs re-read.
        val_src = TokenSource(model, va_tok, va_fi, layers, rows=np.asarray(va_rows), pool_tokens=job.pool_tokens)
        mode = "stream" if job.train_images is not None else job.features
        # The cache holds the whole token file (below), so that is what must fit, not the --max-samples subset.
        cached_n = train_src.n if job.train_images is not None else int(train_src.tok.shape[0])
        size = cache_bytes(cached_n, train_src.tokens, train_src.dim, len(layers))
        if mode == "auto":
            mode = "cache" if size <= job.cache_limit_gb * 2**30 and cfg.epochs > 1 else "stream"
        log(f"probes: {train_src.n} train / {val_src.n} val samples, {len(classes)} classes, layers {layers}, "
            f"{len(specs)} heads, features {mode} ({size / 2**30:.2f} GiB as an fp16 cache), {dist.world} process(es)")
        if mode == "cache":
            # The whole token file is cached (rows select the subset), so a cache serves any --max-samples;
            # it lives in the token file's folder, so a rebuilt token file (other data) takes it along.
            full = TokenSource(model, train_src.tok, train_src.fi, layers, pool_tokens=job.pool_tokens)
            # Keyed by the checkpoint too: features of another step (a run trained further) are not reused.
            cdir = os.path.join(work, "train", f"cache-pool{job.pool_tokens}-layers{'-'.join(map(str, layers))}"
                                               f"-{context['rule']}-{context['eval_len']}-{ckpt_id}")
            build_feature_cache(full, cdir, batch_size=job.batch_size, dist=dist, log=log)
            train_src = CacheSource(cdir, layers, rows=train_src.rows)
        trained = train_heads(train_src, train_y, val_src, val_y, specs, classes, cfg,
                              val_groups=va_vid if is_video else None, eval_batch_size=max(job.batch_size, 2),
                              state_path=os.path.join(work, f"state-{mode}.pt"), checkpoint_every=job.checkpoint_every,
                              state_key={"train": job.train_images or job.train, "split": job.train_split,
                                         "frames": job.frames, "stride": job.stride, "clips": job.clips,
                                         "max_samples": job.max_samples, "pool_tokens": job.pool_tokens,
                                         "images": job.train_images is not None, "context": context,
                                         "checkpoint": ckpt_id},
                              restart_other=True,  # a rerun with other settings (a demo rerun) starts afresh
                              dist=dist, device=next(model.parameters()).device, log=log)
        doc = sweep_doc(specs, [r for r, _ in trained], n_layers=n_layers, classes=classes, cfg=cfg, task=job.task,
                        progress=log if dist.rank == 0 else None,
                        extra_config={"features": mode, "world_size": dist.world, "pool_tokens": job.pool_tokens})
        doc["checkpoint"] = str(meta.get("step_dir", ""))
        doc["context"] = context
        if job.task in TASK_PRESETS:  # what the preset ran with, beside the paper's numbers
            doc["task_preset"] = {"task": job.task, "frames": job.frames, "stride": job.stride, "clips": job.clips,
                                  "poolings": list(job.poolings), "classes": len(classes),
                                  "paper": TASK_PRESETS[job.task]["paper"]}
        name = f"probe-{job.task}"
        if dist.rank != 0:
            return doc, os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.png")
        json_path, png_path = write_sweep(doc, out_dir, name=name)
        return doc, json_path, png_path


def check_probe_data(model: torch.nn.Module, job: ProbeJob, storage_options: dict | None = None) -> None:
    """The probe's datasets are what the model reads (codes, or a patch model's pixel datasets), else a
    ValueError naming the dataset to pass."""
    from pipeline.shards import read_manifest
    from trainer.patches import check_input_dataset

    for url in [job.val] + ([] if job.train_images is not None else [job.train]):
        check_input_dataset(model.cfg, read_manifest(url, storage_options), url)


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
    if info.get("id"):
        from pipeline.tokenizers import load_tokenizer

        # Only the bundled weights themselves: a user's own dVAE may also be named "demo".
        if info["id"] == load_tokenizer("demo", device="cpu").id:
            return "demo"
    raise ValueError(
        f"the checkpoint was trained on tokenizer {info.get('id')!r}; pass --tokenizer SPEC "
        "(dalle:DIR, vqgan:DIR, dvae:DIR or demo) pointing at the same weights"
    )


def frame_inputs_for(model: torch.nn.Module, meta: dict, spec: str | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """What the model reads of frames (F, R, R, 3) uint8: their codes (F, h, w) by the checkpoint's
    tokenizer, or for a patch-input model their own P x P patches (F, h, w, P*P*3)."""
    if model.cfg.input == "patches":
        from pipeline.tokenizers.patch import patchify

        p = int(model.cfg.patch_size)
        return lambda frames: patchify(np.asarray(frames), p)
    return frame_tokenizer_from_meta(meta, spec)


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
        tokens = tokenize(frames)  # (F, h, w) codes, or (F, h, w, P*P*3) patches for a patch model
        h, w = tokens.shape[1:3]
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
    with trained_context(model):  # windows may extend the context; the caller's model is as trained afterwards
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
