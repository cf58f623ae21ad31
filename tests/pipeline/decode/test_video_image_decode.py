"""Decoding every generated media kind: frame counts, orientation, size, colour, timing, errors."""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import pytest

from pipeline.decode import DecodeConfig, DecodeWorker, decode_item, decode_items
from pipeline.decode.video import square_crop
from pipeline.media import QUADRANT_COLORS, item_for, make_media_set, timecode_level
from pipeline.sources import segment_video
from pipeline.sources.items import make_item

R = 32
CFG = DecodeConfig(resolution=R)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return make_media_set(str(tmp_path_factory.mktemp("media")))


def frames_of(recs: list[dict]) -> np.ndarray:
    assert all(r["type"] == "chunk" for r in recs), recs
    return np.concatenate([r["frames"] for r in recs])  # (T, R, R, 3)


def quadrant(frames: np.ndarray, where: str) -> np.ndarray:
    """Mean colour of the inner part of one quadrant over all frames, (T, 3)."""
    q = R // 2
    ys = slice(2, q - 2) if where[0] == "t" else slice(q + 2, R - 2)
    xs = slice(2, q - 2) if where[1] == "l" else slice(q + 2, R - 2)
    return frames[:, ys, xs].reshape(len(frames), -1, 3).mean(axis=1)


GOOD = ["h264", "vp9", "odd_97x61", "portrait_rot", "rot90", "sar2", "vfr", "fps60", "long_gop", "with_audio",
        "jpeg", "jpeg_exif6", "rgba_png", "cmyk_jpeg", "palette_png"]


@pytest.mark.parametrize("name", GOOD)
def test_good_media_decode_upright_with_expected_frames(media, name):
    spec = media[name]
    recs = decode_item(item_for(spec), CFG)
    frames = frames_of(recs)
    assert frames.dtype == np.uint8 and frames.shape[1:] == (R, R, 3)
    assert abs(len(frames) - spec.duration * spec.out_fps) <= 1 + 1e-6 if spec.kind == "video" else len(frames) == 1
    assert recs[0]["fps"] == pytest.approx(spec.out_fps)
    # The red / green / blue quadrants come out where the viewer sees them (rotation, SAR, EXIF).
    for where in ("tl", "tr", "bl"):
        err = np.abs(quadrant(frames, where) - np.array(QUADRANT_COLORS[where])).max()
        assert err <= 12, (name, where, err)
    if "br" in spec.extra:
        assert np.abs(quadrant(frames, "br") - np.array(spec.extra["br"])).max() <= 2


@pytest.mark.parametrize("name", ["grey_png", "png16"])
def test_grey_and_16_bit_images(media, name):
    frames = frames_of(decode_item(item_for(media[name]), CFG))
    assert np.abs(frames.astype(int) - media[name].extra["gray"]).max() <= 1


def test_rotation_metadata_is_what_makes_portrait_upright(media):
    """Without applying the display matrix the quadrants would be turned: the test media really needs it."""
    import av

    with av.open(media["portrait_rot"].path) as c:
        f = next(c.decode(video=0))
        assert f.rotation in (-90, 270) and (f.width, f.height) == (96, 64)  # coded landscape, shown portrait
        raw = f.to_ndarray(format="rgb24")
    assert np.abs(raw[5, 5].astype(int) - QUADRANT_COLORS["tl"]).max() > 60


def test_square_crop_is_the_display_centre_square_in_coded_pixels():
    # display 96×64 (sar 2): the square is 64 display pixels = 32 coded pixels wide, 64 tall
    assert square_crop(48, 64, Fraction(2)) == (32, 64, 8, 0)
    assert square_crop(1920, 1080, None) == (1080, 1080, 420, 0)
    assert square_crop(1080, 1920, None) == (1080, 1080, 0, 420)  # coded portrait
    assert square_crop(97, 61, None) == (61, 61, 18, 0)
    # anamorphic 720×576 at sar 16:11 (display ≈ 1047×576): 576 display = 396 coded pixels wide
    assert square_crop(720, 576, Fraction(16, 11)) == (396, 576, 162, 0)


def test_vfr_resampled_by_presentation_time(media):
    spec = media["vfr"]
    frames = frames_of(decode_item(item_for(spec), CFG))
    times = [round(t * 1000) / 1000 for t in spec.extra["times"]]  # as stored: millisecond pts
    got = quadrant(frames, "br")[:, 0]
    # Output frame k shows the source frame on screen at k/30: the last one with pts <= k/30.
    want = [timecode_level(max(t for t in times if t <= k / 30 + 1e-9), spec.duration) for k in range(len(frames))]
    assert np.abs(got - np.array(want)).max() <= 4
    # A naive "every decoded frame" read would give 40 frames with the source's uneven spacing.
    assert len(frames) in (39, 40)


def test_60fps_halves_and_fps_override(media):
    spec = media["fps60"]
    frames = frames_of(decode_item(item_for(spec), CFG))
    want = [timecode_level(2 * k / 60, 1.0) for k in range(30)]
    assert np.abs(quadrant(frames, "br")[:, 0] - want).max() <= 4
    ten = frames_of(decode_item(item_for(media["h264"]), DecodeConfig(resolution=R, fps=10)))
    assert len(ten) == 10
    assert np.abs(quadrant(ten, "br")[:, 0] - [timecode_level(k / 10, 1.0) for k in range(10)]).max() <= 4


