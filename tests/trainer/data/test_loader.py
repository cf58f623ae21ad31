"""MixLoader: per-rank shares, worker-independent order, exact resume, refusals, S3."""

import itertools

import numpy as np
import pytest
import torch

from trainer.data import MixLoader, build_sequence, iter_clips

from .conftest import make_mix

G = 8


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


def _cat(batches, key):
    return torch.cat([b[key] for b in batches])


def test_contract_fields(mix_path):
    loader = MixLoader(mix_path, global_batch=G, verify="sha256")
    assert loader.seq_len == 16 and loader.vocab_size == 516
    assert loader.specials == {"bos_video": 512, "bos_image": 513, "eos": 514, "pad": 515}
    assert loader.sources == ["k600", "imagenet"]
    (b,) = _take(loader, 1)
    assert b["inputs"].shape == (G, 16) and b["inputs"].dtype == torch.int32
    assert b["targets"].shape == (G, 16) and b["targets"].dtype == torch.int32
    assert b["frame_index"].dtype == torch.int64 and b["sample_index"].tolist() == list(range(G))
    assert len(b["source"]) == G and len(b["label"]) == G
    assert (b["inputs"][:, 1:] == b["targets"][:, :-1]).all()
    assert (b["frame_index"][:, 0] == -1).all()
    assert loader.state_dict() == {"version": 1, "mix_hash": loader.mix_hash, "consumed_samples": G}


def test_world_sizes_and_workers_give_the_same_global_order(mix_path):
    ref = _take(MixLoader(mix_path, global_batch=G), 5)
    two_workers = _take(MixLoader(mix_path, global_batch=G, num_workers=2), 5)
    r0 = _take(MixLoader(mix_path, global_batch=G, rank=0, world=2), 5)
    r1 = _take(MixLoader(mix_path, global_batch=G, rank=1, world=2, num_workers=2), 5)
    for k in range(5):
        assert (two_workers[k]["inputs"] == ref[k]["inputs"]).all()
        assert two_workers[k]["source"] == ref[k]["source"]
        merged = torch.cat([r0[k]["inputs"], r1[k]["inputs"]])
        assert (merged == ref[k]["inputs"]).all()
        assert r0[k]["label"] + r1[k]["label"] == ref[k]["label"]
        assert torch.cat([r0[k]["sample_index"], r1[k]["sample_index"]]).tolist() == list(range(k * G, (k + 1) * G))


def test_resume_equals_uninterrupted_for_other_world_and_workers(mix_path):
    full = _take(MixLoader(mix_path, global_batch=G), 7)
    first = MixLoader(mix_path, global_batch=G, num_workers=2)
    _take(first, 3)
    sd = first.state_dict()
    assert sd["consumed_samples"] == 3 * G
    parts = []
    for rank in range(2):
        resumed = MixLoader(mix_path, global_batch=G, rank=rank, world=2, num_workers=rank)
        resumed.load_state_dict(sd)
        parts.append(_take(resumed, 4))
    for k in range(4):
        merged = torch.cat([parts[0][k]["inputs"], parts[1][k]["inputs"]])
        assert (merged == full[3 + k]["inputs"]).all()
        merged_t = torch.cat([parts[0][k]["targets"], parts[1][k]["targets"]])
        assert (merged_t == full[3 + k]["targets"]).all()


def test_runs_past_the_indexed_samples(mix_path):
    loader = MixLoader(mix_path, global_batch=G)
    n = loader.reader.num_samples
    loader.load_state_dict({**loader.state_dict(), "consumed_samples": n - 4})
    (b,) = _take(loader, 1)
    assert b["sample_index"].tolist() == list(range(n - 4, n + 4))
    # the O(1) formula past the end continues the blend exactly
    src, local = loader.reader.blend.source_and_local(np.arange(n))
    assert (src == np.asarray(loader.reader._blend_src)).all()
    assert (local == np.asarray(loader.reader._blend_local)).all()


def test_state_from_another_mix_is_refused(mix_path, tmp_path):
    other = make_mix(tmp_path / "other", seed=4)
    a = MixLoader(mix_path, global_batch=G)
    b = MixLoader(other, global_batch=G)
    with pytest.raises(ValueError) as e:
        b.load_state_dict(a.state_dict())
    assert a.mix_hash in str(e.value) and b.mix_hash in str(e.value)
    with pytest.raises(ValueError, match="version"):
        a.load_state_dict({"version": 99, "mix_hash": a.mix_hash, "consumed_samples": 0})


def test_bad_arguments_name_the_field(mix_path):
    with pytest.raises(ValueError, match="global_batch=6"):
        MixLoader(mix_path, global_batch=6, world=4)
    with pytest.raises(ValueError, match="rank=2"):
        MixLoader(mix_path, global_batch=8, rank=2, world=2)
    with pytest.raises(ValueError, match="split 'test'"):
        MixLoader(mix_path, global_batch=8, split="test")


def test_val_split_and_build_sequence(mix_path):
    loader = MixLoader(mix_path, global_batch=2, split="val")
    (b,) = _take(loader, 1)
    assert b["source"] == ["k600", "k600"] and b["label"] == ["c", "c"]
    one = build_sequence(mix_path, 5)
    full = MixLoader(mix_path, global_batch=G).batch_at(0)
    assert (torch.from_numpy(one["inputs"]) == full["inputs"][5]).all()


