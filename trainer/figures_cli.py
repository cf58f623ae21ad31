"""`toto-train curves | position-loss`: the paper's Figures 2 and 10 as commands (registered in trainer/cli.py)."""

from __future__ import annotations

import os

import click

__all__ = ["curves_command", "position_loss_command"]


@click.command("curves")
@click.argument("run_dirs", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, help="Output directory (curves.json, curves.png).")
@click.option("--log-y", is_flag=True, help="Log scale for the loss axis too.")
def curves_command(run_dirs, out_dir, log_y) -> None:
    """Training loss (and validation loss where logged) against tokens seen for several runs (Figure 2).

    Each RUN_DIR holds a `toto-train pretrain` run's metrics.jsonl (and val.jsonl), or is a directory
    of runs (a `toto-train sweep-lr` output). Writes the plot and a JSON of every plotted point.

    Example:

    \b
        toto-train curves runs/base runs/large runs/1b --out curves-out
    """
    from pipeline.storage import write_json
    from trainer.evals.curves import curves_doc, plot_curves

    try:
        doc = curves_doc(list(run_dirs))
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "curves.json")
    write_json(json_path, doc, "training_curves")
    png = plot_curves(doc, os.path.join(out_dir, "curves.png"), log_y=log_y)
    for r in doc["runs"]:
        last = r["train"][-1]
        val = f"; val {r['val'][-1]['loss']:.4f}" if r["val"] else ""
        click.echo(f"{r['run']}: {len(r['train'])} points, last train loss {last['loss']:.4f} at "
                   f"{last['tokens_seen']:.3g} tokens{val}")
    click.echo(f"wrote {json_path} and {png}")


@click.command("position-loss")
@click.argument("ckpt")
@click.option("--data", required=True,
              help="Video token dataset (dir or s3:// URL), e.g. Kinetics-400 val tokens; for a patch-input model "
                   "its pixel dataset (--tokenizer patch:P).")
@click.option("--codes", default=None,
              help="Patch -> dVAE models only: the token dataset of --data's input (the codes it predicts).")
@click.option("--split", default="val", show_default=True, help="Split to score; 'all' for every split.")
@click.option("--frames", default=16, show_default=True, type=int, help="Frames per clip (the paper: 16).")
@click.option("--stride", default=4, show_default=True, type=int, help="Temporal stride inside a clip (the paper: 4).")
@click.option("--clips", default=1, show_default=True, type=int, help="Clips per video, evenly spaced.")
@click.option("--max-clips", default=None, type=int, help="Stop after this many clips (quick runs). Default: all.")
@click.option("--batch-size", default=8, show_default=True, type=int, help="Clips per forward pass.")
@click.option("--out", "out_dir", default="position-loss-out", show_default=True,
              help="Output directory (position_loss.json, position_loss.png).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
def position_loss_command(ckpt, data, codes, split, frames, stride, clips, max_clips, batch_size, out_dir, device) -> None:
    """Next-token loss by position (per token and per frame) of CKPT on a video dataset (Figure 10).

    The paper finds the first frame of a clip clearly harder to predict than the later ones. A clip
    of 16 frames of 256 tokens (4097 tokens with bos) is scored in the 4096-token context: the last
    token is only a target. An image-only dataset is refused. A patch -> patch model is scored by its
    MSE on the next normalised patch, a patch -> dVAE model by cross-entropy on the --codes dataset.

    Example:

    \b
        toto-train position-loss runs/large --data tok/k400 --frames 16 --out pos-out
        toto-train position-loss runs/patch-dvae --data px/k400 --codes tok/k400 --out pos-out
    """
    import torch

    from trainer.checkpoint import load_model
    from trainer.evals.position_job import position_loss_job

    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, meta = load_model(ckpt, device=dev)
        doc, json_path, png = position_loss_job(model, meta, data, out_dir, frames=frames, stride=stride, clips=clips,
                                                split=None if split == "all" else split, batch_size=batch_size,
                                                max_clips=max_clips, codes=codes)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    per = "  ".join(f"{x:.3f}" for x in doc["per_frame"])
    click.echo(f"{doc['num_clips']} clips; loss per frame: {per}")
    click.echo(f"first frame {doc['first_frame']:.4f} vs later {doc['later_frames']:.4f} "
               f"(ratio {doc['first_over_later']:.3f}; paper: first frame clearly higher)")
    click.echo(f"wrote {json_path} and {png}")
