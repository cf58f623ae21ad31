"""Video decoding with PyAV: seek, decode, resample to the output rate by presentation time,
rotate, resize + centre crop in FFmpeg's scaler, and cut into chunks."""

from __future__ import annotations

import math
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import numpy as np

from pipeline.decode.config import DecodeConfig, DecodeError
from pipeline.decode.media_io import looks_like_container, open_source, sniff

EPS = 1e-6  # seconds; far below any frame interval


def _fraction(x: Any) -> Fraction | None:
    if x is None:
        return None
    f = Fraction(x)
    return f if f > 0 else None


def native_rate(stream: Any) -> Fraction | None:
    for r in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        f = _fraction(r)
        if f is not None and f < 1000:
            return f
    return None


def output_rate(native: Fraction | None, cfg: DecodeConfig) -> Fraction:
    cap = Fraction(cfg.max_fps).limit_denominator(1001)
    if cfg.fps is not None:
        return Fraction(cfg.fps).limit_denominator(1001)
    if native is None:
        return cap
    return min(native.limit_denominator(1001), cap)


# swscale flag names of the scale filter for PyAV's interpolation names (DecodeConfig.interpolation).
_SCALE_FLAGS = {"FAST_BILINEAR": "fast_bilinear", "BILINEAR": "bilinear", "BICUBIC": "bicubic", "AREA": "area",
                "POINT": "neighbor", "GAUSS": "gauss", "LANCZOS": "lanczos"}


def square_crop(width: int, height: int, sar: Fraction | None) -> tuple[int, int, int, int]:
    """Centre crop (w, h, x, y) in coded pixels of the largest square of the *display* frame.

    The display short side S = min(width·sar, height); the square is S/sar coded pixels wide and
    S tall. Rotation does not change it: a centred square rotates onto itself.
    """
    sar = sar or Fraction(1)
    side = min(width * sar, Fraction(height))
    cw = max(1, min(width, round(side / sar)))
    ch = max(1, min(height, round(side)))
    return cw, ch, (width - cw) // 2, (height - ch) // 2


class _Converter:
    """RGB r×r for one frame: FFmpeg crops the display's centre square (no copy: plane offsets),
    then one swscale call resizes it and converts YUV→BGR, channels are swapped into an RGB array,
    and rotation is a numpy view afterwards.

    Cropping first means the scaler only produces r×r pixels instead of the whole short-side
    resized frame (228×128 at 16:9).
    """

    def __init__(self, cfg: DecodeConfig, sar: Fraction | None) -> None:
        self.cfg = cfg
        self.sar = sar
        self.key: tuple | None = None
        self.graph: Any = None
        self.k = 0

    def _build(self, frame: Any, rot: int) -> None:
        import av

        r = self.cfg.resolution
        cw, ch, x, y = square_crop(frame.width, frame.height, self.sar)
        g = av.filter.Graph()
        src = g.add_buffer(width=frame.width, height=frame.height, format=frame.format.name,
                           time_base=Fraction(1, 1000))
        # Two measured choices (BENCHMARKS.md, decode): swscale writes packed BGR ~1.4x faster than
        # packed RGB (the channel swap below costs 15 µs at 128 px), and sws_dither=ed, which
        # changes no pixel of 8-bit output (tested), takes a path ~1.4x faster than the default.
        chain = [src, g.add("crop", f"{cw}:{ch}:{x}:{y}:exact=1"),
                 g.add("scale", f"{r}:{r}:flags={_SCALE_FLAGS[self.cfg.interpolation]}:sws_dither=ed"),
                 g.add("format", "bgr24"), g.add("buffersink")]
        for a, b in zip(chain[:-1], chain[1:], strict=True):
            a.link_to(b)
        g.configure()
        self.graph = g
        # frame.rotation is counter-clockwise degrees to apply for display; np.rot90 turns counter-clockwise.
        self.k = round(rot / 90) % 4

    def __call__(self, frame: Any) -> np.ndarray:
        rot = int(frame.rotation or 0) % 360 if self.key is None else self.key[3]
        key = (frame.width, frame.height, frame.format.name, rot)
        if key != self.key:
            self.key = key
            self._build(frame, rot)
        self.graph.push(frame)
        bgr = self.graph.pull().to_ndarray()  # (r, r, 3)
        rgb = np.empty_like(bgr)
        # Three plane copies: much faster than one copy of the reversed view bgr[..., ::-1].
        rgb[..., 0], rgb[..., 1], rgb[..., 2] = bgr[..., 2], bgr[..., 1], bgr[..., 0]
        return np.rot90(rgb, self.k) if self.k else rgb


