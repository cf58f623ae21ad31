"""Real encoded test media, written with PyAV and Pillow (used by tests, the benchmark and the demo).

Writers:
    write_video(path, frames, fps=30, codec="libx264", rotation=0, sar=None, times=None, gop=None, ...)
    write_audio_only(path, seconds)       truncate_file(src, dst, fraction)
    write_image(path, rgb, fmt=..., exif_orientation=None, mode=None)
Patterns:
    quadrant_frame(h, w, t, duration): TL red, TR green, BL blue, BR a grey "time code" level
    (30 + 200 * t / duration) so tests can tell which source frame was picked at a given time.
Sets:
    make_media_set(out_dir) -> {name: MediaSpec}: every good kind (H.264 MP4, VP9 WebM, odd size,
    portrait with rotation metadata, anamorphic SAR, variable frame rate, 60 fps, long GOP, images
    with EXIF orientation / RGBA / grey / CMYK / 16-bit) and every bad kind (audio-only, zero-byte,
    truncated MP4 and WebM, not-a-video, corrupt JPEG), each with what decoding must give.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

QUADRANT_COLORS = {"tl": (230, 30, 30), "tr": (30, 200, 40), "bl": (40, 50, 220)}


def timecode_level(t: float, duration: float) -> int:
    """Grey level the BR quadrant shows at time t (monotonic in t, 30..230)."""
    return int(round(30 + 200 * min(max(t / duration, 0.0), 1.0)))


def quadrant_frame(h: int, w: int, t: float = 0.0, duration: float = 1.0) -> np.ndarray:
    """uint8 (h, w, 3): red / green / blue quadrants and a BR grey level encoding t."""
    a = np.empty((h, w, 3), np.uint8)
    hh, hw = h // 2, w // 2
    a[:hh, :hw] = QUADRANT_COLORS["tl"]
    a[:hh, hw:] = QUADRANT_COLORS["tr"]
    a[hh:, :hw] = QUADRANT_COLORS["bl"]
    a[hh:, hw:] = timecode_level(t, duration)
    return a


def write_video(
    path: str,
    frames: Iterable[np.ndarray] | Callable[[int, float], np.ndarray],
    *,
    fps: float = 30,
    num_frames: int | None = None,
    codec: str = "libx264",
    pix_fmt: str | None = None,
    rotation: int = 0,
    sar: Fraction | None = None,
    times: Sequence[float] | None = None,
    gop: int | None = None,
    crf: int = 18,
    audio: bool = False,
    options: dict | None = None,
) -> str:
    """Encode RGB frames (H, W, 3) uint8 to `path` (container from the extension).

    frames: an iterable of arrays, or f(index, time_s) -> array with num_frames given.
    rotation: counter-clockwise display rotation in degrees stored in the display matrix (what
    phones write); the coded frames are stored as given. sar: sample aspect ratio (anamorphic).
    times: presentation times in seconds per frame (variable frame rate; needs a ms timebase).
    """
    import av

    if callable(frames):
        if num_frames is None:
            raise ValueError("num_frames is required when frames is a function")
        if times is not None:
            seq = (frames(i, times[i]) for i in range(num_frames))
        else:
            seq = (frames(i, i / fps) for i in range(num_frames))
    else:
        seq = iter(frames)
    first = next(seq)
    h, w = first.shape[:2]
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(path, "w") as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height = w, h
        s.pix_fmt = pix_fmt or ("yuv420p" if (w % 2 == 0 and h % 2 == 0) or codec != "libx264" else "yuv444p")
        opts = {}
        if codec == "libx264":
            opts.update({"crf": str(crf), "preset": "veryfast"})
        if codec.startswith("libvpx"):
            opts.update({"crf": "20", "b": "0", "deadline": "realtime", "cpu-used": "8"})
        opts.update(options or {})
        s.options = opts
        if gop is not None:
            s.codec_context.gop_size = gop
        if sar is not None:
            s.codec_context.sample_aspect_ratio = Fraction(sar)
        if rotation:
            s.set_display_rotation(rotation)
        tb = Fraction(1, 1000) if times is not None else 1 / rate
        s.codec_context.time_base = tb
        a_stream = None
        if audio:
            a_stream = c.add_stream("aac", rate=16000)
        for i, arr in enumerate(_chain(first, seq)):
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
            f.pts = int(round(times[i] * 1000)) if times is not None else i
            f.time_base = tb
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
        if a_stream is not None:
            _encode_tone(c, a_stream, seconds=(num_frames or i + 1) / float(rate))
    return path


def _chain(first: np.ndarray, rest: Iterable[np.ndarray]) -> Iterable[np.ndarray]:
    yield first
    yield from rest


def _encode_tone(c, stream, seconds: float, rate: int = 16000) -> None:
    import av

    n = int(seconds * rate)
    t = np.arange(n) / rate
    samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    step = 1024
    for i in range(0, n, step):
        block = samples[i : i + step]
        if len(block) < step:
            block = np.pad(block, (0, step - len(block)))
        fr = av.AudioFrame.from_ndarray(block[None, :], format="fltp", layout="mono")
        fr.sample_rate = rate
        fr.pts = i
        for p in stream.encode(fr):
            c.mux(p)
    for p in stream.encode():
        c.mux(p)


def write_audio_only(path: str, seconds: float = 1.0) -> str:
    """An MP4/M4A with one AAC stream and no video."""
    import av

    with av.open(path, "w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000)
        _encode_tone(c, s, seconds)
    return path


def truncate_file(src: str, dst: str, fraction: float = 0.5) -> str:
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data[: int(len(data) * fraction)])
    return dst


def write_image(
    path: str,
    rgb: np.ndarray,
    *,
    fmt: str | None = None,
    mode: str | None = None,
    exif_orientation: int | None = None,
    quality: int = 95,
) -> str:
    """Save an array with Pillow. mode: convert before saving ("L", "CMYK", "RGBA", "I;16", "P").

    For "I;16" the array must be 2-D uint16. exif_orientation: value of EXIF tag 0x0112.
    """
    from PIL import Image

    if mode == "I;16":
        im = Image.fromarray(rgb.astype(np.uint16))
    elif rgb.ndim == 3 and rgb.shape[2] == 4:
        im = Image.fromarray(rgb, "RGBA")
    else:
        im = Image.fromarray(rgb)
        if mode:
            im = im.convert(mode)
    kw = {}
    fmt = fmt or ("JPEG" if path.lower().endswith((".jpg", ".jpeg")) else None)
    if fmt == "JPEG":
        kw["quality"] = quality
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kw["exif"] = exif.tobytes()
    im.save(path, format=fmt, **kw)
    return path


@dataclass
class MediaSpec:
    """One generated file and what decoding it at the default settings must give.

    error: expected reason prefix for bad files (None for good ones); frames: expected output
    frame count at `out_fps` (native capped at 30); quadrants: whether the output shows the
    red/green/blue quadrant layout upright; gray: expected grey level of a greyscale image.
    """

    name: str
    path: str
    kind: str
    error: str | None = None
    duration: float = 0.0
    out_fps: float = 0.0
    frames: int = 1
    quadrants: bool = True
    extra: dict = field(default_factory=dict)


def make_media_set(out_dir: str, *, base: int = 96) -> dict[str, MediaSpec]:
    """Write every good and bad media kind into out_dir (about 1 s clips); returns specs by name."""
    os.makedirs(out_dir, exist_ok=True)
    specs: dict[str, MediaSpec] = {}
    H, W = (base * 2) // 3 // 2 * 2, base  # landscape, even (64 x 96 by default)

    def add(spec: MediaSpec) -> None:
        specs[spec.name] = spec

    def pattern(h: int, w: int, dur: float, rot_k: int = 0):
        # rot_k: store the display pattern rotated clockwise k*90° so that the display matrix
        # (counter-clockwise k*90°) brings it back upright.
        def f(i: int, t: float) -> np.ndarray:
            return np.ascontiguousarray(np.rot90(quadrant_frame(h, w, t, dur), -rot_k))

        return f

    p = os.path.join
    d = 1.0
    write_video(p(out_dir, "h264.mp4"), pattern(H, W, d), fps=30, num_frames=30)
    add(MediaSpec("h264", p(out_dir, "h264.mp4"), "video", duration=d, out_fps=30, frames=30))
    write_video(p(out_dir, "vp9.webm"), pattern(H, W, d), fps=30, num_frames=30, codec="libvpx-vp9")
    add(MediaSpec("vp9", p(out_dir, "vp9.webm"), "video", duration=d, out_fps=30, frames=30))
    write_video(p(out_dir, "odd_97x61.mp4"), pattern(61, 97, d), fps=25, num_frames=25)
    add(MediaSpec("odd_97x61", p(out_dir, "odd_97x61.mp4"), "video", duration=d, out_fps=25, frames=25))
    # Portrait phone video: coded landscape, display matrix rotates it a quarter turn.
    write_video(p(out_dir, "portrait_rot.mp4"), pattern(W, H, d, rot_k=-1), fps=30, num_frames=30, rotation=-90)
    add(MediaSpec("portrait_rot", p(out_dir, "portrait_rot.mp4"), "video", duration=d, out_fps=30, frames=30,
                  extra={"rotation": -90, "display_hw": (W, H)}))
    write_video(p(out_dir, "rot90.mp4"), pattern(W, H, d, rot_k=1), fps=30, num_frames=30, rotation=90)
    add(MediaSpec("rot90", p(out_dir, "rot90.mp4"), "video", duration=d, out_fps=30, frames=30,
                  extra={"rotation": 90, "display_hw": (W, H)}))
    # Anamorphic: coded half as wide as displayed (SAR 2:1).
    write_video(p(out_dir, "sar2.mp4"), pattern(H, W // 2, d), fps=30, num_frames=30, sar=Fraction(2, 1))
    add(MediaSpec("sar2", p(out_dir, "sar2.mp4"), "video", duration=d, out_fps=30, frames=30,
                  extra={"sar": 2}))
    # Variable frame rate: alternating 1/60 s and 1/20 s gaps, 40 frames ≈ 1.33 s.
    gaps = [1 / 60 if i % 2 == 0 else 1 / 20 for i in range(40)]
    times = [0.0]
    for g in gaps[:-1]:
        times.append(times[-1] + g)
    vdur = times[-1] + gaps[-1]
    write_video(p(out_dir, "vfr.mp4"), pattern(H, W, vdur), fps=30, num_frames=40, times=times)
    add(MediaSpec("vfr", p(out_dir, "vfr.mp4"), "video", duration=vdur, out_fps=30, frames=round(vdur * 30),
                  extra={"times": times}))
    write_video(p(out_dir, "fps60.mp4"), pattern(H, W, d), fps=60, num_frames=60)
    add(MediaSpec("fps60", p(out_dir, "fps60.mp4"), "video", duration=d, out_fps=30, frames=30))
    write_video(p(out_dir, "long_gop.mp4"), pattern(H, W, 4.0), fps=30, num_frames=120, gop=120,
                options={"keyint_min": "120", "sc_threshold": "0"})
    add(MediaSpec("long_gop", p(out_dir, "long_gop.mp4"), "video", duration=4.0, out_fps=30, frames=120))
    write_video(p(out_dir, "with_audio.mp4"), pattern(H, W, d), fps=30, num_frames=30, audio=True)
    add(MediaSpec("with_audio", p(out_dir, "with_audio.mp4"), "video", duration=d, out_fps=30, frames=30))

    # Bad videos.
    write_audio_only(p(out_dir, "audio_only.mp4"))
    add(MediaSpec("audio_only", p(out_dir, "audio_only.mp4"), "video", error="no video stream"))
    open(p(out_dir, "zero.mp4"), "wb").close()
    add(MediaSpec("zero", p(out_dir, "zero.mp4"), "video", error="zero bytes"))
    truncate_file(p(out_dir, "h264.mp4"), p(out_dir, "truncated.mp4"), 0.5)
    add(MediaSpec("truncated_mp4", p(out_dir, "truncated.mp4"), "video", error="truncated"))
    write_video(p(out_dir, "vp9_long.webm"), pattern(H, W, 3.0), fps=30, num_frames=90, codec="libvpx-vp9")
    truncate_file(p(out_dir, "vp9_long.webm"), p(out_dir, "truncated.webm"), 0.4)
    os.remove(p(out_dir, "vp9_long.webm"))
    add(MediaSpec("truncated_webm", p(out_dir, "truncated.webm"), "video", error="truncated"))
    with open(p(out_dir, "not_a_video.mp4"), "wb") as f:
        f.write(b"this is a text file, not a video\n" * 20)
    add(MediaSpec("not_a_video", p(out_dir, "not_a_video.mp4"), "video", error="decoder error"))

    # Images (display pattern is the quadrant frame at t=0).
    img = quadrant_frame(H, W)
    write_image(p(out_dir, "plain.jpg"), img)
    add(MediaSpec("jpeg", p(out_dir, "plain.jpg"), "image"))
    # EXIF 6: "rotate 90° clockwise to display": store the pattern turned counter-clockwise.
    write_image(p(out_dir, "exif6.jpg"), np.ascontiguousarray(np.rot90(img, 1)), exif_orientation=6)
    add(MediaSpec("jpeg_exif6", p(out_dir, "exif6.jpg"), "image"))
    rgba = np.concatenate([img, np.full((H, W, 1), 255, np.uint8)], axis=2)
    rgba[H // 2 :, W // 2 :, 3] = 0  # transparent BR quadrant → background
    write_image(p(out_dir, "rgba.png"), rgba)
    add(MediaSpec("rgba_png", p(out_dir, "rgba.png"), "image", extra={"br": (255, 255, 255)}))
    grey = np.full((H, W), 90, np.uint8)
    write_image(p(out_dir, "grey.png"), grey)
    add(MediaSpec("grey_png", p(out_dir, "grey.png"), "image", quadrants=False, extra={"gray": 90}))
    write_image(p(out_dir, "cmyk.jpg"), img, mode="CMYK")
    add(MediaSpec("cmyk_jpeg", p(out_dir, "cmyk.jpg"), "image"))
    write_image(p(out_dir, "grey16.png"), np.full((H, W), 40000, np.uint16), mode="I;16")
    add(MediaSpec("png16", p(out_dir, "grey16.png"), "image", quadrants=False, extra={"gray": 40000 >> 8}))
    write_image(p(out_dir, "palette.png"), img, mode="P")
    add(MediaSpec("palette_png", p(out_dir, "palette.png"), "image"))
    truncate_file(p(out_dir, "plain.jpg"), p(out_dir, "corrupt.jpg"), 0.5)
    add(MediaSpec("corrupt_jpeg", p(out_dir, "corrupt.jpg"), "image", error="truncated"))
    open(p(out_dir, "zero.jpg"), "wb").close()
    add(MediaSpec("zero_jpeg", p(out_dir, "zero.jpg"), "image", error="zero bytes"))
    with open(p(out_dir, "not_an_image.png"), "wb") as f:
        f.write(b"\x00garbage" * 50)
    add(MediaSpec("not_an_image", p(out_dir, "not_an_image.png"), "image", error="decoder error"))
    return specs


def item_for(spec: MediaSpec, dataset: str = "media") -> dict:
    """A work item for one generated file (for tests and the benchmark)."""
    from pipeline.sources.items import make_item

    return make_item(uri=spec.path, dataset=dataset, split="train", label=spec.name,
                     video_id=spec.name, kind=spec.kind)
