"""`toto-train probe | track | scaling`: click commands (registered in trainer/cli.py)."""

from __future__ import annotations

import os
import sys

import click

from trainer.evals.context import CONTEXT_RULES
from trainer.evals.probes import POOLINGS, ProbeConfig, torch_threads

__all__ = ["probe", "track", "scaling"]


def _fail(e: Exception) -> None:
    raise click.ClickException(str(e)) from e


@click.command("probe")
@click.argument("ckpt")
@click.option("--train", "train_url", default=None,
              help="Labelled token dataset (dir or s3:// URL) to train the probe on (required unless --train-images); "
                   "for a patch-input model its pixel dataset (--tokenizer patch:P).")
@click.option("--val", "val_url", required=True,
              help="Labelled token (or, for a patch model, pixel) dataset to score the probe on (may equal --train "
                   "with other splits).")
@click.option("--train-split", default="train", show_default=True, help="Split of --train to use; 'all' for every split.")
@click.option("--val-split", default="val", show_default=True, help="Split of --val to use; 'all' for every split.")
@click.option("--layers", default="all", show_default=True,
              help="'all' sweeps every block (accuracy by relative depth, JSON + PNG); a block number such as 6; "
                   "a comma list such as 2,4,6; 'half' for the middle block.")
@click.option("--pooling", "--head", "pooling", default="attention", show_default=True,
              type=click.Choice([*POOLINGS, "both"]),
              help="Probe head (cross-attn-mlp: the paper's Table 16 head); 'both' = attention and average.")
@click.option("--clips", default=4, show_default=True, type=int,
              help="Clips per video; the clips of one validation video are averaged. Ignored for images.")
@click.option("--frames", default=16, show_default=True, type=int, help="Frames per video clip (the paper: 16).")
@click.option("--stride", default=4, show_default=True, type=int, help="Temporal stride inside a clip (the paper: 4).")
@click.option("--max-samples", default=None, type=int, help="Cap on samples per split (quick runs). Default: all.")
@click.option("--pool-tokens", default=1, show_default=True, type=int,
              help="Average this many consecutive tokens before the probe (bounds memory on long clips).")
@click.option("--epochs", default=30, show_default=True, type=int, help="Probe training epochs.")
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Peak AdamW learning rate (cosine decay).")
@click.option("--batch-size", default=64, show_default=True, type=int, help="Probe training batch size.")
@click.option("--weight-decay", default=0.05, show_default=True, type=float, help="AdamW weight decay.")
@click.option("--heads", default=4, show_default=True, type=int, help="Heads of the attention-pooling probe.")
@click.option("--out", "out_dir", default="probe-out", show_default=True, help="Output directory.")
@click.option("--task", default="probe", show_default=True,
              help="Name used in file names and plots. A preset name sets the paper's settings for that task "
                   "(options given explicitly win): cater = 16-frame clips at stride 18 (32 at 9 with --frames 32), "
                   "one clip per video, attention pooling, top-1/top-5 over the 36 grid cells.")
@click.option("--context", "context_rule", default="auto", show_default=True, type=click.Choice(CONTEXT_RULES),
              help="Clips longer than the trained context: auto extends it (LLaMA rope_base, GPT-2 pos_interp), "
                   "drop_bos leaves bos out (16x256 = 4096 tokens fit), none refuses (docs/evaluation.md#context).")
@click.option("--device", default="cpu", show_default=True, help="Device for feature extraction (cpu, cuda).")
@click.option("--threads", default=None, type=int,
              help="Torch intra-op threads on CPU (default: torch's). 1 is much faster on a busy machine.")
@click.option("--features", "features_mode", default="auto", show_default=True,
              type=click.Choice(["stream", "cache", "auto"]),
              help="stream: run the backbone on every batch of every epoch (memory of a batch); cache: compute "
                   "every layer's features once into fp16 files under OUT/probe-work; auto: cache when they fit "
                   "--cache-limit-gb.")
@click.option("--cache-limit-gb", default=4.0, show_default=True, type=float,
              help="Disk the feature cache may take in auto mode.")
