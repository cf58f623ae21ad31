"""`toto-pipeline status | verify | inspect`: look at a token dataset (local or s3://)."""

from __future__ import annotations

import collections
import json
import sys
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline import storage
from pipeline.shards import store

_err = Console(stderr=True)


def _storage_options(endpoint_url: str | None) -> dict | None:
    return {"client_kwargs": {"endpoint_url": endpoint_url}} if endpoint_url else None


endpoint_option = click.option(
    "--endpoint-url",
    envvar="TOTO_S3_ENDPOINT_URL",
    default=None,
    help="S3 endpoint for s3:// URLs (e.g. a MinIO or on-prem store). Credentials come from the "
    "environment / AWS config only. Env: TOTO_S3_ENDPOINT_URL.",
)


def dataset_status(
    out: str, storage_options: dict | None = None, *, names: list[str] | None = None,
    sidecars: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Counts of a token dataset, from its sidecars (works while a job is writing it).

    One listing of OUT (or ``names``) serves sidecars, debris and the manifest's presence; the
    sidecars are read once, concurrently (or taken from ``sidecars``, read from that listing)."""
    names = storage.listdir(out, storage_options) if names is None else names
    sides = store.committed_shards(out, storage_options, names=names) if sidecars is None else sidecars
    total = None
    if "job.json" in names:
        total = storage.read_json(storage.join(out, "job.json"), "job_plan", storage_options)["num_input_shards"]
    tokens = sum(s["counts"]["tokens"] for s in sides)
    nbytes = sum(s["bytes"] for s in sides)
    return {
        "output": out,
        "shards_committed": len(sides),
        "shards_planned": total,
        "rows": sum(s["counts"]["rows"] for s in sides),
        "frames": sum(s["counts"]["frames"] for s in sides),
        "tokens": tokens,
        "bytes": nbytes,
        "bytes_per_token": (nbytes / tokens) if tokens else None,
        "inputs_failed": sum(len(s["errors"]) for s in sides),
        "errors_by_reason": store.errors_by_reason(sides),
        "error_examples": [e for s in sides for e in s["errors"]][:5],
        "debris": len(store.debris(out, storage_options, names=names)),
        "manifest": store.MANIFEST in names,
    }


@click.command("status")
@click.argument("out")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--rebuild-manifest", is_flag=True, help="Rewrite OUT/manifest.json from the shard sidecars.")
@endpoint_option
def status_cmd(out: str, as_json: bool, rebuild_manifest: bool, endpoint_url: str | None) -> None:
    """Progress and totals of the token dataset at OUT (during or after a job).

    \b
    Shows shards committed (of the planned number while a job runs), rows, frames, tokens,
    bytes per token on disk, and failed inputs grouped by reason.
    Example: toto-pipeline status tok/k600 --json
    """
    so = _storage_options(endpoint_url)
    names = storage.listdir(out, so)
    try:
        sides = store.committed_shards(out, so, names=names)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    if rebuild_manifest:
        store.write_manifest(out, so, sidecars=sides)  # the sidecars just read, not a second GET of each
        names = sorted({*names, store.MANIFEST})
    st = dataset_status(out, so, names=names, sidecars=sides)
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    t = Table(title=f"token dataset {storage.redact(out)}", show_header=False)
    planned = f" of {st['shards_planned']}" if st["shards_planned"] is not None else ""
    t.add_row("shards committed", f"{st['shards_committed']}{planned}")
    for k in ("rows", "frames", "tokens"):
        t.add_row(k, f"{st[k]:,}")
    t.add_row("bytes on disk", f"{st['bytes']:,}")
    t.add_row("bytes per token", f"{st['bytes_per_token']:.3f}" if st["bytes_per_token"] else "-")
    t.add_row("failed inputs", str(st["inputs_failed"]))
    for reason, n in st["errors_by_reason"].items():
        t.add_row(f"  {reason}", str(n))
    t.add_row("manifest.json", "written" if st["manifest"] else "not yet (job running or interrupted)")
    if st["debris"]:
        t.add_row("debris files", f"{st['debris']} (uncommitted leftovers; removed by the next run or `verify --clean`)")
    Console().print(t)


@click.command("verify")
@click.argument("out")
@click.option("--clean", is_flag=True, help="First delete debris (temporaries, data files without a sidecar, sidecars without a data file). "
              "Only when no job writes OUT.")
@endpoint_option
def verify_cmd(out: str, clean: bool, endpoint_url: str | None) -> None:
    """Check every committed shard at OUT: schema, sha256, per-frame checksums, row counts, token range.

    \b
    Each data file's sha256 is checked against its sidecar; Arrow shards of format 2 also carry a
    checksum per frame, which names the damaged rows and frames. The last line says which checks
    ran on how many shards (older shards have the whole-file sha256 only).
    Exits 1 and names each bad shard if anything is wrong. Example: toto-pipeline verify tok/k600
    """
    so = _storage_options(endpoint_url)
    names = storage.listdir(out, so)  # one listing, one read of each sidecar, for every check below
    deb = store.debris(out, so, names=names)
    if clean and deb:  # first: a sidecar whose data file is gone is debris that readers refuse
        store.clean_debris(out, so, names=names)
        gone = {storage.basename(u) for u in deb}
        names = [n for n in names if n not in gone]
    try:
        sides = store.committed_shards(out, so, names=names)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    bad: dict[str, list[str]] = {}
    ran: collections.Counter[str] = collections.Counter()
    from tqdm import tqdm

    for s in tqdm(sides, desc="verify", unit="shard", file=sys.stderr, disable=len(sides) < 2):
        ran.update(store.verify_checks(s))
        problems = store.verify_shard(out, s, so)
        if problems:
            bad[s["data_file"]] = problems
    if store.MANIFEST in names:
        try:
            man = store.read_manifest(out, so)
            if man["content_hash"] != store.build_manifest(out, so, sidecars=sides)["content_hash"]:
                bad["manifest.json"] = ["does not match the shard sidecars; rebuild with `toto-pipeline status OUT --rebuild-manifest`"]
        except ValueError as e:
            bad["manifest.json"] = [str(e)]
    for name, problems in bad.items():
        for p in problems:
            click.echo(f"BAD {storage.join(out, name)}: {p}", err=True)
    rows = sum(s["counts"]["rows"] for s in sides)
    click.echo(
        f"{len(sides) - len([n for n in bad if n != 'manifest.json'])}/{len(sides)} shards OK, {rows:,} rows"
        + (f", {len(deb)} debris files {'removed' if clean else 'ignored'}" if deb else "")
    )
    if sides:
        frames = sum(n for c, n in ran.items() if c.startswith("frames:"))
        kinds = ", ".join(sorted(c.split(":", 1)[1] for c in ran if c.startswith("frames:")))
        click.echo(f"checks: whole-file sha256 on {ran['sha256']} shards; per-frame checksums ({kinds or 'none'}) on "
                   f"{frames} shards" + (f" ({len(sides) - frames} shards predate them: sha256 only)"
                                         if frames < len(sides) else ""))
    if bad:
        sys.exit(1)


@click.command("inspect")
@click.argument("target")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
@click.option("--plot", "plot_path", default=None,
              help="Write the 1-, 2- and 3-gram rank-frequency plot (Figure 3) to this PNG, and its numbers to the "
                   ".json beside it.")
@click.option("--with", "others", multiple=True,
              help="Another token dataset (e.g. another tokenizer's) on the same --plot; repeatable.")
@click.option("--ngram-buckets", default=1 << 22, show_default=True, type=int,
              help="Counters per hashed n-gram order (a power of two; bounds memory): exact below V^n.")
@endpoint_option
def inspect_cmd(target: str, as_json: bool, plot_path: str | None, others: tuple[str, ...], ngram_buckets: int,
                endpoint_url: str | None) -> None:
    """Statistics of a token dataset directory or one shard file.

    \b
    Rows, grid, fps, and the token unigram statistics of the paper's Figure 3: the fraction of the
    codebook in use (coverage) and the entropy in bits (max = log2 codebook size).
    With --plot: 1-, 2- and 3-gram distributions within frames (rank-frequency, log-log), coverage
    (fraction of possible n-grams seen) and how many n-grams cover 90%, for TARGET and each --with.
    Example: toto-pipeline inspect tok/k600/shard-000000.arrow
    Example: toto-pipeline inspect tok/in1k-dalle --with tok/in1k-vqgan --plot ngrams.png
    """
    so = _storage_options(endpoint_url)
    name = storage.basename(target)
    if store.DATA_RE.match(name) or store.SIDECAR_RE.match(name):
        r = store.open_shard(target, so)
        sides = [r.sidecar]
        out = target[: len(target) - len(name)].rstrip("/") or "."
        r.close()
    else:
        out = target
        sides = store.committed_shards(out, so)
        if not sides:
            raise click.ClickException(f"{target}: no committed shards found")
    cb = sides[0]["codebook_size"]
    counter = None
    if plot_path:  # one pass: the n-gram counts hold the exact unigram histogram too
        from pipeline.shards.ngrams import count_dataset

        try:
            counter, _ = count_dataset(out, so, buckets=ngram_buckets, sidecars=sides)
        except ValueError as e:
            raise click.ClickException(str(e)) from e
    if counter is not None and counter.exact[1]:
        counts = counter.counts[1]
    else:
        counts = store.token_histogram(out, cb, so, sidecars=sides)
    stats = store.unigram_stats(counts)
    fps = sorted({s.get("fps") for s in sides if s.get("fps") is not None})
    info = {
        "target": target,
        "shards": len(sides),
        "rows": sum(s["counts"]["rows"] for s in sides),
        "frames": sum(s["counts"]["frames"] for s in sides),
        "grid": sides[0]["grid"],
        "resolution": sides[0]["resolution"],
        "fps": fps,
        "codebook_size": cb,
        "tokenizer": sides[0]["tokenizer"]["id"],
        "datasets": sorted({d for s in sides for d in s.get("datasets", [])}),
        **stats,
        "top_codes": [[int(c), int(counts[c])] for c in np.argsort(-counts, kind="stable")[:10] if counts[c]],
    }
    if plot_path:
        _ngram_plot(out, sides, counter, list(others), plot_path, ngram_buckets, so)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    t = Table(title=f"inspect {storage.redact(target)}", show_header=False)
    for k in ("shards", "rows", "frames", "grid", "resolution", "fps", "codebook_size", "tokenizer", "datasets"):
        t.add_row(k, str(info[k]))
    t.add_row("tokens", f"{stats['tokens']:,}")
    t.add_row("codebook coverage", f"{stats['coverage']:.1%} of {cb} codes")
    t.add_row("unigram entropy", f"{stats['entropy_bits']:.3f} bits (max {stats['max_entropy_bits']:.2f})")
    t.add_row("top codes", ", ".join(f"{c}:{n}" for c, n in info["top_codes"]))
    Console().print(t)




def _ngram_plot(out: str, sides: list[dict], counter, others: list[str], plot_path: str, buckets: int, so) -> None:
    """n-gram statistics of `out` (its counts, `counter`) and of each other dataset: PNG + JSON (ngram_stats)."""
    import os

    from pipeline.shards.ngrams import dataset_ngrams, ngram_doc, plot_ngrams

    try:
        docs = [ngram_doc(out, counter, sides)]
        docs += [dataset_ngrams(o, so, buckets=buckets) for o in others]
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    names = [d["tokenizer"] for d in docs]
    for d in docs:  # label by tokenizer; by dataset path where two share a tokenizer
        d["label"] = d["tokenizer"] if names.count(d["tokenizer"]) == 1 else storage.basename(d["target"])
    if os.path.dirname(plot_path):
        os.makedirs(os.path.dirname(plot_path), exist_ok=True)
    plot_ngrams(docs, plot_path)
    json_path = os.path.splitext(plot_path)[0] + ".json"
    storage.write_json(json_path, {"schema": "ngram_stats", "version": 1, "datasets": docs}, "ngram_stats")
    for d in docs:
        cov = "  ".join(f"{n}-gram coverage {'n/a' if g['coverage'] is None else format(g['coverage'], '.3%')}"
                        f" ({g['ngrams_for_90pct']:,} cover 90%)" for n, g in d["ngrams"].items())
        _err.print(f"{d['label']}: {cov}")
    _err.print(f"wrote {plot_path} and {json_path}")


COMMANDS = [status_cmd, verify_cmd, inspect_cmd]
