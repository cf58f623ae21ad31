"""`toto-pipeline mix`: build a mix manifest (+ cached blend index) or inspect one."""

from __future__ import annotations

import sys

import click
import numpy as np

from pipeline.mix.access import read_mix_manifest
from pipeline.mix.blend import Blend
from pipeline.mix.build import MixConfig, build_mix


def _pairs(text: str | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    if not text:
        return out
    for part in text.split(","):
        if "=" not in part:
            raise click.BadParameter(f"{part!r} is not NAME=VALUE (e.g. imagenet=0.2)", param_hint=what)
        k, v = part.split("=", 1)
        if k.strip() in out:
            raise click.BadParameter(f"{k.strip()!r} is given twice", param_hint=what)
        out[k.strip()] = v.strip()
    return out


def inspect_text(doc: dict, budget_tokens: float) -> str:
    """Realised shares, sample counts and passes over each source for a token budget."""
    lines = [f"mix {doc['content_hash'][:16]}  seed {doc['seed']}  seq_len {doc['seq_len']}  "
             f"vocab {doc['vocab_size']} (codebook {doc['codebook_size']} + specials {doc['specials']})",
             f"video samples: {doc['frames']} frames at stride {doc['stride']}, clip starts every {doc['hop']} frames"
             f"{' + per-pass jitter' if doc['jitter'] else ''}; "
             f"image samples: {doc['images_per_seq']} images",
             f"budget {budget_tokens:.3g} tokens = {int(budget_tokens // doc['seq_len'])} sequences of {doc['seq_len']}"]
    kinds = {s["name"]: s for s in doc["sources"]}
    budget_samples = int(budget_tokens // doc["seq_len"])
    for sp, info in doc["splits"].items():
        blend = Blend(info["weights"], info["period"])
        n = info["num_samples"]
        counts = blend.counts(n)
        # Worst prefix error over one period (the interleave repeats with this period).
        src, _ = blend.build(min(n, blend.period))
        c = np.zeros(len(info["weights"]), np.int64)
        worst = 0.0
        w = np.asarray(info["weights"]) / info["period"]
        for i, s in enumerate(src.tolist()):
            c[s] += 1
            worst = max(worst, float(np.abs(c - w * (i + 1)).max()))
        bud = blend.counts(budget_samples)
        lines.append(f"\n[{sp}] {n} samples indexed; period {info['period']}; worst prefix error {worst:.3f} samples")
        lines.append(f"  {'source':<14}{'kind':<7}{'share':>8}{'realised':>10}{'samples':>12}{'per pass':>12}"
                     f"{'passes':>9}{'passes@budget':>15}")
        for k, name in enumerate(info["sources"]):
            ps = info["per_source"][name]
            lines.append(
                f"  {name:<14}{kinds[name]['kind']:<7}{w[k]:>8.4f}{counts[k] / n:>10.4f}{int(counts[k]):>12}"
                f"{ps['samples_per_pass']:>12}{counts[k] / ps['samples_per_pass']:>9.2f}"
                f"{bud[k] / ps['samples_per_pass']:>15.2f}")
        for name, ps in info["per_source"].items():
            if not ps.get("used"):
                lines.append(f"  {name}: no usable samples in this split ({ps['units']} units)")
            elif ps.get("segments_too_short"):
                lines.append(f"  {name}: {ps['segments_too_short']} video segments shorter than one clip were skipped")
    return "\n".join(lines)


@click.command("mix")
@click.option("--ratios", help="Per-sequence shares, NAME=RATIO,... (normalised), e.g. imagenet=0.2,k600=0.1,ego4d=0.1,howto100m=0.6.")
@click.option("--inputs", help="Token datasets, NAME=URI,... (local dirs or s3://), one per name in --ratios.")
@click.option("--out", "out", help="Mix manifest to write, e.g. mix.json; the index goes beside it in mix.index/<hash>/.")
@click.option("--seed", default=0, show_default=True, help="Seed of the per-source sample orders.")
@click.option("--seq-len", type=int, default=None, help="Model context T. Default: frames × tokens per frame (4096 at 16 × 16×16).")
@click.option("--frames", default=16, show_default=True, help="Frames per video sample.")
@click.option("--stride", default=4, show_default=True, help="Temporal stride between the frames of a sample.")
@click.option("--hop", type=int, default=None, help="Frames between clip starts inside a video. Default: frames × stride.")
@click.option("--jitter/--no-jitter", default=True, show_default=True,
              help="Shift each clip's start by a seeded offset in [0, hop) that changes every pass (stays inside the video).")
@click.option("--images-per-seq", default=16, show_default=True, help="Images per image sample.")
@click.option("--num-samples", type=int, default=None, help="Train samples to index. Default: until every source has had one pass (the loader continues past it).")
@click.option("--kinds", default=None, help="Override image/video detection, NAME=image|video,...")
@click.option("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// URLs (credentials come from the environment).")
@click.option("--inspect", "inspect_path", default=None, help="Print shares, sample counts and passes of an existing MIX.json and exit.")
@click.option("--budget-tokens", default=1e12, show_default=True, type=float, help="Token budget for the passes column of --inspect.")
def mix_command(ratios, inputs, out, seed, seq_len, frames, stride, hop, jitter, images_per_seq, num_samples, kinds,
                endpoint_url, inspect_path, budget_tokens) -> None:
    """Blend token datasets into a mix manifest with a deterministic, cached sample index.

    \b
    Example:
      toto-pipeline mix --ratios imagenet=0.2,k600=0.1,ego4d=0.1,howto100m=0.6 \\
          --inputs imagenet=tok/in,k600=tok/k600,ego4d=tok/ego4d,howto100m=s3://b/howto \\
          --out mix.json --seed 0 --frames 16 --stride 4 --images-per-seq 16
      toto-pipeline mix --inspect mix.json --budget-tokens 1e12
    """
    so = {"client_kwargs": {"endpoint_url": endpoint_url}} if endpoint_url else None
    if inspect_path:
        click.echo(inspect_text(read_mix_manifest(inspect_path, so), budget_tokens))
        return
    if not (ratios and inputs and out):
        raise click.UsageError("give --ratios, --inputs and --out (or --inspect MIX.json)")
    try:
        cfg = MixConfig(ratios=_pairs(ratios, "--ratios"), inputs=_pairs(inputs, "--inputs"), seed=seed, seq_len=seq_len,
                        frames=frames, stride=stride, hop=hop, jitter=jitter, images_per_seq=images_per_seq, num_samples=num_samples,
                        kinds=_pairs(kinds, "--kinds"))
        doc = build_mix(cfg, out, so)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {out} (content hash {doc['content_hash']})", err=True)
    click.echo(inspect_text(doc, budget_tokens), file=sys.stdout)
