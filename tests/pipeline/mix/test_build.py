"""Mix manifests: pinning, refusals, cached index, tables, and sequences read back by global id."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

import schemas
from pipeline.cli import main as cli
from pipeline.mix import MixConfig, MixReader, build_mix, read_mix_manifest
from pipeline.mix.synthetic import decode_frame, write_positional_dataset
from pipeline.mix.tables import read_row_table, split_table, video_units
from pipeline.shards import read_manifest

CB = 512


def _cfg(d, **kw):
    base = dict(ratios={"k600": "0.7", "imagenet": "0.3"}, inputs={"k600": d["k600"], "imagenet": d["imagenet"]},
                frames=4, stride=3, images_per_seq=3, seed=5)
    base.update(kw)
    return MixConfig(**base)


def _decode_sample(seq, hw):
    """(video, frame) of every frame of an assembled sequence, checking the layout on the way.

    Targets are the inputs shifted by one: the frame tokens first (all of them at seq_len = F*HW),
    then eos/ignored padding for shorter image sequences; frame_index names each input's frame.
    """
    toks, fi = seq["targets"], seq["frame_index"]
    t = len(toks)
    assert (seq["inputs"][1:] == np.where(toks[:-1] == -100, 515, toks[:-1])).all()
    body = (toks >= 0) & (toks < CB)
    n = int(body.sum())
    assert body[:n].all() and n % hw == 0
    assert fi[0] == -1 and (fi[1 : n + 1] == np.repeat(np.arange(n // hw), hw)[: t - 1]).all()
    assert (fi[n + 1 :] == -1).all()
    return [decode_frame(f, CB) for f in toks[:n].reshape(-1, hw)]


def test_manifest_pins_inputs_and_validates(datasets):
    out = str(datasets["root"] / "mix.json")
    doc = build_mix(_cfg(datasets), out, progress=False)
    schemas.validate(json.load(open(out)), "mix_manifest")
    assert read_mix_manifest(out)["content_hash"] == doc["content_hash"] == schemas.content_hash(doc)
    srcs = {s["name"]: s for s in doc["sources"]}
    assert srcs["k600"]["manifest_hash"] == read_manifest(datasets["k600"])["content_hash"]
    assert srcs["k600"]["kind"] == "video" and srcs["imagenet"]["kind"] == "image"
    assert doc["specials"] == {"bos_video": 512, "bos_image": 513, "eos": 514, "pad": 515}
    assert doc["vocab_size"] == 516 and doc["seq_len"] == 4 * 4
    assert abs(srcs["k600"]["weight"] - 0.7) < 1e-12
    tr = doc["splits"]["train"]["per_source"]["k600"]
    assert tr["segments_too_short"] == 1  # the 20-frame video
    # span = 3*3+1 = 10, hop = 12: video frames 150 → 12 clips, 90 → 7, 75 → 6
    assert tr["units"] == 12 + 7 + 6
    assert set(doc["splits"]) == {"train", "val"}
    idx_dir = os.path.join(str(datasets["root"]), doc["index"]["dir"])
    assert os.path.exists(os.path.join(idx_dir, "index.json"))


def test_hand_edited_or_incomplete_manifest_is_refused(datasets):
    out = str(datasets["root"] / "mix.json")
    doc = build_mix(_cfg(datasets), out, progress=False)
    edited = dict(doc, seed=99)
    json.dump(edited, open(out, "w"))
    with pytest.raises(ValueError, match="content_hash does not match"):
        read_mix_manifest(out)
    del edited["index"]
    json.dump(edited, open(out, "w"))
    with pytest.raises(schemas.SchemaError, match="index"):
        read_mix_manifest(out)


def test_index_is_cached_by_hash(datasets, capsys):
    out = str(datasets["root"] / "mix.json")
    a = build_mix(_cfg(datasets), out, progress=True)
    b = build_mix(_cfg(datasets), out, progress=True)
    assert a == b and "reusing cached index" in capsys.readouterr().err
    c = build_mix(_cfg(datasets, seed=6), str(datasets["root"] / "mix6.json"), progress=False)
    assert c["index"]["key"] != a["index"]["key"]


def test_refuses_mismatched_tokenizations(datasets, tmp_path):
    other = str(tmp_path / "other")
    write_positional_dataset(other, [{"frames": 40}], dataset="ego4d", grid=(2, 3), codebook=1024)
    cfg = MixConfig(ratios={"k600": "1", "ego4d": "1"}, inputs={"k600": datasets["k600"], "ego4d": other})
    with pytest.raises(ValueError) as e:
        build_mix(cfg, str(tmp_path / "m.json"), progress=False)
    msg = str(e.value)
    assert "grid: k600 has [2, 2] but ego4d has [2, 3]" in msg
    assert "codebook_size: k600 has 512 but ego4d has 1024" in msg
    tok = dict(id="other-dvae", sha256="1" * 64, vocab_size=512, downsample=8)
    third = str(tmp_path / "third")
    write_positional_dataset(third, [{"frames": 40}], dataset="ego4d", tokenizer=tok)
    cfg = MixConfig(ratios={"k600": "1", "x": "1"}, inputs={"k600": datasets["k600"], "x": third})
    with pytest.raises(ValueError, match="tokenizer: k600 has 'synthetic-positions' but x has 'other-dvae'"):
        build_mix(cfg, str(tmp_path / "m.json"), progress=False)


def test_source_without_a_single_clip_is_refused(datasets):
    with pytest.raises(ValueError, match=r"source k600 has no clip of 16 frames at stride 10 \(151 frames\).*longest run of consecutive frames is 150"):
        build_mix(_cfg(datasets, frames=16, stride=10), str(datasets["root"] / "m.json"), progress=False)
    with pytest.raises(ValueError, match="source imagenet has 40 train images, fewer than --images-per-seq 41"):
        build_mix(_cfg(datasets, images_per_seq=41), str(datasets["root"] / "m.json"), progress=False)


def test_config_validation_names_the_field(datasets):
    with pytest.raises(ValueError, match="frames=0"):
        _cfg(datasets, frames=0)
    with pytest.raises(ValueError, match="only in one of them"):
        MixConfig(ratios={"a": "1"}, inputs={"b": "x"})


def test_segments_split_at_missing_chunks(tmp_path):
    url = str(tmp_path / "gap")
    m = write_positional_dataset(url, [{"frames": 96}, {"frames": 40}], dataset="k600", chunk_frames=32)
    rows = read_row_table(url, m)
    # drop chunk 1 of video 0 from the table: its frames 32..63 are missing
    vids = rows.video_id.to_pylist()
    keep = [i for i in range(len(rows)) if not (vids[i] == "v00000" and rows.chunk[i] == 1)]
    t = split_table(rows.take(np.asarray(keep)), "train")
    assert t.segment.tolist() == [0, 1, 2, 2]
    assert t.video.tolist() == [0, 0, 1, 1] and t.videos == ["k600/v00000", "k600/v00001"]
    assert t.label.tolist() == [-1, -1, -1, -1] and t.labels == []
    units, slack, short = video_units(t, frames=4, stride=4, hop=8)  # span 13
    # segment 0 = frames 0..31 (1 row), segment 1 = 32..63 (chunk 2), segment 2 = video 1 (64..103)
    assert short == 0
    assert units.tolist() == [0, 8, 16, 32, 40, 48, 64, 72, 80, 88]
    # latest start in a segment = its end - 13; slack = min(hop - 1, latest - unit)
    assert slack.tolist() == [7, 7, 3, 7, 7, 3, 7, 7, 7, 3]
    for u, sl in zip(units, slack, strict=True):
        # the latest jittered start still ends inside the same segment
        seg_of = t.segment[np.searchsorted(t.cum, [u, u + sl + 12], side="right") - 1]
        assert seg_of[0] == seg_of[1]


def test_sequences_have_specials_length_and_frame_order(datasets):
    out = str(datasets["root"] / "mix.json")
    doc = build_mix(_cfg(datasets, jitter=False), out, progress=False)
    r = MixReader(out)
    ids = np.arange(120)  # several passes over both sources
    b = r.batch(ids)
    assert b["inputs"].shape == (120, 16) and b["inputs"].dtype == np.int32
    video = {s["name"]: s["kind"] == "video" for s in doc["sources"]}
    for i in range(120):
        seq = {k: b[k][i] for k in ("inputs", "targets", "frame_index")}
        assert seq["inputs"][0] == (512 if video[b["source"][i]] else 513)
        assert ((seq["inputs"][1:] < 512) | (seq["inputs"][1:] >= 514)).all()
        frames = _decode_sample(seq, 4)
        if video[b["source"][i]]:
            vids = {v for v, _ in frames}
            assert len(vids) == 1, "a clip crossed videos"
            nums = [f for _, f in frames]
            assert np.diff(nums).tolist() == [3, 3, 3]
            assert nums[0] % 12 == 0  # clip starts every hop=12 frames of its video
            label = {0: "walk", 1: "run", 3: "walk"}[vids.pop()]
            assert b["label"][i] == label
        else:
            assert len(frames) == 3 and all(f == 0 for _, f in frames)
            assert b["label"][i] == f"c{frames[0][0] % 4}"
    # shares of the prefix match the blend within one sample
    n_vid = sum(s == "k600" for s in b["source"])
    assert abs(n_vid - 0.7 * 120) < 1


def test_jitter_moves_clip_starts_each_pass_but_never_out_of_the_video(datasets):
    out = str(datasets["root"] / "mix.json")
    build_mix(_cfg(datasets, ratios={"k600": "1", "imagenet": "1"}), out, progress=False)
    r = MixReader(out)
    src, _ = r.locate(np.arange(400))
    vid_ids = np.arange(400)[src == 0][:100]  # 4 passes over the 25 clips
    b = r.batch(vid_ids)
    lengths = {0: 150, 1: 90, 3: 75}
    starts = []
    for i in range(100):
        fr = _decode_sample({k: b[k][i] for k in ("inputs", "targets", "frame_index")}, 4)
        (v,) = {x for x, _ in fr}
        nums = [f for _, f in fr]
        assert np.diff(nums).tolist() == [3, 3, 3] and nums[-1] < lengths[v]
        starts.append((v, nums[0]))
    for k in range(4):
        windows = {(v, f // 12) for v, f in starts[k * 25 : (k + 1) * 25]}
        assert len(windows) == 25  # each pass: one clip starting in each hop window [12k, 12k+11]
    assert len(set(starts)) > 40  # ... at a phase that changes from pass to pass


def test_every_clip_is_used_once_per_pass(datasets):
    out = str(datasets["root"] / "mix.json")
    build_mix(_cfg(datasets, ratios={"k600": "1", "imagenet": "1"}), out, progress=False)
    r = MixReader(out)
    src, local = r.locate(np.arange(200))
    vid_ids = np.arange(200)[src == 0][:25]  # first pass over the 25 clips
    b = r.batch(vid_ids)
    starts = {_decode_sample({k: b[k][i] for k in b if k not in ("source", "label", "sample_index")}, 4)[0]
              for i in range(25)}
    assert len(starts) == 25


def test_changed_input_is_refused(datasets):
    out = str(datasets["root"] / "mix.json")
    doc = build_mix(_cfg(datasets), out, progress=False)
    write_positional_dataset(datasets["imagenet"], [{"frames": 1, "number": i} for i in range(50)],
                             dataset="imagenet", rows_per_shard=16)
    new = read_manifest(datasets["imagenet"])["content_hash"]
    old = {s["name"]: s for s in doc["sources"]}["imagenet"]["manifest_hash"]
    with pytest.raises(ValueError) as e:
        MixReader(out)
    assert old in str(e.value) and new in str(e.value)


def test_corrupt_shard_is_caught_on_first_use(datasets):
    out = str(datasets["root"] / "mix.json")
    build_mix(_cfg(datasets), out, progress=False)
    m = read_manifest(datasets["k600"])
    path = os.path.join(datasets["k600"], m["shards"][0]["data_file"])
    data = bytearray(open(path, "rb").read())
    data[-100] ^= 0xFF
    open(path, "wb").write(bytes(data))
    r = MixReader(out)
    with pytest.raises(ValueError, match="sha256"):
        r.batch(np.arange(40))
    r = MixReader(out, verify="off")
    r.batch(np.arange(3))


def test_corrupt_index_file_is_caught(datasets):
    out = str(datasets["root"] / "mix.json")
    doc = build_mix(_cfg(datasets), out, progress=False)
    path = os.path.join(str(datasets["root"]), doc["index"]["dir"], "train.blend_local.npy")
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0x01
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="train.blend_local.npy is corrupt"):
        MixReader(out)


def test_reader_survives_pickling_for_spawned_workers(datasets):
    import pickle

    out = str(datasets["root"] / "mix.json")
    build_mix(_cfg(datasets), out, progress=False)
    r = MixReader(out)
    a = r.batch(np.arange(20))
    r2 = pickle.loads(pickle.dumps(r))
    b = r2.batch(np.arange(20))
    assert (a["inputs"] == b["inputs"]).all() and a["label"] == b["label"]
    assert len(pickle.dumps(r)) < 200_000  # memory maps and permutation tables are not shipped
    # ... nor the caches derived from them (per-row labels, the broadcast frame_index, the arenas)
    state = r.__getstate__()
    assert not {"_all_labels", "_rows_cache", "_fi_same", "_tab"} & set(state) and state["_direct"] == {}
    assert (b["frame_index"] == a["frame_index"]).all() and b["source"] == a["source"]


def test_webdataset_shards_read_through_the_shard_reader(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    vids = [{"frames": 64, "label": "x"}, {"frames": 40, "label": "y"}]
    write_positional_dataset(a, vids, dataset="k600", chunk_frames=16)
    write_positional_dataset(b, vids, dataset="k600", chunk_frames=16, format="webdataset")
    seqs = []
    for u in (a, b):
        cfg = MixConfig(ratios={"v": "1"}, inputs={"v": u}, frames=4, stride=2, seed=1)
        build_mix(cfg, u + ".mix.json", progress=False)
        seqs.append(MixReader(u + ".mix.json").batch(np.arange(10))["inputs"])
    assert (seqs[0] == seqs[1]).all()


def test_cli_mix_and_inspect(datasets):
    out = str(datasets["root"] / "cli.json")
    res = CliRunner().invoke(cli, ["mix", "--ratios", "k600=0.7,imagenet=0.3", "--inputs",
                                   f"k600={datasets['k600']},imagenet={datasets['imagenet']}", "--out", out,
                                   "--frames", "4", "--stride", "3", "--images-per-seq", "3"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["mix", "--inspect", out, "--budget-tokens", "1e6"])
    assert res.exit_code == 0, res.output
    assert "worst prefix error" in res.output and "k600" in res.output and "0.7000" in res.output
    res = CliRunner().invoke(cli, ["mix", "--ratios", "k600=1", "--inputs", "k600=/nonexistent", "--out", out])
    assert res.exit_code != 0
