"""A generated Ego4D-STA-layout miniature (tests and quick runs), made with numpy and PyAV.

Each clip shows one or two coloured rectangles ("nouns": red cup, green knife, blue sponge)
drifting over a grey table. The verb of an object is fixed by its noun (cup: take, knife: cut,
sponge: wash), so it is visible in the frames; the time to contact shrinks with the box size
(closer objects are touched sooner). The detections file holds, per annotated frame, every
object's box shifted by 2 px (IoU > 0.5) with the right noun, and one low-scoring false box.

    ROOT/annotations/fho_sta_train.json, fho_sta_val.json
    ROOT/clips/<clip_uid>.mp4
    ROOT/object_detections.json
"""

from __future__ import annotations

import json
import os

import numpy as np

__all__ = ["NOUNS", "VERBS", "make_sta_miniature"]

NOUNS = {0: "cup", 1: "knife", 2: "sponge"}
VERBS = {0: "take", 1: "cut", 2: "wash"}
COLORS = {0: (220, 40, 40), 1: (40, 200, 60), 2: (40, 70, 220)}


def _ttc(box_w: float, width: int) -> float:
    return round(0.25 + 2.0 * (1.0 - box_w / width), 3)


def make_sta_miniature(root: str, *, train_clips: int = 6, val_clips: int = 3, frames: int = 16,
                       width: int = 96, height: int = 64, annotated: tuple[int, ...] = (11, 15),
                       seed: int = 0) -> dict[str, str]:
    """Write the miniature under ``root``; returns {"annotations", "videos", "detections"} paths."""
    from pipeline.media import write_video

    rng = np.random.default_rng(seed)
    paths = {"annotations": os.path.join(root, "annotations"), "videos": os.path.join(root, "clips"),
             "detections": os.path.join(root, "object_detections.json")}
    for k in ("annotations", "videos"):
        os.makedirs(paths[k], exist_ok=True)
    detections: dict[str, list] = {}
    for split, n in (("train", train_clips), ("val", val_clips)):
        anns = []
        for c in range(n):
            clip_uid = f"{split}-clip-{c:02d}"
            objs = []
            # Nouns cycle with the clip so that every split holds every class; odd clips show two objects.
            for noun in [(c + k) % 3 for k in range(1 + c % 2)]:
                w, h = int(rng.integers(20, 44)), int(rng.integers(16, 30))
                x, y = float(rng.integers(0, width - w - 16)), float(rng.integers(0, height - h))
                objs.append({"noun": int(noun), "w": w, "h": h, "x": x, "y": y, "vx": float(rng.uniform(-0.5, 1.0))})

            def box(o, t):
                x1 = min(max(0.0, o["x"] + o["vx"] * t), width - o["w"])
                return [round(x1), round(o["y"]), round(x1) + o["w"] - 1, round(o["y"]) + o["h"] - 1]

            def frame(t, _s, objs=objs):
                img = np.full((height, width, 3), 110, dtype=np.uint8)
                for o in objs:
                    x1, y1, x2, y2 = box(o, t)
                    img[y1 : y2 + 1, x1 : x2 + 1] = COLORS[o["noun"]]
                return img

            write_video(os.path.join(paths["videos"], f"{clip_uid}.mp4"), frame, num_frames=frames, fps=30)
            for t in annotated:
                uid = f"{clip_uid}_{t:07d}"
                gts = [{"box": [float(v) for v in box(o, t)], "noun_category_id": o["noun"],
                        "verb_category_id": o["noun"], "time_to_contact": _ttc(o["w"], width)} for o in objs]
                anns.append({"uid": uid, "video_uid": f"video-{clip_uid}", "frame": 1000 + t, "clip_id": c,
                             "clip_uid": clip_uid, "clip_frame": t, "objects": gts})
                dets = [{"box": [g["box"][0] + 2, g["box"][1] + 2, g["box"][2] + 2, g["box"][3] + 2],
                         "noun_category_id": g["noun_category_id"], "score": round(float(rng.uniform(0.6, 0.95)), 3)}
                        for g in gts]
                dets.append({"box": [0.0, 0.0, 9.0, 9.0], "noun_category_id": int(rng.integers(0, 3)), "score": 0.3})
                detections[uid] = dets
        doc = {"version": "2.0", "split": split, "description": "generated STA miniature",
               "info": {"video_metadata": {f"video-{split}-clip-{c:02d}": {"fps": 30, "frame_width": width,
                                                                         "frame_height": height} for c in range(n)}},
               "noun_categories": [{"id": k, "name": v} for k, v in NOUNS.items()],
               "verb_categories": [{"id": k, "name": v} for k, v in VERBS.items()],
               "annotations": anns}
        with open(os.path.join(paths["annotations"], f"fho_sta_{split}.json"), "w") as f:
            json.dump(doc, f)
    with open(paths["detections"], "w") as f:
        json.dump(detections, f)
    return paths


if __name__ == "__main__":
    import click

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.argument("root")
    @click.option("--train-clips", default=6, show_default=True, type=int)
    @click.option("--val-clips", default=3, show_default=True, type=int)
    @click.option("--seed", default=0, show_default=True, type=int)
    def _main(root, train_clips, val_clips, seed) -> None:
        """Write an STA-layout miniature under ROOT.

        Example: python -m trainer.evals.sta_miniature /tmp/sta --train-clips 12 --val-clips 3
        """
        p = make_sta_miniature(root, train_clips=train_clips, val_clips=val_clips, seed=seed)
        click.echo(f"--annotations {p['annotations']} --videos {p['videos']} --detections {p['detections']}")

    _main()
