"""Context that fits the protocol: evaluating a checkpoint on sequences longer than it was trained on.

The paper's evaluation settings do not all fit the 4096-token pre-training context: a 16-frame
Kinetics clip is `1 + 16·256 = 4097` tokens, a 512 px DAVIS frame at 8 px tokens is `64·64 = 4096`
tokens plus `bos`, CATER's 32 frames are twice the context. `fit_context(model, seq_len, rule)`
returns the model made to accept `seq_len` tokens and a record of what was done, which every result
JSON carries as its `context` field:

- `rope_base` (LLaMA; the default `auto` picks it): the NTK-aware base change. With s = eval / trained
  and d the head width, the rotary base becomes theta' = theta · s^(d / (d - 2)). The lowest frequency
  (theta'^(-(d-2)/d) = theta^(-(d-2)/d) / s) is interpolated by exactly s, so the farthest positions
  land inside the trained range, while the highest frequencies (neighbouring tokens) are almost
  unchanged: the fine relative positions inside a frame, which probes and label propagation read,
  stay as trained. It needs no fine-tuning.
- `rope_pi` (LLaMA): position interpolation (Chen et al. 2023): position t is rotated as t · trained /
  eval, so every position is inside the trained range, but neighbour distances shrink by s too
  (negligible at 4097 / 4096, halved at 2x).
- `pos_interp` (GPT-2, the `auto` choice): the learned position table is interpolated. With the frame
  grids known, the table is read as [bos, frame 0's h·w rows, frame 1's, ...]: each frame's rows are
  resized bilinearly to the eval grid (as `trainer.backbones.resize_positions` does) and the frame
  axis is linearly interpolated to the frames needed. That needs (T_old - 1) % (h·w) == 0 for the
  trained table; otherwise (or without grids) rows 1.. are interpolated in 1-D.
- Mamba has no positions: only the length check is lifted (recorded as `no_positions`).
- `drop_bos`: the sequence layout leaves out `bos` (where the protocol allows it: features are read
  at visual tokens only), so 16·256 = 4096 tokens fit exactly; the caller drops the token, this
  checks that the rest fits.
- `none`: the trained context; longer sequences are refused.

With a factor of 1 (the sequence fits) every rule leaves the model's outputs exactly unchanged. The
model is changed in place and remembers what it was trained with, so a later call (a shorter
sequence, another rule) starts from the trained state again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CONTEXT_RULES", "fit_context", "trained_context", "trained_length", "context_limit", "uses_bos",
           "fit_probe_inputs"]

CONTEXT_RULES = ("auto", "rope_base", "rope_pi", "pos_interp", "drop_bos", "none")
_ARCH_RULES = {"llama": ("rope_base", "rope_pi"), "gpt2": ("pos_interp",), "mamba": ()}
_ORIGIN = "_toto_trained_context"


def _origin(model: nn.Module) -> dict:
    """What the model was trained with (recorded on first use): its config and GPT-2's position table."""
    if _ORIGIN not in model.__dict__:
        origin = {"cfg": model.cfg}
        if getattr(model.cfg, "arch", "llama") == "gpt2":
            origin["pos_embeddings"] = model.pos_embeddings
        model.__dict__[_ORIGIN] = origin
    return model.__dict__[_ORIGIN]


def trained_length(model: nn.Module) -> int:
    """The context the checkpoint was trained with (before any fit_context)."""
    return int(_origin(model)["cfg"].max_seq_len)


def uses_bos(rule: str) -> bool:
    """Whether sequences under `rule` start with the `bos` token (all but drop_bos)."""
    _check_rule(rule)
    return rule != "drop_bos"


def context_limit(model: nn.Module, rule: str) -> int:
    """Most tokens (bos included) a sequence may have under `rule`: the trained context for none,
    one more for drop_bos (bos is dropped), unbounded for the extension rules."""
    _check_rule(rule)
    n = trained_length(model)
    if rule == "none":
        return n
    return n + 1 if rule == "drop_bos" else sys.maxsize


@contextlib.contextmanager
def trained_context(model: nn.Module):
    """Within the block `fit_context` may extend `model`; on leaving it (also on an error) the model is
    as trained again, so a later evaluation on the same object does not inherit another's extension."""
    try:
        yield model
    finally:
        _restore(model)


def _check_rule(rule: str) -> None:
    if rule not in CONTEXT_RULES:
        raise ValueError(f"context rule {rule!r} is unknown: use one of {', '.join(CONTEXT_RULES)} (e.g. --context auto)")


def _restore(model: nn.Module) -> dict:
    origin = _origin(model)
    cfg = origin["cfg"]
    if model.cfg is not cfg:
        _set_length(model, cfg)
    return origin


def _set_length(model: nn.Module, cfg, position_scale: float = 1.0) -> None:
    """Install `cfg` (its max_seq_len and rope_theta) and, for LLaMA, the rotary tables it implies."""
    model.cfg = cfg
    if cfg.arch == "llama":
        from trainer.model import rope_cache

        cos, sin = rope_cache(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, position_scale)
        model.rope_cos = cos.to(model.rope_cos.device)  # registered buffers: assignment replaces them
        model.rope_sin = sin.to(model.rope_sin.device)
    elif cfg.arch == "gpt2":
        model.pos_embeddings = _origin(model)["pos_embeddings"]


