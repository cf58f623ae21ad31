"""`toto-pipeline worklist`: list a dataset once into a frozen work list and show its report."""

from __future__ import annotations

import click

from pipeline.sources.adapters import ADAPTERS
from pipeline.sources.items import DEFAULT_CHUNK_SECONDS, DEFAULT_MAX_ITEM_SECONDS
from pipeline.sources.worklist import ensure_worklist, input_shards


@click.command("worklist")
@click.option("--dataset", required=True, type=click.Choice(sorted(ADAPTERS)), help="Dataset adapter.")
@click.option("--input", "root", required=True, help="Dataset root: a folder or s3://bucket/prefix.")
@click.option("--out", required=True, help="Work-list folder (worklist.parquet + worklist.json); reused if frozen.")
@click.option("--split", "splits", multiple=True, help="Only these splits (repeatable; kinetics/imagenet). Default: all.")
@click.option("--max-item-seconds", default=DEFAULT_MAX_ITEM_SECONDS, show_default=True,
              help="Cut longer videos into items of at most this long (whole chunks).")
@click.option("--chunk-seconds", default=round(DEFAULT_CHUNK_SECONDS, 6), show_default=True,
              help="Decoder chunk window = chunk_frames / max_fps (64/30); must match the decode settings.")
@click.option("--items-per-shard", default=256, show_default=True, help="Input-shard size to report.")
@click.option("--index", default=None, help="folder only: CSV/JSONL with path,label,split (relative to --input).")
@click.option("--val-solution", default=None, help="imagenet only: LOC_val_solution.csv when it is not under --input.")
@click.option("--name", default=None, help="Dataset name written into keys (default: --dataset).")
@click.option("--listing", default=None,
              help="Text file (.gz/.zst ok) of file paths relative to --input, one per line (e.g. from an S3 "
                   "Inventory), used instead of listing storage.")
def worklist(dataset: str, root: str, out: str, splits: tuple[str, ...], max_item_seconds: float,
             chunk_seconds: float, items_per_shard: int, index: str | None, val_solution: str | None,
             name: str | None, listing: str | None) -> None:
    """List a dataset once into a frozen, sorted, hashed work list and print what was found.

    Missing and unmatched files are counted with a few examples (see docs/datasets.md). A rerun
    with the same --out reuses the frozen list and does not list storage again.

    \b
    Example:
      toto-pipeline worklist --dataset kinetics600 --input demo/data/kinetics --out work/k600
      toto-pipeline worklist --dataset imagenet --input s3://bucket/imagenet --out s3://bucket/work/in1k
    """
    opts: dict = {"max_item_seconds": max_item_seconds, "chunk_seconds": chunk_seconds}
    if splits:
        opts["splits"] = list(splits)
    if index:
        opts["index"] = index
    if val_solution:
        opts["val_solution"] = val_solution
    if name:
        opts["name"] = name
    if listing:
        opts["listing"] = listing
    try:
        wl, created = ensure_worklist(dataset, root, out, **opts)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    report = wl.meta.get("report", {})
    click.echo(f"{'froze' if created else 'reused frozen'} work list {out}: {len(wl)} items, sha256 {wl.sha256}")
    click.echo(f"input shards of {items_per_shard}: {len(input_shards(wl, items_per_shard))}")
    for problem, count in sorted(report.get("problems", {}).items()):
        click.echo(f"  {problem.replace('_', ' ')}: {count}")
        for ex in report.get("examples", {}).get(problem, []):
            click.echo(f"    e.g. {ex}")
