import json
import os

import pytest
import torch

from schemas import validate
from trainer.evals.features import extract_features
from trainer.evals.probes import ProbeConfig
from trainer.evals.sweep import best_layer, layer_sweep, write_sweep


def _clips(n: int, seed: int, bos: int = 39):
    """Sequences [bos, 6 visual tokens]; the class decides which token range appears."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    body = torch.randint(0, 10, (n, 6), generator=g) + 10 * labels[:, None]  # class 0: 0..9, class 1: 10..19
    tokens = torch.cat([torch.full((n, 1), bos), body], dim=1)  # (N, 7)
    frame_index = torch.cat([torch.full((n, 1), -1), torch.zeros(n, 6, dtype=torch.long)], dim=1)
    return tokens, frame_index, labels


def test_extract_features_keeps_visual_positions(toy_backbone):
    tokens, fi, _ = _clips(5, 0)
    feats = extract_features(toy_backbone, tokens, fi, [1, 3], batch_size=2)
    assert set(feats) == {1, 3}
    assert feats[1].shape == (5, 6, 8) and feats[1].dtype == torch.float16
    expected = toy_backbone.emb[tokens[:, 1:]] * 3 + 0.03
    torch.testing.assert_close(feats[3].float(), expected.detach(), atol=1e-2, rtol=1e-2)
    pooled = extract_features(toy_backbone, tokens, fi, [1], pool_tokens=3)
    assert pooled[1].shape == (5, 2, 8)
    with pytest.raises(ValueError, match="pool_tokens"):
        extract_features(toy_backbone, tokens, fi, [1], pool_tokens=4)


def test_sweep_covers_every_layer_and_writes_json_and_png(toy_backbone, tmp_path):
    n_layers = toy_backbone.cfg.n_layers
    layers = list(range(1, n_layers + 1))
    tr_tok, tr_fi, tr_y = _clips(64, 1)
    va_tok, va_fi, va_y = _clips(32, 2)
    tr = extract_features(toy_backbone, tr_tok, tr_fi, layers)
    va = extract_features(toy_backbone, va_tok, va_fi, layers)
    cfg = ProbeConfig(epochs=8, batch_size=16, lr=1e-2, num_heads=2)
    doc = layer_sweep(tr, va, tr_y, va_y, ["low", "high"], n_layers=n_layers, poolings=["attention", "average"],
                      cfg=cfg, task="toy")
    assert sorted({r["layer"] for r in doc["results"]}) == layers
    assert len(doc["results"]) == 2 * n_layers
    assert [r["relative_depth"] for r in doc["results"] if r["pooling"] == "average"] == [0.25, 0.5, 0.75, 1.0]
    assert all(r["top1"] == 100.0 for r in doc["results"])  # separable at every layer
    assert doc["best"]["average"]["layer"] == 1  # ties go to the shallower layer
    json_path, png_path = write_sweep(doc, str(tmp_path))
    validate(json.loads(open(json_path).read()), "probe_sweep")
    assert os.path.getsize(png_path) > 1000


def test_best_layer_picks_highest_top1():
    rows = [
        {"layer": 1, "relative_depth": 0.25, "pooling": "attention", "top1": 40.0},
        {"layer": 2, "relative_depth": 0.5, "pooling": "attention", "top1": 70.0},
        {"layer": 4, "relative_depth": 1.0, "pooling": "attention", "top1": 55.0},
    ]
    assert best_layer(rows, "attention") == {"layer": 2, "relative_depth": 0.5, "top1": 70.0}
