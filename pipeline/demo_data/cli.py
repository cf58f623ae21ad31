"""`toto-pipeline demo-data`: write the embedded demo data set."""

from __future__ import annotations

import sys
import time

import click

from pipeline.demo_data import DemoDataConfig, make_demo_data
from pipeline.demo_data.cater import KINDS, CaterConfig, make_cater


@click.command("demo-data")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (created; files in it are overwritten).")
@click.option("--seed", default=0, show_default=True, help="Everything generated is a function of the seed.")
@click.option("--scale", default=1.0, show_default=True, type=float,
              help="Multiply every count (e.g. 0.05 for a tiny CI set: 150+25 images, 13+3 clips, 1 DAVIS sequence).")
@click.option("--images", default=3000, show_default=True, help="ImageNet-style train images (at scale 1).")
@click.option("--val-images", default=500, show_default=True, help="ImageNet-style val images.")
@click.option("--videos", default=256, show_default=True, help="Kinetics-style train clips.")
@click.option("--val-videos", default=64, show_default=True, help="Kinetics-style validate clips.")
@click.option("--davis", default=8, show_default=True, help="DAVIS-style sequences.")
@click.option("--fps", default=16, show_default=True, help="Clip frame rate.")
@click.option("--clip-seconds", default=2.0, show_default=True, help="Clip length in seconds.")
@click.option("--workers", default=2, show_default=True, help="Processes (the output does not depend on it).")
def demo_data(out: str, seed: int, scale: float, images: int, val_images: int, videos: int, val_videos: int,
              davis: int, fps: int, clip_seconds: float, workers: int) -> None:
    """Make the demo data set from images bundled in scikit-learn and scikit-image (no downloads).

    \b
    OUT/imagenet/  ILSVRC-2012 layout, 10 object classes (n00000000..n00000009: a photo-textured disc), 64 px JPEGs
    OUT/kinetics/  Kinetics layout (annotations/*.csv + {train,val}/*.mp4), 10 classes: the moving object's texture
    OUT/davis/     DAVIS-2017 layout (JPEGImages/480p, Annotations/480p palette PNGs, ImageSets/2017)

    Read the parts with the normal
    adapters: imagenet → `imagenet`, kinetics → `kinetics600` (or 400/700).

    \b
    Example:
      toto-pipeline demo-data --out demo/data
      toto-pipeline demo-data --out /tmp/tiny --scale 0.05 --seed 1
    """
    try:
        cfg = DemoDataConfig(out=out, seed=seed, scale=scale, images=images, val_images=val_images, videos=videos,
                             val_videos=val_videos, davis=davis, fps=fps, clip_seconds=clip_seconds, workers=workers)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    t = time.perf_counter()
    summary = make_demo_data(cfg, progress=sys.stderr.isatty())
    dt = time.perf_counter() - t
    i, k, d = summary["imagenet"], summary["kinetics"], summary["davis"]
    click.echo(
        f"wrote {out}: imagenet {i['train']}+{i['val']} images, kinetics {k['train']}+{k['validate']} clips, "
        f"davis {d['sequences']} sequences in {dt:.1f} s"
    )


@click.command("demo-cater")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (files in it are overwritten).")
@click.option("--seed", default=0, show_default=True, help="Everything generated is a function of the seed.")
@click.option("--train", default=48, show_default=True, help="Videos in lists/localize/train.txt.")
@click.option("--val", default=16, show_default=True, help="Videos in lists/localize/val.txt.")
@click.option("--frames", default=300, show_default=True, help="Frames per video (CATER: 300).")
@click.option("--fps", default=24, show_default=True, help="Frame rate (CATER: 24).")
@click.option("--size", default=96, show_default=True, help="Frame side in px (square).")
@click.option("--workers", default=1, show_default=True, help="Processes (the output does not depend on it).")
def demo_cater(out, seed, train, val, frames, fps, size, workers) -> None:
    """Make a CATER-like miniature for snitch localisation in CATER's release layout.

    Objects (cones, cubes) slide on a table seen from above; a gold snitch is sometimes covered by
    a cone and carried; the label is the snitch's final cell on the 6x6 grid (0..35). Read it with
    the `cater` adapter; the probe preset is `toto-train probe ... --task cater`.

    \b
    Example:
      toto-pipeline demo-cater --out demo/cater
      toto-pipeline tokenize --dataset cater --input demo/cater --output tok/cater
    """
    try:
        cfg = CaterConfig(out=out, seed=seed, train=train, val=val, frames=frames, fps=fps, size=size,
                          workers=workers)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    s = make_cater(cfg)
    click.echo(f"wrote {out}: " + ", ".join(
        f"{sp} {s[sp]['videos']} videos ({s[sp]['classes']} cells; " +
        " / ".join(f"{s[sp][k]} {k}" for k in KINDS) + ")" for sp in ("train", "val")))