@click.option("--checkpoint-every", default=500, show_default=True, type=int,
              help="Save the heads, optimizer and data position every N steps (a rerun resumes); 0: at the end only.")
@click.option("--train-images", default=None,
              help="Raw training images (ImageNet layout train/WNID/*.JPEG) to probe on with the paper's augmentation: "
                   "a random resized crop + flip every epoch, re-tokenized with --tokenizer. --train is then unused.")
@click.option("--images-layout", default="imagenet", show_default=True,
              help="pipeline.sources.adapters layout of --train-images (imagenet, folder).")
@click.option("--tokenizer", "tokenizer_spec", default=None,
              help="With --train-images: load_tokenizer spec of the checkpoint's tokenizer (dalle:DIR, vqgan:DIR, "
                   "dvae:DIR, demo); its id must match the checkpoint's.")
@click.option("--resolution", default=None, type=int,
              help="With --train-images: crop size fed to the tokenizer. Default: the checkpoint's training resolution.")
def probe(ckpt, train_url, val_url, train_split, val_split, layers, pooling, clips, frames, stride, max_samples,
          pool_tokens, epochs, lr, batch_size, weight_decay, heads, out_dir, task, device, threads, features_mode,
          cache_limit_gb, checkpoint_every, train_images, images_layout, tokenizer_spec, resolution,
          context_rule) -> None:
    """Train probes on a frozen checkpoint's features and report top-1 / top-5.

    CKPT is a checkpoint directory (step-NNNNNNNN) or a run directory (its newest checkpoint).
    Images are single-frame sequences; videos are FRAMES-frame clips at STRIDE. Every (layer,
    pooling) head trains at once from one backbone pass per batch (AdamW + cosine); a rerun with
    the same OUT resumes. Under torchrun the ranks split every batch (gloo on CPU, nccl on CUDA).

    Example:

    \b
        toto-train probe runs/demo --train data/digits --val data/digits --layers all --pooling both
        torchrun --nproc_per_node 8 -m trainer.cli probe runs/base --train tok/in1k --val tok/in1k --device cuda
        toto-train probe runs/base --train-images in1k-raw --tokenizer demo --val tok/in1k --head cross-attn-mlp
        toto-train probe runs/base --task cater --train tok/cater --val tok/cater --layers half --device cuda
    """
    from trainer.checkpoint import load_model
    from trainer.evals.run import ProbeJob, frame_tokenizer_from_meta, probe_job
    from trainer.evals.stream_probe import Dist

    if not train_url and not train_images:
        raise click.UsageError("pass --train TOKEN_DATASET (or --train-images RAW_IMAGES with --tokenizer)")
    try:
        dist = Dist.init_from_env(device)
        if dist.world > 1 and device == "cuda":
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        model, meta = load_model(ckpt, device=device)
        preset = _task_preset(task, frames)
        if preset:  # the preset replaces the defaults, not values given on the command line
            frames, stride, clips = (preset[k] if _default(k) else v
                                     for k, v in (("frames", frames), ("stride", stride), ("clips", clips)))
            pooling = preset["poolings"][0] if _default("pooling") else pooling
        job = ProbeJob(
            train=train_url or train_images, val=val_url, layers=layers,
            poolings=("attention", "average") if pooling == "both" else (pooling,),
            train_split=None if train_split == "all" else train_split,
            val_split=None if val_split == "all" else val_split,
            frames=frames, stride=stride, clips=clips, max_samples=max_samples, pool_tokens=pool_tokens, task=task,
            features=features_mode, cache_limit_gb=cache_limit_gb, checkpoint_every=checkpoint_every,
            train_images=train_images, images_layout=images_layout, context=context_rule,
            classes=preset.get("classes"),
        )
        cfg = ProbeConfig(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay, num_heads=heads)
        tokenize = (frame_tokenizer_from_meta(meta, tokenizer_spec) if train_images and model.cfg.input != "patches"
                    else None)  # a patch model reads the crops' pixels
        with torch_threads(threads):
            doc, json_path, png_path = probe_job(model, meta, job, cfg, out_dir, tokenize=tokenize,
                                                 resolution=resolution)
    except (ValueError, RuntimeError) as e:
        _fail(e)
    if dist.rank != 0:
        return
    for r in doc["results"]:
        click.echo(f"layer {r['layer']:>3} ({r['relative_depth']:.2f})  {r['pooling']:<9}  "
                   f"top-1 {r['top1']:5.1f}  top-5 {r['top5']:5.1f}")
    click.echo(f"wrote {json_path} and {png_path}")


