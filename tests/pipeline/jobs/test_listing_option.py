"""`tokenize --listing PATH`: a generated listing file replaces the storage LIST of --input."""

from __future__ import annotations

import json

from click.testing import CliRunner

from pipeline.cli import main
from pipeline.jobs import TokenizeConfig, prepare


def test_help_explains_the_listing_option():
    res = CliRunner().invoke(main, ["tokenize", "--help"])
    assert res.exit_code == 0
    assert "--listing PATH" in res.output and "S3 Inventory" in res.output


def test_listing_file_decides_the_work_list(tmp_path, make_layout, tok_spec):
    lay = make_layout("folder", str(tmp_path / "data"))
    listing = tmp_path / "files.txt"
    listing.write_text("clips/good1.mp4\nstill.png\n")  # 2 of the 5 files under the root
    cfg = TokenizeConfig(dataset="folder", input=lay["root"], output=str(tmp_path / "out"), tokenizer=tok_spec,
                         resolution=64, listing=str(listing), progress=False)
    plan = prepare(cfg)
    assert plan.num_items == 2
    uris = sorted(plan.shards[0].table.column("uri").to_pylist())
    assert [u[len(lay["root"]):].lstrip("/") for u in uris] == ["clips/good1.mp4", "still.png"]
    doc = json.loads((tmp_path / "out" / "worklist" / "worklist.json").read_text())
    assert doc["options"]["listing"] == str(listing)


def test_bad_listing_from_the_cli_names_the_file_and_line(tmp_path, make_layout, tok_spec):
    lay = make_layout("folder", str(tmp_path / "data"))
    listing = tmp_path / "bad.txt"
    listing.write_text("still.png\n../escape.mp4\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["tokenize", "--dataset", "folder", "--input", lay["root"], "--output", str(out),
                                    "--tokenizer", tok_spec, "--resolution", "64", "--num-gpus", "0",
                                    "--listing", str(listing), "--no-progress"])
    assert res.exit_code == 1, res.output
    assert f"{listing}:2" in res.output and "not a plain path" in res.output
    assert not (out / "job.json").exists() and not (out / "worklist" / "worklist.json").exists()
