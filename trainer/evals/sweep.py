"""Layer sweep: one probe per (layer, pooling), accuracy by relative depth (the paper's Figure 4)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import torch

from trainer.evals.probes import ProbeConfig, ProbeResult, torch_threads

__all__ = ["layer_sweep", "sweep_specs", "sweep_doc", "write_sweep", "plot_sweep", "best_layer"]


def layer_sweep(
    train_feats: dict[int, torch.Tensor],
    val_feats: dict[int, torch.Tensor],
    train_labels: torch.Tensor,
    val_labels: torch.Tensor,
    classes: list[str],
    *,
    n_layers: int,
    poolings: list[str],
    cfg: ProbeConfig,
    task: str,
    val_groups: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Train a probe for every layer in ``train_feats`` (in-memory (N, P, D) each) and every pooling,
    all at once (`trainer.evals.stream_probe.train_heads`); return a probe_sweep doc."""
    from trainer.evals.stream_probe import TensorSource, train_heads

    if set(train_feats) != set(val_feats):
        raise ValueError(f"train layers {sorted(train_feats)} and val layers {sorted(val_feats)} differ")
    specs = sweep_specs(sorted(train_feats), poolings, n_layers)
    with torch_threads(1):
        trained = train_heads(TensorSource(train_feats), train_labels, TensorSource(val_feats), val_labels, specs,
                              classes, cfg, val_groups=val_groups)
    return sweep_doc(specs, [r for r, _ in trained], n_layers=n_layers, classes=classes, cfg=cfg, task=task,
                     progress=progress)


def sweep_specs(layers: list[int], poolings: list[str], n_layers: int) -> list:
    """One head per (layer, pooling), layers ascending, poolings in the order given."""
    from trainer.evals.stream_probe import HeadSpec

    for layer in layers:
        if not 1 <= layer <= n_layers:
            raise ValueError(f"layer {layer} outside 1..{n_layers}")
    return [HeadSpec(layer, pooling) for layer in layers for pooling in poolings]


def sweep_doc(specs: list, results: list[ProbeResult], *, n_layers: int, classes: list[str], cfg: ProbeConfig,
              task: str, progress: Callable[[str], None] | None = None, extra_config: dict | None = None) -> dict:
    """The probe_sweep document of trained heads: a row per (layer, pooling), the best layer per pooling."""
    rows = []
    for spec, res in zip(specs, results, strict=True):
        rows.append(
            {
                "layer": spec.layer,
                "relative_depth": spec.layer / n_layers,
                "pooling": spec.pooling,
                "top1": res.top1,
                "top5": res.top5,
                "final_train_loss": res.train_loss[-1] if res.train_loss else None,
                "num_train": res.num_train,
                "num_eval": res.num_eval,
                "correct": res.correct,  # per scored sample, for paired comparisons
            }
        )
        if progress is not None:
            progress(f"{task}: layer {spec.layer}/{n_layers} {spec.pooling}: top-1 {res.top1:.1f}%")
    poolings = list(dict.fromkeys(s.pooling for s in specs))
    return {
        "schema": "probe_sweep",
        "version": 1,
        "task": task,
        "n_layers": n_layers,
        "classes": list(classes),
        "probe_config": {**dataclasses.asdict(cfg), **(extra_config or {})},
        "results": rows,
        "best": {p: best_layer(rows, p) for p in poolings},
    }


def best_layer(results: list[dict], pooling: str) -> dict:
    rows = [r for r in results if r["pooling"] == pooling]
    if not rows:
        raise ValueError(f"no results for pooling {pooling!r}")
    # Ties go to the shallower layer: the cheaper read-out.
    best = max(rows, key=lambda r: (r["top1"], -r["layer"]))
    return {"layer": best["layer"], "relative_depth": best["relative_depth"], "top1": best["top1"]}


def plot_sweep(doc: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for pooling in sorted({r["pooling"] for r in doc["results"]}):
        rows = sorted((r for r in doc["results"] if r["pooling"] == pooling), key=lambda r: r["layer"])
        ax.plot([r["relative_depth"] for r in rows], [r["top1"] for r in rows], marker="o", label=f"{pooling} pooling")
    ax.axvline(0.5, color="grey", ls=":", lw=1, label="paper's best depth (~50%)")
    ax.set_xlabel("relative depth (layer / layers)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"probe accuracy by depth: {doc['task']}")
    ax.set_xlim(0, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_sweep(doc: dict, out_dir: str, name: str | None = None) -> tuple[str, str]:
    """Write `<name>.json` (validated probe_sweep) and `<name>.png` into out_dir; return both paths."""
    from pipeline.storage import write_json

    os.makedirs(out_dir, exist_ok=True)
    name = name or f"probe-sweep-{doc['task']}"
    json_path = os.path.join(out_dir, f"{name}.json")
    write_json(json_path, doc, "probe_sweep")
    png_path = plot_sweep(doc, os.path.join(out_dir, f"{name}.png"))
    return json_path, png_path
