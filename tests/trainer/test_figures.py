"""`toto-train curves` (Figure 2) and `toto-train position-loss` (Figure 10) end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from click.testing import CliRunner

from schemas import validate
from trainer.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from figure_fixtures import make_checkpoint, write_labelled  # noqa: E402


def _run(d: Path, losses: list[float], val: list[tuple[int, float]], *, batch: int, seq: int) -> str:
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"global_batch": batch, "seq_len": seq}))
    lines = []
    for step, loss in enumerate(losses, 1):
        rec = {"step": step, "loss": loss, "lr": 1e-3}
        if step != 2:  # line 2 lacks tokens_seen: counted from config.json
            rec["tokens_seen"] = step * batch * seq
        lines.append(json.dumps(rec))
    lines.append(json.dumps({"step": 3, "loss": losses[2], "tokens_seen": 3 * batch * seq}))  # step 3 logged twice
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if val:
        (d / "val.jsonl").write_text("".join(json.dumps({"step": s, "val_loss": v, "tokens_seen": s * batch * seq})
                                             + "\n" for s, v in val))
    return str(d)


def test_curves_of_several_runs(tmp_path):
    a = _run(tmp_path / "small", [5.0, 4.0, 3.5, 3.0], [(2, 4.2), (4, 3.1)], batch=2, seq=10)
    b = _run(tmp_path / "sweep" / "big", [5.0, 3.0, 2.5], [], batch=4, seq=10)
    r = CliRunner().invoke(main, ["curves", a, str(tmp_path / "sweep"), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "out" / "curves.json").read_text())
    validate(doc, "training_curves")
    small, big = doc["runs"]
    assert (small["run"], big["run"]) == ("small", "big") and big["path"] == b
    assert [(p["step"], p["tokens_seen"], p["loss"]) for p in small["train"]] == [
        (1, 20.0, 5.0), (2, 40.0, 4.0), (3, 60.0, 3.5), (4, 80.0, 3.0)]
    assert [(p["tokens_seen"], p["loss"]) for p in small["val"]] == [(40.0, 4.2), (80.0, 3.1)]
    assert [p["tokens_seen"] for p in big["train"]] == [40.0, 80.0, 120.0] and big["val"] == []
    assert (tmp_path / "out" / "curves.png").stat().st_size > 1000
    bad = CliRunner().invoke(main, ["curves", str(tmp_path / "nothing"), "--out", str(tmp_path / "o2")])
    assert bad.exit_code != 0 and "toto-train pretrain" in bad.output


def test_position_loss_on_videos_and_refuses_images(tmp_path):
    vid = write_labelled(str(tmp_path / "vid"), video=True, per_class=2, seed=3, frames=6)
    # 4 frames of 16 tokens: a clip is 1 + 64 = 65 tokens; the model reads 64 (its whole context).
    ckpt = make_checkpoint(str(tmp_path / "run"), n_layers=1, max_seq_len=64)
    out = tmp_path / "pos"
    r = CliRunner().invoke(main, ["position-loss", ckpt, "--data", vid, "--frames", "4", "--stride", "1",
                                  "--batch-size", "4", "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "position_loss.json").read_text())
    validate(doc, "clip_loss")
    assert doc["num_clips"] == 6 and len(doc["per_frame"]) == 4 and len(doc["per_position"]) == 64
    # The same numbers computed directly: cross-entropy of every clip's targets, averaged per frame.
    from trainer.checkpoint import load_model
    from trainer.data import iter_clips

    model, meta = load_model(ckpt)
    clips = list(iter_clips(vid, frames=4, stride=1, specials=meta["specials"], split="val"))
    tok = torch.stack([torch.as_tensor(c["tokens"]) for c in clips]).long()  # (6, 65)
    with torch.no_grad():
        ce = F.cross_entropy(model(tok[:, :-1]).transpose(1, 2), tok[:, 1:], reduction="none")  # (6, 64)
    per_frame = ce.mean(0).reshape(4, 16).mean(1)  # target t is frame t // 16: bos is never a target
    assert torch.allclose(torch.tensor(doc["per_frame"], dtype=torch.float64), per_frame.double(), atol=1e-5)
    assert (out / "position_loss.png").stat().st_size > 1000
    img = write_labelled(str(tmp_path / "img"), video=False, per_class=2, seed=0)
    bad = CliRunner().invoke(main, ["position-loss", ckpt, "--data", img, "--out", str(tmp_path / "p2")])
    assert bad.exit_code != 0 and "image dataset" in bad.output and "video token dataset" in bad.output
    too_long = CliRunner().invoke(main, ["position-loss", ckpt, "--data", vid, "--frames", "5", "--stride", "1",
                                         "--out", str(tmp_path / "p3")])
    assert too_long.exit_code != 0 and "fewer --frames" in too_long.output
