"""Decode-path throughput vs a bare PyAV decode loop of the same file, in the same run.

    PYTHONPATH=$PWD python bench/decode.py [--seconds 8] [--repeats 3] [--threads 0 1] [--out bench-out/decode.json]

For a 480p and a 1080p H.264 30 fps clip (generated here with PyAV from a bundled photo, panned
so that every frame differs, with light sensor-like grain), measures frames/s of:
  bare           for f in container.decode(stream): pass                 (same threading)
  path[INTERP]   pipeline.decode.decode_video → 128 px RGB chunks      (decode + resize/crop + array)
                 + its quality: PSNR against Pillow's Lanczos resize of the same frames
  to_ndarray     decode + frame.to_ndarray(width, height, format="rgb24")  (PyAV's default bicubic)
  worker         decode_items in the watchdog subprocess (adds pickling through a pipe)
  scaler only    CPU ms per frame of the conversion alone: whole-frame resize (RGB, BGR) vs the
                 path's crop-then-scale
Each figure is the best of --repeats runs, variants interleaved within each repeat. Two rates:
  fps_wall        frames per wall-clock second
  fps_per_cpu_s   frames per CPU-second (user+sys of every thread, and of the worker subprocess):
                  the per-core throughput, and much less disturbed by other load on a shared machine
Ratios are variant / bare for each rate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from itertools import islice

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.decode import DecodeConfig, DecodeWorker  # noqa: E402
from pipeline.decode.video import decode_video  # noqa: E402
from pipeline.media import write_video  # noqa: E402
from pipeline.sources.items import make_item  # noqa: E402


def source_image() -> np.ndarray:
    from importlib.resources import files

    from PIL import Image

    path = files("skimage") / "data" / "astronaut.png"
    return np.asarray(Image.open(str(path)).convert("RGB"))


def make_clip(path: str, w: int, h: int, seconds: float, fps: int = 30) -> str:
    from PIL import Image

    big = np.asarray(Image.fromarray(source_image()).resize((int(w * 1.3), int(h * 1.3)), Image.Resampling.BICUBIC))
    n = int(seconds * fps)
    dx, dy = big.shape[1] - w, big.shape[0] - h

    # Camera footage carries sensor noise; without it a pan over a still photo is far cheaper to
    # decode than real video (near-perfect motion compensation), and the fixed cost of the
    # resize would look larger than it is on real footage. Light grain (sigma 3) brings the
    # bitrate to a camera-like level.
    grain = np.random.default_rng(0).normal(0, 3, size=(8, h, w, 1)).astype(np.float32)

    def frame(i: int, t: float) -> np.ndarray:
        x, y = int(dx * i / max(n - 1, 1)), int(dy * i / max(n - 1, 1))
        crop = big[y : y + h, x : x + w].astype(np.float32) + grain[i % 8]
        return np.clip(crop, 0, 255).astype(np.uint8)

    return write_video(path, frame, fps=fps, num_frames=n, crf=23, options={"preset": "medium"})


class Clock:
    """Wall time and CPU time (all threads of this process, plus a child process if given)."""

    def __init__(self, child_pid: int | None = None) -> None:
        self.child_pid = child_pid
        self.wall = time.perf_counter()
        self.cpu = time.process_time() + self._child()

    def _child(self) -> float:
        if self.child_pid is None:
            return 0.0
        with open(f"/proc/{self.child_pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() + self._child() - self.cpu


def bare(path: str, threads: int) -> tuple[int, float, float]:
    import av

    clock = Clock()
    n = 0
    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        s.codec_context.thread_count = threads
        for _ in c.decode(s):
            n += 1
    return (n, *clock.stop())


def to_ndarray_default(path: str, threads: int, res: int) -> tuple[int, float, float]:
    import av

    clock = Clock()
    n = 0
    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        s.codec_context.thread_count = threads
        for f in c.decode(s):
            w = round(f.width * res / f.height)
            f.to_ndarray(width=w, height=res, format="rgb24")
            n += 1
    return (n, *clock.stop())


def path_run(path: str, cfg: DecodeConfig) -> tuple[int, float, float]:
    item = make_item(uri=path, dataset="bench", split="train", label=None, video_id="clip", kind="video")
    clock = Clock()
    n = sum(r["num_frames"] for r in decode_video(item, cfg))
    return (n, *clock.stop())


def worker_run(path: str, cfg: DecodeConfig) -> tuple[int, float, float]:
    item = make_item(uri=path, dataset="bench", split="train", label=None, video_id="clip", kind="video")
    with DecodeWorker(cfg) as w:
        w.decode(item)  # start the subprocess and warm it up; time the second decode
        clock = Clock(child_pid=w._proc.pid)
        n = sum(r["num_frames"] for r in w.decode(item))
        return (n, *clock.stop())


def scaler_only_ms(path: str, res: int, frames: int = 40, repeats: int = 5) -> dict[str, float]:
    """CPU ms per frame of the conversion alone (AREA), on frames decoded beforehand: resizing the
    whole frame to short side ``res`` with PyAV's reformatter (cached SwsContext; the crop would
    follow as a view) against the decode path's converter (FFmpeg crops the centre square first,
    then scales only that to res×res: BGR out, channels swapped into RGB)."""
    import av
    from av.video.reformatter import VideoReformatter

    from pipeline.decode.video import _Converter

    with av.open(path) as c:
        decoded = list(islice(c.decode(video=0), frames))
    w = round(decoded[0].width * res / decoded[0].height)
    variants = {
        f"scaler_resize_whole_{fmt}": (lambda f, r=VideoReformatter(), fmt=fmt: r.reformat(
            f, width=w, height=res, format=fmt, interpolation="AREA").to_ndarray())
        for fmt in ("rgb24", "bgr24")
    }
    variants["scaler_path_crop_then_scale"] = _Converter(DecodeConfig(resolution=res, interpolation="AREA"), None)
    out = {}
    for name, fn in variants.items():
        best = float("inf")
        for _ in range(repeats):
            t = time.process_time()
            for f in decoded:
                fn(f)
            best = min(best, (time.process_time() - t) / len(decoded) * 1000)
        out[f"{name}_cpu_ms"] = round(best, 3)
    return out


def quality_psnr(path: str, interp: str, res: int, frames: int = 8) -> float:
    """PSNR (dB) of the decode path's output against Pillow's Lanczos resize of the same RGB frame."""
    import av
    from PIL import Image

    item = make_item(uri=path, dataset="bench", split="train", label=None, video_id="clip", kind="video")
    cfg = DecodeConfig(resolution=res, interpolation=interp, chunk_frames=frames, max_fps=30)
    got = next(iter(decode_video(item, cfg)))["frames"][:frames].astype(np.float64)  # (T, R, R, 3)
    refs = []
    with av.open(path) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i == frames:
                break
            im = f.to_image()
            w, h = im.size
            m = min(w, h)
            box = ((w - m) / 2, (h - m) / 2, (w + m) / 2, (h + m) / 2)
            refs.append(np.asarray(im.resize((res, res), Image.Resampling.LANCZOS, box=box), np.float64))
    mse = float(np.mean((got - np.stack(refs)) ** 2))
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="clip length (default 8)")
    ap.add_argument("--repeats", type=int, default=3, help="best of N runs per figure (default 3)")
    ap.add_argument("--threads", type=int, nargs="+", default=[0, 1], help="decoder threads to test (0 = auto)")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--interpolations", nargs="+", default=["BILINEAR", "AREA", "FAST_BILINEAR", "BICUBIC", "POINT"])
    ap.add_argument("--out", default=None, help="write results as JSON here")
    args = ap.parse_args()

    results = {"cpu_count": os.cpu_count(), "seconds": args.seconds, "resolution": args.resolution, "clips": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (w, h) in {"480p": (854, 480), "1080p": (1920, 1080)}.items():
            path = make_clip(os.path.join(tmp, f"{name}.mp4"), w, h, args.seconds)
            clip = results["clips"][name] = {}
            for threads in args.threads:
                # Interleave the variants within each repeat so that load changes on a shared
                # machine hit all of them alike; keep each variant's best run.
                runs: dict[str, Callable[[], tuple[int, float]]] = {"bare": partial(bare, path, threads)}
                for interp in args.interpolations:
                    cfg = DecodeConfig(resolution=args.resolution, interpolation=interp, threads=threads)
                    runs[f"path_{interp}"] = partial(path_run, path, cfg)
                runs["to_ndarray_default"] = partial(to_ndarray_default, path, threads, args.resolution)
                wcfg = DecodeConfig(resolution=args.resolution, threads=threads)
                runs[f"worker_{wcfg.interpolation}"] = partial(worker_run, path, wcfg)
                wall = {k: 0.0 for k in runs}
                cpu = {k: 0.0 for k in runs}
                for _ in range(args.repeats):
                    for k, fn in runs.items():
                        n, dt, dc = fn()
                        wall[k] = max(wall[k], n / dt)
                        cpu[k] = max(cpu[k], n / max(dc, 1e-9))
                row = clip[f"threads={threads}"] = {}
                for k in runs:
                    row[f"{k}_fps_wall"] = round(wall[k], 1)
                    row[f"{k}_fps_per_cpu_s"] = round(cpu[k], 1)
                    if k != "bare":
                        row[f"{k}_ratio_wall"] = round(wall[k] / wall["bare"], 3)
                        row[f"{k}_ratio_cpu"] = round(cpu[k] / cpu["bare"], 3)
                print(f"{name} threads={threads}: " + ", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            clip.update(scaler_only_ms(path, args.resolution))
            print(f"{name} scaler only: " + ", ".join(f"{k}={v}" for k, v in clip.items() if k.startswith("scaler")))
            for interp in args.interpolations:
                clip[f"psnr_{interp}_db"] = round(quality_psnr(path, interp, args.resolution), 2)
            print(f"{name} PSNR vs Lanczos: " + ", ".join(f"{k}={v}" for k, v in clip.items() if k.startswith("psnr")))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