def decode_video(item: dict, cfg: DecodeConfig, storage_options: dict | None = None) -> Iterator[dict]:
    """Yield chunk records for one video work item (see pipeline.decode for the record fields).

    Frames are taken on a uniform grid t_k = g0 + k / fps, g0 = t_start - chunk * chunk_seconds
    (the time of the video's chunk 0), for t_start <= t_k < t_end: each grid time gets the frame
    on screen at that time (the last frame whose pts <= t_k), so variable-frame-rate input comes
    out at a constant rate, 60 fps input at 30 fps drops every other frame without converting it,
    and low-rate input repeats frames. Output frame k belongs to chunk floor(k / fps /
    chunk_seconds); segments of one long video therefore continue one grid and one numbering.
    """
    import av

    src, closer = open_source(item, storage_options)
    try:
        try:
            container = av.open(src, metadata_errors="ignore")
        except av.error.FFmpegError as e:
            msg = getattr(e, "strerror", None) or str(e)
            if looks_like_container(sniff(src)):
                raise DecodeError(f"truncated: container cannot be opened ({msg})") from None
            raise DecodeError(f"decoder error: not a media file ({msg})") from None
        try:
            yield from _decode_open(container, item, cfg)
        finally:
            container.close()
    finally:
        if closer is not None:
            closer.close()


