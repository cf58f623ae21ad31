"""Image decoding with Pillow: EXIF orientation, any mode to RGB, a decompression-bomb guard, and
the same short-side resize + centre crop as videos (one antialiased resize of the crop box)."""

from __future__ import annotations

import math
import struct
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline.decode.config import DecodeConfig, DecodeError
from pipeline.decode.media_io import open_source


def to_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode → 8-bit RGB.

    16-bit and 32-bit integer greyscale keep their top 8 bits (Pillow's own convert would clip
    everything above 255 to white); float images are read as 0..255; transparent pixels are
    composited over `background`; CMYK, YCbCr, palette, 1-bit and L go through Pillow's convert.
    """
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im, dtype=np.int64)  # (H, W)
        if mode == "I" and a.size and a.max() <= 255:
            g = a.astype(np.uint8)
        else:
            g = (np.clip(a, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(np.repeat(g[:, :, None], 3, axis=2), "RGB")
    if mode == "F":
        a = np.clip(np.asarray(im, dtype=np.float32), 0, 255).round().astype(np.uint8)
        return Image.fromarray(np.repeat(a[:, :, None], 3, axis=2), "RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if mode != "RGB":
        return im.convert("RGB")
    return im


def resize_crop(im: Image.Image, resolution: int) -> np.ndarray:
    """Short side → resolution, centre crop, as one antialiased resize of the centred square box."""
    w, h = im.size
    m = min(w, h)
    box = ((w - m) / 2, (h - m) / 2, (w + m) / 2, (h + m) / 2)
    out = im.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    return np.asarray(out, dtype=np.uint8)  # (R, R, 3)


def load_image(src, cfg: DecodeConfig) -> np.ndarray:
    """Open, guard, orient, convert and resize one image → uint8 (R, R, 3)."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    # Our guard below uses cfg.max_image_pixels; lift Pillow's own (a process-wide setting,
    # restored afterwards) so the two do not disagree.
    saved_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(src)
            w, h = im.size
            if w * h > cfg.max_image_pixels:
                raise DecodeError(
                    f"decompression bomb: {w}x{h} = {w * h} pixels exceeds max_image_pixels={cfg.max_image_pixels}"
                )
            if w < 1 or h < 1:
                raise DecodeError(f"decoder error: image has size {w}x{h}")
            if im.format == "JPEG":
                # Let libjpeg decode at a reduced DCT scale when the image is much larger than
                # needed; the result stays >= the size the final resize needs on both sides.
                s = cfg.resolution / min(w, h)
                im.draft("RGB", (math.ceil(w * s), math.ceil(h * s)))
            im.load()
            im = ImageOps.exif_transpose(im)
            rgb = to_rgb(im, cfg.background)
            return resize_crop(rgb, cfg.resolution)
    except DecodeError:
        raise
    except UnidentifiedImageError as e:
        raise DecodeError(f"decoder error: not an image ({e})") from None
    except OSError as e:
        msg = str(e)
        if "truncated" in msg.lower():
            raise DecodeError(f"truncated: {msg}") from None
        raise DecodeError(f"decoder error: {msg}") from None
    except (SyntaxError, ValueError, struct.error) as e:
        raise DecodeError(f"decoder error: {type(e).__name__}: {e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved_limit


def decode_image(item: dict, cfg: DecodeConfig, storage_options: dict | None = None) -> Iterator[dict]:
    """Yield the one chunk record (1 frame, fps 0.0) of an image work item."""
    src, closer = open_source(item, storage_options)
    try:
        frame = load_image(src, cfg)
    finally:
        if closer is not None:
            closer.close()
    chunk = int(item.get("chunk") or 0)
    yield {
        "type": "chunk",
        "key": f"{item['dataset']}/{item['video_id']}/{chunk:05d}",
        "uri": item["uri"],
        "dataset": item["dataset"],
        "split": item["split"],
        "video_id": item["video_id"],
        "label": item.get("label"),
        "chunk": chunk,
        "t_start": 0.0,
        "fps": 0.0,
        "num_frames": 1,
        "frames": frame[None],  # (1, R, R, 3)
    }
