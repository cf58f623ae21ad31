"""n-gram statistics (Figure 3): exact counts on known frames, hashed counts against exact ones,
and `toto-pipeline inspect --plot` over two tokenizers' datasets."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.shards import ShardWriter, write_manifest
from pipeline.shards.ngrams import NgramCounter
from schemas import validate


def test_exact_counts_within_frames():
    c = NgramCounter(2)
    c.add(np.array([[0, 1, 0, 1], [1, 1, 1, 1]]))
    assert c.counts[1].tolist() == [2, 6]
    # Bigram id a*V+b: (0,1)=1 twice, (1,0)=2 once, (1,1)=3 three times; none crosses the frame boundary.
    assert c.counts[2].tolist() == [0, 2, 1, 3]
    assert c.counts[3][0b010] == 1 and c.counts[3][0b101] == 1 and c.counts[3][0b111] == 2 and c.counts[3].sum() == 4
    s = c.summary()
    assert s["2"]["distinct"] == 3 and s["2"]["coverage"] == 0.75 and s["2"]["total"] == 6
    assert s["2"]["ngrams_for_90pct"] == 3  # 3/6, 5/6 < 0.9, then 6/6
    assert s["1"]["entropy_bits"] == pytest.approx(-(0.25 * np.log2(0.25) + 0.75 * np.log2(0.75)))
    assert s["3"]["rank"] == [1, 2, 3] and s["3"]["frequency"] == [0.5, 0.25, 0.25]
    with pytest.raises(ValueError, match="outside the codebook"):
        c.add(np.array([[0, 2]]))


def test_hashed_counts_agree_with_exact_ones():
    rng = np.random.default_rng(0)
    # 300 distinct 4-token frames over V=64 drawn Zipf-like (as visual tokens are): trigrams are hashed
    # into 2^14 counters (V^3 = 2^18).
    vocab = rng.integers(0, 64, size=(300, 4))
    p = 1.0 / np.arange(1, 301) ** 1.2
    frames = vocab[rng.choice(300, size=5000, p=p / p.sum())]
    hashed, exact = NgramCounter(64, buckets=1 << 14), NgramCounter(64, buckets=1 << 18)
    hashed.add(frames)
    exact.add(frames)
    assert not hashed.exact[3] and exact.exact[3] and hashed.exact[2]
    h, e = hashed.summary(), exact.summary()
    assert h["3"]["total"] == e["3"]["total"] == 5000 * 2
    assert h["3"]["distinct"] == pytest.approx(e["3"]["distinct"], rel=0.02)  # linear counting
    # The head of the curve: frequent n-grams dominate their counters (a collision adds a rare one's count).
    assert h["3"]["frequency"][:5] == pytest.approx(e["3"]["frequency"][:5], rel=0.05)
    assert h["2"] == e["2"]


def _dataset(out, tok_id: str, codes: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    tok = {"id": tok_id, "sha256": "ab" * 32, "vocab_size": 256, "downsample": 8}
    for sid in range(2):
        w = ShardWriter(str(out), sid, codebook_size=256, tokenizer=tok, resolution=32)
        for i in range(4):
            vid = f"v{sid}{i}"
            w.add({"key": f"d/{vid}/00000", "dataset": "d", "split": "train", "video_id": vid, "chunk": 0,
                   "t_start": 0.0, "fps": 30.0, "num_frames": 3, "grid_h": 4, "grid_w": 4, "label": None,
                   "tokens": rng.integers(0, codes, size=(3, 4, 4)).astype(np.uint16)})
        w.commit(input_shard={"id": sid, "worklist_sha256": "x", "num_items": 4}, errors=[])
    write_manifest(str(out))
    return str(out)


def test_inspect_plot_two_tokenizers(tmp_path, monkeypatch):
    from pipeline.shards import store

    a = _dataset(tmp_path / "a", "tok-a", codes=16, seed=0)
    b = _dataset(tmp_path / "b", "tok-b", codes=256, seed=1)
    plain = CliRunner().invoke(main, ["inspect", a, "--json"])
    png = tmp_path / "fig" / "ngrams.png"
    opened = []
    real_init = store.ShardReader.__init__
    monkeypatch.setattr(store.ShardReader, "__init__", lambda self, url, *a, **k: (opened.append(url),
                                                                                   real_init(self, url, *a, **k))[1])
    res = CliRunner().invoke(main, ["inspect", a, "--with", b, "--plot", str(png), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output[res.output.index("{"):])
    assert len(opened) == len(set(opened)) == 4  # each dataset's 2 shards read once: statistics and n-grams together
    assert info == json.loads(plain.output[plain.output.index("{"):])  # the same statistics as without --plot
    doc = json.loads(png.with_suffix(".json").read_text())
    validate(doc, "ngram_stats")
    da, db = doc["datasets"]
    assert (da["label"], db["label"]) == ("tok-a", "tok-b")
    assert da["ngrams"]["1"]["coverage"] == info["coverage"] == 16 / 256  # as inspect's unigram statistics
    assert da["ngrams"]["1"]["total"] == 2 * 4 * 3 * 16 and da["ngrams"]["2"]["total"] == 2 * 4 * 3 * 15
    assert da["ngrams"]["2"]["possible"] == 256**2 and db["ngrams"]["1"]["coverage"] > da["ngrams"]["1"]["coverage"]
    assert png.stat().st_size > 1000
