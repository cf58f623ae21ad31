"""`toto-pipeline tokenize --tokenizer patch:8` writes a pixel dataset through the same job, writer and
sidecars as a token dataset: its rows are the decoded frames' 8x8 patches under the work list's keys
(the ones a dVAE job on the same input writes: test_tokenize_job checks those against the same decode)."""

from __future__ import annotations

import numpy as np

from pipeline import storage
from pipeline.decode import decode_item
from pipeline.jobs import TokenizeConfig, run_tokenize
from pipeline.shards import committed_shards, open_shard, read_manifest, verify_shard
from pipeline.sources import load_worklist
from pipeline.tokenizers.patch import patchify

SMALL = dict(resolution=64, max_fps=10.0, chunk_frames=4, num_cpus=2, decode_cpus=0.5, tokenizer_cpus=1.0,
             batch_size=8, rows_per_batch=4, progress=False, items_per_shard=1, limit=2)


def _rows(out: str) -> dict[str, np.ndarray]:
    rows = {}
    for side in committed_shards(out):
        with open_shard(storage.join(out, side["data_file"]), verify=True) as r:
            rows.update({row["key"]: row["tokens"] for row in r})
    return rows


def test_patch_job_writes_the_frames_patches(ray_local, tmp_path, make_layout):
    lay = make_layout("kinetics600", str(tmp_path / "data"))
    px_out = str(tmp_path / "px")
    cfg = TokenizeConfig(dataset="kinetics600", input=lay["root"], output=px_out, tokenizer="patch:8", **SMALL)
    run_tokenize(cfg)
    px = _rows(px_out)
    want = {rec["key"]: rec["frames"] for item in load_worklist(storage.join(px_out, "worklist")).items[: cfg.limit]
            for rec in decode_item(item, cfg.decode_config()) if rec["type"] == "chunk"}
    for k, frames in want.items():
        assert px[k].shape == (len(frames), 8, 8 * 192)
        np.testing.assert_array_equal(px[k].reshape(len(frames), 8, 8, 192), patchify(frames, 8), err_msg=k)
    man = read_manifest(px_out)
    assert man["grid"] == [8, 8 * 192] and man["tokenizer"]["values_per_token"] == 192
    assert sorted(px) == sorted(want) and len(px) >= 2
    assert man["tokenizer"]["precision"] == "fp32" and man["resolution"] == 64
    assert all(verify_shard(px_out, s) == [] for s in committed_shards(px_out))