def _interp_positions(weight: torch.Tensor, new_len: int, grid, trained_grid) -> tuple[torch.Tensor, bool]:
    """weight (T_old, D) -> (new_len, D), bos row kept; True when read frame by frame."""
    T_old, D = weight.shape
    w = weight.detach().float()
    if grid and trained_grid and (T_old - 1) % (trained_grid[0] * trained_grid[1]) == 0:
        (h, w_), (h2, w2) = trained_grid, grid
        frames = (T_old - 1) // (h * w_)
        rows = w[1:].reshape(frames, h, w_, D).permute(0, 3, 1, 2)  # (F, D, h, w)
        if (h2, w2) != (h, w_):
            rows = F.interpolate(rows, size=(h2, w2), mode="bilinear", align_corners=False)  # (F, D, h2, w2)
        need = -(-(new_len - 1) // (h2 * w2))
        if need > frames:
            # (1, D·h2·w2, F) -> (1, D·h2·w2, need): the first and last trained frames keep their rows.
            flat = rows.reshape(frames, -1).T[None]
            rows = F.interpolate(flat, size=need, mode="linear", align_corners=True)[0].T.reshape(need, D, h2, w2)
        table = rows.permute(0, 2, 3, 1).reshape(-1, D)  # (F', D)
        out = torch.cat([w[:1], table])[:new_len]
        frame_wise = True
    else:
        rows = w[1:].T[None]  # (1, D, T_old - 1)
        if new_len != T_old:
            rows = F.interpolate(rows, size=new_len - 1, mode="linear", align_corners=True)
        out = torch.cat([w[:1], rows[0].T])
        frame_wise = False
    if out.shape[0] < new_len:
        raise ValueError(f"position table of {T_old} rows cannot cover {new_len} positions on grid {grid}")
    return out.to(weight.dtype).contiguous(), frame_wise


def fit_context(model: nn.Module, seq_len: int, rule: str = "auto", *, grid: tuple[int, int] | None = None,
                trained_grid: tuple[int, int] | None = None) -> tuple[nn.Module, dict]:
    """Make `model` accept `seq_len` tokens under `rule`; returns (model, record).

    seq_len counts the tokens actually fed (bos included unless the rule is drop_bos). grid /
    trained_grid (h, w) are the eval and training frame grids, used by GPT-2's position table.
    The record is {"rule", "trained_len", "eval_len", ...} with "factor" (eval / trained, >= 1) and
    "base" (the rotary base used) where they apply.
    """
    _check_rule(rule)
    origin = _restore(model)
    cfg = origin["cfg"]
    trained, arch = int(cfg.max_seq_len), cfg.arch
    seq_len = int(seq_len)
    rec = {"rule": rule, "trained_len": trained, "eval_len": seq_len}
    fits = seq_len <= trained
    if rule in ("none", "drop_bos"):
        if not fits:
            raise ValueError(
                f"a sequence of {seq_len} tokens{' (bos dropped)' if rule == 'drop_bos' else ''} exceeds the trained "
                f"context of {trained}; use --context auto to extend it ({(_ARCH_RULES[arch] or ('none',))[0]} for {arch})"
            )
        if rule == "drop_bos":
            rec["bos"] = False
        return model, rec
    if rule == "auto":
        if fits:
            return model, {**rec, "rule": "none"}
        rule = _ARCH_RULES[arch][0] if _ARCH_RULES[arch] else "none"
        rec["rule"] = rule
    if arch == "mamba":
        if rule != "none":
            raise ValueError(f"--context {rule} does not apply to mamba (it has no positions): use auto or none")
        _set_length(model, dataclasses.replace(cfg, max_seq_len=max(seq_len, trained)))
        rec["rule"] = "no_positions"  # a recurrent model: only the length check is lifted
        return model, rec
    if rule not in _ARCH_RULES[arch]:
        raise ValueError(f"--context {rule} does not apply to {arch}: use {' or '.join(_ARCH_RULES[arch])} or auto")
    new_len = max(seq_len, trained)
    factor = new_len / trained
    rec["factor"] = factor
    if rule == "rope_base":
        hd = cfg.head_dim
        base = cfg.rope_theta * factor ** (hd / (hd - 2)) if factor != 1.0 else cfg.rope_theta
        _set_length(model, dataclasses.replace(cfg, max_seq_len=new_len, rope_theta=base))
        rec["base"] = base
    elif rule == "rope_pi":
        _set_length(model, dataclasses.replace(cfg, max_seq_len=new_len), position_scale=1.0 / factor)
        rec["base"] = cfg.rope_theta
    else:  # pos_interp
        table, frame_wise = _interp_positions(origin["pos_embeddings"].weight, new_len, grid, trained_grid)
        model.cfg = dataclasses.replace(cfg, max_seq_len=new_len)
        emb = nn.Embedding(new_len, table.shape[1], device=table.device, dtype=table.dtype)
        emb.weight.data.copy_(table)
        emb.weight.requires_grad_(False)
        model.pos_embeddings = emb
        rec["frame_wise"] = frame_wise
    return model, rec


def fit_probe_inputs(model: nn.Module, rule: str, *splits: tuple[torch.Tensor, torch.Tensor]):
    """Probe inputs under `rule`: (model, record, *(tokens, frame_index) per split).

    tokens / frame_index (N, T) as `trainer.data.iter_clips` stacks them (frame_index -1 on
    specials). drop_bos removes a leading special column from every split; the model is fitted
    to the longest sequence of any split.
    """
    out = []
    for tok, fi in splits:
        if rule == "drop_bos" and tok.shape[1] and bool((fi[:, 0] < 0).all()):
            tok, fi = tok[:, 1:], fi[:, 1:]
        out.append((tok, fi))
    model, rec = fit_context(model, max(t.shape[1] for t, _ in out), rule)
    return (model, rec, *out)
