"""The media generator writes real files with the properties its names promise."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from pipeline.media import make_media_set, quadrant_frame, timecode_level


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return make_media_set(str(tmp_path_factory.mktemp("gen")))


def probe(path: str) -> dict:
    with av.open(path) as c:
        v = c.streams.video[0]
        frames = list(c.decode(v))
        return {
            "codec": v.codec_context.name,
            "size": (v.codec_context.width, v.codec_context.height),
            "sar": v.sample_aspect_ratio,
            "rotation": frames[0].rotation,
            "n": len(frames),
            "pts_s": [float(f.pts * v.time_base) for f in frames],
            "keyframes": sum(f.key_frame for f in frames),
            "audio": len(c.streams.audio),
        }


def test_video_kinds(media):
    assert probe(media["h264"].path)["codec"] == "h264"
    assert probe(media["vp9"].path)["codec"] == "vp9"
    assert probe(media["odd_97x61"].path)["size"] == (97, 61)
    p = probe(media["portrait_rot"].path)
    assert p["rotation"] == -90 and p["size"] == (96, 64)
    assert probe(media["rot90"].path)["rotation"] == 90
    assert probe(media["sar2"].path)["sar"] == Fraction(2, 1)
    assert probe(media["fps60"].path)["n"] == 60
    lg = probe(media["long_gop"].path)
    assert lg["n"] == 120 and lg["keyframes"] == 1
    assert probe(media["with_audio"].path)["audio"] == 1


def test_vfr_has_uneven_gaps(media):
    gaps = np.diff(probe(media["vfr"].path)["pts_s"])
    assert gaps.min() == pytest.approx(1 / 60, abs=2e-3) and gaps.max() == pytest.approx(1 / 20, abs=2e-3)


def test_bad_files_are_bad_in_the_promised_way(media):
    with av.open(media["audio_only"].path) as c:
        assert len(c.streams.video) == 0 and len(c.streams.audio) == 1
    assert open(media["zero"].path, "rb").read() == b""
    with pytest.raises(av.error.InvalidDataError):
        av.open(media["truncated_mp4"].path)
    with pytest.raises(OSError, match="(?i)truncated"):
        Image.open(media["corrupt_jpeg"].path).load()


def test_images(media):
    assert Image.open(media["jpeg_exif6"].path).getexif()[0x0112] == 6
    assert Image.open(media["rgba_png"].path).mode == "RGBA"
    assert Image.open(media["grey_png"].path).mode == "L"
    assert Image.open(media["cmyk_jpeg"].path).mode == "CMYK"
    assert Image.open(media["png16"].path).mode in ("I;16", "I")
    assert Image.open(media["palette_png"].path).mode == "P"


def test_quadrant_pattern_and_timecode():
    a = quadrant_frame(4, 6, t=0.5, duration=1.0)
    assert a.shape == (4, 6, 3) and tuple(a[0, 0]) == (230, 30, 30) and tuple(a[3, 5]) == (130, 130, 130)
    assert timecode_level(0, 2) == 30 and timecode_level(2, 2) == 230 and timecode_level(5, 2) == 230
