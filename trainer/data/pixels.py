"""Pixels beside tokens: the mix loader for the patch models of the tokenizer ablation (Table 3).

A pixel dataset is the tokenize job's output with `--tokenizer patch:P` (pipeline/tokenizers/patch.py)
on the same input and settings as a source's dVAE job: the same keys, rows and frames, each frame
stored as its P x P patches at the token grid. `PixelMixLoader` is `MixLoader` over the token mix (same
order, state and resume) whose batches also carry each sequence's pixels, read from the pixel datasets
at the very frames the mix chose, and hand the model packed tensors (trainer/patches.py):

- ``inputs`` int32 (B, T, 1 + P*P*3): the position's token id and its patch's pixels (0 on specials);
- ``targets``: the next dVAE code, int32 (B, T), for patch -> dVAE, or for patch -> patch the next
  patch's pixels packed as int32 (B, T, 1 + P*P*3), channel 0 = IGNORE_INDEX where no patch follows;
- ``tokens`` int32 (B, T): the token inputs as MixLoader gives them (what the patches are aligned to).

Pairing is checked when the loader is made: each pixel dataset must have been made by the patch
tokenizer with the model's patch size, at the token dataset's resolution with the same patch grid,
and hold the same rows (videos, chunk segments, frame counts) in the same frame numbering as the mix
index, else a ValueError says what differs and how to remake it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.mix.access import MixReader, TokenStore
from pipeline.mix.tables import read_row_table, split_table
from pipeline.shards import read_manifest
from trainer.data.loader import MixLoader
from trainer.patches import N_SPECIAL, pack_inputs, pack_pixel_targets

__all__ = ["PixelMixLoader", "PixelMixReader", "parse_pixels"]


def parse_pixels(spec: str | dict | None, sources: list[str]) -> dict[str, str]:
    """`name=URL,name=URL` (or one URL for a one-source mix, or a dict) -> {source: pixel dataset URL}."""
    if spec is None or spec == "" or spec == {}:
        raise ValueError("a patch model needs the pixel datasets beside the mix's token datasets: pass "
                         "pixels=NAME=DIR[,NAME=DIR] (each made by `toto-pipeline tokenize --tokenizer patch:8` on the "
                         "source's input) or pixels=DIR for a one-source mix")
    if isinstance(spec, dict):
        got = {str(k): str(v) for k, v in spec.items()}
    elif "=" not in spec.split(",")[0]:
        if len(sources) != 1:
            raise ValueError(f"pixels={spec!r} names one directory but the mix has sources {sources}; pass "
                             "pixels=NAME=DIR,NAME=DIR, one per source")
        got = {sources[0]: spec}
    else:
        got = {}
        for part in spec.split(","):
            name, sep, url = part.partition("=")
            if not sep or not name.strip() or not url.strip():
                raise ValueError(f"pixels={spec!r}: {part!r} is not NAME=DIR")
            got[name.strip()] = url.strip()
    missing = [s for s in sources if s not in got]
    unknown = [s for s in got if s not in sources]
    if missing or unknown:
        raise ValueError(f"pixels={spec!r}: the mix's sources are {sources}; missing {missing}, unknown {unknown}")
    return got


class PixelMixReader(MixReader):
    """MixReader whose ``batch`` also returns the pixels of every sequence (module docstring)."""

    def __init__(self, mix_url: str, *, pixels: str | dict, patch_size: int, target: str, split: str = "train",
                 storage_options: dict | None = None, verify: str = "auto", read_slack: float = 0.5,
                 cache_mb: int = 256):
        super().__init__(mix_url, split=split, storage_options=storage_options, verify=verify, read_slack=read_slack,
                         cache_mb=cache_mb)
        if target not in ("tokens", "pixels"):
            raise ValueError(f"target={target!r}: use tokens (patch -> dVAE) or pixels (patch -> patch)")
        self.target = target
        self.patch_size = int(patch_size)
        self.patch_dim = 3 * self.patch_size * self.patch_size
        self.pixel_urls = parse_pixels(pixels, self.sources)
        self.first_special = self.vocab_size - N_SPECIAL
        self._pix: list[TokenStore] = []
        self._ptab: list[dict[str, np.ndarray]] = []
        for si, s in enumerate(self._src):
            self._pair(si, s, storage_options, verify, read_slack, cache_mb)

    def _pair(self, si: int, s: dict, so: dict | None, verify: str, read_slack: float, cache_mb: int) -> None:
        name, url = s["name"], self.pixel_urls[s["name"]]
        tm, pm = self._dsm[name], read_manifest(url, so)
        tok, p = pm["tokenizer"], self.patch_size
        remake = (f"remake it with `toto-pipeline tokenize --tokenizer patch:{p} --resolution {tm['resolution']}` "
                  f"on {name}'s input with the settings of its token job")
        if not str(tok.get("id", "")).startswith("patch:") or int(tok.get("values_per_token", 0)) != self.patch_dim:
            raise ValueError(f"pixels for {name} ({url}) were made by tokenizer {tok.get('id')!r}, not the {p}x{p} patch "
                             f"tokenizer the model needs (model.patch_size={p}); {remake}")
        if int(pm["resolution"]) != int(tm["resolution"]):
            raise ValueError(f"pixels for {name} ({url}) are at {pm['resolution']} px, its tokens ({s['url']}) at "
                             f"{tm['resolution']} px; {remake}")
        gh, gw = (int(g) for g in tm["grid"])
        if (int(pm["grid"][0]), int(pm["grid"][1])) != (gh, gw * self.patch_dim):
            raise ValueError(
                f"the {p}x{p} patches of {name} form a {pm['grid'][0]}x{int(pm['grid'][1]) // self.patch_dim} grid but its "
                f"tokens a {gh}x{gw} one: model.patch_size must equal the tokenizer's downsampling "
                f"({int(tm['resolution']) // gh}); set model.patch_size={int(tm['resolution']) // gh} and {remake}")
        pt = split_table(read_row_table(url, pm, so), self.split)
        tt = split_table(read_row_table(s["url"], tm, so), self.split)
        tab = self._tab[si]
        same = (np.array_equal(pt.cum, tt.cum) and np.array_equal(pt.cum, tab["cum"])
                and np.array_equal(pt.segment, tt.segment) and pt.videos == tt.videos)
        if not same:
            miss = sorted(set(tt.videos) - set(pt.videos))[:3]
            raise ValueError(
                f"pixels for {name} ({url}) do not hold the rows of its tokens ({s['url']}) in split {self.split!r}: "
                f"{len(pt.num_frames)} rows / {int(pt.cum[-1])} frames vs {len(tt.num_frames)} / {int(tt.cum[-1])}"
                f"{f', videos missing: {miss}' if miss else ''}; {remake} (same input, fps, chunking and limit)")
        self._ptab.append(pt.arrays())
        self._pix.append(TokenStore(url, pm, int(pm["grid"][0]) * int(pm["grid"][1]), storage_options=so,
                                    verify=verify, read_slack=read_slack, cache_mb=cache_mb))

    def pixels(self, ids: np.ndarray) -> np.ndarray:
        """uint8 (B, T+1, P*P*3): the patch of every position of the sequences ``ids`` (0 on specials)."""
        ids = np.asarray(ids, dtype=np.int64)
        t1 = self.seq_len + 1
        out = np.zeros((len(ids), t1, self.patch_dim), dtype=np.uint8)
        for si, pos, frames in self.sample_frames(ids):
            vals, _ = self._pix[si].gather(self._ptab[si], frames)  # (m, F, hw * P*P*3) uint16
            m, f = frames.shape
            body = vals.reshape(m, -1, self.patch_dim)  # (m, F*hw, P*P*3): raster order, as the tokens
            n = min(body.shape[1], t1 - 1)  # frames after position 0 (the start token), cut like the sequence
            out[pos, 1 : 1 + n] = body[:, :n]
        return out

    def batch(self, ids: np.ndarray) -> dict[str, Any]:
        got = super().batch(ids)
        px = self.pixels(ids)  # (B, T+1, P*P*3)
        x, y = got["inputs"], got["targets"]  # (B, T) int64
        got["tokens"] = torch.from_numpy(np.ascontiguousarray(x))
        got["inputs"] = pack_inputs(x, px[:, :-1])
        if self.target == "pixels":
            got["targets"] = pack_pixel_targets(y, px[:, 1:], self.first_special)
        else:
            got["targets"] = np.ascontiguousarray(y)
        return got


class PixelMixLoader(MixLoader):
    """MixLoader whose batches carry packed patch inputs (and pixel targets); same order, state, resume.

    >>> loader = PixelMixLoader("mix.json", pixels="k600=px/k600", patch_size=8, target="pixels", global_batch=8)
    """

    def __init__(self, mix_path: str, *, pixels: str | dict, patch_size: int, target: str, global_batch: int,
                 rank: int = 0, world: int = 1, num_workers: int = 0, split: str = "train",
                 storage_options: dict | None = None, verify: str = "auto", prefetch_factor: int = 4,
                 cache_mb: int = 256, read_slack: float = 0.5):
        super().__init__(mix_path, global_batch=global_batch, rank=rank, world=world, num_workers=num_workers,
                         split=split, storage_options=storage_options, verify=verify, prefetch_factor=prefetch_factor,
                         cache_mb=cache_mb, read_slack=read_slack)
        self.reader = PixelMixReader(mix_path, pixels=pixels, patch_size=patch_size, target=target, split=split,
                                     storage_options=storage_options, verify=verify, read_slack=read_slack,
                                     cache_mb=cache_mb)
