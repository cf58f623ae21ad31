"""Ego4D short-term object-interaction anticipation (STA): the forecasting annotations, the
baseline's object detections and the frames before an annotated frame, read as they ship.

Layout (Ego4D v2, `ego4d --datasets annotations clips sta_models --benchmarks FHO`):
    ANNOTATIONS/fho_sta_train.json, fho_sta_val.json
        {"noun_categories": [{"id", "name"}], "verb_categories": [{"id", "name"}],
         "info": {"video_metadata": {video_uid: {"fps", "frame_width", "frame_height"}}},   (optional)
         "annotations": [{"uid", "video_uid", "frame", "clip_uid", "clip_frame",
                          "objects": [{"box": [x1, y1, x2, y2] (pixels), "noun_category_id",
                                       "verb_category_id", "time_to_contact" (seconds)}]}]}
    VIDEOS/<clip_uid>.mp4                 (the v2/clips folder; VIDEOS may also be its parent v2/)
    DETECTIONS (sta_models/object_detections.json)
        {annotation uid: [{"box": [x1, y1, x2, y2], "score", "noun_category_id"}]}

`clip_frame` is the annotated frame's index in the clip (30 fps clips); the model sees the clip's
frames up to and including it, never after it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "StaObject", "StaAnnotation", "StaSplit", "Detection",
    "load_sta_split", "load_detections", "clip_path", "read_frames_before", "SPLIT_FILES",
]

SPLIT_FILES = {"train": "fho_sta_train.json", "val": "fho_sta_val.json"}


@dataclass
class StaObject:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the original frame
    noun: int
    verb: int
    ttc: float  # seconds until contact


@dataclass
class StaAnnotation:
    uid: str
    video_uid: str
    clip_uid: str
    clip_frame: int
    objects: list[StaObject] = field(default_factory=list)


@dataclass
class StaSplit:
    annotations: list[StaAnnotation]
    nouns: dict[int, str]
    verbs: dict[int, str]


@dataclass
class Detection:
    box: tuple[float, float, float, float]
    score: float
    noun: int


def _need(d: dict, key: str, where: str):
    if not isinstance(d, dict) or key not in d:
        raise ValueError(f"{where}: field {key!r} is missing")
    return d[key]


def _box(v, where: str) -> tuple[float, float, float, float]:
    if not isinstance(v, list | tuple) or len(v) != 4:
        raise ValueError(f"{where}: 'box' must be [x1, y1, x2, y2], got {v!r}")
    x1, y1, x2, y2 = (float(x) for x in v)
    if x2 < x1 or y2 < y1:
        raise ValueError(f"{where}: 'box' {list(v)} has x2 < x1 or y2 < y1; boxes are [x1, y1, x2, y2] in pixels")
    return x1, y1, x2, y2


def _taxonomy(doc: dict, key: str, path: str) -> dict[int, str]:
    cats = _need(doc, key, path)
    if not isinstance(cats, list) or not cats:
        raise ValueError(f"{path}: {key!r} must be a non-empty list of {{'id', 'name'}}")
    return {int(_need(c, "id", f"{path}: {key}[{i}]")): str(_need(c, "name", f"{path}: {key}[{i}]"))
            for i, c in enumerate(cats)}


def load_sta_split(annotations_dir: str, split: str) -> StaSplit:
    """Read `fho_sta_<split>.json` from ``annotations_dir``; every field is checked, errors name it."""
    if split not in SPLIT_FILES:
        raise ValueError(f"split={split!r}: STA annotations exist for {sorted(SPLIT_FILES)}")
    path = os.path.join(annotations_dir, SPLIT_FILES[split])
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found; --annotations must be the folder holding {SPLIT_FILES[split]} "
                         "(Ego4D v2/annotations)")
    with open(path) as f:
        doc = json.load(f)
    nouns, verbs = _taxonomy(doc, "noun_categories", path), _taxonomy(doc, "verb_categories", path)
    rows = _need(doc, "annotations", path)
    out = []
    for i, a in enumerate(rows):
        where = f"{path}: annotations[{i}]"
        objs = []
        for j, o in enumerate(_need(a, "objects", where)):
            w = f"{where}.objects[{j}]"
            noun, verb = int(_need(o, "noun_category_id", w)), int(_need(o, "verb_category_id", w))
            if noun not in nouns:
                raise ValueError(f"{w}: noun_category_id {noun} is not in noun_categories")
            if verb not in verbs:
                raise ValueError(f"{w}: verb_category_id {verb} is not in verb_categories")
            ttc = float(_need(o, "time_to_contact", w))
            if not np.isfinite(ttc) or ttc < 0:
                raise ValueError(f"{w}: time_to_contact must be a finite number of seconds >= 0, got {ttc}")
            objs.append(StaObject(_box(_need(o, "box", w), w), noun, verb, ttc))
        frame = int(_need(a, "clip_frame", where))
        if frame < 0:
            raise ValueError(f"{where}: clip_frame {frame} is negative")
        out.append(StaAnnotation(str(_need(a, "uid", where)), str(a.get("video_uid", "")),
                                 str(_need(a, "clip_uid", where)), frame, objs))
    if not out:
        raise ValueError(f"{path}: 'annotations' is empty")
    return StaSplit(out, nouns, verbs)


def load_detections(path: str, uids: list[str] | None = None) -> dict[str, list[Detection]]:
    """The baseline's object detections: {annotation uid: [Detection]}; every uid asked for must be there."""
    if not os.path.isfile(path):
        raise ValueError(f"--detections {path} not found; it is Ego4D's sta_models/object_detections.json "
                         "(or a file of that layout from another detector)")
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected an object {{annotation uid: [detections]}}")
    out: dict[str, list[Detection]] = {}
    for uid, dets in doc.items():
        rows = []
        for j, d in enumerate(dets):
            w = f"{path}: {uid}[{j}]"
            rows.append(Detection(_box(_need(d, "box", w), w), float(_need(d, "score", w)),
                                  int(_need(d, "noun_category_id", w))))
        out[str(uid)] = rows
    missing = [u for u in (uids or []) if u not in out]
    if missing:
        raise ValueError(f"{path}: no detections for {len(missing)} annotation uid(s), e.g. {missing[:3]}; "
                         "the file must cover every annotation of the splits evaluated")
    return out


