"""Evaluations of the tokenizer ablation's patch models (Table 3): probes, loss by position and the
per-patch features of tracking read the pixel datasets (`--tokenizer patch:P`) and feed the models
the patches of the very frames they name; datasets a model cannot read are refused by name."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.mix import MixConfig, build_mix
from pipeline.tokenizers.patch import patchify
from trainer import checkpoint as ck
from trainer.config import load_config
from trainer.data import iter_clips
from trainer.evals.features import backbone_features
from trainer.evals.position_job import position_loss_job
from trainer.evals.probes import ProbeConfig
from trainer.evals.run import ProbeJob, probe_job
from trainer.patches import image_inputs, pack_inputs, pack_pixel_targets, pixel_losses
from trainer.train import train

sys.path.insert(0, str(Path(__file__).parents[1]))
from patch_data import frames_of, write_pair  # noqa: E402

P, RES = 4, 8  # 4 px patches of 8 px frames: a 2 x 2 grid, 48 values a patch
VIDEOS = [{"frames": 24, "label": lab} for lab in "abab"] + [{"frames": 24, "split": "val", "label": lab} for lab in "ab"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("patch-evals")
    tok, px = write_pair(root, VIDEOS, dataset="k600", patch=P, grid=RES // P)
    mix = str(root / "mix.json")
    build_mix(MixConfig(ratios={"k600": "1"}, inputs={"k600": tok}, frames=4, stride=2, seed=0), mix, progress=False)
    out = {"tok": tok, "px": px, "root": root}
    for arm in ("tiny-patch", "tiny-patch-dvae"):
        cfg = load_config(arm, ["progress=false", "tensorboard=false", "global_batch=4", "micro_batch=4", "max_steps=2",
                                "val_every=0", "ckpt_every=2", "model.patch_size=4", "model.dim=32", "model.n_heads=2",
                                "model.mlp_hidden=64", f"pixels={px}"])
        train(cfg, mix, root / arm)
        out[arm] = ck.load_model(root / arm)
    return out


def _clip_pixels(video: int, first: int, frames: int, stride: int) -> np.ndarray:
    """The patches (F*hw, P*P*3) of a clip, from the generated frames themselves (not the datasets)."""
    fr = frames_of(video, VIDEOS[video]["frames"], RES)[first + stride * np.arange(frames)]
    return patchify(fr, P).reshape(-1, 3 * P * P)


def test_clips_of_a_pixel_dataset_carry_the_patches_of_their_frames(runs):
    specials = runs["tiny-patch"][1]["specials"]
    items = list(iter_clips(runs["px"], frames=3, stride=2, clips_per_video=2, specials=specials))
    codes = list(iter_clips(runs["tok"], frames=3, stride=2, clips_per_video=2, specials=specials))
    assert len(items) == len(codes) == 12
    for c, k in zip(items, codes, strict=True):
        assert c["pixels"].shape == (13, 48) and c["pixels"].dtype == np.uint8
        assert (c["video_id"], c["first_frame"], c["label"]) == (k["video_id"], k["first_frame"], k["label"])
        np.testing.assert_array_equal(c["frame_index"], k["frame_index"])
        v = int(c["video_id"].rsplit("/v", 1)[1])
        np.testing.assert_array_equal(c["pixels"][1:], _clip_pixels(v, c["first_frame"], 3, 2))
        assert not c["pixels"][0].any() and c["tokens"][0] == specials["bos_video"] and not c["tokens"][1:].any()
        # The token dataset's code is the patch's first pixel (patch_data): the two line up position by position.
        np.testing.assert_array_equal(k["tokens"][1:], c["pixels"][1:, 0])


def test_probe_on_a_patch_model_reads_its_pixel_dataset(runs, tmp_path):
    model, meta = runs["tiny-patch"]
    job = ProbeJob(train=runs["px"], val=runs["px"], train_split="train", val_split="val", layers="1,2", frames=3,
                   stride=2, clips=2, batch_size=4,
                   features="stream")
    doc, json_path, _ = probe_job(model, meta, job, ProbeConfig(epochs=2, batch_size=4), str(tmp_path / "p"),
                                  log=lambda m: None)
    assert [r["layer"] for r in doc["results"]] == [1, 2] and doc["classes"] == ["a", "b"]
    assert all(0 <= r["top1"] <= 100 for r in doc["results"]) and json.loads(Path(json_path).read_text())["results"]
    # The token file holds the patches; read back packed, they are the model's input for those clips.
    from trainer.evals.stream_probe import TokenSource, open_token_file

    work = tmp_path / "p" / "probe-work" / "probe" / "val"
    info = json.loads((work / "index.json").read_text())
    tok, fi = open_token_file(str(work), info)
    assert tok.shape == (4, 13, 49) and info["patch_values"] == 48
    first = next(iter_clips(runs["px"], frames=3, stride=2, clips_per_video=2, specials=meta["specials"], split="val"))
    x = tok[np.array([0])]
    np.testing.assert_array_equal(x[0, 1:, 1:], _clip_pixels(4, first["first_frame"], 3, 2))
    got = TokenSource(model, tok, fi, [2]).features(np.array([0]), 0)[2]  # (1, 12, D)
    want = model.features(torch.from_numpy(x), layers=[2])[0][:, 1:]
    torch.testing.assert_close(got, want.to(torch.float16).float())
    # drop_bos views both the codes and the patches without their first column.
    assert tok[:, 1:].shape == (4, 12, 49) and np.array_equal(tok[:, 1:][np.array([0])], x[:, 1:])


def test_datasets_a_model_cannot_read_are_refused_by_name(runs, tmp_path):
    patch_model, meta = runs["tiny-patch"]
    job = ProbeJob(train=runs["tok"], val=runs["tok"], layers="1", frames=3, stride=2)
    with pytest.raises(ValueError, match=r"reads 4x4 pixel patches .* --tokenizer patch:4"):
        probe_job(patch_model, meta, job, ProbeConfig(epochs=1), str(tmp_path / "a"), log=lambda m: None)
    dvae_model, tmeta = runs["tiny-patch-dvae"]  # reads pixels, predicts the codes of another dataset
    with pytest.raises(ValueError, match="--codes"):
        position_loss_job(dvae_model, tmeta, runs["px"], str(tmp_path / "b"), frames=4, stride=2)
    with pytest.raises(ValueError, match="is a pixel dataset"):
        position_loss_job(dvae_model, tmeta, runs["px"], str(tmp_path / "b"), frames=4, stride=2, codes=runs["px"])
    with pytest.raises(ValueError, match="--codes is for a patch -> dVAE model"):
        position_loss_job(patch_model, meta, runs["px"], str(tmp_path / "b"), frames=4, stride=2, codes=runs["tok"])
    from pipeline.shards import read_manifest
    from trainer.model import ModelConfig
    from trainer.patches import check_input_dataset

    with pytest.raises(ValueError, match="is a pixel dataset .* this model reads dVAE codes"):
        check_input_dataset(ModelConfig(), read_manifest(runs["px"]), runs["px"])
    check_input_dataset(ModelConfig(), read_manifest(runs["tok"]), runs["tok"])
    _, short = write_pair(tmp_path / "short", VIDEOS, dataset="k600", patch=P, grid=RES // P, drop_pixel_video=4)
    with pytest.raises(ValueError, match="do not hold the same clips"):
        position_loss_job(dvae_model, tmeta, short, str(tmp_path / "b"), frames=4, stride=2, split=None,
                          codes=runs["tok"])


def test_position_loss_of_both_arms_is_their_own_loss_on_the_clips(runs, tmp_path):
    clip = next(iter_clips(runs["px"], frames=4, stride=2, clips_per_video=1, specials=runs["tiny-patch"][1]["specials"],
                           split="val", kind="video"))
    px = np.concatenate([np.zeros((1, 48), np.uint8), _clip_pixels(4, clip["first_frame"], 4, 2)])[None]  # (1, 17, 48)
    for arm in ("tiny-patch", "tiny-patch-dvae"):
        model, meta = runs[arm]
        codes = runs["tok"] if arm == "tiny-patch-dvae" else None
        doc, json_path, png = position_loss_job(model, meta, runs["px"], str(tmp_path / arm), frames=4, stride=2,
                                                max_clips=1, codes=codes)
        tok = np.asarray(clip["tokens"], dtype=np.int64)[None]  # (1, 17): bos and code 0 at every patch
        with torch.no_grad():
            out = model(torch.from_numpy(pack_inputs(tok[:, :-1], px[:, :-1])))
        if arm == "tiny-patch":
            y = torch.from_numpy(pack_pixel_targets(tok[:, 1:], px[:, 1:], model.cfg.vocab_size - 4))
            want = pixel_losses(out, y)[0]
            assert doc["loss"] == "mse_next_patch"
        else:
            codes_next = torch.from_numpy(px[0, 1:, 0].astype(np.int64))  # the code of a patch = its first pixel
            want = F.cross_entropy(out[0].float(), codes_next, reduction="none")
            assert doc["loss"] == "cross_entropy" and doc["codes"] == runs["tok"]
        np.testing.assert_allclose(doc["per_position"], want.numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(doc["per_frame"], want.reshape(4, 4).mean(1).numpy(), rtol=1e-4)
        assert doc["num_clips"] == 1 and doc["tokens_per_frame"] == 4 and Path(png).stat().st_size > 1000


def test_tracking_and_image_features_of_a_patch_model_are_its_features_on_the_patches(runs):
    from trainer.evals.davis import patch_features
    from trainer.evals.run import frame_inputs_for

    model, meta = runs["tiny-patch"]
    frames = frames_of(9, 5, RES)  # (5, 8, 8, 3)
    patches = frame_inputs_for(model, meta)(frames)
    assert patches.shape == (5, 2, 2, 48)
    got = patch_features(model, patches, bos=meta["specials"]["bos_video"], layers=[1, 2], window=3)
    assert got[2].shape == (5, 2, 2, 32)
    bos = meta["specials"]["bos_video"]
    ids = np.r_[bos, np.zeros(12, np.int64)][None]
    x = pack_inputs(ids, np.concatenate([np.zeros((1, 48), np.uint8), patches[:3].reshape(12, 48)])[None])
    fi = torch.zeros(1, 13, dtype=torch.int64)
    fi[0, 0] = -1
    want = backbone_features(model, torch.from_numpy(x), fi, [2])[2].reshape(3, 2, 2, 32)
    torch.testing.assert_close(got[2][:2], want[:2])  # frames 0, 1 come from the first window
    # A probe's single images: bos_image, then the image's patches.
    img = image_inputs(frames[:2], P, 513)
    assert img.shape == (2, 5, 49) and img[:, 0, 0].tolist() == [513, 513] and not img[:, 0, 1:].any()
    np.testing.assert_array_equal(img[1, 1:, 1:], patchify(frames[1:2], P).reshape(4, 48))


def test_probe_crops_of_raw_images_feed_a_patch_model_their_own_patches(runs, tmp_path):
    from PIL import Image

    from trainer.evals.augment import ImageSource, list_probe_images

    model, meta = runs["tiny-patch"]
    for c in range(2):
        d = tmp_path / "train" / f"n0000000{c}"
        d.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(frames_of(10 * c + i, 1, 12)[0]).save(d / f"n0000000{c}_{i}.JPEG", quality=95)
    items = list_probe_images(str(tmp_path), "imagenet", "train")
    bos = meta["specials"]["bos_image"]
    src = ImageSource(model, items, None, bos=bos, layers=[2], resolution=RES)  # no tokenizer: patches
    assert (src.n, src.tokens, src.dim) == (4, 4, 32)
    got = src.features(np.arange(4), epoch=3)[2]  # augmented crops of epoch 3
    crops = np.stack([src.frame(i, 3) for i in range(4)])
    x = torch.from_numpy(image_inputs(crops, P, bos))
    with torch.no_grad():
        want = model.features(x, layers=[2])[0][:, 1:]
    torch.testing.assert_close(got, want.to(torch.float16).float())
    with pytest.raises(ValueError, match="not a multiple of the model's 4 px patches"):
        ImageSource(model, items, None, bos=bos, layers=[2], resolution=10)