def test_seek_into_long_gop_and_cut(media):
    item = dict(item_for(media["long_gop"]), t_start=2.5, t_end=3.5)
    recs = decode_item(item, CFG)
    frames = frames_of(recs)
    assert len(frames) == 30 and recs[0]["t_start"] == pytest.approx(2.5)
    want = [timecode_level(2.5 + k / 30, 4.0) for k in range(30)]
    assert np.abs(quadrant(frames, "br")[:, 0] - want).max() <= 4


def test_chunks_are_bounded_and_numbered(media):
    cfg = DecodeConfig(resolution=R, chunk_frames=16)
    recs = decode_item(item_for(media["h264"]), cfg)
    assert [(r["chunk"], r["num_frames"], r["key"]) for r in recs] == [
        (0, 16, "media/h264/00000"), (1, 14, "media/h264/00001")]
    assert [r["t_start"] for r in recs] == pytest.approx([0.0, 16 / 30])
    assert {r["video_id"] for r in recs} == {"h264"} and recs[0]["label"] == "h264"


def test_segmented_items_give_consecutive_chunks_and_every_frame_once(media):
    cfg = DecodeConfig(resolution=R, chunk_frames=16)  # chunk window 16/30 s
    whole = frames_of(decode_item(item_for(media["long_gop"]), cfg))
    segs = segment_video(item_for(media["long_gop"]), 4.0, max_item_seconds=1.1, chunk_seconds=cfg.chunk_seconds)
    assert len(segs) == 4
    recs = [r for s in segs for r in decode_item(s, cfg)]
    assert [r["chunk"] for r in recs] == list(range(8))
    assert len({r["key"] for r in recs}) == 8
    joined = frames_of(recs)
    assert len(joined) == len(whole) == 120
    assert np.abs(joined.astype(int) - whole.astype(int)).max() <= 2


BAD = {"audio_only": "no video stream", "zero": "zero bytes", "truncated_mp4": "truncated",
       "truncated_webm": "truncated", "not_a_video": "decoder error: ", "corrupt_jpeg": "truncated",
       "zero_jpeg": "zero bytes", "not_an_image": "decoder error: "}


def test_bad_files_give_error_records_while_good_ones_decode_in_one_batch(media):
    names = sorted(media)
    items = [item_for(media[n]) for n in names]
    recs = list(decode_items(items, CFG))  # one worker subprocess
    errors = {r["key"].split("/")[1]: r for r in recs if r["type"] == "error"}
    assert set(errors) == set(BAD)
    for name, prefix in BAD.items():
        assert errors[name]["reason"].startswith(prefix), errors[name]
        assert errors[name]["uri"] == media[name].path
    decoded = {r["video_id"] for r in recs if r["type"] == "chunk"}
    assert decoded == set(names) - set(BAD)


def test_decompression_bomb_guard(media):
    (rec,) = decode_item(item_for(media["jpeg"]), DecodeConfig(resolution=R, max_image_pixels=1000))
    assert rec["type"] == "error" and rec["reason"].startswith("decompression bomb: 96x64")


def test_hanging_input_is_stopped_by_the_time_limit(media, tmp_path):
    fifo = str(tmp_path / "never_written.mp4")
    os.mkfifo(fifo)  # opening it blocks inside FFmpeg forever: a real hang in native code
    hang = make_item(uri=fifo, dataset="media", split="train", label=None, video_id="hang", kind="video")
    with DecodeWorker(DecodeConfig(resolution=R, timeout_s=2)) as w:
        (rec,) = w.decode(hang)
        assert rec["type"] == "error" and rec["reason"] == "timeout: no result within 2 s"
        after = w.decode(item_for(media["h264"]))  # a fresh worker takes the next input
        assert len(frames_of(after)) == 30 and w.restarts == 1


def test_crashing_decoder_costs_one_input(media, monkeypatch):
    monkeypatch.setenv("TOTO_DECODE_FAULT", "crash:vp9.webm")
    items = [item_for(media[n]) for n in ("h264", "vp9", "jpeg")]
    recs = list(decode_items(items, CFG))
    assert [r["type"] for r in recs] == ["chunk", "error", "chunk"]
    assert recs[1]["reason"] == "decoder crashed: worker process died with signal 6 (SIGABRT)"


def test_missing_file_after_listing(tmp_path):
    item = make_item(uri=str(tmp_path / "gone.mp4"), dataset="d", split="train", label=None, video_id="g", kind="video")
    (rec,) = decode_item(item, CFG)
    assert rec["reason"].startswith("missing file: ")


@pytest.mark.parametrize(
    "kw, field",
    [({"resolution": 4}, "resolution"), ({"fps": 60}, "fps"), ({"interpolation": "NICE"}, "interpolation"),
     ({"chunk_frames": 0}, "chunk_frames"), ({"timeout_s": 0}, "timeout_s"), ({"background": (0, 0)}, "background")],
)
def test_config_validation_names_field(kw, field):
    with pytest.raises(ValueError, match=rf"DecodeConfig\.{field}="):
        DecodeConfig(**kw)
    assert DecodeConfig().chunk_seconds == pytest.approx(64 / 30)


