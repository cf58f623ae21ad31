"""A CATER-like miniature for snitch localisation, made with numpy and PyAV (no downloads).

    from pipeline.demo_data.cater import CaterConfig, make_cater
    summary = make_cater(CaterConfig(out="demo/cater", train=48, val=16))

Written in CATER's release layout, so the `cater` adapter reads it like the real data set
(docs/datasets.md "cater"):

    OUT/videos/CLEVR_new_{i:06d}.avi        H.264 in AVI, SIZE×SIZE, FRAMES frames at FPS (default 300 at 24 fps, as CATER)
    OUT/lists/localize/{train,val}.txt      "CLEVR_new_{i:06d}.avi CLASS", CLASS = the snitch's final cell 0..35
    OUT/scenes/CLEVR_new_{i:06d}.json       CATER-style metadata: objects (instance, shape, color, rgb,
                                            size) with their (x, y, z) location per frame, and movements

The scene is CATER's table seen from straight above: the table spans -3..3 table units on both
axes (the whole frame), cut into the 6×6 grid of the localisation task. On it: 3-5 objects
(`cone`s drawn as shaded discs, `cube`s as squares, each a colour of its own), which slide to
new places in each of SEGMENTS time segments, and the snitch (`spl`, a small gold disc). The
label is CATER's: `(floor(y) + 3) * 6 + (floor(x) + 3)` of the snitch's last location.

Object permanence is what the task tests, so the videos come in three kinds (video i: i % 3):

- 0 `visible`: the snitch slides on its own and is visible at the end;
- 1 `carried`: a cone slides over the snitch and covers it (CATER's `_contain`), then carries it
  to other places until the end: the snitch ends hidden and its cell is the carrier's;
- 2 `released`: as 1, but after carrying it the cone slides away and leaves the snitch visible
  where it was carried to (not where it was covered).

The snitch is drawn above every object but its carrier, which is drawn above it, so it is hidden
exactly while it is contained: the frames determine the label (`localize_from_frames`, the
tracking baseline the tests run on the decoded videos). Every position is drawn at least 0.15 of
a cell away from the grid lines, so a pixel of compression noise cannot change a cell.

Deterministic for a seed: each video comes from its own seed (seed, index), and is encoded by
x264 single-threaded without its SIMD paths (as the demo's clips, `encode_clip`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

GRID = 6  # cells per side of the table (CATER's `localize` task: 36 classes)
HALF = 3.0  # the table spans [-HALF, HALF) table units on x and y
SEGMENTS = 6  # time segments; every object may move in each
SNITCH_RADIUS = 0.25  # table units
CONE_RADIUS = 0.6  # a cone covers the snitch whole
CUBE_HALF = 0.45
CELL_MARGIN = 0.15  # positions keep this fraction of a cell away from grid lines
SNITCH_RGB = (235, 190, 30)
TABLE_RGB = (150, 150, 150)
# Saturated colours far from the grey table and from the snitch's gold, one per object.
COLORS = {"red": (200, 30, 30), "blue": (30, 60, 210), "green": (30, 170, 50), "purple": (140, 40, 190),
          "cyan": (20, 180, 200), "brown": (120, 60, 20)}
KINDS = ("visible", "carried", "released")


@dataclass(frozen=True)
class CaterConfig:
    """out: output folder. seed: everything is a function of it. train / val: videos per list.
    frames, fps: per video (CATER: 300 at 24 fps). size: frame side in px (square: the decoder's
    centre crop keeps the whole table). workers: processes (the output does not depend on it)."""

    out: str
    seed: int = 0
    train: int = 48
    val: int = 16
    frames: int = 300
    fps: int = 24
    size: int = 96
    workers: int = 1

    def __post_init__(self) -> None:
        def bad(field: str, value: object, fix: str) -> None:
            raise ValueError(f"CaterConfig.{field}={value!r} is invalid: {fix}")

        if self.train < 1 or self.val < 1:
            bad("train" if self.train < 1 else "val", min(self.train, self.val), "use at least 1 video per list")
        if self.frames < 2 * SEGMENTS:
            bad("frames", self.frames, f"use at least {2 * SEGMENTS} (two per time segment), e.g. 300 as CATER")
        if not 1 <= self.fps <= 60:
            bad("fps", self.fps, "use a rate in [1, 60], e.g. 24 as CATER")
        if not 48 <= self.size <= 512 or self.size % 2:
            bad("size", self.size, "use an even side in [48, 512] (the snitch is 1/24 of it across), e.g. 96")
        if self.workers < 1:
            bad("workers", self.workers, "use >= 1")


def cell_of(x: float, y: float) -> int:
    """CATER's class of a table position: row-major 6×6 cell, 0..35 (gen_train_test.localize_dataset)."""
    cx = min(max(int(math.floor(x)) + GRID // 2, 0), GRID - 1)
    cy = min(max(int(math.floor(y)) + GRID // 2, 0), GRID - 1)
    return cy * GRID + cx


def _place(rng: np.random.Generator, radius: float, avoid: list[np.ndarray], gap: float) -> np.ndarray:
    """A table position (x, y) inside a cell's margins, `radius` from the edges and, when it can be,
    `gap` from every point in `avoid`."""
    lo, hi = -HALF + radius, HALF - radius
    p = None
    for _ in range(64):
        cell = rng.integers(0, GRID, size=2)
        p = cell - HALF + rng.uniform(CELL_MARGIN, 1 - CELL_MARGIN, size=2)
        if (p < lo).any() or (p > hi).any():
            continue
        if all(np.linalg.norm(p - a) >= gap for a in avoid):
            return p
    return np.clip(p, lo, hi)


def _ease(u: np.ndarray) -> np.ndarray:
    return u * u * (3 - 2 * u)  # starts and stops at rest, as CATER's slides


def simulate(seed: int, index: int, frames: int) -> dict:
    """The scene of video `index`: {"kind", "objects": [{instance, shape, color, rgb, size, xy (F, 2)}]
    with the snitch first, "movements", "carrier" (instance covering the snitch at the end or None)}."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7, index]))
    kind = KINDS[index % len(KINDS)]
    n_obj = int(rng.integers(3, 6))
    names = rng.permutation(list(COLORS))[:n_obj]
    shapes = ["cone"] + [str(rng.choice(["cone", "cube"])) for _ in range(n_obj - 1)]  # a cone to carry it
    sizes = [CONE_RADIUS if s == "cone" else CUBE_HALF for s in shapes]
    snitch = _place(rng, SNITCH_RADIUS, [], 0)
    pos = [snitch]
    for r in sizes:
        pos.append(_place(rng, r, pos, 1.4))
    seg = np.linspace(0, frames, SEGMENTS + 1).round().astype(int)
    xy = np.zeros((n_obj + 1, frames, 2))
    movements: dict[str, list] = {"Spl_0": []}
    insts = ["Spl_0"] + [f"{s.capitalize()}_{i}" for i, s in enumerate(shapes)]
    for name in insts[1:]:
        movements[name] = []
    # Containment plan (segments): cover at `c` (the cone slides onto the snitch), carry after it;
    # `released` lifts the cone away two segments later.
    c = int(rng.integers(1, SEGMENTS - 3)) if kind != "visible" else None
    contained = False
    for s in range(SEGMENTS):
        t0, t1 = int(seg[s]), int(seg[s + 1])
        u = _ease(np.linspace(0, 1, t1 - t0, endpoint=False) + 1 / max(t1 - t0, 1))[:, None]  # (L, 1), ends at 1
        targets = [p.copy() for p in pos]
        move = [bool(rng.random() < 0.6) for _ in pos]
        if c is not None and s == c:  # cone 1 slides onto the snitch, which stays put
            move[0], move[1] = False, True
            targets[1] = pos[0].copy()
            movements[insts[1]].append(["_contain", "Spl_0", t0, t1])
        elif contained and s in (c + 1, c + 2) and not (kind == "released" and s == c + 2):
            move[1] = True  # carried at least once, so where it was covered is not the answer
        elif kind == "released" and contained and s == c + 2:
            move[1] = True  # the cone slides away and leaves the snitch where it is
        for k in range(len(pos)):
            if k == 1 and c is not None and s == c:
                continue
            if not move[k] or (k == 0 and contained):
                continue
            r = SNITCH_RADIUS if k == 0 else sizes[k - 1]
            others = [targets[j] for j in range(len(pos)) if j != k and not (contained and {j, k} == {0, 1})]
            gap = 2.2 if (kind == "released" and contained and s == c + 2 and k == 1) else 1.3
            if kind == "released" and contained and s == c + 2 and k == 1:
                others = [pos[0]]  # far from the snitch it leaves behind
            targets[k] = _place(rng, r, others, gap)
            movements[insts[k]].append(["_slide", None, t0, t1])
        if contained and not (kind == "released" and s == c + 2):
            targets[0] = targets[1].copy()  # the snitch goes where its carrier goes
        for k in range(len(pos)):
            xy[k, t0:t1] = pos[k] + (targets[k] - pos[k]) * u
        pos = targets
        if c is not None and s == c:
            contained = True
        if kind == "released" and contained and s == c + 2:
            contained = False
    objects = [{"instance": "Spl_0", "shape": "spl", "color": "gold", "rgb": list(SNITCH_RGB),
                "size": SNITCH_RADIUS, "xy": xy[0]}]
    for k in range(n_obj):
        objects.append({"instance": insts[k + 1], "shape": shapes[k], "color": str(names[k]),
                        "rgb": list(COLORS[str(names[k])]), "size": sizes[k], "xy": xy[k + 1]})
    return {"kind": kind, "objects": objects, "movements": movements, "carrier": insts[1] if contained else None,
            # Covered from the last frame of the cone's approach, when it sits on the (still) snitch:
            # from then on the snitch is under it, and wherever it goes, however far one frame takes it.
            "contain_start": None if c is None else int(seg[c + 1]) - 1,
            "contain_end": None if kind != "released" else int(seg[c + 3])}


def render(scene: dict, size: int) -> np.ndarray:
    """The scene's frames, uint8 (F, size, size, 3): table, objects under the snitch, the snitch,
    then its carrier while it is contained (drawn over it)."""
    objs = scene["objects"]
    n = objs[0]["xy"].shape[0]
    scale = size / (2 * HALF)  # px per table unit
    yy, xx = np.mgrid[:size, :size].astype(np.float32) + 0.5
    shade = 1.0 - 0.08 * (yy / size)  # a faint light gradient over the table
    base = np.asarray(TABLE_RGB, np.float32)[None, None, :] * shade[..., None]
    out = np.empty((n, size, size, 3), np.uint8)
    start, end = scene["contain_start"], scene["contain_end"]
    carrier = objs[1]["instance"] if start is not None else None
    for t in range(n):
        fr = base.copy()
        covered = carrier is not None and t >= start and (end is None or t < end)
        order = [o for o in objs[1:] if not (covered and o["instance"] == carrier)] + [objs[0]]
        if covered:
            order.append(objs[1])
        for o in order:
            cx, cy = (o["xy"][t] + HALF) * scale
            r = o["size"] * scale
            if o["shape"] == "cube":
                d = np.maximum(np.abs(xx - cx), np.abs(yy - cy))
                col = np.asarray(o["rgb"], np.float32)[None, None, :] * np.ones_like(d)[..., None]
            else:
                d = np.hypot(xx - cx, yy - cy)
                # cones: lighter towards the apex; the snitch flat
                lift = 0.85 + 0.3 * np.clip(1 - d / max(r, 1e-6), 0, 1) if o["shape"] == "cone" else np.ones_like(d)
                col = np.asarray(o["rgb"], np.float32)[None, None, :] * lift[..., None]
            a = np.clip(r + 0.5 - d, 0, 1)[..., None]  # 1-px antialiased edge
            fr = fr * (1 - a) + np.clip(col, 0, 255) * a
        out[t] = np.clip(fr + 0.5, 0, 255).astype(np.uint8)
    return out


def label_of(scene: dict) -> int:
    """The class CATER writes: the cell of the snitch's last location."""
    x, y = scene["objects"][0]["xy"][-1]
    return cell_of(float(x), float(y))


def scene_json(scene: dict) -> dict:
    """CATER-style metadata: per object its (x, y, z) location at every frame (z = 0, the table)."""
    objs = [{k: v for k, v in o.items() if k != "xy"} | {
        "locations": {str(t): [round(float(x), 4), round(float(y), 4), 0.0] for t, (x, y) in enumerate(o["xy"])}}
        for o in scene["objects"]]
    return {"kind": scene["kind"], "objects": objs, "movements": scene["movements"], "carrier": scene["carrier"]}


def localize_from_frames(frames: np.ndarray, colors: dict[str, tuple[int, int, int]]) -> int:
    """The tracking baseline: the snitch's final cell from the frames alone, given the colours.

    frames uint8 (F, S, S, 3); colors {instance: rgb} with the snitch as "Spl_0". While gold
    pixels are seen, the snitch is where they are; when it vanishes, the object whose colour covers
    its last seen place carries it, and it is wherever that object is until it shows again.
    """
    names = list(colors)
    pal = np.asarray([colors[n] for n in names] + [TABLE_RGB], np.float32)  # (K+1, 3)
    s = frames.shape[1]
    scale = s / (2 * HALF)
    min_px = max(4, int(0.15 * math.pi * (SNITCH_RADIUS * scale) ** 2))
    last, carrier = None, None
    for fr in frames:
        d = ((fr[:, :, None, :].astype(np.float32) - pal[None, None]) ** 2).sum(-1)  # (S, S, K+1)
        lab = d.argmin(-1)
        near = d.min(-1) < 60.0**2
        gold = (lab == names.index("Spl_0")) & near
        if gold.sum() >= min_px:
            ys, xs = np.nonzero(gold)
            last, carrier = np.array([xs.mean() + 0.5, ys.mean() + 0.5]), None
            continue
        if last is None:
            continue
        if carrier is None:
            px, py = (int(v) for v in np.clip(last, 0, s - 1))
            k = int(lab[py, px])
            if k >= len(names):  # table at its place: nothing to follow (does not happen in the miniature)
                continue
            carrier = k
        m = (lab == carrier) & near
        if m.any():
            ys, xs = np.nonzero(m)
            last = np.array([xs.mean() + 0.5, ys.mean() + 0.5])
    if last is None:
        raise ValueError("the snitch is never seen in these frames")
    x, y = last / scale - HALF
    return cell_of(float(x), float(y))


def _video_job(args: tuple) -> tuple[str, int, str]:
    from pipeline.demo_data import encode_clip

    seed, index, frames, fps, size, root = args
    scene = simulate(seed, index, frames)
    name = f"CLEVR_new_{index:06d}"
    encode_clip(os.path.join(root, "videos", f"{name}.avi"), list(render(scene, size)), fps)
    os.makedirs(os.path.join(root, "scenes"), exist_ok=True)
    with open(os.path.join(root, "scenes", f"{name}.json"), "w") as f:
        json.dump(scene_json(scene), f)
    return name, label_of(scene), scene["kind"]


def make_cater(cfg: CaterConfig) -> dict:
    """Write the miniature under cfg.out (files overwritten); returns counts and the kinds per list."""
    root = os.path.abspath(cfg.out)
    n = cfg.train + cfg.val
    jobs = [(cfg.seed, i, cfg.frames, cfg.fps, cfg.size, root) for i in range(n)]
    if cfg.workers > 1 and n > 4:
        from multiprocessing import get_context

        with get_context("spawn").Pool(cfg.workers) as pool:
            done = pool.map(_video_job, jobs)
    else:
        done = [_video_job(j) for j in jobs]
    lists = os.path.join(root, "lists", "localize")
    os.makedirs(lists, exist_ok=True)
    summary: dict = {"frames": cfg.frames, "fps": cfg.fps, "size": cfg.size}
    for split, part in (("train", done[: cfg.train]), ("val", done[cfg.train :])):
        with open(os.path.join(lists, f"{split}.txt"), "w") as f:
            f.write("".join(f"{name}.avi {cls}\n" for name, cls, _ in part))
        summary[split] = {"videos": len(part), "classes": len({c for _, c, _ in part}),
                          **{k: sum(1 for *_, kind in part if kind == k) for k in KINDS}}
    return summary
