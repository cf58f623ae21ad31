"""The tokenizer's precision through the job: chosen per device, recorded in job.json, the sidecars and
the manifest, and refused when a resume, a manifest or a mix would combine two precisions. The bf16
job runs on CPU under torch.autocast("cpu"), the branch a GPU actor takes by default."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import storage
from pipeline.decode import decode_item
from pipeline.jobs import JobError, TokenizeConfig, run_tokenize
from pipeline.jobs.ray_job import job_precision
from pipeline.mix.build import check_compatible
from pipeline.shards import ShardWriter, build_manifest, committed_shards, open_shard, read_manifest
from pipeline.sources import load_worklist
from pipeline.tokenizers import load_tokenizer

SMALL = dict(resolution=64, max_fps=10.0, chunk_frames=4, num_cpus=2, decode_cpus=0.5, tokenizer_cpus=1.0,
             batch_size=8, rows_per_batch=4, progress=False, items_per_shard=2)


def test_bf16_job_records_its_precision_and_refuses_to_mix(ray_local, tmp_path, make_layout, tok_spec):
    lay = make_layout("kinetics600", str(tmp_path / "data"))
    out_bf16, out_fp32 = str(tmp_path / "bf16"), str(tmp_path / "fp32")
    cfg = TokenizeConfig(dataset="kinetics600", input=lay["root"], output=out_bf16, tokenizer=tok_spec,
                         precision="bf16", **SMALL)
    run_tokenize(cfg)
    with open(f"{out_bf16}/job.json") as f:
        assert json.load(f)["tokenizer"]["precision"] == "bf16"
    sides = committed_shards(out_bf16)
    assert len(sides) == 2 and {s["tokenizer"]["precision"] for s in sides} == {"bf16"}
    assert read_manifest(out_bf16)["tokenizer"]["precision"] == "bf16"
    # The rows are what the tokenizer computes at bf16 on its own, whatever the job's batching.
    tok = load_tokenizer(tok_spec).to("cpu", "bf16")
    want = {rec["key"]: tok.encode(rec["frames"]) for item in load_worklist(storage.join(out_bf16, "worklist")).items
            for rec in decode_item(item, cfg.decode_config()) if rec["type"] != "error"}
    got = {}
    for s in sides:
        with open_shard(storage.join(out_bf16, s["data_file"]), verify=True) as r:
            got.update({row["key"]: row["tokens"] for row in r})
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)

    # Resuming into it at another precision (the CPU default, fp32) is refused with the fix.
    with pytest.raises(JobError, match="rerun with --precision bf16"):
        run_tokenize(TokenizeConfig(**{**cfg.__dict__, "precision": None}))

    # A second dataset at fp32 cannot be mixed with the bf16 one.
    run_tokenize(TokenizeConfig(**{**cfg.__dict__, "output": out_fp32, "precision": "fp32"}))
    assert read_manifest(out_fp32)["tokenizer"]["precision"] == "fp32"
    with pytest.raises(ValueError, match="tokenizer precision: a has 'bf16' but b has 'fp32'"):
        check_compatible({"a": read_manifest(out_bf16), "b": read_manifest(out_fp32)})
    check_compatible({"a": read_manifest(out_bf16), "b": read_manifest(out_bf16)})


def test_a_manifest_refuses_shards_of_two_precisions(tmp_path):
    tok = {"id": "t:x:" + "ab" * 32, "sha256": "ab" * 32, "vocab_size": 512, "downsample": 8}
    for sid, precision in ((0, "fp32"), (1, "bf16")):
        w = ShardWriter(str(tmp_path), sid, codebook_size=512, tokenizer={**tok, "precision": precision},
                        resolution=16, grid=(2, 2))
        side = w.commit(input_shard={"id": sid, "worklist_sha256": "f" * 64, "num_items": 0}, errors=[])
        assert side["tokenizer"]["precision"] == precision
    with pytest.raises(ValueError, match="precisions fp32 and bf16"):
        build_manifest(str(tmp_path))


def test_precision_batch_rows_and_decode_threads_defaults(ray_local, tmp_path):
    from pipeline.jobs import config
    from pipeline.tokenizers import VisualTokenizer
    from pipeline.tokenizers.numerics import PRECISIONS

    # config.py keeps torch out of the CLI's import path, so it repeats these two; they must agree.
    assert (config.PRECISIONS, config.GPU_MIN_FORWARD) == (PRECISIONS, VisualTokenizer.GPU_MIN_FORWARD)
    base = dict(dataset="kinetics600", input=str(tmp_path), output=str(tmp_path / "o"))
    cfg = TokenizeConfig(**base)
    assert (cfg.tokenizer_precision(gpu_actors=True), cfg.tokenizer_precision(gpu_actors=False)) == ("bf16", "fp32")
    assert TokenizeConfig(**base, precision="fp32").tokenizer_precision(gpu_actors=True) == "fp32"
    with pytest.raises(ValueError, match="tf32 runs on GPUs only"):
        TokenizeConfig(**base, precision="tf32").tokenizer_precision(gpu_actors=False)
    with pytest.raises(ValueError, match="TokenizeConfig.precision='fp16'"):
        TokenizeConfig(**base, precision="fp16")
    with pytest.raises(ValueError, match="TokenizeConfig.precision='tf32'"):
        TokenizeConfig(**base, precision="tf32", num_gpus=0)
    # The shared local Ray has no GPUs: CPU actors, fp32; tf32 is refused before any work.
    assert job_precision(cfg) == "fp32"
    with pytest.raises(ValueError, match="tf32"):
        job_precision(TokenizeConfig(**base, precision="tf32"))
    # A tokenizer-stage batch holds a forward pass of frames whatever rows_per_batch says; on GPUs
    # it holds 1 GiB of frames (many forward passes): few, large events for the driver.
    assert cfg.tokenizer_batch_rows(gpu_actors=False) == 16  # 16 rows of up to 64 frames ≥ 64 frames
    assert TokenizeConfig(**{**base, "dataset": "imagenet"}, batch_size=512).tokenizer_batch_rows(gpu_actors=False) == 512
    assert TokenizeConfig(**{**base, "dataset": "imagenet"}).tokenizer_batch_rows(gpu_actors=True) == 21845  # 128 px
    assert TokenizeConfig(**{**base, "dataset": "imagenet"}, resolution=256).tokenizer_batch_rows(gpu_actors=True) == 5461
    assert TokenizeConfig(**base, chunk_frames=8, rows_per_batch=4).tokenizer_batch_rows(gpu_actors=True) == 2731
    # Decode blocks: 256 MB of frames for GPU tokenizers, 32 MB for CPU ones, or --decode-block-mb.
    assert cfg.decode_block_bytes(gpu_actors=True) == 256 << 20 and cfg.decode_block_bytes(gpu_actors=False) == 32 << 20
    assert TokenizeConfig(**base, decode_block_mb=0.25).decode_block_bytes(gpu_actors=True) == 1 << 18
    with pytest.raises(ValueError, match="TokenizeConfig.decode_block_mb=0 is invalid"):
        TokenizeConfig(**base, decode_block_mb=0)
    # One FFmpeg thread per decode on a cluster (one decode actor per core); FFmpeg's choice embedded.
    assert cfg.decode_config().threads == 0
    assert TokenizeConfig(**base, ray_address="auto").decode_config().threads == 1
    assert TokenizeConfig(**base, ray_address="auto", decode_threads=4).decode_config().threads == 4


def test_the_cli_offers_the_three_precisions(tmp_path):
    from click.testing import CliRunner

    from pipeline.jobs.cli import tokenize_cmd

    res = CliRunner().invoke(tokenize_cmd, ["--dataset", "folder", "--input", str(tmp_path), "--output",
                                            str(tmp_path / "o"), "--precision", "fp16"])
    assert res.exit_code == 2 and "'fp16' is not one of 'fp32', 'tf32', 'bf16'" in res.output
    res = CliRunner().invoke(tokenize_cmd, ["--dataset", "folder", "--input", str(tmp_path), "--output",
                                            str(tmp_path / "o"), "--precision", "tf32", "--num-gpus", "0"])
    assert res.exit_code == 1 and "tf32 runs on GPUs only" in res.output