def _decode_open(container: Any, item: dict, cfg: DecodeConfig) -> Iterator[dict]:
    import av

    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        raise DecodeError("no video stream" + (f" (streams: {', '.join(kinds)})" if kinds else ""))
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = cfg.threads
    tb_q = stream.time_base or Fraction(1, 1_000_000)
    # Per-frame timing runs in float seconds (Fraction arithmetic per frame costs more than the
    # scaler at 480p); EPS makes a frame whose pts equals a grid time count as covering it.
    tb = float(tb_q)
    start_offset = float((stream.start_time or 0) * tb_q)
    native = native_rate(stream)
    fps_q = output_rate(native, cfg)
    fps = float(fps_q)
    frame_dur_default = float(1 / native) if native else 1 / fps
    # chunk of output frame k = floor(k / fps / (chunk_frames / max_fps)), in exact integers.
    max_q = Fraction(cfg.max_fps).limit_denominator(1001)
    chunk_num = max_q.numerator * fps_q.denominator
    chunk_den = fps_q.numerator * cfg.chunk_frames * max_q.denominator
    sar = _fraction(stream.sample_aspect_ratio) or _fraction(stream.codec_context.sample_aspect_ratio)
    convert = _Converter(cfg, sar)

    t0 = float(item.get("t_start") or 0.0)
    t_end = item.get("t_end")
    t_end = None if t_end is None else float(t_end)
    if stream.duration is not None:
        total = stream.duration * tb
    elif container.duration is not None:
        total = container.duration / 1_000_000 - start_offset
    else:
        total = None
    if t0 > 0:
        container.seek(int((t0 + start_offset) / tb), stream=stream, backward=True, any_frame=False)

    res = cfg.resolution
    base_chunk = int(item.get("chunk") or 0)
    # The frame grid is anchored at the time of the video's chunk 0 (g0), not at this item's
    # t_start: consecutive segments of one long video (t_start = i x a whole number of chunk
    # windows, chunk = i x chunks per segment) then continue one grid, so decoding them one by
    # one gives exactly the frames, times and chunk numbers of decoding the whole video at once.
    window = cfg.chunk_frames / float(max_q)
    g0 = t0 - base_chunk * window
    k_first = max(0, math.ceil((t0 - g0) * fps - 1e-6))
    buf = np.empty((cfg.chunk_frames, res, res, 3), np.uint8)  # (T, H, W, 3)
    n_buf = 0
    k = k_first
    cur_chunk = (k * chunk_num) // chunk_den  # absolute chunk number (== base_chunk)
    chunk_k0 = k
    prev = None  # (frame, time s)
    prev_rgb = None
    prev_rgb_of = None
    last_time = None
    last_dur = frame_dur_default
    key_prefix = f"{item['dataset']}/{item['video_id']}/"

    def record(c: int, k0: int, n: int) -> dict:
        return {
            "type": "chunk",
            "key": f"{key_prefix}{c:05d}",
            "uri": item["uri"],
            "dataset": item["dataset"],
            "split": item["split"],
            "video_id": item["video_id"],
            "label": item.get("label"),
            "chunk": c,
            "t_start": g0 + k0 / fps,
            "fps": fps,
            "num_frames": n,
            "frames": buf[:n].copy(),
        }

    def emit_until(limit: float) -> Iterator[dict]:
        """Emit `prev` for every grid time < limit (and < t_end)."""
        nonlocal k, n_buf, cur_chunk, chunk_k0, prev_rgb, prev_rgb_of
        stop = limit - EPS if t_end is None else min(limit, t_end) - EPS
        while g0 + k / fps < stop:
            c = (k * chunk_num) // chunk_den
            if c != cur_chunk:
                if n_buf:
                    yield record(cur_chunk, chunk_k0, n_buf)
                cur_chunk, chunk_k0, n_buf = c, k, 0
            if prev_rgb_of is not prev[0]:
                prev_rgb = convert(prev[0])
                prev_rgb_of = prev[0]
            buf[n_buf] = prev_rgb
            n_buf += 1
            k += 1

    try:
        for frame in container.decode(stream):
            pts = frame.pts
            if pts is not None:
                ft = pts * tb - start_offset
            else:
                ft = (last_time + last_dur) if last_time is not None else 0.0
            if last_time is not None and ft <= last_time:
                continue  # duplicate or backwards timestamp from a broken muxer: keep the first
            dur = frame.duration
            if dur:
                last_dur = dur * tb
            if prev is not None:
                yield from emit_until(ft)
            prev = (frame, ft)
            last_time = ft
            if t_end is not None and ft >= t_end:
                break
            # Convert a frame that will fill a grid slot now, while its pixels are still in cache
            # (after the next frame's decode they are not: 5-15% of the path's CPU time). Whether
            # it does is judged by its duration; emit_until converts on demand if that was wrong.
            nxt = g0 + k / fps
            if nxt < ft + last_dur - EPS and (t_end is None or nxt < t_end - EPS):
                prev_rgb, prev_rgb_of = convert(frame), frame
    except av.error.FFmpegError as e:
        msg = getattr(e, "strerror", None) or str(e)
        if k > 0 or prev is not None:
            got = last_time if last_time is not None else 0.0
            raise DecodeError(f"truncated: decoding failed at {got:.2f} s ({msg})") from None
        raise DecodeError(f"decoder error: {msg}") from None
    if prev is None:
        if t0 > 0 and total is not None and t0 >= total:
            raise DecodeError(f"decoder error: t_start {t0:.2f} s is past the end ({total:.2f} s)")
        raise DecodeError("decoder error: no frames could be decoded")
    end_of_last = prev[1] + last_dur
    yield from emit_until(end_of_last)
    if n_buf:
        yield record(cur_chunk, chunk_k0, n_buf)
    # A stream that ends well before its declared duration (or the requested t_end) was cut off.
    expected = total if t_end is None else (min(t_end, total) if total is not None else None)
    if expected is not None and expected > t0:
        tolerance = max(0.5, (expected - t0) / 10)
        if end_of_last < expected - tolerance:
            raise DecodeError(f"truncated: decoded {end_of_last:.2f} s of {expected:.2f} s")
