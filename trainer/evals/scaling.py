"""Scaling law: fit L(C) = a · C^b on the compute-optimal frontier of several runs.

Each run directory holds ``metrics.jsonl`` (one JSON object per line, as the trainer writes
it); the points used are the lines carrying a validation loss (``val_loss``) and the training
compute so far, read from ``macs`` (multiply-accumulates) or, failing that, ``flops`` (converted
with MACs = FLOPs / 2, since one multiply-accumulate is two floating-point operations). The
frontier is the lower envelope of all points: a point stays when no point with less or equal
compute has a lower loss. The fit is least squares on log L = log a + b log C.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

__all__ = ["PAPER_LAW", "LANGUAGE_LAW", "read_run_points", "frontier", "fit_power_law", "scaling_study", "plot_scaling"]

PAPER_LAW = (7.32, -0.0378)  # Toto: L = 7.32 · C^-0.0378, C in MACs
LANGUAGE_LAW = (2.57, -0.048)  # language models, as quoted by the paper


def read_run_points(run_dir: str) -> list[dict]:
    """(compute in MACs, validation loss) points of one run, from RUN/metrics.jsonl."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise ValueError(f"{run_dir}: metrics.jsonl is missing; pass run directories written by `toto-train pretrain`")
    points = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e})") from e
            loss = rec.get("val_loss")
            if loss is None:
                continue
            if rec.get("macs") is not None:
                macs = float(rec["macs"])
            elif rec.get("flops") is not None:
                macs = float(rec["flops"]) / 2.0
            else:
                raise ValueError(f"{path}:{lineno}: a val_loss line without 'macs' or 'flops' (the compute so far)")
            if macs > 0 and loss > 0:
                points.append({"run": os.path.basename(os.path.normpath(run_dir)), "step": rec.get("step"),
                               "macs": macs, "loss": float(loss)})
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


def scaling_study(run_dirs: list[str]) -> dict:
    points = [p for d in run_dirs for p in read_run_points(d)]
    front = frontier(points)
    if len(front) < 2:
        raise ValueError(
            f"the compute-optimal frontier has {len(front)} point(s); need at least two runs or evaluations "
            "at different compute to fit a law"
        )
    a, b, r2 = fit_power_law(np.array([p["macs"] for p in front]), np.array([p["loss"] for p in front]))
    return {
        "schema": "scaling_fit",
        "version": 1,
        "runs": [os.path.normpath(d) for d in run_dirs],
        "points": points,
        "frontier": front,
        "fit": {"a": a, "b": b, "r2": r2},
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
