"""`toto-train finetune`: click command (registered in trainer/cli.py); the work is trainer.finetune."""

from __future__ import annotations

import click

from trainer.finetune import HEADS, PAPER_TOP1, PARALLEL, PRESETS, FinetuneConfig

__all__ = ["finetune_command"]


def _split(v: str) -> str | None:
    return None if v == "all" else v


@click.command("finetune")
@click.argument("ckpt")
@click.option("--train", "train_url", required=True, help="Labelled token dataset (dir or s3:// URL) to fine-tune on.")
@click.option("--val", "val_url", required=True, help="Labelled token dataset scored after every epoch.")
@click.option("--out", "out_dir", required=True, help="Run directory: step-NNNNNNNN/ checkpoints and finetune.json.")
@click.option("--preset", default="paper", show_default=True, type=click.Choice(sorted(PRESETS)),
              help="Settings the options below override: 'paper' (MAE/BEiT ImageNet recipe) or 'tiny' (CI, seconds).")
@click.option("--head", default=None, type=click.Choice(HEADS), help="Pooling head on the backbone. [default: attention]")
@click.option("--layer", default=None, type=int, help="Block whose output the head reads. Default: the last block.")
@click.option("--epochs", default=None, type=int, help="Epochs. [paper: 50]")
@click.option("--warmup-epochs", default=None, type=float, help="Linear warmup epochs, then cosine. [paper: 5]")
@click.option("--global-batch", default=None, type=int, help="Sequences per optimizer step, all ranks. [paper: 1024]")
@click.option("--micro-batch", default=None, type=int, help="Sequences per forward per rank (accumulation).")
@click.option("--lr", default=None, type=float, help="Peak lr of the head; block i gets lr·decay^(L+1-i). [paper: 4e-3]")
@click.option("--min-lr", default=None, type=float, help="Lr at the end of the cosine. [paper: 1e-6]")
@click.option("--layer-decay", default=None, type=float, help="Layer-wise lr decay; 1 turns it off. [paper: 0.75]")
@click.option("--weight-decay", default=None, type=float, help="AdamW weight decay (not on norms/biases). [paper: 0.05]")
@click.option("--label-smoothing", default=None, type=float, help="Label smoothing. [paper: 0.1]")
@click.option("--heads", "num_heads", default=None, type=int, help="Heads of the attention pooling. [paper: 16]")
@click.option("--frames", default=None, type=int, help="Frames per video clip. [paper: 16]")
@click.option("--stride", default=None, type=int, help="Temporal stride inside a clip. [paper: 4]")
@click.option("--val-clips", default=None, type=int, help="Clips per validation video, averaged. [paper: 4]")
@click.option("--train-split", default="train", show_default=True, help="Split of --train; 'all' for every split.")
@click.option("--val-split", default="val", show_default=True, help="Split of --val; 'all' for every split.")
@click.option("--max-samples", default=None, type=int, help="Cap on samples per split (quick runs).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the head init and the sample order.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--parallel", default=None, type=click.Choice(PARALLEL),
              help="Under torchrun: ddp (replicas) or fsdp (FSDP2: weights, gradients and AdamW state sharded "
                   "over the ranks, for backbones that do not fit one GPU with DDP). [default: ddp]")
@click.option("--exit-after-steps", default=None, type=int, help="Checkpoint and leave after N steps (rerun resumes).")
def finetune_command(ckpt, train_url, val_url, out_dir, preset, train_split, val_split, seed, device, **overrides) -> None:
    """Fine-tune a checkpoint end to end with a pooling head and report top-1 / top-5 per epoch.

    The whole backbone (up to --layer) and the head train together: AdamW with layer-wise lr decay,
    warmup + cosine, label smoothing, bf16 autocast on CUDA. Images are single-frame sequences,
    videos FRAMES-frame clips. Run the same command again to resume OUT after an interruption;
    launch with torchrun for data parallelism. Results: OUT/finetune.json.

    Example:

    \b
        toto-train finetune runs/demo --train demo-out/data/digits --val demo-out/data/digits \\
            --head attention --preset tiny --out ft-out
        torchrun --nproc-per-node 8 -m trainer.cli finetune runs/large --train tok/in1k --val tok/in1k \\
            --out ft/large
        torchrun --nproc-per-node 8 -m trainer.cli finetune runs/1b --train tok/in1k --val tok/in1k \\
            --parallel fsdp --out ft/1b
    """
    from trainer.finetune import finetune

    kw = dict(PRESETS[preset])
    kw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = FinetuneConfig(train_split=_split(train_split), val_split=_split(val_split), seed=seed, device=device,
                             **kw)
        doc = finetune(ckpt, train_url, val_url, out_dir, cfg)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    f = doc["final"]
    if f is None:
        click.echo(f"stopped after epoch {len(doc['epochs'])}/{cfg.epochs}; run the same command to resume")
        return
    click.echo(f"top-1 {f['top1']:.2f}  top-5 {f['top5']:.2f}  (best top-1 {f['best_top1']:.2f}; paper, ImageNet: "
               f"{PAPER_TOP1})  wrote {out_dir}/finetune.json")