def _task_preset(task: str, frames: int) -> dict:
    from trainer.evals.run import preset_settings

    return preset_settings(task, None if _default("frames") else frames)


def _default(param: str) -> bool:
    """Whether a probe option was left at its default (not given on the command line)."""
    return click.get_current_context().get_parameter_source(param) == click.core.ParameterSource.DEFAULT


@click.command("track")
@click.argument("ckpt")
@click.option("--davis", "davis_root", required=True, help="DAVIS-2017 root (JPEGImages/480p, Annotations/480p).")
@click.option("--split", default="val", show_default=True, help="ImageSets/2017/<split>.txt; every sequence if absent.")
@click.option("--layer", default=None, type=int, help="Block whose features are used. Default: the middle block.")
@click.option("--layers", "layers_spec", default=None,
              help="Sweep blocks instead of --layer: 'all' (or a comma list) scores every block from one backbone "
                   "pass per window and reports the peak layer, as the paper does (track.json + track-layers.png).")
@click.option("--resolution", default=None, type=int,
              help="Square frame size fed to the tokenizer (the paper: 256 or 512; 512 px at 8 px patches is "
                   "4096 tokens a frame, fitted by --context). Default: the checkpoint's training resolution.")
@click.option("--context", "context_rule", default="auto", show_default=True, type=click.Choice(CONTEXT_RULES),
              help="When one frame (+ bos) exceeds the trained context: auto extends it (LLaMA rope_base, GPT-2 "
                   "pos_interp), rope_pi, drop_bos leaves bos out, none refuses. Recorded in track.json.")
@click.option("--tokenizer", "tokenizer_spec", default=None,
              help="load_tokenizer spec of the checkpoint's tokenizer (dalle:DIR, vqgan:DIR, dvae:DIR, demo). "
                   "Default: demo for demo-tokenizer checkpoints; its id must match the checkpoint's.")
@click.option("--max-frames", default=None, type=int, help="Use only the first N frames of each sequence.")
@click.option("--topk", default=10, show_default=True, type=int, help="Affinities kept per patch.")
@click.option("--temperature", default=0.05, show_default=True, type=float, help="Softmax temperature.")
@click.option("--radius", default=12.0, show_default=True, type=float, help="Spatial radius in feature-grid cells.")
@click.option("--n-context", "n_context", default=20, show_default=True, type=int,
              help="Previous frames whose labels propagate (besides the first frame; the paper: 20).")
@click.option("--out", "out_dir", default="track-out", show_default=True, help="Output directory (track.json).")
@click.option("--device", default="cpu", show_default=True, help="Device (cpu, cuda).")
@click.option("--threads", default=None, type=int,
              help="Torch intra-op threads on CPU (default: torch's). 1 is much faster on a busy machine.")
