"""`toto-pipeline tokenize` and `toto-pipeline submit`."""

from __future__ import annotations

import sys

import click

from pipeline.sources import ADAPTERS


def _storage_options(endpoint_url: str | None) -> dict | None:
    return {"client_kwargs": {"endpoint_url": endpoint_url}} if endpoint_url else None


@click.command("tokenize")
@click.option("--dataset", required=True, type=click.Choice(sorted(ADAPTERS)),
              help="Dataset adapter (layouts: docs/datasets.md).")
@click.option("--input", "input_", required=True, metavar="URI", help="Dataset root: a local folder or s3://bucket/prefix.")
@click.option("--output", required=True, metavar="URI",
              help="Output location (local or s3://). Holds the shards and all job state; rerun into it to resume.")
@click.option("--tokenizer", default="demo", show_default=True,
              help="Tokenizer spec: demo (bundled), dalle:DIR, vqgan:DIR, dvae:DIR, or patch:8 (the frames' 8x8 pixel "
                   "patches at the token grid, for the patch models of Table 3: docs/training.md).")
@click.option("--resolution", default=128, show_default=True, type=int, help="Frame side in px (short-side resize + centre crop).")
@click.option("--fps", default=None, type=float, help="Output frame rate. Default: each video's native rate, capped at --max-fps.")
@click.option("--max-fps", default=30.0, show_default=True, type=float, help="Cap on the frame rate; also sets the chunk window.")
@click.option("--chunk-frames", default=64, show_default=True, type=int, help="Most frames in one token row.")
@click.option("--format", "fmt", default="arrow", show_default=True, type=click.Choice(["arrow", "webdataset"]),
              help="Shard format: Arrow IPC or WebDataset tar.")
@click.option("--compression", default=None, type=click.Choice(["zstd"]), help="Arrow buffer compression (default: none).")
@click.option("--items-per-shard", default=None, type=int,
              help="Work items per input shard (= per output shard shard-NNNNNN). Default: 16384 for imagenet "
                   "(one image per item), 64 otherwise (docs/cluster.md).")
@click.option("--limit", default=None, type=int, help="Only the first N work items (sorted by key). Default: all.")
@click.option("--split", "splits", multiple=True, help="Only these splits (repeatable). Default: all.")
@click.option("--listing", default=None, metavar="PATH",
              help="Text file (local or s3://, .gz/.zst accepted) of paths relative to --input, one per line, "
                   "used instead of listing storage (e.g. from an S3 Inventory report; a LIST of 1e7 objects takes "
                   "hours). Read once, when OUT/worklist is first frozen. Default: list --input.")
@click.option("--ray-address", default=None,
              help="Join a Ray cluster ('auto' inside a submitted job, or HOST:6379). Default: embedded local Ray.")
@click.option("--num-cpus", default=None, type=int, help="CPUs of the embedded Ray. Default: all cores.")
@click.option("--num-gpus", default=None, type=int,
              help="Up to N tokenizer actors on GPUs (one GPU each); on an autoscaling cluster their requests start GPU "
                   "nodes. Default: the GPUs the cluster has at start; 0 = CPU actors.")
@click.option("--decode-concurrency", default=None, type=int,
              help="Most decode actors (one input shard each at a time). Default: unbounded on a cluster; embedded, "
                   "the CPUs the other actors leave / --decode-cpus.")
@click.option("--decode-cpus", default=1.0, show_default=True, type=float, help="CPUs reserved per decode actor.")
@click.option("--decode-threads", default=None, type=int,
              help="FFmpeg threads per decode; 0 = FFmpeg chooses. Default: 1 with --ray-address (one decode actor "
                   "per core), else 0.")
@click.option("--tokenizer-cpus", default=1.0, show_default=True, type=float,
              help="CPUs per CPU tokenizer actor (and its torch threads).")
@click.option("--cpu-actors", default=1, show_default=True, type=int, help="Most tokenizer actors when there is no GPU.")
@click.option("--writers", default=None, type=int,
              help="Shard writer actors (encode, hash, upload). Default: one per 8 tokenizer actors.")
@click.option("--writer-cpus", default=0.0, show_default=True, type=float,
              help="CPUs reserved per writer actor (0: they may share any node, the head included).")
@click.option("--executors", default=None, type=int,
              help="Ray Data executors the shards are split across (1 = in the driver; more = executor actors, "
                   "1 CPU each on a cluster, feeding the same writers). Default: one per 64 tokenizer GPUs.")
@click.option("--batch-size", default=64, show_default=True, type=int, help="Frames per tokenizer forward pass (raise on GPUs, e.g. 512).")
@click.option("--rows-per-batch", default=16, show_default=True, type=int,
              help="Token rows per tokenizer-stage batch, at least (raised to hold one forward pass of frames).")
@click.option("--decode-block-mb", default=None, type=float,
              help="MB of frames per decode output block (one event for the driver each). Default: 256 with GPU "
                   "tokenizers, 32 without. Larger blocks let one driver feed more GPUs (docs/cluster.md) and cost "
                   "~3x their size in each decode actor's memory.")
