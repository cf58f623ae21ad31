"""`toto-train pretrain`: the command line over trainer.train."""

from __future__ import annotations

import json
import sys

import click

from trainer.config import PRESETS, load_config


@click.command("pretrain", context_settings={"ignore_unknown_options": False})
@click.option("--config", "config", default="tiny", show_default=True,
              help=f"Preset ({', '.join(sorted(PRESETS))}) or a .json/.yaml file of TrainConfig fields "
                   "(an optional 'preset' key names the starting point).")
@click.option("--data", required=True, help="Mix manifest (mix.json from `toto-pipeline mix`).")
@click.option("--out", required=True, help="Run directory (local, or an fsspec URL such as s3://bucket/runs/x): "
                                           "checkpoints, metrics.jsonl, tb/, position_loss/. Re-running the same "
                                           "command resumes from its newest checkpoint.")
@click.option("--init-from", default=None, help="Checkpoint (step dir or run dir) whose model weights start this "
                                                "run, with a new optimizer and schedule (e.g. the 256 px stage).")
@click.option("--peak-flops", type=float, default=None,
              help="Peak FLOP/s of one device for MFU; default: looked up for known GPUs, none on CPU.")
@click.option("--ray-workers", type=int, default=0, show_default=True,
              help="Run under Ray Train's TorchTrainer with this many workers (0: run in this process / "
                   "under torchrun).")
@click.option("--ray-address", default=None, help="Ray cluster address for --ray-workers (default: local or "
                                                  "RAY_ADDRESS).")
@click.option("--ray-gpu/--no-ray-gpu", default=True, show_default=True, help="One GPU per Ray worker.")
@click.option("--endpoint-url", envvar="TOTO_S3_ENDPOINT_URL", default=None,
              help="S3 endpoint for an s3:// --out (MinIO, on-prem). Credentials come from the environment / AWS "
                   "config only. Env: TOTO_S3_ENDPOINT_URL.")
@click.option("--print-config", is_flag=True, help="Print the resolved config as JSON and exit.")
@click.argument("overrides", nargs=-1)
def pretrain_command(config, data, out, init_from, peak_flops, ray_workers, ray_address, ray_gpu, endpoint_url,
                     print_config, overrides) -> None:
    """Pre-train a LLaMA (or, with model.arch=gpt2|mamba, GPT-2 / Mamba) over visual tokens.

    OVERRIDES are key=value config fields.

    \b
    Examples:
      toto-train pretrain --config demo --data demo-out/mix.json --out runs/demo
      toto-train pretrain --config tiny --data mix.json --out runs/t max_steps=50 model.n_layers=4
      torchrun --nproc-per-node 8 -m trainer.cli pretrain --config base --data mix.json --out runs/base
      toto-train pretrain --config base-256 --data mix256.json --out runs/b256 --init-from runs/base
      toto-train pretrain --config large-mamba --data mix.json --out runs/mamba
      toto-train pretrain --config base --data mix.json --out s3://bucket/runs/base
    """
    from trainer.config import config_to_dict

    extra = list(overrides)
    if init_from:
        extra.append(f"init_from={init_from}")
    if peak_flops:
        extra.append(f"peak_flops={peak_flops}")
    try:
        cfg = load_config(config, extra)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    if print_config:
        click.echo(json.dumps(config_to_dict(cfg), indent=2))
        return
    so = {"client_kwargs": {"endpoint_url": endpoint_url}} if endpoint_url else None
    if ray_workers:
        from trainer.train import run_with_ray

        res = run_with_ray(cfg, data, out, num_workers=ray_workers, use_gpu=ray_gpu, address=ray_address,
                           storage_options=so)
    else:
        from trainer.train import train

        try:
            res = train(cfg, data, out, storage_options=so)
        except ValueError as e:
            if "--out" not in str(e):
                raise
            raise click.UsageError(str(e)) from e
    click.echo(json.dumps(res, default=str), file=sys.stderr)
