"""Tiny datasets in each adapter's layout, written with real encoders (PyAV / Pillow)."""

from __future__ import annotations

import json
import os

import pytest

from pipeline.media import quadrant_frame, truncate_file, write_audio_only, write_image, write_video


def _video(path: str, n: int = 8, fps: int = 10, codec: str = "libx264", seed: int = 0) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # (h, w) = (32, 48): odd aspect so the resize + centre crop is exercised; content varies in time.
    return write_video(path, lambda i, t: quadrant_frame(32, 48, t + seed, 3.0), fps=fps, num_frames=n, codec=codec)


def _image(path: str, color: tuple[int, int, int]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = quadrant_frame(40, 30)
    img[:8, :8] = color
    return write_image(path, img)


def _text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def build_layout(kind: str, root: str) -> dict:
    """Write a dataset of `kind` under root; returns {"dataset", "root", "bad"} (bad = uris expected to fail)."""
    bad: list[str] = []
    if kind == "kinetics600":
        _text(f"{root}/annotations/train.csv", "label,youtube_id,time_start,time_end,split\n"
              "abseiling,aaa,0,1,train\nzumba,bbb,0,1,train\nzumba,ccc,0,1,train\n")
        for i, v in enumerate(("aaa", "bbb", "ccc")):
            _video(f"{root}/train/{v}_000000_000001.mp4", seed=i)
    elif kind == "ego4d":
        _text(f"{root}/ego4d.json", json.dumps({"videos": [{"video_uid": "uid-a", "duration_sec": 1.6},
                                                             {"video_uid": "uid-b", "duration_sec": 0.8}]}))
        _video(f"{root}/v2/full_scale/uid-a.mp4", n=16)
        _video(f"{root}/v2/full_scale/uid-b.mp4", n=8, seed=1)
    elif kind == "howto100m":
        _text(f"{root}/HowTo100M_v1.csv", "video_id,category_1,category_2,rank,task_id\n"
              "vidA,Food,Recipes,1,100\nvidB,Hobbies,Knitting,2,101\n")
        _video(f"{root}/videos/vidA.mp4", n=12)
        _video(f"{root}/videos/vidB.webm", n=6, codec="libvpx-vp9", seed=2)
    elif kind == "imagenet":
        _image(f"{root}/train/n01440764/n01440764_1.JPEG", (200, 10, 10))
        _image(f"{root}/train/n01440764/n01440764_2.JPEG", (10, 200, 10))
        _image(f"{root}/train/n01443537/n01443537_3.JPEG", (10, 10, 200))
    elif kind == "folder":
        for i in range(3):
            _video(f"{root}/clips/good{i}.mp4", seed=i)
        _image(f"{root}/still.png", (0, 0, 0))
        write_audio_only(f"{root}/clips/audio_only.mp4", 0.5)
        bad.append(f"{root}/clips/audio_only.mp4")
        open(f"{root}/clips/zero.mp4", "wb").close()
        bad.append(f"{root}/clips/zero.mp4")
        _video(f"{root}/tmp_full.mp4", n=20)
        truncate_file(f"{root}/tmp_full.mp4", f"{root}/clips/truncated.mp4", 0.4)
        os.unlink(f"{root}/tmp_full.mp4")
        bad.append(f"{root}/clips/truncated.mp4")
    else:
        raise AssertionError(kind)
    return {"dataset": kind, "root": root, "bad": bad}


@pytest.fixture
def make_layout():
    return build_layout


@pytest.fixture(scope="session")
def tok_spec(tmp_path_factory) -> str:
    """A small dVAE tokenizer folder with random weights (64 px → 8×8 codes of 512), made with the
    tokenizers' own save path; the spec `dvae:DIR` loads it like any converted or trained one."""
    import torch

    from pipeline.tokenizers import make_config, save_tokenizer
    from pipeline.tokenizers.base import state_dict_of
    from pipeline.tokenizers.dalle import DVAEArch, DVAEEncoder

    torch.manual_seed(0)
    arch = DVAEArch(vocab_size=512, n_hid=16, n_init=16, n_blk_per_group=1)
    out = str(tmp_path_factory.mktemp("tok") / "dvae")
    cfg = make_config("dvae", "jobs-test", arch, resolution=64, has_decoder=False, source={"made_by": "tests/pipeline/jobs"})
    save_tokenizer(out, cfg, state_dict_of(DVAEEncoder(arch), None, "dvae"))
    return f"dvae:{out}"
