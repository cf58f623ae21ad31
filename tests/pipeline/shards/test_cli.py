import json

import numpy as np
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.shards import ShardWriter

TOK = {"id": "test-tokenizer", "sha256": "ab" * 32, "vocab_size": 8192, "downsample": 8}


def _dataset(out, rows, codebook=8192):
    for sid, part in enumerate((rows[:6], rows[6:])):
        w = ShardWriter(str(out), sid, codebook_size=codebook, tokenizer=TOK, resolution=32)
        for r in part:
            w.add(r)
        w.commit(input_shard={"id": sid, "worklist_sha256": "x", "num_items": 7},
                 errors=[{"uri": f"v{sid}.mp4", "reason": "truncated"}, {"uri": "z.mp4", "reason": "decoder error: bad"}])


def test_status_reports_counts_and_errors_by_reason(tmp_path, rows):
    _dataset(tmp_path, rows)
    res = CliRunner().invoke(main, ["status", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    st = json.loads(res.output)
    assert st["shards_committed"] == 2 and st["rows"] == len(rows)
    assert st["frames"] == sum(r["num_frames"] for r in rows)
    assert st["tokens"] == sum(r["tokens"].size for r in rows)
    assert st["errors_by_reason"] == {"decoder error": 2, "truncated": 2}
    assert st["bytes_per_token"] == st["bytes"] / st["tokens"] > 2.0  # uint16 plus framing
    res = CliRunner().invoke(main, ["status", str(tmp_path)])
    assert "shards committed" in res.output and "truncated" in res.output


def test_verify_passes_then_names_the_bad_shard(tmp_path, rows):
    _dataset(tmp_path, rows)
    runner = CliRunner()
    res = runner.invoke(main, ["verify", str(tmp_path)])
    assert res.exit_code == 0 and "2/2 shards OK" in res.output
    p = tmp_path / "shard-000001.arrow"
    b = bytearray(p.read_bytes())
    b[100] ^= 0xFF
    p.write_bytes(bytes(b))
    res = runner.invoke(main, ["verify", str(tmp_path)])
    assert res.exit_code == 1
    assert "shard-000001.arrow" in res.output and "sha256 mismatch" in res.output
    assert "shard-000000" not in res.output.split("BAD")[-1]


def test_inspect_reports_coverage_and_entropy(tmp_path, rows):
    # tokens drawn uniformly from 4 codes: coverage 4/16, entropy ≈ 2 bits
    rng = np.random.default_rng(0)
    for r in rows:
        r["tokens"] = rng.integers(0, 4, size=r["tokens"].shape)
    _dataset(tmp_path, rows, codebook=16)
    res = CliRunner().invoke(main, ["inspect", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["coverage"] == 0.25 and abs(info["entropy_bits"] - 2.0) < 0.05 and info["max_entropy_bits"] == 4.0
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "shard-000000.arrow"), "--json"])
    assert json.loads(res.output)["rows"] == 6


def test_reason_kind_keeps_the_words_before_any_detail():
    from pipeline.shards import reason_kind

    assert reason_kind("decoder error: Invalid data found") == "decoder error"
    assert reason_kind("no video stream (streams: audio)") == "no video stream"
    assert reason_kind("truncated") == "truncated"


def test_empty_shard_records_the_given_grid(tmp_path):
    w = ShardWriter(str(tmp_path), 0, codebook_size=16, tokenizer=TOK, resolution=32, grid=(4, 4))
    side = w.commit(input_shard={"id": 0, "worklist_sha256": "x", "num_items": 1},
                    errors=[{"uri": "a.mp4", "reason": "zero bytes"}])
    assert side["grid"] == [4, 4] and side["counts"]["rows"] == 0
