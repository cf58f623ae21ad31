"""The embedded demo data set, made offline from images bundled in installed packages.

    from pipeline.demo_data import DemoDataConfig, make_demo_data
    summary = make_demo_data(DemoDataConfig(out="demo/data", seed=0, scale=1.0))

Sources (no downloads): scikit-learn's 8×8 handwritten digits (`load_digits`, 1 797 images) and
sample photos (china.jpg, flower.jpg), and the photos shipped in scikit-image's data folder
(astronaut, chelsea, coffee, rocket, motorcycle, hubble, retina, ...).

Output, each laid out exactly like the real data set so the real adapters read it:

    OUT/imagenet/   ILSVRC-2012 layout: train/{wnid}/{wnid}_{i}.JPEG, val/ILSVRC2012_val_{i:08d}.JPEG,
                    LOC_val_solution.csv, LOC_synset_mapping.txt. Ten classes n00000000..n00000009 =
                    digit identity; each image is a digit with random position, scale, stroke colour
                    and a photo background (96×96 px).
    OUT/kinetics/   Kinetics layout: annotations/{train,validate}.csv (label,youtube_id,time_start,
                    time_end,split) and {train,val}/{youtube_id}_{start:06d}_{end:06d}.mp4. Label = the
                    camera motion over a photo: pan left/right/up/down, zoom in/out, rotate
                    clockwise/counterclockwise. Any single frame is just a photo crop, so telling
                    the classes apart needs time.
    OUT/davis/      DAVIS-2017 layout: JPEGImages/480p/{seq}/{t:05d}.jpg, Annotations/480p/{seq}/{t:05d}.png
                    (palette PNG, index 0 background, 1..K objects), ImageSets/2017/{train,val}.txt.
                    Digit-shaped textured objects moving and bouncing over a panning photo.

Deterministic for a seed: every file is made from its own seed derived from (seed, kind, index),
and videos are encoded single-threaded without x264's SIMD code (which gave run-to-run
differences), so the bytes depend neither on the number of workers nor on the run.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from multiprocessing import get_context

import numpy as np
from PIL import Image

MOTIONS = (
    "pan left",
    "pan right",
    "pan up",
    "pan down",
    "zoom in",
    "zoom out",
    "rotate clockwise",
    "rotate counterclockwise",
)
DIGIT_WNIDS = tuple(f"n{d:08d}" for d in range(10))
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

_SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                   "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "color.png", "brick.png", "grass.png",
                   "gravel.png", "camera.png", "moon.png")


@dataclass(frozen=True)
class DemoDataConfig:
    """out: output folder. seed: everything is a function of it. scale: multiplies all counts
    (e.g. 0.05 for a tiny CI set). images/val_images/videos/val_videos/davis: counts at scale 1.
    image_size: side of the square images; video_size: side of the square clips; fps and
    clip_seconds: clip rate and length; davis_frames, davis_size (w, h): DAVIS sequences.
    workers: processes (the output does not depend on it)."""

    out: str
    seed: int = 0
    scale: float = 1.0
    images: int = 3000
    val_images: int = 500
    videos: int = 256
    val_videos: int = 64
    davis: int = 8
    image_size: int = 96
    video_size: int = 96
    fps: int = 16
    clip_seconds: float = 2.0
    davis_frames: int = 24
    davis_size: tuple[int, int] = (128, 96)
    workers: int = 2

    def __post_init__(self) -> None:
        def bad(field: str, value: object, fix: str) -> None:
            raise ValueError(f"DemoDataConfig.{field}={value!r} is invalid: {fix}")

        if not self.scale > 0:
            bad("scale", self.scale, "use a positive factor, e.g. 1.0 (or 0.05 for a tiny set)")
        for name in ("images", "val_images", "videos", "val_videos", "davis"):
            if getattr(self, name) < 0:
                bad(name, getattr(self, name), "use a count >= 0")
        if not 32 <= self.image_size <= 512:
            bad("image_size", self.image_size, "use a side in [32, 512], e.g. 96")
        if not 32 <= self.video_size <= 512 or self.video_size % 2:
            bad("video_size", self.video_size, "use an even side in [32, 512], e.g. 96")
        if not 1 <= self.fps <= 60:
            bad("fps", self.fps, "use a rate in [1, 60], e.g. 16")
        if not 0.25 <= self.clip_seconds <= 30:
            bad("clip_seconds", self.clip_seconds, "use a length in [0.25, 30] s, e.g. 2")
        if self.workers < 1:
            bad("workers", self.workers, "use >= 1")

    def count(self, n: int) -> int:
        return max(1, round(n * self.scale)) if n > 0 else 0


# --------------------------------------------------------------------------------------------
# Bundled sources
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def photos() -> tuple[np.ndarray, ...]:
    """RGB uint8 photos from scikit-learn and scikit-image, each resized to 256 px on the short side."""
    from sklearn.datasets import load_sample_images

    out = [np.asarray(im) for im in load_sample_images().images]
    data = files("skimage") / "data"
    for name in _SKIMAGE_PHOTOS:
        p = data / name
        if p.is_file():
            out.append(np.asarray(Image.open(str(p)).convert("RGB")))
    if len(out) < 2:
        raise RuntimeError("no bundled photos found in scikit-learn / scikit-image; reinstall them")
    res = []
    for a in out:
        im = Image.fromarray(a)
        s = 256 / min(im.size)
        res.append(np.asarray(im.resize((max(256, round(im.width * s)), max(256, round(im.height * s))),
                                        Image.Resampling.BICUBIC, reducing_gap=2.0)))
    return tuple(res)


@lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [N, 8, 8] in 0..1, labels int [N]) from scikit-learn's bundled digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def _rng(seed: int, kind: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, kind, index]))


def _photo_crop(rng: np.random.Generator, w: int, h: int, zoom: float = 1.0) -> np.ndarray:
    ph = photos()[rng.integers(len(photos()))]
    cw, ch = min(ph.shape[1], int(w * zoom)), min(ph.shape[0], int(h * zoom))
    x = rng.integers(0, ph.shape[1] - cw + 1)
    y = rng.integers(0, ph.shape[0] - ch + 1)
    crop = Image.fromarray(ph[y : y + ch, x : x + cw])
    return np.asarray(crop.resize((w, h), Image.Resampling.BILINEAR))


def _digit_mask(img8: np.ndarray, size: int) -> np.ndarray:
    """Smooth 0..1 mask (size, size) from an 8×8 digit."""
    im = Image.fromarray((img8 * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(im, np.float32) / 255.0 * 1.4 - 0.2, 0, 1)


# --------------------------------------------------------------------------------------------
# ImageNet-style digits
# --------------------------------------------------------------------------------------------


def render_digit_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, int]:
    """A digit with random scale, position and colour over a dimmed photo; returns (rgb, digit)."""
    imgs, labels = digits()
    i = rng.integers(len(imgs))
    bg = _photo_crop(rng, size, size, zoom=rng.uniform(1.0, 2.5)).astype(np.float32)
    bg = bg * rng.uniform(0.35, 0.6) + rng.uniform(0, 40)
    ds = int(size * rng.uniform(0.45, 0.85))
    m = _digit_mask(imgs[i], ds)
    x = rng.integers(0, size - ds + 1)
    y = rng.integers(0, size - ds + 1)
    color = rng.uniform(150, 255, size=3) * (rng.uniform(0.6, 1.0, size=3))
    color[rng.integers(3)] = 255.0  # keep the stroke bright against the dimmed photo
    out = bg.copy()
    region = out[y : y + ds, x : x + ds]
    out[y : y + ds, x : x + ds] = region * (1 - m[..., None]) + color * m[..., None]
    return np.clip(out, 0, 255).astype(np.uint8), int(labels[i])


def _image_job(args: tuple) -> tuple[str, str, int]:
    seed, kind, index, size, path_fmt = args
    rng = _rng(seed, kind, index)
    rgb, digit = render_digit_image(rng, size)
    wnid = DIGIT_WNIDS[digit]
    path = path_fmt.format(wnid=wnid, i=index)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rgb).save(path, format="JPEG", quality=90)
    return path, wnid, index


# --------------------------------------------------------------------------------------------
# Kinetics-style motion clips
# --------------------------------------------------------------------------------------------


def motion_frames(rng: np.random.Generator, motion: str, size: int, n: int) -> list[np.ndarray]:
    """n frames (size, size, 3): a camera window moving over a photo according to `motion`."""
    ph = photos()[rng.integers(len(photos()))]
    im = Image.fromarray(ph)
    W, H = im.size
    view = rng.uniform(0.35, 0.6) * min(W, H)  # side of the source window at t = 0
    speed = rng.uniform(0.35, 0.6)  # fraction of the window per clip for pans
    # Keep every window (turned by up to 90°: half-diagonal 0.71·side, or panned) inside the
    # photo, so no frame shows the black fill outside it (a give-away unrelated to the motion).
    reach = 0.7072 + speed
    view = min(view, min(W, H) / (2 * reach) - 1)
    m = view * reach
    cx = rng.uniform(m, W - m)
    cy = rng.uniform(m, H - m)
    zoom_total = rng.uniform(1.6, 2.2)
    angle_total = rng.uniform(50, 90)  # degrees over the clip
    frames = []
    for k in range(n):
        u = k / max(n - 1, 1)  # 0..1 over the clip
        side, ang, dx, dy = view, 0.0, 0.0, 0.0
        if motion == "pan left":  # camera pans left: content moves right
            dx = -speed * view * u
        elif motion == "pan right":
            dx = speed * view * u
        elif motion == "pan up":
            dy = -speed * view * u
        elif motion == "pan down":
            dy = speed * view * u
        elif motion == "zoom in":
            side = view / zoom_total**u
        elif motion == "zoom out":
            side = view / zoom_total ** (1 - u)
        elif motion == "rotate clockwise":  # content turns clockwise on screen
            ang = -angle_total * u
        elif motion == "rotate counterclockwise":
            ang = angle_total * u
        else:
            raise ValueError(f"unknown motion {motion!r}; choose one of {MOTIONS}")
        # Affine map output pixel (x, y) → source: centre + R(angle) · (x - size/2, y - size/2) · side/size.
        s = side / size
        a = np.deg2rad(ang)
        c, sn = np.cos(a) * s, np.sin(a) * s
        ox, oy = cx + dx, cy + dy
        coeffs = (c, -sn, ox - c * size / 2 + sn * size / 2, sn, c, oy - sn * size / 2 - c * size / 2)
        fr = im.transform((size, size), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
        frames.append(np.asarray(fr))
    return frames


def encode_clip(path: str, frames: list[np.ndarray], fps: int) -> None:
    from pipeline.media import write_video

    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Byte-identical reruns need one encoder thread *and* x264's C code paths: measured here,
    # its SIMD paths gave different bitstreams for the same frames from one process to the next
    # (about 3x slower, ~0.1 s per clip, which the demo can afford).
    write_video(path, frames, fps=fps, crf=20, options={"threads": "1", "preset": "veryfast", "x264-params": "asm=0"})


def _video_job(args: tuple) -> tuple[str, str, str, int, int, str]:
    seed, index, size, fps, seconds, root, split = args
    rng = _rng(seed, 2, index)
    motion = MOTIONS[index % len(MOTIONS)]  # balanced classes
    yid = f"demo{index:07d}"  # 11 characters like a YouTube id, unique by construction
    t0 = int(rng.integers(0, 300))
    t1 = t0 + int(np.ceil(seconds))
    folder = "train" if split == "train" else "val"
    path = os.path.join(root, folder, f"{yid}_{t0:06d}_{t1:06d}.mp4")
    n = max(2, round(fps * seconds))
    encode_clip(path, motion_frames(rng, motion, size, n), fps)
    return motion, yid, split, t0, t1, path


# --------------------------------------------------------------------------------------------
# DAVIS-2017-style sequences
# --------------------------------------------------------------------------------------------


def voc_palette() -> list[int]:
    """The PASCAL VOC / DAVIS colour palette (index i's bits spread over R, G, B) as 768 ints."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def _davis_job(args: tuple) -> str:
    seed, index, n_frames, (w, h), root, name = args
    rng = _rng(seed, 3, index)
    imgs, _ = digits()
    ph = photos()[rng.integers(len(photos()))]
    bg_im = Image.fromarray(ph)
    # Background: a slow pan across the photo.
    bw = min(bg_im.width, int(w * rng.uniform(1.2, 1.6)))
    bh = min(bg_im.height, int(h * bw / w))
    bx0 = rng.uniform(0, max(bg_im.width - bw * 1.2, 1))
    by0 = rng.uniform(0, max(bg_im.height - bh, 1))
    k_obj = int(rng.integers(1, 4))
    objs = []
    for _ in range(k_obj):
        size = int(min(w, h) * rng.uniform(0.35, 0.55))
        mask = _digit_mask(imgs[rng.integers(len(imgs))], size) > 0.45
        tex = _photo_crop(rng, size, size, zoom=1.0).astype(np.float32)
        tint = rng.uniform(0.5, 1.0, size=3) * 255
        tex = np.clip(0.5 * tex + 0.5 * tint, 0, 255).astype(np.uint8)
        pos = np.array([rng.uniform(0, w - size), rng.uniform(0, h - size)])
        vel = rng.uniform(-1, 1, size=2)
        vel = vel / (np.linalg.norm(vel) + 1e-6) * rng.uniform(1.5, 3.5)
        objs.append({"size": size, "mask": mask, "tex": tex, "pos": pos, "vel": vel})
    img_dir = os.path.join(root, "JPEGImages", "480p", name)
    ann_dir = os.path.join(root, "Annotations", "480p", name)
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    palette = voc_palette()
    for t in range(n_frames):
        u = t / max(n_frames - 1, 1)
        bx = bx0 + 0.2 * bw * u
        frame = np.asarray(bg_im.crop((int(bx), int(by0), int(bx) + bw, int(by0) + int(bh))).resize(
            (w, h), Image.Resampling.BILINEAR)).copy()
        label = np.zeros((h, w), np.uint8)
        for oid, o in enumerate(objs, start=1):  # later objects occlude earlier ones
            x, y = (int(round(v)) for v in o["pos"])
            s = o["size"]
            m = o["mask"]
            frame[y : y + s, x : x + s][m] = o["tex"][m]
            label[y : y + s, x : x + s][m] = oid
            nxt = o["pos"] + o["vel"]
            for d, lim in ((0, w - s), (1, h - s)):
                if not 0 <= nxt[d] <= lim:
                    o["vel"][d] = -o["vel"][d]
            o["pos"] = np.clip(o["pos"] + o["vel"], 0, [w - s, h - s])
        Image.fromarray(frame).save(os.path.join(img_dir, f"{t:05d}.jpg"), format="JPEG", quality=92)
        ann = Image.fromarray(label, "P")
        ann.putpalette(palette)
        ann.save(os.path.join(ann_dir, f"{t:05d}.png"), format="PNG")
    return name


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _init_worker() -> None:
    photos(), digits()


def _map(fn, jobs: list, pool, progress: str | None) -> list:
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc=progress, disable=progress is None, leave=False, unit="file")
    out = []
    if pool is not None and len(jobs) > 8:
        for r in pool.imap(fn, jobs, chunksize=max(1, min(32, len(jobs) // 64))):
            out.append(r)
            bar.update()
    else:
        for j in jobs:
            out.append(fn(j))
            bar.update()
    bar.close()
    return out


def make_demo_data(cfg: DemoDataConfig, *, progress: bool = False) -> dict:
    """Write the demo set under cfg.out; returns counts per part. Existing files are overwritten."""
    photos(), digits()  # fail early (and once) if the bundled data is missing
    total = cfg.count(cfg.images) + cfg.count(cfg.val_images) + cfg.count(cfg.videos) + cfg.count(cfg.val_videos)
    if cfg.workers > 1 and total > 200:
        with get_context("spawn").Pool(cfg.workers, initializer=_init_worker) as pool:
            return _make(cfg, pool, progress)
    return _make(cfg, None, progress)


def _make(cfg: DemoDataConfig, pool, progress: bool) -> dict:
    out = os.path.abspath(cfg.out)

    # ImageNet-style.
    inet = os.path.join(out, "imagenet")
    n_train, n_val = cfg.count(cfg.images), cfg.count(cfg.val_images)
    jobs = [(cfg.seed, 0, i, cfg.image_size, os.path.join(inet, "train", "{wnid}", "{wnid}_{i}.JPEG"))
            for i in range(n_train)]
    _map(_image_job, jobs, pool, "imagenet train" if progress else None)
    vjobs = [(cfg.seed, 1, i, cfg.image_size, os.path.join(inet, "val", "ILSVRC2012_val_{i:08d}.JPEG"))
             for i in range(1, n_val + 1)]
    val = _map(_image_job, vjobs, pool, "imagenet val" if progress else None)
    if n_val:
        with open(os.path.join(inet, "LOC_val_solution.csv"), "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["ImageId", "PredictionString"])
            for _, wnid, i in val:
                wr.writerow([f"ILSVRC2012_val_{i:08d}", f"{wnid} 0 0 {cfg.image_size - 1} {cfg.image_size - 1}"])
    os.makedirs(inet, exist_ok=True)
    with open(os.path.join(inet, "LOC_synset_mapping.txt"), "w") as f:
        for wnid, name in zip(DIGIT_WNIDS, DIGIT_NAMES, strict=True):
            f.write(f"{wnid} digit {name}\n")

    # Kinetics-style.
    kin = os.path.join(out, "kinetics")
    n_vt, n_vv = cfg.count(cfg.videos), cfg.count(cfg.val_videos)
    vjobs = [(cfg.seed, i, cfg.video_size, cfg.fps, cfg.clip_seconds, kin, "train") for i in range(n_vt)]
    vjobs += [(cfg.seed, n_vt + i, cfg.video_size, cfg.fps, cfg.clip_seconds, kin, "validate") for i in range(n_vv)]
    clips = _map(_video_job, vjobs, pool, "kinetics clips" if progress else None)
    os.makedirs(os.path.join(kin, "annotations"), exist_ok=True)
    for split in ("train", "validate"):
        buf = io.StringIO()
        wr = csv.writer(buf, lineterminator="\n")
        wr.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
        for motion, yid, sp, t0, t1, _ in clips:
            if sp == split:
                wr.writerow([motion, yid, t0, t1, split])
        with open(os.path.join(kin, "annotations", f"{split}.csv"), "w") as f:
            f.write(buf.getvalue())

    # DAVIS-style.
    davis = os.path.join(out, "davis")
    n_seq = cfg.count(cfg.davis)
    names = [f"demo-seq-{i:03d}" for i in range(n_seq)]
    djobs = [(cfg.seed, i, cfg.davis_frames, cfg.davis_size, davis, names[i]) for i in range(n_seq)]
    _map(_davis_job, djobs, pool, "davis" if progress else None)
    os.makedirs(os.path.join(davis, "ImageSets", "2017"), exist_ok=True)
    n_dtrain = n_seq // 2
    with open(os.path.join(davis, "ImageSets", "2017", "train.txt"), "w") as f:
        f.write("".join(f"{n}\n" for n in names[:n_dtrain]))
    with open(os.path.join(davis, "ImageSets", "2017", "val.txt"), "w") as f:
        f.write("".join(f"{n}\n" for n in names[n_dtrain:]))

    summary = {
        "imagenet": {"train": n_train, "val": n_val, "classes": len(DIGIT_WNIDS)},
        "kinetics": {"train": n_vt, "validate": n_vv, "classes": len(MOTIONS)},
        "davis": {"sequences": n_seq, "frames": cfg.davis_frames},
    }
    with open(os.path.join(out, "README.txt"), "w") as f:
        f.write(
            f"Toto demo data (seed {cfg.seed}, scale {cfg.scale}); made by `toto-pipeline demo-data`.\n"
            f"imagenet/: {n_train} train + {n_val} val digit images, classes {DIGIT_WNIDS[0]}..{DIGIT_WNIDS[-1]} "
            f"(LOC_synset_mapping.txt)\n"
            f"kinetics/: {n_vt} train + {n_vv} validate clips of {cfg.clip_seconds:g} s at {cfg.fps} fps; "
            f"labels: {', '.join(MOTIONS)}\n"
            f"davis/: {n_seq} sequences of {cfg.davis_frames} frames with palette PNG masks\n"
            "Sources: scikit-learn digits and sample images, scikit-image data photos.\n"
        )
    return summary
