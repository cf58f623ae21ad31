"""The embedded demo data set, made offline from images bundled in installed packages.

    from pipeline.demo_data import DemoDataConfig, make_demo_data
    summary = make_demo_data(DemoDataConfig(out="demo/data", seed=0, scale=1.0))

Sources (no downloads): the photos shipped in scikit-image's data folder and scikit-learn's
sample photos (china.jpg, flower.jpg), and scikit-learn's 8×8 digits (the shapes of the DAVIS-style
objects only).

Designed so each of the paper's findings has something to find at 64 px with 8×8-pixel tokens
(the study measures these properties from the tokens before training, `trainer.evals.data_checks`):

- the label is an **object**: a disc textured with a crop of one of ten real photos (brick, grass,
  gravel, coins, moon, coffee, chelsea, Hubble deep field, retina, IHC; `OBJECT_CLASSES`), 32-40 px
  across (about a quarter of the frame, i.e. ~16 of the 64 tokens), at a random place on a
  background cut from *other* photos (`BACKGROUNDS`). The class is in the content of a few tokens,
  not in the whole frame, so a pooling that can pick tokens (attention) has something to find;
  its texture makes it visible to a bag of tokens as well.
- videos move slowly: the object drifts 8-16 px over the 2 s clip and the background pans 0-8 px,
  so a token is usually the same as the token at its position in the previous frame: later frames
  are predictable from earlier ones, the first frame is not.

Output, each laid out exactly like the real data set so the real adapters read it:

    OUT/imagenet/   ILSVRC-2012 layout: train/{wnid}/{wnid}_{i}.JPEG, val/ILSVRC2012_val_{i:08d}.JPEG,
                    LOC_val_solution.csv, LOC_synset_mapping.txt. Ten classes n00000000..n00000009 =
                    the object's texture (64×64 px).
    OUT/kinetics/   Kinetics layout: annotations/{train,validate}.csv (label,youtube_id,time_start,
                    time_end,split) and {train,val}/{youtube_id}_{start:06d}_{end:06d}.mp4. Label = the
                    moving object's texture name (64×64 px, balanced classes).
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

# The label: which photo textures the object. Backgrounds come from the other photos only, so an
# object's tokens are never the background's.
OBJECT_CLASSES = ("brick", "grass", "gravel", "coins", "moon", "coffee", "chelsea", "hubble", "retina", "ihc")
_OBJECT_FILES = ("brick.png", "grass.png", "gravel.png", "coins.png", "moon.png", "coffee.png", "chelsea.png",
                 "hubble_deep_field.jpg", "retina.jpg", "ihc.png")
BACKGROUNDS = ("astronaut.png", "rocket.jpg", "motorcycle_left.png", "camera.png", "page.png")  # + sklearn's 2
OBJECT_WNIDS = tuple(f"n{d:08d}" for d in range(len(OBJECT_CLASSES)))
OBJECT_SIZE = (32, 41)  # disc diameter in px at 64 px: [low, high)
OBJECT_DRIFT = (8.0, 16.0)  # px the object moves over a clip
BACKGROUND_PAN = (0.0, 8.0)  # px the background moves over a clip
MIN_FRAME = 48  # smallest frame side (even, a multiple of 8) that holds the largest object

_SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                   "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "color.png", "brick.png", "grass.png",
                   "gravel.png", "camera.png", "moon.png")


@dataclass(frozen=True)
class DemoDataConfig:
    """out: output folder. seed: everything is a function of it. scale: multiplies all counts
    (e.g. 0.05 for a tiny CI set). images/val_images/videos/val_videos/davis: counts at scale 1.
    image_size: side of the square images; video_size: side of the square clips (64: the demo's
    training resolution, so the object's size in tokens is as designed); fps and
    clip_seconds: clip rate and length; davis_frames, davis_size (w, h): DAVIS sequences.
    workers: processes (the output does not depend on it)."""

    out: str
    seed: int = 0
    scale: float = 1.0
    images: int = 3000
    val_images: int = 500
    videos: int = 256
    # 192 validation clips: at 64 the paired attention-vs-average difference had a standard error of
    # ~4.4 points (seeds 0-2), too coarse for a finding of a few points; 192 gives ~2.5.
    val_videos: int = 192
    davis: int = 8
    image_size: int = 64
    video_size: int = 64
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
        # The object is OBJECT_SIZE px across whatever the frame, so a frame must hold the largest one.
        lo = MIN_FRAME
        if not lo <= self.image_size <= 512:
            bad("image_size", self.image_size, f"use a side in [{lo}, 512] (the objects are up to "
                f"{OBJECT_SIZE[1] - 1} px across), e.g. 64")
        if not lo <= self.video_size <= 512 or self.video_size % 2:
            bad("video_size", self.video_size, f"use an even side in [{lo}, 512] (the objects are up to "
                f"{OBJECT_SIZE[1] - 1} px across), e.g. 64")
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


def _short_side_256(a: np.ndarray) -> np.ndarray:
    im = Image.fromarray(a)
    s = 256 / min(im.size)
    return np.asarray(im.resize((max(256, round(im.width * s)), max(256, round(im.height * s))),
                                Image.Resampling.BICUBIC, reducing_gap=2.0))


def _skimage_photos(names: tuple[str, ...], need_all: bool) -> list[np.ndarray]:
    data = files("skimage") / "data"
    out = []
    for name in names:
        p = data / name
        if p.is_file():
            out.append(np.asarray(Image.open(str(p)).convert("RGB")))
        elif need_all:
            raise RuntimeError(f"scikit-image's bundled photo {name} is missing from {data}; reinstall scikit-image")
    return out


@lru_cache(maxsize=1)
def photos() -> tuple[np.ndarray, ...]:
    """RGB uint8 photos from scikit-learn and scikit-image, each resized to 256 px on the short side
    (the DAVIS-style sequences' backgrounds and textures)."""
    from sklearn.datasets import load_sample_images

    out = [np.asarray(im) for im in load_sample_images().images] + _skimage_photos(_SKIMAGE_PHOTOS, False)
    if len(out) < 2:
        raise RuntimeError("no bundled photos found in scikit-learn / scikit-image; reinstall them")
    return tuple(_short_side_256(a) for a in out)


@lru_cache(maxsize=1)
def object_textures() -> tuple[np.ndarray, ...]:
    """One photo per class of OBJECT_CLASSES (256 px short side): the object's texture is cut from it."""
    return tuple(_short_side_256(a) for a in _skimage_photos(_OBJECT_FILES, True))


@lru_cache(maxsize=1)
def backgrounds() -> tuple[np.ndarray, ...]:
    """Background photos, none of them an object class's (256 px short side)."""
    from sklearn.datasets import load_sample_images

    out = _skimage_photos(BACKGROUNDS, True) + [np.asarray(im) for im in load_sample_images().images]
    return tuple(_short_side_256(a) for a in out)


@lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [N, 8, 8] in 0..1, labels int [N]) from scikit-learn's bundled digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def _rng(seed: int, kind: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, kind, index]))


def _photo_crop(rng: np.random.Generator, w: int, h: int, zoom: float = 1.0,
                photo: np.ndarray | None = None) -> np.ndarray:
    """A (h, w, 3) uint8 crop of ``photo`` (default: a random one of `photos()`), ``zoom`` times the output size."""
    ph = photos()[rng.integers(len(photos()))] if photo is None else photo
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
# The labelled object (images and clips)
# --------------------------------------------------------------------------------------------


def render_object(rng: np.random.Generator, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Object of class k: (texture float32 (d, d, 3), soft disc mask float32 (d, d, 1)), d in OBJECT_SIZE."""
    d = int(rng.integers(*OBJECT_SIZE))
    tex = _photo_crop(rng, d, d, zoom=rng.uniform(0.6, 1.4), photo=object_textures()[k]).astype(np.float32)
    yy, xx = np.mgrid[:d, :d]
    r = d / 2
    m = np.clip(r + 0.5 - np.sqrt((yy - r + 0.5) ** 2 + (xx - r + 0.5) ** 2), 0, 1)  # 1-px antialiased edge
    return tex, m[..., None].astype(np.float32)


def _paste(frame: np.ndarray, tex: np.ndarray, m: np.ndarray, x: int, y: int) -> None:
    d = tex.shape[0]
    region = frame[y : y + d, x : x + d]
    frame[y : y + d, x : x + d] = region * (1 - m) + tex * m


def render_object_image(rng: np.random.Generator, size: int, k: int | None = None) -> tuple[np.ndarray, int, float]:
    """An object of class k (random when None) at a random place over a background photo crop;
    returns (rgb uint8 (size, size, 3), class index, fraction of the frame the object covers)."""
    k = int(rng.integers(len(OBJECT_CLASSES))) if k is None else k
    bgs = backgrounds()
    bg = _photo_crop(rng, size, size, zoom=rng.uniform(1.0, 2.5), photo=bgs[rng.integers(len(bgs))])
    frame = bg.astype(np.float32) * rng.uniform(0.6, 1.0)
    tex, m = render_object(rng, k)
    d = tex.shape[0]
    _paste(frame, tex, m, int(rng.integers(0, size - d + 1)), int(rng.integers(0, size - d + 1)))
    return np.clip(frame, 0, 255).astype(np.uint8), k, float(m.sum() / size**2)


def object_clip_frames(rng: np.random.Generator, k: int, size: int, n: int) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """n frames (size, size, 3) uint8 of an object of class k drifting over a slowly panning photo,
    and the object's top-left corner (x, y) in each frame."""
    bgs = backgrounds()
    ph = bgs[rng.integers(len(bgs))]
    zoom = rng.uniform(1.0, 2.0)  # source pixels per output pixel
    margin = BACKGROUND_PAN[1] + 1
    side = int(np.ceil((size + 2 * margin) * zoom))
    big = Image.fromarray((_photo_crop(rng, side, side, photo=ph).astype(np.float32) * rng.uniform(0.6, 1.0)).astype(np.uint8))
    tex, m = render_object(rng, k)
    d = tex.shape[0]

    def direction(length: float) -> np.ndarray:
        v = rng.normal(size=2)
        return v / (np.linalg.norm(v) + 1e-9) * length

    p0 = rng.uniform(0, size - d, size=2)
    v = direction(rng.uniform(*OBJECT_DRIFT))
    bv = direction(rng.uniform(*BACKGROUND_PAN))
    frames, corners = [], []
    for t in range(n):
        u = t / max(n - 1, 1)
        ox, oy = (margin + bv * u) * zoom  # the background window's corner in source pixels
        fr = np.asarray(big.transform((size, size), Image.Transform.AFFINE, (zoom, 0, ox, 0, zoom, oy),
                                      resample=Image.Resampling.BILINEAR)).astype(np.float32)
        x, y = (int(round(c)) for c in np.clip(p0 + v * u, 0, size - d))
        _paste(fr, tex, m, x, y)
        frames.append(np.clip(fr, 0, 255).astype(np.uint8))
        corners.append((x, y))
    return frames, corners


def _image_job(args: tuple) -> tuple[str, str, int, float]:
    seed, kind, index, size, path_fmt = args
    rng = _rng(seed, kind, index)
    rgb, k, area = render_object_image(rng, size)
    wnid = OBJECT_WNIDS[k]
    path = path_fmt.format(wnid=wnid, i=index)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rgb).save(path, format="JPEG", quality=90)
    return path, wnid, index, area


# --------------------------------------------------------------------------------------------
# Kinetics-style clips
# --------------------------------------------------------------------------------------------


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
    k = index % len(OBJECT_CLASSES)  # balanced classes
    yid = f"demo{index:07d}"  # 11 characters like a YouTube id, unique by construction
    t0 = int(rng.integers(0, 300))
    t1 = t0 + int(np.ceil(seconds))
    folder = "train" if split == "train" else "val"
    path = os.path.join(root, folder, f"{yid}_{t0:06d}_{t1:06d}.mp4")
    n = max(2, round(fps * seconds))
    frames, _ = object_clip_frames(rng, k, size, n)
    encode_clip(path, frames, fps)
    return OBJECT_CLASSES[k], yid, split, t0, t1, path


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
    photos(), digits(), object_textures(), backgrounds()


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
    photos(), digits(), object_textures(), backgrounds()  # fail early (and once) if the bundled data is missing
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
    vjobs = [(cfg.seed, 1, i, cfg.image_size, os.path.join(inet, "val", "ILSVRC2012_val_{i:08d}.JPEG"))
             for i in range(1, n_val + 1)]
    train = _map(_image_job, jobs, pool, "imagenet train" if progress else None)
    val = _map(_image_job, vjobs, pool, "imagenet val" if progress else None)
    if n_val:
        with open(os.path.join(inet, "LOC_val_solution.csv"), "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["ImageId", "PredictionString"])
            for _, wnid, i, _ in val:
                wr.writerow([f"ILSVRC2012_val_{i:08d}", f"{wnid} 0 0 {cfg.image_size - 1} {cfg.image_size - 1}"])
    os.makedirs(inet, exist_ok=True)
    with open(os.path.join(inet, "LOC_synset_mapping.txt"), "w") as f:
        for wnid, name in zip(OBJECT_WNIDS, OBJECT_CLASSES, strict=True):
            f.write(f"{wnid} {name}\n")

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
        "imagenet": {"train": n_train, "val": n_val, "classes": len(OBJECT_WNIDS),
                     # measured on the images written: the share of the frame the labelled object covers
                     "object_area": round(float(np.mean([r[3] for r in train + val])), 4) if train or val else None},
        "kinetics": {"train": n_vt, "validate": n_vv, "classes": len(OBJECT_CLASSES)},
        "davis": {"sequences": n_seq, "frames": cfg.davis_frames},
    }
    with open(os.path.join(out, "README.txt"), "w") as f:
        f.write(
            f"Toto demo data (seed {cfg.seed}, scale {cfg.scale}); made by `toto-pipeline demo-data`.\n"
            f"imagenet/: {n_train} train + {n_val} val object images, classes {OBJECT_WNIDS[0]}..{OBJECT_WNIDS[-1]} "
            f"(LOC_synset_mapping.txt: {', '.join(OBJECT_CLASSES)})\n"
            f"kinetics/: {n_vt} train + {n_vv} validate clips of {cfg.clip_seconds:g} s at {cfg.fps} fps; "
            f"labels: the moving object's texture ({', '.join(OBJECT_CLASSES)})\n"
            f"davis/: {n_seq} sequences of {cfg.davis_frames} frames with palette PNG masks\n"
            "Sources: scikit-image data photos, scikit-learn sample images and digits (DAVIS object shapes).\n"
        )
    return summary