def test_iter_clips_for_probes(mix_path, tmp_path):
    from pipeline.mix.synthetic import decode_frame

    loader = MixLoader(mix_path, global_batch=G)
    vid = loader.reader._src[0]["url"]
    clips = list(iter_clips(vid, frames=4, stride=2, clips_per_video=3, specials=loader.specials, split="train"))
    assert [c["video_id"] for c in clips] == ["k600/v00000"] * 3 + ["k600/v00001"] * 3
    assert [c["label"] for c in clips] == ["a"] * 3 + ["b"] * 3
    # valid starts of a 120-frame video with span 7: 0..113, evenly spaced
    assert [c["first_frame"] for c in clips[:3]] == [0, 56, 113]
    c = clips[1]
    assert c["tokens"].shape == (1 + 16,) and c["tokens"][0] == 512
    assert c["frame_index"].tolist() == [-1] + [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert [decode_frame(c["tokens"][1 + 4 * f : 5 + 4 * f], 512) for f in range(4)] == [(0, 56), (0, 58), (0, 60), (0, 62)]
    imgs = list(iter_clips(loader.reader._src[1]["url"], frames=16, stride=4, specials=loader.specials, add_eos=True))
    assert len(imgs) == 24 and imgs[0]["tokens"].tolist()[0] == 513 and imgs[0]["tokens"][-1] == 514
    assert [i["label"] for i in imgs[:4]] == ["c0", "c1", "c2", "c0"]


def test_s3_reads_match_local(tmp_path, s3_server):
    from pipeline.mix import access
    from pipeline.shards.cache import process_cache

    so = s3_server["storage_options"]
    remote = make_mix(tmp_path, prefix=f"s3://{s3_server['bucket']}/mixtest", storage_options=so)
    local = make_mix(tmp_path / "local")
    a = _take(MixLoader(local, global_batch=G), 3)
    before = dict(access.REMOTE_FETCHES)
    rl = MixLoader(remote, global_batch=G, storage_options=so, cache_mb=2)
    b = _take(rl, 3)
    for x, y in zip(a, b, strict=True):
        assert (x["inputs"] == y["inputs"]).all() and x["label"] == y["label"]
    # Remote shards are read by ranges and checked per frame (default verify="auto"): no file was
    # hashed whole, and what was fetched sits in the one process-wide cache, within its budget.
    files = [f for st in rl.reader._stores for f in st._files.values()]
    assert files and not any(f._checked for f in files)
    assert access.REMOTE_FETCHES["requests"] > before["requests"]
    cache = process_cache()
    assert cache.budget == 2 << 20 and 0 < cache.nbytes <= cache.budget


def test_batched_assembly_equals_one_by_one(mix_path):
    # frames == images_per_seq here, so a whole batch shares one frame-index row (broadcast) while
    # a single sample has its own; both must give the same sequences.
    loader = MixLoader(mix_path, global_batch=G)
    b = loader.reader.batch(np.arange(24))
    assert set(b["source"]) == {"k600", "imagenet"}
    for i in range(24):
        one = loader.sequence(i)
        for k in ("inputs", "targets", "frame_index"):
            assert (one[k] == b[k][i]).all()
        assert one["label"] == b["label"][i] and one["source"] == b["source"][i]


def test_inputs_and_targets_are_views_of_one_buffer_and_frame_index_is_shared(mix_path):
    # One int32 [B, T+1] buffer per batch (4 bytes written per token, not 8) and one frame-index
    # row for all samples of a layout; the values must be what separate arrays would hold.
    loader = MixLoader(mix_path, global_batch=G)
    b = loader.batch_at(0)
    x, y, fi = b["inputs"], b["targets"], b["frame_index"]
    assert x.dtype == y.dtype == torch.int32 and fi.dtype == torch.int64 and x.shape == y.shape == fi.shape == (G, loader.seq_len)
    assert x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert fi.stride(0) == 0 and torch.equal(fi[0], fi[-1])
    for i in range(G):
        one = loader.sequence(i)
        assert (one["inputs"] == x[i].numpy()).all() and (one["targets"] == y[i].numpy()).all()
        assert (one["frame_index"] == fi[i].numpy()).all()


def test_integrity_switch_reaches_the_loader_from_the_trainer_config(mix_path):
    from trainer.config import load_config
    from trainer.train import mix_loader_factory

    assert load_config("tiny", []).data_verify == "auto"
    cfg = load_config("tiny", ["data_verify=off"])
    loader = mix_loader_factory(mix_path, global_batch=G, rank=0, world=1, split="train", verify=cfg.data_verify)
    assert loader.reader.verify == "off" and all(s.verify == "off" for s in loader.reader._stores)
    with pytest.raises(ValueError, match="data_verify='sha' is invalid: choose one of"):
        load_config("tiny", ["data_verify=sha"])
    with pytest.raises(ValueError, match="verify='yes'.*'auto'"):
        MixLoader(mix_path, global_batch=G, verify="yes")