def clip_path(videos_dir: str, clip_uid: str) -> str:
    """VIDEOS/<clip_uid>.mp4, or VIDEOS/clips/<clip_uid>.mp4 when VIDEOS is the v2/ folder."""
    for p in (os.path.join(videos_dir, f"{clip_uid}.mp4"), os.path.join(videos_dir, "clips", f"{clip_uid}.mp4")):
        if os.path.isfile(p):
            return p
    raise ValueError(f"clip {clip_uid}: {videos_dir}/{clip_uid}.mp4 not found; --videos must be Ego4D's v2/clips folder")


def read_frames_before(path: str, frame: int, n: int, stride: int) -> np.ndarray:
    """Frames frame - stride*(n-1), ..., frame of a video as (n, H, W, 3) uint8 RGB.

    Indices before the first frame repeat frame 0 (as the official loader clamps them). Frame
    indices come from timestamps (pts × time_base × fps) after a seek, so long clips are not
    decoded from their start.
    """
    import av

    want = [max(0, frame - stride * k) for k in range(n - 1, -1, -1)]
    got: dict[int, np.ndarray] = {}
    with av.open(path) as c:
        s = c.streams.video[0]
        fps = float(s.average_rate or s.guessed_rate or 30)
        tb = float(s.time_base)
        t0 = (s.start_time or 0) * tb
        first = min(want)
        if first > 0:
            c.seek(int((first / fps + t0 - 1.0) / tb) if first / fps > 1.0 else 0, stream=s, backward=True)
        last = None
        for fr in c.decode(s):
            idx = round(((fr.pts or 0) * tb - t0) * fps)
            if idx in want:
                got[idx] = fr.to_ndarray(format="rgb24")
            last = idx
            if idx >= frame:
                break
    if frame not in got:
        raise ValueError(f"{path}: frame {frame} is past the end of the video (last frame {last})")
    # A frame missing from the decode (a variable-rate clip) takes the nearest earlier decoded one.
    keys = sorted(got)
    return np.stack([got[max([k for k in keys if k <= i] or [keys[0]])] for i in want])
