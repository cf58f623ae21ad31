"""Decode settings, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# swscale interpolations we allow for the video resize (PyAV's Interpolation names). AREA is the
# default, chosen by bench/decode.py: it averages every source pixel under an output pixel, so the
# large 480p/1080p → 128 px reductions do not alias (≈36 dB PSNR against a Lanczos reference vs
# ≈22 dB for FAST_BILINEAR), and it costs less than BILINEAR's tent filter, whose support grows
# with the reduction factor. See BENCHMARKS.md.
INTERPOLATIONS = ("FAST_BILINEAR", "BILINEAR", "BICUBIC", "AREA", "POINT", "GAUSS", "LANCZOS")

# Pillow's own default bomb limit (Image.MAX_IMAGE_PIXELS), ~89.5 megapixels.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


class DecodeError(Exception):
    """A per-input failure with a readable reason; becomes an error record, never stops a job."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DecodeConfig:
    """How inputs become frames.

    resolution:   output side in px: short-side resize then centre crop to resolution × resolution.
    fps:          output frame rate for videos; None = the video's native rate capped at max_fps.
    max_fps:      cap on the output rate; chunks cover `chunk_frames / max_fps` seconds each.
    chunk_frames: most frames in one output chunk (one token row).
    interpolation: swscale filter for videos (one of INTERPOLATIONS).
    threads:      decoder threads per video (0 = FFmpeg chooses from the cores).
    timeout_s:    wall-clock limit for one input (one work item) in the worker subprocess.
    max_image_pixels: decompression-bomb guard: images with more pixels are refused.
    background:   RGB used under transparent image pixels.
    start_method: multiprocessing start method of the worker ("spawn" is safe inside Ray/threads).
    """

    resolution: int = 128
    fps: float | None = None
    max_fps: float = 30.0
    chunk_frames: int = 64
    interpolation: str = "AREA"
    threads: int = 0
    timeout_s: float = 300.0
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    background: tuple[int, int, int] = (255, 255, 255)
    start_method: str = "spawn"

    def __post_init__(self) -> None:
        def bad(field: str, value: object, fix: str) -> None:
            raise ValueError(f"DecodeConfig.{field}={value!r} is invalid: {fix}")

        if not isinstance(self.resolution, int) or not 8 <= self.resolution <= 4096:
            bad("resolution", self.resolution, "use an int in [8, 4096], e.g. 128")
        if self.max_fps is None or not 0 < float(self.max_fps) <= 240:
            bad("max_fps", self.max_fps, "use a rate in (0, 240], e.g. 30")
        if self.fps is not None and not 0 < float(self.fps) <= float(self.max_fps):
            bad("fps", self.fps, f"use None (native) or a rate in (0, max_fps={self.max_fps}]; raise max_fps for higher rates")
        if not isinstance(self.chunk_frames, int) or self.chunk_frames < 1:
            bad("chunk_frames", self.chunk_frames, "use an int >= 1, e.g. 64")
        if self.interpolation not in INTERPOLATIONS:
            bad("interpolation", self.interpolation, f"choose one of {INTERPOLATIONS}")
        if not isinstance(self.threads, int) or self.threads < 0:
            bad("threads", self.threads, "use 0 (auto) or a positive int")
        if not self.timeout_s > 0:
            bad("timeout_s", self.timeout_s, "use a positive number of seconds, e.g. 300")
        if not isinstance(self.max_image_pixels, int) or self.max_image_pixels < 1:
            bad("max_image_pixels", self.max_image_pixels, "use a positive int, e.g. 89478485")
        if len(self.background) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in self.background):
            bad("background", self.background, "use an (r, g, b) tuple of ints in [0, 255]")
        if self.start_method not in ("spawn", "forkserver", "fork"):
            bad("start_method", self.start_method, "use 'spawn' (default), 'forkserver' or 'fork'")

    @property
    def chunk_seconds(self) -> float:
        """Duration of one chunk window; pass it to the work-list builders (chunk_seconds=...)."""
        return self.chunk_frames / float(self.max_fps)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["background"] = list(self.background)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DecodeConfig:
        d = dict(d)
        if "background" in d:
            d["background"] = tuple(d["background"])
        return cls(**d)