def test_segments_of_a_25fps_video_continue_one_frame_grid(tmp_path):
    """Native 25 fps with 30 fps chunk windows: 13.3 frames per window, so segment boundaries
    fall between frames; segments must still give exactly the frames of the whole video."""
    from pipeline.media import quadrant_frame, write_video

    path = write_video(str(tmp_path / "v25.mp4"), lambda i, t: quadrant_frame(48, 64, t, 4.0), fps=25, num_frames=100)
    cfg = DecodeConfig(resolution=R, chunk_frames=16)  # window 16/30 s
    item = make_item(uri=path, dataset="d", split="train", label=None, video_id="v25", kind="video")
    whole = decode_item(item, cfg)
    segs = segment_video(item, 4.0, max_item_seconds=1.1, chunk_seconds=cfg.chunk_seconds)
    assert [s["chunk"] for s in segs] == [0, 2, 4, 6]
    parts = [r for s in segs for r in decode_item(s, cfg)]
    assert [(r["key"], r["num_frames"], r["t_start"]) for r in parts] == [
        (r["key"], r["num_frames"], r["t_start"]) for r in whole]
    assert sum(r["num_frames"] for r in parts) == 100
    assert [r["chunk"] for r in parts] == list(range(len(parts)))
    np.testing.assert_array_equal(frames_of(parts), frames_of(whole))


def test_each_frame_is_converted_once_right_after_its_decode_and_only_when_shown(media, monkeypatch):
    """A frame is converted as soon as it is decoded (its pixels still in cache) when its duration
    covers a grid time, never twice, and frames that fps resampling drops are not converted."""
    from pipeline.decode import video

    events: list[tuple[str, int]] = []
    real_call, real_open = video._Converter.__call__, video._decode_open

    def converting(self, frame):
        events.append(("convert", frame.pts))
        return real_call(self, frame)

    class Spy:  # the container, recording each decoded frame
        def __init__(self, c):
            self._c = c

        def __getattr__(self, name):
            return getattr(self._c, name)

        def decode(self, *a, **kw):
            for f in self._c.decode(*a, **kw):
                events.append(("decoded", f.pts))
                yield f

    monkeypatch.setattr(video._Converter, "__call__", converting)
    monkeypatch.setattr(video, "_decode_open", lambda c, item, cfg: real_open(Spy(c), item, cfg))
    for spec, cfg, shown in [(media["fps60"], CFG, 30), (media["h264"], DecodeConfig(resolution=R, fps=10), 10),
                             (media["h264"], CFG, 30)]:
        events.clear()
        frames = frames_of(list(video.decode_video(item_for(spec), cfg)))
        converted = [p for kind, p in events if kind == "convert"]
        assert len(frames) == shown and len(converted) == len(set(converted)) == shown, (spec.name, len(converted))
        for i, (kind, p) in enumerate(events):
            if kind == "convert":
                assert events[i - 1] == ("decoded", p), (spec.name, events[i - 2 : i + 1])


def test_the_converters_speed_choices_keep_the_pixels(media):
    """The converter asks swscale for BGR with sws_dither=ed because both are faster (BENCHMARKS.md).
    The dither option must change no pixel of 8-bit output, the swap must give exactly the BGR
    pixels in RGB order, and those stay within a level or two of swscale's own RGB output (the two
    writers round separately)."""
    import av

    from pipeline.decode.video import _Converter

    with av.open(media["h264"].path) as c:
        frames = [f for _, f in zip(range(6), c.decode(video=0), strict=False)]
    cw, ch, x, y = square_crop(frames[0].width, frames[0].height, None)

    def graph(scale: str, fmt: str):
        g = av.filter.Graph()
        f0 = frames[0]
        chain = [g.add_buffer(width=f0.width, height=f0.height, format=f0.format.name, time_base=Fraction(1, 1000)),
                 g.add("crop", f"{cw}:{ch}:{x}:{y}:exact=1"), g.add("scale", scale), g.add("format", fmt),
                 g.add("buffersink")]
        for a, b in zip(chain[:-1], chain[1:], strict=True):
            a.link_to(b)
        g.configure()
        return g

    def out(g, frame):
        g.push(frame)
        return g.pull().to_ndarray().astype(int)

    plain, ed = graph(f"{R}:{R}:flags=area", "bgr24"), graph(f"{R}:{R}:flags=area:sws_dither=ed", "bgr24")
    rgb = graph(f"{R}:{R}:flags=area", "rgb24")
    conv = _Converter(DecodeConfig(resolution=R, interpolation="AREA"), None)
    for f in frames:
        bgr = out(ed, f)
        assert np.array_equal(bgr, out(plain, f))
        got = conv(f).astype(int)
        assert np.array_equal(got, bgr[..., ::-1])
        diff = np.abs(got - out(rgb, f))
        assert diff.mean() < 2.5 and diff.max() <= 8, (diff.mean(), diff.max())
