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


def test_status_refuses_a_sidecar_without_data_and_verify_clean_removes_it(tmp_path, rows):
    _dataset(tmp_path, rows)
    (tmp_path / "shard-000001.arrow").unlink()
    (tmp_path / ".shard-000003.tar.tmp-1-abcd").write_bytes(b"partial")
    runner = CliRunner()
    for cmd in (["status", str(tmp_path)], ["verify", str(tmp_path)]):
        res = runner.invoke(main, cmd)
        assert res.exit_code == 1 and "shard-000001.json names shard-000001.arrow, which is missing" in res.output
    res = runner.invoke(main, ["verify", str(tmp_path), "--clean"])
    assert res.exit_code == 0, res.output
    assert "1/1 shards OK" in res.output and "2 debris files removed" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.arrow", "shard-000000.json"]


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


def _frame_bytes_offset(path, tokens) -> int:
    """Where one frame's uint16 tokens lie in an uncompressed Arrow file (found by their bytes)."""
    data = path.read_bytes()
    needle = np.asarray(tokens, dtype=np.uint16).tobytes()
    at = data.find(needle)
    assert at > 0 and data.find(needle, at + 1) == -1
    return at


def test_verify_names_the_row_and_frame_of_a_flipped_byte_and_says_which_checks_ran(tmp_path, rows):
    _dataset(tmp_path, rows)
    res = CliRunner().invoke(main, ["verify", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "checks: whole-file sha256 on 2 shards; per-frame checksums (mul32) on 2 shards" in res.output
    # Shard 1 holds rows[6:] in key order: its row 2 is rows[8], of 3 frames.
    target = rows[8]
    assert target["num_frames"] == 3
    p = tmp_path / "shard-000001.arrow"
    at = _frame_bytes_offset(p, target["tokens"][2])  # frame 2 of that row
    b = bytearray(p.read_bytes())
    b[at + 5] ^= 0x10
    p.write_bytes(bytes(b))
    res = CliRunner().invoke(main, ["verify", str(tmp_path)])
    assert res.exit_code == 1
    bad = [line for line in res.output.splitlines() if line.startswith("BAD")]
    assert len(bad) == 2, res.output
    assert all("shard-000001.arrow" in line for line in bad)
    assert "sha256 mismatch" in bad[0]
    assert bad[1].endswith(f"row 2 ({target['key']}): frame 2 fails its mul32 checksum")
    assert "1/2 shards OK" in res.output


def test_verify_of_shards_without_frame_checksums_says_sha256_only(tmp_path, rows):
    from pipeline import storage

    _dataset(tmp_path, rows)
    side_url = str(tmp_path / "shard-000000.json")
    side = storage.read_json(side_url, "shard_sidecar")
    side.pop("checksums")  # a sidecar written before format 2 (the file's extra column is then unchecked)
    storage.write_json(side_url, side, "shard_sidecar")
    res = CliRunner().invoke(main, ["verify", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert ("checks: whole-file sha256 on 2 shards; per-frame checksums (mul32) on 1 shards "
            "(1 shards predate them: sha256 only)") in res.output


def test_status_lists_once_and_reads_each_sidecar_once(tmp_path, rows, monkeypatch):
    from pipeline import storage

    _dataset(tmp_path, rows)
    reads: list[str] = []
    lists: list[str] = []
    real_many, real_one, real_ls = storage.read_json_many, storage.read_json, storage.listdir

    def many(urls, kind, so=None, **kw):
        reads.extend(u for u in urls if kind == "shard_sidecar")
        return real_many(urls, kind, so, **kw)

    def one(url, kind, so=None):
        if kind == "shard_sidecar":
            reads.append(url)
        return real_one(url, kind, so)

    def ls(url, so=None):
        lists.append(url)
        return real_ls(url, so)

    monkeypatch.setattr(storage, "read_json_many", many)
    monkeypatch.setattr(storage, "read_json", one)
    monkeypatch.setattr(storage, "listdir", ls)
    res = CliRunner().invoke(main, ["status", str(tmp_path), "--json", "--rebuild-manifest"])
    assert res.exit_code == 0, res.output
    assert sorted(storage.basename(u) for u in reads) == ["shard-000000.json", "shard-000001.json"]
    assert len(lists) == 1
    st = json.loads(res.output)
    assert st["manifest"] is True and st["shards_committed"] == 2 and st["debris"] == 0
    reads.clear()
    lists.clear()
    res = CliRunner().invoke(main, ["verify", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert len(reads) == 2 and len(lists) == 1
