"""Scaling law: fit L(C) = a · C^b on the compute-optimal frontier of several runs.

Points are (training compute so far, validation loss). A run directory as `toto-train pretrain`
writes it holds ``val.jsonl`` ({"step", "val_loss"} per evaluation), ``metrics.jsonl`` (training
lines with "tokens_seen") and ``config.json`` ("flops_per_token", "global_batch", "seq_len").
Compute at a step is tokens seen × FLOPs per token / 2 in multiply-accumulates (MACs, the
paper's unit; one MAC is two FLOPs). A line may instead carry "macs" or "flops" directly; runs
without val.jsonl are read from metrics.jsonl lines that carry "val_loss".
The frontier is the lower envelope of all points: a point stays when no point with less or equal
compute has a lower loss. The power law is least squares on log L = log a + b log C; the saturating
law L = E + a·C^b (an irreducible loss E, as in Chinchilla-style fits) is non-linear least squares
on L. Both carry confidence intervals (default 95 %, Student t on the fit's standard errors).
A directory that holds run directories (a `toto-train sweep-lr` output) stands for all of them.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

__all__ = ["PAPER_LAW", "LANGUAGE_LAW", "read_run_points", "expand_run_dirs", "frontier", "fit_power_law",
           "power_law_with_ci", "fit_saturating", "scaling_study", "plot_scaling"]

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


def _t_quantile(level: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, dof))


def power_law_with_ci(macs: np.ndarray, loss: np.ndarray, level: float = 0.95) -> dict:
    """fit_power_law plus intervals: {"a", "b", "r2", "a_ci", "b_ci"} (intervals None with two points)."""
    a, b, r2 = fit_power_law(macs, loss)
    x, y = np.log(np.asarray(macs, np.float64)), np.log(np.asarray(loss, np.float64))
    n = x.size
    out = {"a": a, "b": b, "r2": r2, "a_ci": None, "b_ci": None, "b_se": None, "level": level}
    if n > 2:
        resid = y - (math.log(a) + b * x)
        s2 = float((resid**2).sum()) / (n - 2)
        sxx = float(((x - x.mean()) ** 2).sum())
        se_b = math.sqrt(s2 / sxx)
        out["b_se"] = se_b  # least-squares standard error of b (the demo study's verdict uses 2 of them)
        se_loga = math.sqrt(s2 * (1.0 / n + x.mean() ** 2 / sxx))
        q = _t_quantile(level, n - 2)
        out["b_ci"] = [b - q * se_b, b + q * se_b]
        out["a_ci"] = [a * math.exp(-q * se_loga), a * math.exp(q * se_loga)]  # symmetric in log a
    return out


def fit_saturating(macs: np.ndarray, loss: np.ndarray, level: float = 0.95) -> dict:
    """Non-linear least squares of L = E + a·C^b: {"E", "a", "b", "r2", "E_ci", "a_ci", "b_ci", "level"}.

    Fitted as L = E + A·(C/C0)^b with C0 the geometric mean of C (so A and b are not nearly collinear
    over many decades), under E in [0, min L), A > 0, b < 0; a = A·C0^-b. Needs 4 points (3 parameters
    and one degree of freedom for the intervals).
    """
    from scipy.optimize import curve_fit

    c, y = np.asarray(macs, np.float64), np.asarray(loss, np.float64)
    if c.shape != y.shape or c.size < 4:
        raise ValueError(f"a saturating fit E + a·C^b needs at least 4 (compute, loss) points; got {c.size}")
    if np.any(c <= 0) or np.any(y <= 0):
        raise ValueError("compute and loss must be positive")
    log_c0 = float(np.log(c).mean())
    u = np.log(c) - log_c0  # log(C / C0)

    def model(u, E, A, b):
        return E + A * np.exp(b * u)

    # Start from a power law through L - E0, E0 half the smallest loss.
    E0 = 0.5 * float(y.min())
    a0, b0, _ = fit_power_law(c, y - E0)
    p0 = [E0, a0 * math.exp(b0 * log_c0), min(b0, -1e-6)]
    try:
        popt, pcov = curve_fit(model, u, y, p0=p0, bounds=([0.0, 0.0, -10.0], [float(y.min()), np.inf, 0.0]),
                               maxfev=20000)
    except RuntimeError as e:
        raise ValueError(f"the saturating fit did not converge ({e}); the points may not flatten or fall") from e
    E, A, b = (float(v) for v in popt)
    pred = model(u, *popt)
    ss_res, ss_tot = float(((y - pred) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    a = A * math.exp(-b * log_c0)
    q = _t_quantile(level, c.size - 3)
    se = np.sqrt(np.clip(np.diag(pcov), 0, None))
    # a's interval by the delta method on log a = log A - b·log C0.
    var_loga = pcov[1, 1] / A**2 + log_c0**2 * pcov[2, 2] - 2 * log_c0 * pcov[1, 2] / A if A > 0 else math.inf
    se_loga = math.sqrt(max(float(var_loga), 0.0))
    finite = bool(np.all(np.isfinite(pcov)))
    return {
        "E": E, "a": a, "b": b, "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0, "level": level,
        "E_ci": [E - q * se[0], E + q * se[0]] if finite else None,
        "b_ci": [b - q * se[2], b + q * se[2]] if finite else None,
        "a_ci": [a * math.exp(-q * se_loga), a * math.exp(q * se_loga)] if finite else None,
    }


def expand_run_dirs(paths: list[str]) -> list[str]:
    """Each path, or when it holds no logs itself, the run directories directly inside it (a sweep)."""
    out = []
    for p in paths:
        if any(os.path.exists(os.path.join(p, f)) for f in ("val.jsonl", "metrics.jsonl")) or not os.path.isdir(p):
            out.append(p)
            continue
        subs = sorted(os.path.join(p, d) for d in os.listdir(p)
                      if any(os.path.exists(os.path.join(p, d, f)) for f in ("val.jsonl", "metrics.jsonl")))
        if not subs:
            raise ValueError(f"{p}: no val.jsonl or metrics.jsonl in it or in its subdirectories; pass run "
                             "directories written by `toto-train pretrain` or a `toto-train sweep-lr` directory")
        out.extend(subs)
    return out


def scaling_study(run_dirs: list[str]) -> dict:
    """Points of every run, the frontier, the power-law fit (with intervals) and, with 4 or more frontier
    points, the saturating fit; a run directory may be a sweep directory (expand_run_dirs)."""
    run_dirs = expand_run_dirs(list(run_dirs))
    points = [p for d in run_dirs for p in read_run_points(d)]
    front = frontier(points)
    if len(front) < 2:
        raise ValueError(
            f"the compute-optimal frontier has {len(front)} point(s); need at least two runs or evaluations "
            "at different compute to fit a law"
        )
    c, y = np.array([p["macs"] for p in front]), np.array([p["loss"] for p in front])
    fit = power_law_with_ci(c, y)
    try:
        saturating = fit_saturating(c, y) if len(front) >= 4 else None
    except ValueError:
        saturating = None  # too few points or no convergence: the power law alone is reported
    return {
        "schema": "scaling_fit",
        "version": 1,
        "runs": [os.path.normpath(d) for d in run_dirs],
        "points": points,
        "frontier": front,
        "fit": fit,
        "saturating": saturating,
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
    sat = doc.get("saturating")
    if sat:
        ax.plot(grid, sat["E"] + sat["a"] * grid ** sat["b"], "b-.", lw=1.2,
                label=f"ours, saturating: {sat['E']:.3g} + {sat['a']:.3g}·C^{sat['b']:.4f}")
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
