"""The tokenizer ablation's patch models (Table 3): patch embedding / pixel head on every backbone,
the paired pixel loader, and both arms trained (and resumed exactly) through the real trainer."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.mix import MixConfig, build_mix
from pipeline.mix.sequence import IGNORE_INDEX
from trainer import checkpoint as ck
from trainer.config import load_config
from trainer.data.pixels import PixelMixLoader
from trainer.model import PRESETS, ModelConfig, build_model, count_params, flops_per_token
from trainer.patches import normalise_patches, pack_inputs, pack_pixel_targets, pixel_losses
from trainer.train import train

sys.path.insert(0, str(Path(__file__).parent))
from patch_data import write_pair  # noqa: E402


def _cfg(arch: str, target: str, **kw) -> ModelConfig:
    return dataclasses.replace(PRESETS[arch], input="patches", target=target, patch_size=4, max_seq_len=32, dim=32,
                               n_heads=2, mlp_hidden=64, **kw)


@pytest.mark.parametrize("arch", ["tiny", "tiny-gpt2"])  # (Mamba shares the same swap; not run here to save CI time)
def test_patch_models_read_pixels_not_codes_and_count_their_matmuls(arch):
    torch.manual_seed(0)
    for target, width in (("pixels", 48), ("tokens", 516)):
        cfg = _cfg(arch, target)
        m = build_model(cfg).eval()
        assert m.num_params() == count_params(cfg) and m.num_params(False) == count_params(cfg, False)
        # 6N counts the patch projection (48 -> 32, + bias): only the 4 special vectors are a lookup.
        lookups = 4 * 32 + (cfg.max_seq_len * 32 if cfg.arch == "gpt2" else 0)
        assert m.num_params() - m.num_params(False) == lookups
        assert flops_per_token(cfg, 16, m.num_params(False)) >= 6 * (48 * 32 + 32)
        tok = np.zeros((2, 12), dtype=np.int64)
        tok[:, 0] = 512  # bos_video
        px = np.random.default_rng(0).integers(0, 256, (2, 12, 48), dtype=np.uint8)
        x = torch.from_numpy(pack_inputs(tok, px))
        with torch.no_grad():
            out = m(x)
            assert out.shape == (2, 12, width)
            assert m.features(x, [2])[0].shape == (2, 12, 32)
            other_codes = x.clone()
            other_codes[:, 1:, 0] = 7  # the codes at patch positions are never read
            torch.testing.assert_close(m(other_codes), out)
            other_bos = x.clone()
            other_bos[:, 0, 1:] = 255  # nor the pixels at a special position: its learned vector stands there
            torch.testing.assert_close(m(other_bos), out)
            moved = x.clone()
            moved[:, 5, 1:] = 255 - moved[:, 5, 1:]  # a patch changes only its own and later positions
            got = m(moved)
            torch.testing.assert_close(got[:, :5], out[:, :5])
            assert not torch.allclose(got[:, 5:], out[:, 5:])
        with pytest.raises(ValueError, match="pack_inputs"):
            m(torch.from_numpy(tok))


def test_pixel_loss_is_mse_on_per_patch_normalised_next_patches():
    px = np.random.default_rng(1).integers(0, 256, (1, 3, 48), dtype=np.uint8)
    y = torch.from_numpy(pack_pixel_targets(np.array([[5, 514, IGNORE_INDEX]]), px, first_special=512))
    assert y[0, :, 0].tolist() == [0, IGNORE_INDEX, IGNORE_INDEX]  # eos and padding are no patch
    t = px[0, 0].astype(np.float64) / 255
    norm = (t - t.mean()) / np.sqrt(t.var(ddof=1) + 1e-6)
    np.testing.assert_allclose(normalise_patches(torch.from_numpy(px[0, 0])).numpy(), norm, rtol=1e-5)
    pred = torch.zeros(1, 3, 48)
    loss = pixel_losses(pred, y)
    np.testing.assert_allclose(loss[0].tolist(), [np.mean(norm**2), 0, 0], rtol=1e-5)  # ≈ 1 for a zero guess
    assert float(pixel_losses(torch.from_numpy(norm[None, None].repeat(3, 1)).float(), y)[0, 0]) < 1e-10


def test_config_refuses_arms_that_do_not_exist(tmp_path):
    from trainer.export import export_hf

    with pytest.raises(ValueError, match="no equivalent to export"):
        export_hf(build_model(_cfg("tiny", "tokens")), tmp_path / "hf")
    with pytest.raises(ValueError, match="model.input=patches"):
        ModelConfig(target="pixels")
    with pytest.raises(ValueError, match="ModelConfig.input='pixels'"):
        ModelConfig(input="pixels")
    assert load_config("large-patch").model.dim == 1024 and load_config("large-patch-dvae").model.target == "tokens"


VIDEOS = [{"frames": 40, "label": "a"}, {"frames": 30, "label": "b"}, {"frames": 20, "split": "val", "label": "c"}]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    tok, px = write_pair(root, VIDEOS, dataset="k600")
    mix = str(root / "mix.json")
    build_mix(MixConfig(ratios={"k600": "1"}, inputs={"k600": tok}, frames=4, stride=2, seed=0), mix, progress=False)
    return {"root": root, "tok": tok, "px": px, "mix": mix}


def test_loader_pairs_each_position_with_its_own_patch(pair):
    for target in ("pixels", "tokens"):
        loader = PixelMixLoader(pair["mix"], pixels=f"k600={pair['px']}", patch_size=4, target=target, global_batch=4)
        it = iter(loader)
        for _ in range(3):
            b = next(it)
            x, y, tok, fi = b["inputs"], b["targets"], b["tokens"], b["frame_index"]
            assert x.shape == (4, 16, 49) and x.dtype == torch.int32
            vis = fi >= 0
            assert int(vis.sum()) == 4 * 15 and torch.equal(x[..., 0], tok)
            # The "code" of a patch is its first pixel: equal at every visual position of every sample.
            assert torch.equal(x[..., 1][vis], tok[vis]) and int(x[~vis][:, 1:].abs().sum()) == 0
            if target == "pixels":
                assert torch.equal(y[:, :-1, 1:], x[:, 1:, 1:]) and bool((y[..., 0] == 0).all())
            else:
                assert y.dtype == torch.int32 and torch.equal(y[:, :-1], tok[:, 1:])
        assert loader.state_dict()["consumed_samples"] == 12  # the token mix's order and state, unchanged


def test_loader_refuses_pixels_that_do_not_pair_naming_the_fix(pair, tmp_path):
    with pytest.raises(ValueError, match="pixels=NAME=DIR"):
        PixelMixLoader(pair["mix"], pixels=None, patch_size=4, target="pixels", global_batch=4)
    with pytest.raises(ValueError, match="model.patch_size=8"):
        PixelMixLoader(pair["mix"], pixels=pair["px"], patch_size=8, target="pixels", global_batch=4)
    with pytest.raises(ValueError, match="not the 4x4 patch tokenizer"):
        PixelMixLoader(pair["mix"], pixels=pair["tok"], patch_size=4, target="pixels", global_batch=4)
    _, short = write_pair(tmp_path / "short", VIDEOS, dataset="k600", drop_pixel_video=1)
    with pytest.raises(ValueError, match=r"videos missing: \['k600/v00001'\]"):
        PixelMixLoader(pair["mix"], pixels=short, patch_size=4, target="pixels", global_batch=4)
    _, big = write_pair(tmp_path / "big", VIDEOS, dataset="k600", pixel_res=16)
    with pytest.raises(ValueError, match="at 16 px, its tokens .* at 8 px"):
        PixelMixLoader(pair["mix"], pixels=big, patch_size=4, target="pixels", global_batch=4)


def _run(pair, arm: str, out, *extra) -> list[float]:
    cfg = load_config(arm, ["progress=false", "tensorboard=false", "global_batch=4", "micro_batch=2", "max_steps=6",
                            "val_every=3", "ckpt_every=3", "lr=3e-3", "warmup_steps=1", "model.patch_size=4",
                            "model.dim=32", "model.n_heads=2", "model.mlp_hidden=64", f"pixels={pair['px']}", *extra])
    train(cfg, pair["mix"], out)
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arm", ["tiny-patch", "tiny-patch-dvae"])
def test_both_arms_train_validate_by_position_and_resume_exactly(pair, tmp_path, arm):
    full = _run(pair, arm, tmp_path / "full")
    assert len(full) == 6 and full[-1] < full[0]
    val = [json.loads(x) for x in (tmp_path / "full" / "val.jsonl").read_text().splitlines()]
    pos = json.loads((tmp_path / "full" / "position_loss" / "step-00000006.json").read_text())
    assert [v["step"] for v in val] == [3, 6] and len(pos["frame_loss"]) == 4
    if arm == "tiny-patch":  # MSE on unit-variance targets: about 1 for an untrained model, never CE's ln(516)
        assert 0.5 < val[0]["val_loss"] < 1.5
    else:
        assert 5.0 < val[0]["val_loss"] < 7.0
    model, meta = ck.load_model(tmp_path / "full")
    assert (model.cfg.input, model.cfg.target) == ("patches", arm == "tiny-patch" and "pixels" or "tokens")
    assert meta["train_config"]["pixels"] == pair["px"]
    if arm == "tiny-patch":  # the pixel head and its loss are the new state to resume; the CE arm's is the token model's
        # Left after 2 steps and restarted: the same losses (model, optimizer, loader position, RNG).
        _run(pair, arm, tmp_path / "split", "exit_after_steps=2")
        assert _run(pair, arm, tmp_path / "split") == full


class FirstPixelTokenizer:
    """The synthetic data's tokenizer (patch_data): a patch's code is its first pixel value; a code
    decodes to a patch of that value everywhere."""

    id, vocab_size, downsample = "first-pixel", 512, 4

    def encode(self, frames):
        from pipeline.tokenizers.patch import patchify

        return patchify(np.asarray(frames), 4)[..., 0].astype(np.uint16)

    def decode(self, codes):
        c = np.minimum(np.asarray(codes), 255).astype(np.uint8)
        return np.repeat(np.repeat(c, 4, axis=1), 4, axis=2)[..., None].repeat(3, axis=3)


def test_generate_with_patch_input_decodes_each_sampled_code_to_the_pixels_it_reads_next():
    from trainer.generate import continue_frames

    torch.manual_seed(0)
    model = build_model(_cfg("tiny", "tokens", vocab_size=516, n_layers=1)).eval()
    meta = {"specials": {"bos_video": 512, "bos_image": 513, "eos": 514, "pad": 515}, "codebook_size": 512,
            "grid": [2, 2]}
    frames = np.random.default_rng(3).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    tok = FirstPixelTokenizer()
    res = continue_frames(model, meta, tok, frames, 2, temperature=0)
    new = res["new_tokens"].reshape(-1).astype(np.int64)  # (8,) codes, greedy
    assert res["new_tokens"].shape == (2, 2, 2) and res["generated"].shape == (2, 8, 8, 3)
    # Without a cache: the prompt's real patches, then each generated code as its decoded patch
    # (this decoder has no spatial context, so a code's patch is just that value).
    from pipeline.tokenizers.patch import patchify

    toks = np.concatenate([[512], tok.encode(frames).reshape(-1), new])[None]  # (1, 1 + 8 + 8)
    px = np.concatenate([np.zeros((1, 1, 48), np.uint8), patchify(frames, 4).reshape(1, 8, 48),
                         np.minimum(new, 255).astype(np.uint8)[None, :, None].repeat(48, axis=2)], axis=1)
    with torch.no_grad():
        logits = model(torch.from_numpy(pack_inputs(toks, px)))[0, 8:-1, :512]  # predictions of the 8 new codes
    assert logits.argmax(-1).tolist() == new.tolist()

    pixel_model = build_model(_cfg("tiny", "pixels", vocab_size=516, n_layers=1))
    with pytest.raises(ValueError, match="no distribution to sample"):
        continue_frames(pixel_model, meta, tok, frames, 1)

    class EncoderOnly:  # a tokenizer converted without its decoder
        id, vocab_size, downsample = "first-pixel", 512, 4
        encode = FirstPixelTokenizer.encode

    with pytest.raises(ValueError, match="must be decoded to its patch"):
        continue_frames(model, meta, EncoderOnly(), frames, 1)
