"""The read side: one address range over all shards (FileArena), clip gathers, jitter tables."""

import gc
import os

import numpy as np
import pytest

from pipeline.mix import MixConfig, MixReader, arena, build_mix
from pipeline.mix.arena import FileArena
from pipeline.mix.synthetic import write_positional_dataset
from pipeline.shards import read_manifest

from .conftest import VIDEOS

needs_arena = pytest.mark.skipif(not arena.supported(), reason="FileArena needs 64-bit Linux or macOS")


def _cfg(d, **kw):
    base = dict(ratios={"k600": "0.7", "imagenet": "0.3"}, inputs={"k600": d["k600"], "imagenet": d["imagenet"]},
                frames=4, stride=3, images_per_seq=3, seed=5)
    base.update(kw)
    return MixConfig(**base)


@needs_arena
def test_arena_lays_files_end_to_end_on_page_boundaries(tmp_path):
    rng = np.random.default_rng(0)
    sizes = [5000, 0, 8192, 3]  # bytes: mid-page, empty, exactly two pages, an odd byte count
    paths, data = [], []
    for k, n in enumerate(sizes):
        b = rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()
        p = tmp_path / f"f{k}.bin"
        p.write_bytes(b)
        paths.append(str(p))
        data.append(np.frombuffer(b[: n - n % 2], dtype=np.uint16))
    a = FileArena(paths)
    assert a.base.tolist() == [0, 4096, 4096, 8192]  # uint16 elements: files start on 8192-byte pages
    assert a.elements.tolist() == [2500, 0, 4096, 1]
    for k in range(len(paths)):
        assert np.array_equal(a.u16[a.base[k] : a.base[k] + a.elements[k]], data[k])
    assert not a.u16.flags.writeable
    view = a.u16[a.base[2] : a.base[2] + 10]
    del a
    gc.collect()
    assert np.array_equal(view, data[2][:10])  # a view keeps the files mapped


