"""Scaling law: fit L(C) = a · C^b on the compute-optimal frontier of several runs.

Points are (training compute so far, validation loss). A run directory as `toto-train pretrain`
writes it holds ``val.jsonl`` ({"step", "val_loss"} per evaluation), ``metrics.jsonl`` (training
lines with "tokens_seen") and ``config.json`` ("flops_per_token", "global_batch", "seq_len").
Compute at a step is tokens seen × FLOPs per token / 2 in multiply-accumulates (MACs, the
paper's unit; one MAC is two FLOPs). A line may instead carry "macs" or "flops" directly; runs
without val.jsonl are read from metrics.jsonl lines that carry "val_loss".
The frontier is the lower envelope of all points: a point stays when no point with less or equal
compute has a lower loss. The fit is least squares on log L = log a + b log C.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

__all__ = ["PAPER_LAW", "LANGUAGE_LAW", "read_run_points", "frontier", "fit_power_law", "exponent_se", "scaling_study", "plot_scaling"]

PAPER_LAW = (7.32, -0.0378)  # Toto: L = 7.32 · C^-0.0378, C in MACs
LANGUAGE_LAW = (2.57, -0.048)  # language models, as quoted by the paper


def _read_jsonl(path: str) -> list[tuple[int, dict]]:
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e})") from e
    return out


def read_run_points(run_dir: str) -> list[dict]:
    """(compute in MACs, validation loss) points of one run directory."""
    val_path = os.path.join(run_dir, "val.jsonl")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    path = val_path if os.path.exists(val_path) else metrics_path
    if not os.path.exists(path):
        raise ValueError(f"{run_dir}: neither val.jsonl nor metrics.jsonl exists; pass run directories written by "
                         "`toto-train pretrain`")
    config = {}
    if os.path.exists(os.path.join(run_dir, "config.json")):
        with open(os.path.join(run_dir, "config.json")) as f:
            config = json.load(f)
    tokens_at: dict[int, float] = {}
    if os.path.exists(metrics_path):
        for _, rec in _read_jsonl(metrics_path):
            if rec.get("tokens_seen") is not None and rec.get("step") is not None:
                tokens_at[int(rec["step"])] = float(rec["tokens_seen"])

    def tokens_seen(step: int | None) -> float | None:
        if step is None:
            return None
        if step in tokens_at:
            return tokens_at[step]
        if config.get("global_batch") and config.get("seq_len"):
            return float(step) * config["global_batch"] * config["seq_len"]
        return None

    points = []
    for lineno, rec in _read_jsonl(path):
        loss = rec.get("val_loss")
        if loss is None:
            continue
        step = rec.get("step")
        if rec.get("macs") is not None:
            macs = float(rec["macs"])
        elif rec.get("flops") is not None:
            macs = float(rec["flops"]) / 2.0
        elif config.get("flops_per_token") and tokens_seen(step) is not None:
            macs = tokens_seen(step) * float(config["flops_per_token"]) / 2.0
        else:
            raise ValueError(
                f"{path}:{lineno}: cannot tell the compute of this val_loss line: it has no 'macs' or 'flops', and "
                f"{run_dir}/config.json gives no flops_per_token with tokens seen at step {step}"
            )
        if macs > 0 and loss > 0:
            points.append({"run": os.path.basename(os.path.normpath(run_dir)), "step": step, "macs": macs,
                           "loss": float(loss)})
    if not points:
        raise ValueError(f"{path}: no lines with a validation loss (val_loss); run pretrain with validation enabled")
    return points


def frontier(points: list[dict]) -> list[dict]:
    """Lower envelope: points with strictly lower loss than every point at less or equal compute."""
    best = math.inf
    out = []
    for p in sorted(points, key=lambda p: (p["macs"], p["loss"])):
        if p["loss"] < best:
            out.append(p)
            best = p["loss"]
    return out


def fit_power_law(macs: np.ndarray, loss: np.ndarray) -> tuple[float, float, float]:
    """Least squares in log-log space: returns (a, b, r²) of L = a · C^b."""
    macs, loss = np.asarray(macs, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    if macs.shape != loss.shape or macs.size < 2:
        raise ValueError("a power-law fit needs at least two (compute, loss) points")
    if np.any(macs <= 0) or np.any(loss <= 0):
        raise ValueError("compute and loss must be positive for a log-log fit")
    x, y = np.log(macs), np.log(loss)
    if np.ptp(x) == 0:
        raise ValueError("all points have the same compute; the exponent is undefined")
    b, log_a = np.polyfit(x, y, 1)
    pred = log_a + b * x
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return float(math.exp(log_a)), float(b), r2


def exponent_se(macs: np.ndarray, loss: np.ndarray) -> float | None:
    """Ordinary least-squares standard error of b in log L = log a + b log C (None below 3 points)."""
    x, y = np.log(np.asarray(macs, np.float64)), np.log(np.asarray(loss, np.float64))
    if x.size < 3:
        return None
    b, c = np.polyfit(x, y, 1)
    ss_res = float(((y - (c + b * x)) ** 2).sum())
    return math.sqrt(ss_res / (x.size - 2) / float(((x - x.mean()) ** 2).sum()))


def scaling_study(run_dirs: list[str]) -> dict:
    points = [p for d in run_dirs for p in read_run_points(d)]
    front = frontier(points)
    if len(front) < 2:
        raise ValueError(
            f"the compute-optimal frontier has {len(front)} point(s); need at least two runs or evaluations "
            "at different compute to fit a law"
        )
    fm, fl = np.array([p["macs"] for p in front]), np.array([p["loss"] for p in front])
    a, b, r2 = fit_power_law(fm, fl)
    return {
        "schema": "scaling_fit",
        "version": 1,
        "runs": [os.path.normpath(d) for d in run_dirs],
        "points": points,
        "frontier": front,
        "fit": {"a": a, "b": b, "r2": r2, "b_se": exponent_se(fm, fl)},
        "paper": {"a": PAPER_LAW[0], "b": PAPER_LAW[1]},
        "language_models": {"a": LANGUAGE_LAW[0], "b": LANGUAGE_LAW[1]},
    }


def plot_scaling(doc: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    runs = sorted({p["run"] for p in doc["points"]})
    for run in runs:
        pts = [p for p in doc["points"] if p["run"] == run]
        ax.plot([p["macs"] for p in pts], [p["loss"] for p in pts], ".", alpha=0.6, label=run)
    c = np.array([p["macs"] for p in doc["points"]])
    grid = np.geomspace(c.min(), c.max(), 50)
    a, b = doc["fit"]["a"], doc["fit"]["b"]
    ax.plot(grid, a * grid**b, "k-", lw=1.5, label=f"ours: {a:.3g}·C^{b:.4f}")
    pa, pb = doc["paper"]["a"], doc["paper"]["b"]
    ax.plot(grid, pa * grid**pb, "r--", lw=1.2, label=f"paper: {pa}·C^{pb}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (MACs)")
    ax.set_ylabel("validation loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