def track(ckpt, davis_root, split, layer, resolution, tokenizer_spec, max_frames, topk, temperature, radius, n_context, out_dir,
          device, threads, layers_spec, context_rule) -> None:
    """Semi-supervised video object segmentation by label propagation (DAVIS protocol): J, F, J&F.

    The first frame's masks are propagated with the model's per-patch features (Jabri et al.
    2020: L2-normalised affinities, top-k, temperature, spatial radius, first frame + last N
    frames as context) and scored per object against the annotations.

    Example:

    \b
        toto-train track runs/demo --davis demo-out/data/davis --layer 3 --out track-out
        toto-train track runs/large --davis /data/DAVIS --tokenizer dalle:weights/dalle --resolution 512 --layers all
    """
    from trainer.checkpoint import load_model
    from trainer.evals.propagation import PropagationConfig
    from trainer.evals.run import frame_inputs_for, resolution_from_meta, track_job

    try:
        model, meta = load_model(ckpt, device=device)
        cfg = PropagationConfig(topk=topk, temperature=temperature, radius=radius, n_context=n_context)
        res = resolution or resolution_from_meta(meta)
        with torch_threads(threads):
            doc, path = track_job(model, meta, davis_root, out_dir,
                                  tokenize=frame_inputs_for(model, meta, tokenizer_spec), resolution=res, layer=layer,
                                  split=split, max_frames=max_frames, cfg=cfg, layers=layers_spec,
                                  context=context_rule)
    except (ValueError, RuntimeError) as e:
        _fail(e)
    for r in doc["objects"]:
        click.echo(f"{r['sequence']:<24} object {r['object']:>2}  J {100 * r['J']:5.1f}  F {100 * r['F']:5.1f}  "
                   f"J&F {100 * r['JF']:5.1f}")
    for r in doc.get("layers", []):
        click.echo(f"layer {r['layer']:>3} ({r['relative_depth']:.2f})  J {100 * r['J_mean']:5.1f}  "
                   f"F {100 * r['F_mean']:5.1f}  J&F {100 * r['JF_mean']:5.1f}")
    if "peak_layer" in doc:
        click.echo(f"peak layer {doc['peak_layer']} (scores below); plot {os.path.join(out_dir, 'track-layers.png')}")
    s = doc["summary"]
    click.echo(f"overall ({s['objects']} objects): J {100 * s['J_mean']:.1f}  F {100 * s['F_mean']:.1f}  "
               f"J&F {100 * s['JF_mean']:.1f}   wrote {path}")


@click.command("scaling")
@click.argument("run_dirs", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, help="Output directory (scaling.json, scaling.png).")
def scaling(run_dirs, out_dir) -> None:
    """Fit L(C) = a·C^b and L = E + a·C^b on the compute-optimal frontier of several pre-training runs.

    Each RUN_DIR holds metrics.jsonl / val.jsonl with validation losses and the compute so far (MACs,
    or FLOPs / 2), or is a directory of such runs (a `toto-train sweep-lr` output). Both fits carry
    95% confidence intervals; the saturating one needs 4 frontier points. The plot shows every run,
    both fits and the paper's 7.32·C^-0.0378.

    Example:

    \b
        toto-train scaling runs/a1 runs/a2 runs/a3 runs/a4 --out scaling-out
        toto-train scaling sweeps/mup --out scaling-out
    """
    from pipeline.storage import write_json
    from trainer.evals.scaling import plot_scaling, scaling_study

    try:
        doc = scaling_study(list(run_dirs))
    except ValueError as e:
        _fail(e)
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "scaling.json"), doc, "scaling_fit")
    png = plot_scaling(doc, os.path.join(out_dir, "scaling.png"))
    f = doc["fit"]

    def ci(v) -> str:
        return f" [{v[0]:.4g}, {v[1]:.4g}]" if v else ""

    click.echo(f"L(C) = {f['a']:.4g}{ci(f['a_ci'])} · C^{f['b']:.5f}{ci(f['b_ci'])}  (r² {f['r2']:.3f}, "
               f"{len(doc['frontier'])} frontier points); paper: 7.32 · C^-0.0378")
    sat = doc["saturating"]
    if sat:
        click.echo(f"L(C) = {sat['E']:.4g}{ci(sat['E_ci'])} + {sat['a']:.4g}{ci(sat['a_ci'])} · "
                   f"C^{sat['b']:.5f}{ci(sat['b_ci'])}  (r² {sat['r2']:.3f})")
    else:
        click.echo("saturating fit: not made (it needs 4 frontier points and a converging fit)")
    click.echo(f"wrote {os.path.join(out_dir, 'scaling.json')} and {png}", file=sys.stderr)