@needs_arena
def test_arena_refuses_ranges_outside_their_file(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(bytes(100))
    a = FileArena([str(p), str(p)])
    a.check_extents(np.array([0, 1]), np.array([0, 40]), np.array([50, 10]))
    with pytest.raises(ValueError, match=r"1 token ranges lie outside.*file 1, elements \[45, 55\) of 50"):
        a.check_extents(np.array([0, 1]), np.array([0, 45]), np.array([50, 10]))
    with pytest.raises(ValueError, match="outside their data file"):
        a.check_extents(np.array([0]), np.array([-1]), np.array([2]))


@needs_arena
def test_arena_path_equals_the_per_shard_path(datasets, monkeypatch):
    """Clips inside one run come out of one strided gather, clips across a record batch or shard
    boundary frame by frame; both must equal reading every frame through the shard files."""
    out = str(datasets["root"] / "mix.json")
    build_mix(_cfg(datasets), out, progress=False)
    ids = np.arange(600)
    fast = MixReader(out)
    got = [fast.batch(ids[k : k + 40]) for k in range(0, len(ids), 40)]
    d = fast._direct[0]
    assert d is not None and fast._direct[1] is not None
    # The fixture's 32-frame chunks sit 3 to a shard, 4 to a record batch: some clips cross.
    starts = np.concatenate([s for k in range(0, len(ids), 40) for si, _, s in fast._sample_starts(ids[k : k + 40]) if si == 0])
    q0 = np.searchsorted(d.run_cum, starts, side="right")
    q1 = np.searchsorted(d.run_cum, starts + 9, side="right")
    assert 0 < (q0 != q1).sum() < len(starts)

    monkeypatch.setattr(arena, "supported", lambda: False)
    slow = MixReader(out)
    for k, b in zip(range(0, len(ids), 40), got, strict=True):
        ref = slow.batch(ids[k : k + 40])
        for key in ("inputs", "targets", "frame_index", "sample_index"):
            assert np.array_equal(b[key], ref[key]), key
        assert b["source"] == ref["source"] and b["label"] == ref["label"]
    assert slow._direct == {0: None, 1: None}


@needs_arena
def test_truncated_shard_is_refused_instead_of_read(datasets):
    out = str(datasets["root"] / "mix.json")
    build_mix(_cfg(datasets), out, progress=False)
    m = read_manifest(datasets["k600"])
    path = os.path.join(datasets["k600"], m["shards"][0]["data_file"])
    os.truncate(path, os.path.getsize(path) // 3)
    r = MixReader(out, verify="off")
    with pytest.raises(ValueError, match="outside their data file"):
        r.batch(np.arange(40))


def test_jitter_tables_equal_hashing_each_clip(datasets):
    out = str(datasets["root"] / "mix.json")
    build_mix(_cfg(datasets), out, progress=False)
    r = MixReader(out)
    n = r._orders[0].n
    uid = np.tile(np.arange(n, dtype=np.int64), 3)
    epoch = np.repeat(np.arange(3, dtype=np.int64), n)  # one call spanning three passes
    table = r._jitter(0, epoch, uid)
    direct = np.concatenate([r._jitter_of(0, e, np.arange(n, dtype=np.int64)) for e in range(3)])
    assert np.array_equal(table, direct)
    assert sorted(r._jitter_tables[0].epochs()) == [0, 1, 2]
    slack = np.asarray(r._tab[0]["slack"])
    assert (table >= 0).all() and (table <= np.tile(slack, 3)).all() and table.max() > 0
    assert r._src[1]["kind"] == "image" and r._jitter_tables[1] is None  # images are not jittered


@needs_arena
def test_a_source_that_cannot_be_mapped_falls_back_to_per_shard_maps(datasets, monkeypatch):
    out = str(datasets["root"] / "mix.json")
    build_mix(_cfg(datasets), out, progress=False)
    ref = MixReader(out).batch(np.arange(50))

    def no_room(self, paths):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(FileArena, "__init__", no_room)
    r = MixReader(out)
    with pytest.warns(UserWarning, match="one memory map per shard instead"):
        got = r.batch(np.arange(50))
    assert r._direct == {0: None, 1: None}
    assert np.array_equal(got["inputs"], ref["inputs"]) and got["label"] == ref["label"]


@needs_arena
def test_an_index_that_asks_for_frames_past_the_split_is_refused(datasets):
    out = str(datasets["root"] / "mix.json")
    build_mix(_cfg(datasets), out, progress=False)
    r = MixReader(out, verify="off")
    tab = dict(r._tab[0])
    tab["units"] = np.asarray(tab["units"]).copy()
    tab["units"][3] = int(tab["cum"][-1])  # one clip starting past the last frame of the split
    r._tab[0] = tab
    with pytest.raises(ValueError, match="frames outside the split"):
        r.batch(np.arange(10))


@needs_arena
def test_clip_and_frame_gathers_equal_the_per_shard_reads_across_boundaries(datasets):
    """The arena's gathers (whole clips as strided windows, clips that cross a record batch or a
    shard frame by frame, image frames located by row) against the per-shard reads of the same
    frames (TokenStore.gather), written into int32 rows (the sequence buffer's type) given in any order."""
    # 16-frame chunks, 2 to a record batch, 5 to a shard: clips cross both kinds of boundary.
    vid = str(datasets["root"] / "k600_rb")
    write_positional_dataset(vid, VIDEOS, dataset="k600", chunk_frames=16, rows_per_shard=5, row_group_size=2)
    out = str(datasets["root"] / "mix.json")
    build_mix(_cfg({**datasets, "k600": vid}), out, progress=False)
    r = MixReader(out)
    d, store, tab = r._direct_access(0), r._stores[0], r._tab[0]
    frames, stride = r.manifest["frames"], r.manifest["stride"]
    span = (frames - 1) * stride
    first = np.arange(int(tab["cum"][-1]) - span, dtype=np.int64)  # every clip the split holds
    # Where each clip's first and last frame lie: some clips cross a record batch, some a shard,
    # most neither.
    q0 = np.searchsorted(d.run_cum, first, side="right") - 1
    q1 = np.searchsorted(d.run_cum, first + span, side="right") - 1
    cross_shard = d.run_shard[q0] != d.run_shard[q1]
    cross_batch = (q0 != q1) & ~cross_shard
    assert cross_shard.sum() > 0 and cross_batch.sum() > 0 and (q0 == q1).sum() > len(first) // 2
    ref = store.gather(tab, first[:, None] + stride * np.arange(frames))[0]  # uint16 [m, F, HW]
    assert np.array_equal(d.clips(first), ref)
    rng = np.random.default_rng(0)
    for pick in (np.arange(len(first)), np.flatnonzero(q0 == q1), np.flatnonzero(q0 != q1),
                 rng.choice(len(first), 40, replace=False)):
        rows = rng.permutation(len(pick) + 3)[: len(pick)]  # destination rows in any order, some left out
        body = np.full((len(pick) + 3, frames, r.hw), -7, dtype=np.int32)
        d.clips_into(body, rows, first[pick])
        assert body.dtype == np.int32 and np.array_equal(body[rows], ref[pick])
        assert (np.delete(body, rows, axis=0) == -7).all()
    di = r._direct_access(1)
    assert di._rows is not None  # images: one frame per row, located by row, not by run
    img = rng.integers(0, int(r._tab[1]["cum"][-1]), size=(12, 3))
    assert np.array_equal(di.frames(img), r._stores[1].gather(r._tab[1], img)[0])


@needs_arena
def test_batches_of_unsorted_ids_over_many_passes_equal_the_per_shard_path(datasets, monkeypatch):
    # One batch spanning several passes of each source (and ids past the indexed samples, taken
    # by formula) must equal the same ids read through the per-shard files.
    out = str(datasets["root"] / "mix.json")
    build_mix(_cfg(datasets), out, progress=False)
    fast = MixReader(out)
    n = fast.num_samples
    ids = np.random.default_rng(1).permutation(np.r_[np.arange(0, 4 * n, 7), [n + 3, 10**7]])
    got = fast.batch(ids)
    monkeypatch.setattr(arena, "supported", lambda: False)
    ref = MixReader(out).batch(ids)
    for key in ("inputs", "targets", "frame_index", "sample_index"):
        assert np.array_equal(got[key], ref[key]), key
    assert got["source"] == ref["source"] and got["label"] == ref["label"]
    with pytest.raises(ValueError, match="sample ids must be ≥ 0"):
        fast.batch(np.array([3, -1]))