@click.option("--precision", default=None, type=click.Choice(["fp32", "tf32", "bf16"]),
              help="Tokenizer arithmetic (docs/tokenizers.md). Default: bf16 on GPUs, fp32 on CPUs. Recorded with "
                   "the shards; a resume or a mix refuses another precision.")
@click.option("--decode-timeout", default=300.0, show_default=True, type=float, help="Seconds per input before it counts as hung.")
@click.option("--endpoint-url", envvar="TOTO_S3_ENDPOINT_URL", default=None,
              help="S3 endpoint for s3:// URLs (MinIO, on-prem). Credentials come from the environment / AWS config only. "
                   "Env: TOTO_S3_ENDPOINT_URL.")
@click.option("--no-progress", is_flag=True, help="No live progress display.")
def tokenize_cmd(dataset, input_, output, tokenizer, resolution, fps, max_fps, chunk_frames, fmt, compression,
                 items_per_shard, limit, splits, listing, ray_address, num_cpus, num_gpus, decode_concurrency, decode_cpus,
                 decode_threads, tokenizer_cpus, cpu_actors, writers, writer_cpus, executors, batch_size, rows_per_batch, decode_block_mb,
                 precision, decode_timeout, endpoint_url, no_progress) -> None:
    """Decode and tokenize a dataset into token shards, exactly once per input shard.

    \b
    Lists the dataset once into OUT/worklist (frozen, hashed), cuts it into input shards of
    --items-per-shard items, then streams: decode actors (CPU) → tokenizer actors (GPU when
    present) → one committed output shard per input shard (shard-NNNNNN + sidecar), then
    OUT/manifest.json and OUT/run_summary.json. Rerunning the same command skips committed
    shards, so a killed job resumes where it stopped. Bad inputs become error records; the job
    still exits 0. Watch a running job with `toto-pipeline status OUT`.

    \b
    Example:
      toto-pipeline tokenize --dataset kinetics600 --input s3://bkt/k600 --output s3://bkt/tok/k600 \\
          --tokenizer dalle:weights/dalle --ray-address auto --batch-size 512
    """
    from pipeline.jobs.config import TokenizeConfig
    from pipeline.jobs.plan import JobError
    from pipeline.jobs.ray_job import run_tokenize

    try:
        cfg = TokenizeConfig(
            dataset=dataset, input=input_, output=output, tokenizer=tokenizer, resolution=resolution, fps=fps,
            max_fps=max_fps, chunk_frames=chunk_frames, format=fmt, compression=compression,
            items_per_shard=items_per_shard, limit=limit, splits=tuple(splits) or None, listing=listing,
            ray_address=ray_address,
            num_cpus=num_cpus, num_gpus=num_gpus, decode_concurrency=decode_concurrency, decode_cpus=decode_cpus, decode_threads=decode_threads,
            tokenizer_cpus=tokenizer_cpus, cpu_actors=cpu_actors, writers=writers, writer_cpus=writer_cpus, executors=executors,
            batch_size=batch_size, rows_per_batch=rows_per_batch, decode_block_mb=decode_block_mb, precision=precision,
            decode_timeout_s=decode_timeout,
            progress=not no_progress,
            storage_options=_storage_options(endpoint_url),
        )
        run_tokenize(cfg)
    except (ValueError, JobError) as e:
        raise click.ClickException(str(e)) from None


@click.command("submit", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--address", required=True, envvar="RAY_API_SERVER_ADDRESS",
              help="Ray dashboard / Jobs API address, e.g. http://HEAD:8265 (env RAY_API_SERVER_ADDRESS).")
@click.option("--install", default="deps", show_default=True, type=click.Choice(["deps", "none"]),
              help="deps: pip-install the project's dependencies (not torch) in the job's runtime env; "
                   "none: the cluster image has them (infra/Dockerfile).")
@click.option("--working-dir", default=None, help="Source tree uploaded as the job's working_dir. Default: this checkout.")
@click.option("--no-wait", is_flag=True, help="Return after submitting instead of following the logs.")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def submit_cmd(address, install, working_dir, no_wait, args) -> None:
    """Run a toto-pipeline command on a Ray cluster through the Jobs API.

    \b
    The source tree is uploaded as the job's working_dir and the driver runs on the head node;
    `tokenize` gets --ray-address auto so it joins the cluster. Exits with the job's status.
    Example:
      toto-pipeline submit --address http://HEAD:8265 -- tokenize --dataset kinetics600 \\
          --input s3://bkt/k600 --output s3://bkt/tok/k600 --tokenizer dalle:/weights/dalle
    """
    from pipeline.jobs.submit import submit

    job_id, status = submit(address, list(args), install=install, working_dir=working_dir, wait=not no_wait,
                            echo=lambda s: click.echo(s, err=True))
    click.echo(f"{job_id} {status}")
    if not no_wait and status != "SUCCEEDED":
        sys.exit(1)


COMMANDS = [tokenize_cmd, submit_cmd]
