"""bench/gpu.py end to end on CPU (`--device cpu`: tiny sizes), every section, JSON checked."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import pytest

from trainer.model import PRESETS, flops_per_token

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_device_check_runs_on_cpu_and_writes_sane_json(gpu_bench, tmp_path, ray_local):
    # No capsys: pipeline.jobs.ray_job binds sys.stderr as a default argument when first imported,
    # and capsys's per-test stream is closed after the test (later jobs would write to it).
    out = tmp_path / "gpu.json"
    gpu_bench.main(["--device", "cpu", "--compile", "off,on", "--compile-backend", "aot_eager",
                    "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["peak_flops_bf16"] > 0 and res["targets"]["data_wait_fraction"] == 0.01
    tok = res["tokenizer"]
    assert [(r["resolution"], r["precision"]) for r in tok["rows"]] == [(32, "fp32"), (32, "bf16")]
    assert [(r["resolution"], r["precision"]) for r in tok["skipped"]] == [(32, "tf32")]  # TF32 needs CUDA
    for r in tok["rows"]:
        assert r["frames_per_s"] > 0 and r["fraction_of_bf16_peak"] > 0 and r["deterministic"] is True
        assert r["speedup_vs_fp32"] > 0 and 0 <= r["agreement_with_fp32"] <= 1
    assert tok["rows"][0]["agreement_with_fp32"] == 1.0  # the baseline against itself
    assert tok["bf16_peak_tflops"] == pytest.approx(res["peak_flops_bf16"] / 1e12)
    steps = res["trainer"]
    assert [(r["preset"], r["compile"]) for r in steps] == [("tiny", False), ("tiny", True)]
    cfg = PRESETS["tiny"]
    for r in steps:
        assert r["tokens_per_step"] == 32 and r["tokens_per_s"] > 0
        n = r["params"] - cfg.vocab_size * cfg.dim  # the trainer's N: no input embedding
        assert r["flops_per_token"] == flops_per_token(cfg, 32, n)
        assert r["mfu"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / res["peak_flops_bf16"])
    job = res["job"]
    assert job["frames"] == job["tokenizer_frames"] > 0  # the tokenizer alone saw the job's frames
    assert job["job_tokens_per_s"] > 0 and job["ratio"] == pytest.approx(
        job["job_tokens_per_s"] / job["tokenizer_only_tokens_per_s"])
    lo = res["loader"]
    assert lo["steps"] == 10 and lo["seq_len"] == 256 and 0 <= lo["data_wait_fraction"] < 1
    assert lo["loader_host_s_per_step"] > 0 and lo["step_s_loader"] > 0 and lo["step_s_replay"] > 0
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        gpu_bench.print_table(res)
    table = buf.getvalue()
    assert "| 4 loader |" in table and "| 3 tokenize job |" in table and "MFU" in table
