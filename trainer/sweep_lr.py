"""`toto-train sweep-lr`: learning rate x width grid, best validation loss per run (the paper's Figure 11).

Each (width, lr) is one pre-training run of the chosen preset with `model.dim` set to the width
(heads and depth as the preset has them) and `lr` set, written to OUT/w{width}-lr2^{log2 lr}/. Under
μP (the a1..a6 presets: `model.mup_base_dim` fixed) the best learning rate should be the same at
every width; `--sp` drops μP (standard parameterisation), where the optimum moves with width.
The grid runs one run after another here, or as Ray tasks on a cluster (`--ray-address`).
Re-running the same command skips finished runs and resumes unfinished ones (trainer.train resumes
from a run directory's newest checkpoint). A run whose loss turns non-finite is recorded as diverged.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys

import click

from trainer.config import PRESETS, TrainConfig, load_config

__all__ = ["parse_lrs", "sweep_configs", "best_val_loss", "run_sweep", "plot_sweep", "sweep_lr_command"]


def parse_lrs(spec: str) -> list[float]:
    """'2^-10..2^-5' (every integer power between), '2^-9,2^-7,1e-3' or '3e-4' -> learning rates."""
    m = re.fullmatch(r"\s*2\^(-?\d+)\s*\.\.\s*2\^(-?\d+)\s*", spec)
    if m:
        lo, hi = int(m.group(1)), int(m.group(2))
        if lo > hi:
            raise ValueError(f"--lrs {spec!r}: the range runs from the smaller power up, e.g. 2^-10..2^-5")
        return [2.0**e for e in range(lo, hi + 1)]
    out = []
    for part in spec.split(","):
        part = part.strip()
        try:
            v = 2.0 ** float(part[2:]) if part.startswith("2^") else float(part)
        except ValueError:
            raise ValueError(f"--lrs {spec!r}: {part!r} is not a learning rate; use 2^-10..2^-5 or 1e-3,3e-3") from None
        if not (v > 0):
            raise ValueError(f"--lrs {spec!r}: learning rates must be positive")
        out.append(v)
    return out


def _run_name(width: int, lr: float) -> str:
    e = math.log2(lr)
    tag = f"2^{e:g}" if abs(e - round(e)) < 1e-9 else f"{lr:.3g}"
    return f"w{width}-lr{tag}"


def sweep_configs(config: str, widths: list[int], lrs: list[float], overrides: list[str] = (),
                  sp: bool = False) -> list[tuple[str, int, float, TrainConfig]]:
    """(run name, width, lr, TrainConfig) for every grid point; validation is on (at least at the end)."""
    if not widths or not lrs:
        raise ValueError("sweep-lr needs at least one width (--widths 256,384) and one learning rate (--lrs)")
    out = []
    for width in widths:
        for lr in lrs:
            extra = [*overrides, f"model.dim={width}", f"lr={lr!r}"]
            if sp:
                extra.append("model.mup_base_dim=None")
            try:
                cfg = load_config(config, extra)
            except ValueError as e:
                raise ValueError(f"width {width}, lr {lr:g}: {e}") from e
            if cfg.val_every == 0 or cfg.max_steps % cfg.val_every:
                # The last step must be validated: the largest cadence <= val_every that divides max_steps.
                every = cfg.val_every if 0 < cfg.val_every <= cfg.max_steps else cfg.max_steps
                while cfg.max_steps % every:
                    every -= 1
                cfg = load_config(config, [*extra, f"val_every={every}"])
            out.append((_run_name(width, lr), width, lr, cfg))
    return out


def best_val_loss(run_dir: str) -> float | None:
    """Lowest finite val_loss in run_dir/val.jsonl (None when there is none)."""
    path = os.path.join(run_dir, "val.jsonl")
    if not os.path.exists(path):
        return None
    vals = [json.loads(ln).get("val_loss") for ln in open(path) if ln.strip()]
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return min(vals) if vals else None


def _train_one(cfg: TrainConfig, data: str, run_dir: str, loader_factory=None) -> dict:
    from trainer.checkpoint import latest_checkpoint, read_meta
    from trainer.train import NonFiniteLossError, train

    done = latest_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    if done is not None and int(read_meta(done)["step"]) >= cfg.max_steps:
        # Finished: its validation losses are on disk; building its model and loaders is not needed.
        return {"diverged": False, "best_val_loss": best_val_loss(run_dir)}
    try:
        train(cfg, data, run_dir, loader_factory=loader_factory)
        diverged = False
    except NonFiniteLossError:
        diverged = True
    return {"diverged": diverged, "best_val_loss": None if diverged else best_val_loss(run_dir)}


def run_sweep(config: str, data: str, out: str, widths: list[int], lrs: list[float], *, overrides: list[str] = (),
              sp: bool = False, ray_address: str | None = None, cpus_per_run: float = 1.0, gpus_per_run: float = 0.0,
              loader_factory=None, progress=None) -> dict:
    """Run the grid; write OUT/lr_sweep.json (validated) and OUT/lr_sweep.png; return the document."""
    from pipeline.storage import write_json

    grid = sweep_configs(config, widths, lrs, list(overrides), sp)
    os.makedirs(out, exist_ok=True)
    dirs = [os.path.join(out, name) for name, *_ in grid]
    if ray_address is not None:
        import ray

        ray.init(address=ray_address or None, ignore_reinit_error=True, include_dashboard=False)
        task = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run)(_train_one)
        results = ray.get([task.remote(cfg, data, d, loader_factory) for (_, _, _, cfg), d in zip(grid, dirs, strict=True)])
    else:
        results = []
        for (name, _, _, cfg), d in zip(grid, dirs, strict=True):
            res = _train_one(cfg, data, d, loader_factory)
            results.append(res)
            if progress is not None:
                loss = "diverged" if res["diverged"] else f"{res['best_val_loss']}"
                progress(f"{name}: best val loss {loss}")
    points = []
    for (name, width, lr, cfg), res in zip(grid, results, strict=True):
        points.append({"run": name, "width": width, "lr": lr, "log2_lr": math.log2(lr), "steps": cfg.max_steps,
                       "best_val_loss": res["best_val_loss"], "diverged": res["diverged"]})
    best = {}
    for width in widths:
        ok = [p for p in points if p["width"] == width and p["best_val_loss"] is not None]
        if ok:
            b = min(ok, key=lambda p: (p["best_val_loss"], p["lr"]))
            best[str(width)] = {"lr": b["lr"], "log2_lr": b["log2_lr"], "best_val_loss": b["best_val_loss"]}
    base = grid[0][3].model.mup_base_dim
    doc = {"schema": "lr_sweep", "version": 1, "config": config, "parameterisation": "sp" if sp else "mup",
           "mup_base_dim": base, "widths": list(widths), "lrs": list(lrs), "overrides": list(overrides),
           "points": points, "best": best, "paper_best_log2_lr": -7}
    write_json(os.path.join(out, "lr_sweep.json"), doc, "lr_sweep")
    plot_sweep(doc, os.path.join(out, "lr_sweep.png"))
    return doc


def plot_sweep(doc: dict, path: str) -> str:
    """Best validation loss against log2(lr), one line per width; the paper's μP optimum 2^-7 dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for width in doc["widths"]:
        pts = sorted((p for p in doc["points"] if p["width"] == width and p["best_val_loss"] is not None),
                     key=lambda p: p["lr"])
        line, = ax.plot([p["log2_lr"] for p in pts], [p["best_val_loss"] for p in pts], marker="o", label=f"width {width}")
        b = doc["best"].get(str(width))
        if b:
            ax.plot([b["log2_lr"]], [b["best_val_loss"]], "*", ms=12, color=line.get_color())
    ax.axvline(doc["paper_best_log2_lr"], color="grey", ls=":", lw=1, label="paper's μP optimum 2^-7")
    kind = "μP" if doc["parameterisation"] == "mup" else "standard parameterisation"
    ax.set(xlabel="log2 learning rate", ylabel="best validation loss", title=f"{doc['config']}: lr vs width ({kind})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ints(spec: str) -> list[int]:
    try:
        out = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{spec!r}: use comma-separated widths such as 256,384,512") from None
    if not out or min(out) <= 0:
        raise click.BadParameter(f"{spec!r}: use positive widths such as 256,384,512")
    return out


@click.command("sweep-lr")
@click.option("--config", default="a2", show_default=True,
              help=f"Preset or config file each run starts from ({', '.join(sorted(PRESETS))}).")
@click.option("--data", required=True, help="Mix manifest (mix.json from `toto-pipeline mix`).")
@click.option("--out", required=True, help="Sweep directory: one run directory per grid point, lr_sweep.json/.png.")
@click.option("--lrs", default="2^-10..2^-5", show_default=True,
              help="Learning rates: 2^A..2^B (every integer power), or a comma list (2^-9,2^-7,1e-3).")
@click.option("--widths", default=None, help="Comma-separated model widths (model.dim). Default: the preset's.")
@click.option("--sp", is_flag=True, help="Standard parameterisation (model.mup_base_dim=None): the optimum moves.")
@click.option("--ray-address", default=None,
              help="Run the grid as Ray tasks on this cluster ('auto' or host:port); default: one after another here.")
@click.option("--cpus-per-run", type=float, default=1.0, show_default=True, help="Ray task CPUs.")
@click.option("--gpus-per-run", type=float, default=0.0, show_default=True, help="Ray task GPUs (1 on a GPU cluster).")
@click.argument("overrides", nargs=-1)
def sweep_lr_command(config, data, out, lrs, widths, sp, ray_address, cpus_per_run, gpus_per_run, overrides) -> None:
    """Sweep learning rate x width and plot best validation loss against lr per width (Figure 11).

    OVERRIDES are key=value fields applied to every run (e.g. max_steps=2000 val_every=500).

    \b
    Examples:
      toto-train sweep-lr --config a2 --data mix.json --out sweeps/mup --lrs 2^-10..2^-5 --widths 256,384,512
      toto-train sweep-lr --config a2 --data mix.json --out sweeps/sp --sp --widths 256,512 max_steps=2000
    """
    try:
        lr_list = parse_lrs(lrs)
        width_list = _ints(widths) if widths else [load_config(config, list(overrides)).model.dim]
        doc = run_sweep(config, data, out, width_list, lr_list, overrides=list(overrides), sp=sp,
                        ray_address=ray_address, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run,
                        progress=lambda s: click.echo(s, file=sys.stderr))
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    for w, b in doc["best"].items():
        click.echo(f"width {w}: best lr 2^{b['log2_lr']:.2f} (val loss {b['best_val_loss']:.4f})")
    click.echo(f"wrote {os.path.join(out, 'lr_sweep.json')} and {os.path.join(out, 'lr_sweep.png')}", file=sys.stderr)
