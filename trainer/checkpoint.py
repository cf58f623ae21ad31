"""Training checkpoints: `RUN/step-00001000/` directories committed atomically, on local disk or
an object store (s3://, any fsspec URL).

Layout of one checkpoint (meta.json's `state_format` says which of the two state layouts):
    model.safetensors   "full": unsharded model weights, fp32 (single process and DDP; rank 0 writes)
    optimizer.pt        "full": optimizer state keyed by parameter name (torch.save; loads weights_only)
    dcp/                "dcp": torch.distributed.checkpoint of {"model", "optim"} (FSDP2): every rank
                        writes only its own shards, and a resume reads only the shards it owns, so no
                        rank ever holds the full model and optimizer. Any world size (1 included)
                        can read it back: DCP reshards on load.
    rng-rank00000.pt    RNG states of each rank (torch CPU/CUDA, python, numpy)
    meta.json           written last: step, schedule, loader state, configs, specials, tokenizer
                        id. Its presence is the completion marker.

Atomic commit. Locally all files go to `RUN/.tmp-step-00001000/` first (fsynced), and the directory
is renamed to its final name only when meta.json is in it. Object stores have no rename, so there
the files are PUT under the final prefix and meta.json is PUT last: one PUT is atomic, and a prefix
without meta.json is not a checkpoint. Either way a `step-*` directory without meta.json is ignored
with a warning, and debris of a killed save (`.tmp-*` locally, a `step-*` prefix without meta.json
remotely) is removed by `clean_tmp` before a run starts.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file, save_file

from pipeline import storage
from trainer.model import CausalLM, ModelConfig, build_model

__all__ = [
    "step_dir_name",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_checkpoint",
    "CheckpointWriter",
    "read_meta",
    "load_state",
    "load_sharded",
    "load_model",
    "capture_rng",
    "restore_rng",
    "prune",
    "clean_tmp",
    "is_remote",
]

META_KIND = "checkpoint_meta"
META_VERSION = 1
STATE_FORMATS = ("full", "dcp")
DCP_DIR = "dcp"
_STEP_RE = re.compile(r"^step-(\d{8})$")

StepDir = Path | str  # a local Path, or a URL string on an object store


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def is_remote(run: str | os.PathLike) -> bool:
    """True for an object-store URL (s3://...), False for a local path or file:// URL."""
    return not storage.is_local(os.fspath(run))


def _norm(run: str | os.PathLike) -> StepDir:
    """A local run dir as a Path (file:// stripped), a remote one as its URL string."""
    run = os.fspath(run)
    return run.rstrip("/") if is_remote(run) else Path(storage.local_path(run))


def _join(d: StepDir, *parts: str) -> StepDir:
    return storage.join(d, *parts) if isinstance(d, str) else d.joinpath(*parts)


def _name(d: StepDir) -> str:
    return storage.basename(d) if isinstance(d, str) else d.name


def _exists(p: StepDir, so: dict | None) -> bool:
    return storage.exists(p, so) if isinstance(p, str) else p.exists()


def _read_bytes(p: StepDir, so: dict | None) -> bytes:
    if isinstance(p, str):
        fs, path = storage.url_to_fs(p, so)
        return fs.cat_file(path)
    return p.read_bytes()


def _rm_tree(p: StepDir, so: dict | None) -> None:
    if isinstance(p, str):
        fs, path = storage.url_to_fs(p, so)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


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


def state_format(meta: dict) -> str:
    """"full" or "dcp" (checkpoints written before the field existed are "full")."""
    return meta.get("state_format", "full")


def read_meta(step_dir: str | os.PathLike, storage_options: dict | None = None) -> dict:
    path = _join(_norm(step_dir), "meta.json")
    if not _exists(path, storage_options):
        raise ValueError(f"{step_dir} is not a complete checkpoint: meta.json (the completion marker) is missing")
    return _validate_meta(json.loads(_read_bytes(path, storage_options)))


def _step_dirs(run: StepDir, so: dict | None) -> list[tuple[int, StepDir]]:
    """(step, dir) of every `step-NNNNNNNN` entry of a run, complete or not."""
    if isinstance(run, str):
        names = storage.listdir(run, so)
    else:
        names = [p.name for p in run.iterdir() if p.is_dir()] if run.is_dir() else []
    return [(int(m.group(1)), _join(run, n)) for n in names if (m := _STEP_RE.match(n))]


def list_checkpoints(run_dir: str | os.PathLike, storage_options: dict | None = None) -> list[StepDir]:
    """Complete checkpoints in `run_dir`, oldest first (Paths locally, URLs remotely). Incomplete
    `step-*` dirs are skipped with a warning."""
    found = []
    for step, p in _step_dirs(_norm(run_dir), storage_options):
        if not _exists(_join(p, "meta.json"), storage_options):
            warnings.warn(f"ignoring incomplete checkpoint {storage.redact(str(p))} (no meta.json completion marker)",
                          stacklevel=2)
            continue
        found.append((step, p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike, storage_options: dict | None = None) -> StepDir | None:
    ckpts = list_checkpoints(run_dir, storage_options)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | os.PathLike, storage_options: dict | None = None) -> StepDir:
    """A step dir as given, or the newest complete checkpoint of a run dir."""
    p = _norm(path)
    if _exists(_join(p, "meta.json"), storage_options):
        return p
    latest = latest_checkpoint(p, storage_options)
    if latest is None:
        raise ValueError(
            f"{storage.redact(str(p))} is neither a checkpoint (no meta.json) nor a run directory with a complete "
            "step-NNNNNNNN/ checkpoint; pass e.g. runs/demo or runs/demo/step-00000100"
        )
    return latest


def clean_tmp(run_dir: str | os.PathLike, storage_options: dict | None = None) -> list[StepDir]:
    """Remove the debris of a killed save; call on one rank before training.

    Locally: `.tmp-step-*` directories. On an object store: `step-*` prefixes without meta.json
    (a save that never reached its commit) and `.tmp-*` prefixes.
    """
    run = _norm(run_dir)
    removed: list[StepDir] = []
    if isinstance(run, str):
        for name in storage.listdir(run, storage_options):
            p = storage.join(run, name)
            if name.startswith(".tmp-") or (_STEP_RE.match(name) and not storage.exists(
                    storage.join(p, "meta.json"), storage_options)):
                _rm_tree(p, storage_options)
                removed.append(p)
        return removed
    if run.is_dir():
        for p in run.iterdir():
            if p.name.startswith(".tmp-step-"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _delete_checkpoint(p: StepDir, so: dict | None) -> None:
    """Delete one checkpoint so that a crash part-way leaves debris, never a half checkpoint."""
    if isinstance(p, str):
        storage.remove(storage.join(p, "meta.json"), so)  # first: the prefix stops being a checkpoint
        _rm_tree(p, so)
        return
    trash = p.with_name(".tmp-step-deleting-" + p.name)
    os.replace(p, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prune(run_dir: str | os.PathLike, keep: int, storage_options: dict | None = None) -> list[StepDir]:
    """Delete all but the newest `keep` complete checkpoints (keep >= 1)."""
    if keep < 1:
        raise ValueError(f"keep={keep}: retention must keep at least one checkpoint")
    ckpts = list_checkpoints(run_dir, storage_options)
    doomed = ckpts[:-keep] if len(ckpts) > keep else []
    for p in doomed:
        _delete_checkpoint(p, storage_options)
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

    Rank 0 creates it (`create=True`) before a barrier, the others attach with `create=False`.
    Every rank calls `write_rng`, and `write_sharded` (collective) under FSDP; rank 0 calls
    `write_model` + `write_optimizer` for the full layout, then `commit(meta)` after a barrier.
    Single-process code calls them in sequence.
    """

    def __init__(self, run_dir: str | os.PathLike, step: int, create: bool = True,
                 storage_options: dict | None = None) -> None:
        self.run = _norm(run_dir)
        self.step = step
        self.so = storage_options
        self.final = _join(self.run, step_dir_name(step))
        if isinstance(self.run, str):
            # No rename on object stores: files go under the final prefix, meta.json last.
            self.tmp = self.final
            if create and storage.exists(storage.join(self.final, "meta.json"), self.so):
                # Re-saving a step: un-commit the old one first so no mix of old and new files is
                # ever a complete checkpoint.
                _delete_checkpoint(self.final, self.so)
        else:
            self.tmp = self.run / (".tmp-" + step_dir_name(step))
            if create:
                self.tmp.mkdir(parents=True, exist_ok=True)

    def _put(self, name: str, write) -> None:
        """`write(local_path)` produces the file; it lands at tmp/name durably (fsync) or as one upload."""
        if isinstance(self.tmp, str):
            fd, local = tempfile.mkstemp(prefix="toto-ckpt-", suffix="-" + name)
            os.close(fd)
            try:
                write(local)
                fs, path = storage.url_to_fs(storage.join(self.tmp, name), self.so)
                fs.put_file(local, path)
            finally:
                os.unlink(local)
            return
        path = self.tmp / name
        write(str(path))
        _fsync_file(path)

    def write_model(self, state_dict: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
        self._put("model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))

    def write_optimizer(self, state_dict: dict) -> None:
        self._put("optimizer.pt", lambda p: torch.save(state_dict, p))

    def write_rng(self, rank: int, state: dict) -> None:
        self._put(f"rng-rank{rank:05d}.pt", lambda p: torch.save(state, p))

    def write_sharded(self, state: dict) -> None:
        """Collective: torch.distributed.checkpoint.save of `state` ({"model": ..., "optim": ...} of
        sharded state dicts); each rank writes the shards it owns, rank 0 the metadata."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        single = not (dist.is_available() and dist.is_initialized())
        dcp.save(state, storage_writer=_dcp_writer(_join(self.tmp, DCP_DIR), self.so), no_dist=single)

    def commit(self, meta: dict) -> StepDir:
        doc = {"schema": META_KIND, "version": META_VERSION, "step": self.step, **meta}
        if state_format(doc) not in STATE_FORMATS:
            raise ValueError(f"state_format={doc['state_format']!r}: expected one of {STATE_FORMATS}")
        _validate_meta(doc)
        text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
        if isinstance(self.tmp, str):
            storage.atomic_write_bytes(storage.join(self.tmp, "meta.json"), text.encode(), self.so)  # the commit
            return self.final
        path = self.tmp / "meta.json"
        path.write_text(text)
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


def _dcp_writer(d: StepDir, so: dict | None):
    from torch.distributed.checkpoint import FileSystemWriter

    if isinstance(d, str):
        # Not re-exported by torch.distributed.checkpoint in 2.13; this module is where it lives.
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        return FsspecWriter(d, **(so or {}))
    return FileSystemWriter(str(d))


def _dcp_reader(d: StepDir, so: dict | None):
    from torch.distributed.checkpoint import FileSystemReader

    if isinstance(d, str):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(d, **(so or {}))
    return FileSystemReader(str(d))


def _check_output_rows(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Weights saved before the lm-head was padded have vocab_size rows: pad them with zero rows."""
    w = sd.get("output.weight")
    if w is not None and w.shape[0] == cfg.vocab_size < cfg.padded_vocab_size:
        sd = dict(sd, **{"output.weight": torch.cat([w, w.new_zeros(cfg.padded_vocab_size - w.shape[0], w.shape[1])])})
    return sd


def load_state(step_dir: str | os.PathLike, storage_options: dict | None = None
               ) -> tuple[dict[str, torch.Tensor], dict | None, dict]:
    """(model state dict, optimizer state dict or None, meta) of one complete "full" checkpoint."""
    d = _norm(step_dir)
    meta = read_meta(d, storage_options)
    if state_format(meta) != "full":
        raise ValueError(f"{storage.redact(str(d))} holds a sharded (dcp) state: read it with load_sharded")
    model_sd = _read_safetensors(_join(d, "model.safetensors"), storage_options)
    opt_path = _join(d, "optimizer.pt")
    opt_sd = None
    if _exists(opt_path, storage_options):
        opt_sd = torch.load(io.BytesIO(_read_bytes(opt_path, storage_options)), map_location="cpu",
                            weights_only=True)
    return model_sd, opt_sd, meta


def load_sharded(step_dir: str | os.PathLike, state: dict, storage_options: dict | None = None,
                 no_dist: bool = False) -> None:
    """Fill `state` in place from a "dcp" checkpoint (collective unless no_dist): each rank reads
    only the pieces of the tensors it holds (its shards under FSDP2; everything when unsharded)."""
    import torch.distributed.checkpoint as dcp

    d = _norm(step_dir)
    dcp.load(state, storage_reader=_dcp_reader(_join(d, DCP_DIR), storage_options), no_dist=no_dist)


def _read_safetensors(p: StepDir, so: dict | None) -> dict[str, torch.Tensor]:
    return load_safetensors_bytes(_read_bytes(p, so)) if isinstance(p, str) else load_file(str(p))


def load_rng(step_dir: str | os.PathLike, rank: int, storage_options: dict | None = None) -> dict | None:
    path = _join(_norm(step_dir), f"rng-rank{rank:05d}.pt")
    if not _exists(path, storage_options):
        return None
    return torch.load(io.BytesIO(_read_bytes(path, storage_options)), map_location="cpu", weights_only=True)


def load_model(ckpt_dir: str | os.PathLike, device: str | torch.device = "cpu",
               storage_options: dict | None = None) -> tuple[CausalLM, dict]:
    """Rebuild the model of a checkpoint (or of a run dir's newest checkpoint) in eval mode, in
    this process alone (a sharded checkpoint is read whole here: export, evaluation).

    Returns (model, meta); meta holds "train_config", "model_config", "specials", "tokenizer",
    "loader_state", "step" and "step_dir".
    """
    step_dir = resolve_checkpoint(ckpt_dir, storage_options)
    meta = read_meta(step_dir, storage_options)
    cfg = ModelConfig.from_dict(meta["model_config"])
    model = build_model(cfg)
    if state_format(meta) == "dcp":
        sd = model.state_dict()
        with warnings.catch_warnings():  # DCP warns that it loads in one process: that is the intent here
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            load_sharded(step_dir, {"model": sd}, storage_options, no_dist=True)
    else:
        sd = _check_output_rows(_read_safetensors(_join(step_dir, "model.safetensors"), storage_options), cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{step_dir}: weights do not match the config (missing {missing}, unexpected {unexpected})")
    meta = dict(meta, step_dir=str(step_dir))
    return model.to(device).eval(), meta
