"""Training curves of several runs (the paper's Figure 2): loss against tokens seen.

Reads what `toto-train pretrain` writes in a run directory, with the reader the scaling fit uses
(`trainer.evals.scaling`): metrics.jsonl (training lines: "step", "loss", "tokens_seen") and, when
present, val.jsonl ("step", "val_loss", "tokens_seen"). A line without tokens_seen gets step ×
global_batch × seq_len from config.json. A directory of runs (a sweep) stands for all of them.
Lines of one step logged twice (a run resumed by a newer code path) keep the last.
"""

from __future__ import annotations

import json
import os

import numpy as np

from trainer.evals.scaling import _read_jsonl, expand_run_dirs

__all__ = ["read_curves", "curves_doc", "plot_curves"]


def _per_step(path: str, key: str, tokens_of) -> list[dict]:
    by_step: dict[int, dict] = {}
    for lineno, rec in _read_jsonl(path):
        if rec.get(key) is None or rec.get("step") is None:
            continue
        tokens = rec.get("tokens_seen")
        tokens = float(tokens) if tokens is not None else tokens_of(int(rec["step"]))
        if tokens is None:
            raise ValueError(f"{path}:{lineno}: the line has no tokens_seen and config.json beside it gives no "
                             "global_batch and seq_len to count them; pass runs written by `toto-train pretrain`")
        by_step[int(rec["step"])] = {"step": int(rec["step"]), "tokens_seen": tokens, "loss": float(rec[key])}
    return [by_step[s] for s in sorted(by_step)]


def read_curves(run_dir: str) -> dict:
    """{"run", "path", "train": [{"step", "tokens_seen", "loss"}], "val": [...]} of one run directory."""
    metrics, val = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "val.jsonl")
    if not os.path.exists(metrics):
        raise ValueError(f"{run_dir}: no metrics.jsonl; pass run directories written by `toto-train pretrain`")
    config = {}
    if os.path.exists(os.path.join(run_dir, "config.json")):
        with open(os.path.join(run_dir, "config.json")) as f:
            config = json.load(f)

    def tokens_of(step: int) -> float | None:
        if config.get("global_batch") and config.get("seq_len"):
            return float(step * config["global_batch"] * config["seq_len"])
        return None

    train = _per_step(metrics, "loss", tokens_of)
    if not train:
        raise ValueError(f"{metrics}: no training lines with a loss")
    return {"run": os.path.basename(os.path.normpath(run_dir)), "path": run_dir, "train": train,
            "val": _per_step(val, "val_loss", tokens_of) if os.path.exists(val) else []}


def curves_doc(run_dirs: list[str]) -> dict:
    """The plotted points of every run (schema training_curves). Runs of one name get their parent's name too."""
    runs = [read_curves(d) for d in expand_run_dirs(list(run_dirs))]
    names = [r["run"] for r in runs]
    for r in runs:
        if names.count(r["run"]) > 1:
            r["run"] = os.path.join(os.path.basename(os.path.dirname(os.path.normpath(r["path"]))), r["run"])
    return {"schema": "training_curves", "version": 1, "x": "tokens_seen", "runs": runs}


def plot_curves(doc: dict, path: str, *, log_y: bool = False) -> str:
    """Training loss (solid) and validation loss (dashed, same colour) against tokens seen, log x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, r in enumerate(doc["runs"]):
        color = f"C{i % 10}"
        t = np.array([[p["tokens_seen"], p["loss"]] for p in r["train"] if p["tokens_seen"] > 0])
        if len(t):
            ax.plot(t[:, 0], t[:, 1], "-", color=color, lw=1.0, label=f"{r['run']} train")
        v = np.array([[p["tokens_seen"], p["loss"]] for p in r["val"] if p["tokens_seen"] > 0])
        if len(v):
            ax.plot(v[:, 0], v[:, 1], "--o", color=color, lw=1.0, ms=3, label=f"{r['run']} val")
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title("training curves")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
