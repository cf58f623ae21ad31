"""Training checkpoints: `RUN/step-00001000/` directories committed atomically.

Layout of one checkpoint:
    model.safetensors   full (unsharded) model weights, fp32
    optimizer.pt        optimizer state keyed by parameter name (torch.save; loads weights_only)
    rng-rank00000.pt    RNG states of each rank (torch CPU/CUDA, python, numpy)
    meta.json           written last: step, schedule, loader state, configs, specials, tokenizer
                        id. Its presence is the completion marker.
All files go to `RUN/.tmp-step-00001000/` first (fsynced), and the directory is renamed to its
final name only when meta.json is in it. A `step-*` directory without meta.json (e.g. a copy
interrupted by hand) is ignored with a warning; `.tmp-*` debris from a killed run is removed.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from trainer.model import ModelConfig, Transformer

__all__ = [
    "step_dir_name",
    "list_checkpoints",
    "latest_checkpoint",
    "CheckpointWriter",
    "read_meta",
    "load_model",
    "capture_rng",
    "restore_rng",
    "prune",
    "clean_tmp",
]

META_KIND = "checkpoint_meta"
META_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _validate_meta(doc: dict) -> dict:
    """Validate against schemas/checkpoint_meta.v1.json (refuses unknown versions with a fix)."""
    import schemas

    return schemas.validate(doc, META_KIND)


def read_meta(step_dir: str | os.PathLike) -> dict:
    path = Path(step_dir) / "meta.json"
    if not path.exists():
        raise ValueError(f"{step_dir} is not a complete checkpoint: meta.json (the completion marker) is missing")
    return _validate_meta(json.loads(path.read_text()))


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `run_dir`, oldest first. Incomplete `step-*` dirs are skipped."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    found = []
    for p in run.iterdir():
        m = _STEP_RE.match(p.name)
        if not m or not p.is_dir():
            continue
        if not (p / "meta.json").exists():
            warnings.warn(f"ignoring incomplete checkpoint {p} (no meta.json completion marker)", stacklevel=2)
            continue
        found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step dir as given, or the newest complete checkpoint of a run dir."""
    p = Path(path)
    if (p / "meta.json").exists():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise ValueError(
            f"{p} is neither a checkpoint (no meta.json) nor a run directory with a complete "
            "step-NNNNNNNN/ checkpoint; pass e.g. runs/demo or runs/demo/step-00000100"
        )
    return latest


def clean_tmp(run_dir: str | os.PathLike) -> list[Path]:
    """Remove `.tmp-step-*` debris left by a killed run; call on one rank before training."""
    run = Path(run_dir)
    removed = []
    if run.is_dir():
        for p in run.iterdir():
            if p.name.startswith(".tmp-step-"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def prune(run_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (keep >= 1)."""
    if keep < 1:
        raise ValueError(f"keep={keep}: retention must keep at least one checkpoint")
    ckpts = list_checkpoints(run_dir)
    doomed = ckpts[:-keep] if len(ckpts) > keep else []
    for p in doomed:
        # Rename first so a crash mid-delete leaves debris that clean_tmp removes, not a half checkpoint.
        trash = p.with_name(".tmp-step-deleting-" + p.name)
        os.replace(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def capture_rng() -> dict:
    """RNG states as tensors/lists (loadable with torch.load(weights_only=True))."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointWriter:
    """Two-phase commit of one checkpoint, usable from every rank of a distributed run.

    Every rank may call `write_rng`; rank 0 calls `write_model`, `write_optimizer`, then
    `commit(meta)` after a barrier. Single-process code calls them in sequence.
    """

    def __init__(self, run_dir: str | os.PathLike, step: int, create: bool = True) -> None:
        self.run = Path(run_dir)
        self.step = step
        self.final = self.run / step_dir_name(step)
        self.tmp = self.run / (".tmp-" + step_dir_name(step))
        if create:
            self.tmp.mkdir(parents=True, exist_ok=True)

    def write_model(self, state_dict: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
        path = self.tmp / "model.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt"})
        _fsync_file(path)

    def write_optimizer(self, state_dict: dict) -> None:
        path = self.tmp / "optimizer.pt"
        torch.save(state_dict, path)
        _fsync_file(path)

    def write_rng(self, rank: int, state: dict) -> None:
        path = self.tmp / f"rng-rank{rank:05d}.pt"
        torch.save(state, path)
        _fsync_file(path)

    def commit(self, meta: dict) -> Path:
        doc = {"schema": META_KIND, "version": META_VERSION, "step": self.step, **meta}
        _validate_meta(doc)
        path = self.tmp / "meta.json"
        path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        _fsync_file(path)
        _fsync_dir(self.tmp)
        if self.final.exists():
            # Re-saving a step (e.g. after a resume at the same step): the new one replaces it.
            old = self.run / (".tmp-step-deleting-" + self.final.name)
            os.replace(self.final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(self.tmp, self.final)
        _fsync_dir(self.run)
        return self.final


def load_state(step_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None, dict]:
    """(model state dict, optimizer state dict or None, meta) of one complete checkpoint."""
    d = Path(step_dir)
    meta = read_meta(d)
    model_sd = load_file(str(d / "model.safetensors"))
    opt_path = d / "optimizer.pt"
    opt_sd = torch.load(opt_path, map_location="cpu", weights_only=True) if opt_path.exists() else None
    return model_sd, opt_sd, meta


def load_rng(step_dir: str | os.PathLike, rank: int) -> dict | None:
    path = Path(step_dir) / f"rng-rank{rank:05d}.pt"
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


def load_model(ckpt_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Transformer, dict]:
    """Rebuild the model of a checkpoint (or of a run dir's newest checkpoint) in eval mode.

    Returns (model, meta); meta holds "train_config", "model_config", "specials", "tokenizer",
    "loader_state", "step" and "step_dir".
    """
    step_dir = resolve_checkpoint(ckpt_dir)
    meta = read_meta(step_dir)
    cfg = ModelConfig.from_dict(meta["model_config"])
    model = Transformer(cfg)
    sd = load_file(str(step_dir / "model.safetensors"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{step_dir}: weights do not match the config (missing {missing}, unexpected {unexpected})")
    meta = dict(meta, step_dir=str(step_dir))
    return model.to(device).eval(), meta
