import json
import os

import numpy as np
import pytest

from schemas import validate
from trainer.evals.scaling import (
    fit_power_law,
    frontier,
    plot_scaling,
    power_law_with_ci,
    read_run_points,
    scaling_study,
)


def _write_run(path, rows):
    os.makedirs(path)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_fit_recovers_known_law():
    c = np.geomspace(1e15, 1e20, 12)
    a, b, r2 = fit_power_law(c, 7.32 * c**-0.0378)
    assert a == pytest.approx(7.32, rel=1e-9) and b == pytest.approx(-0.0378, rel=1e-9) and r2 == pytest.approx(1.0)
    assert power_law_with_ci(c, 7.32 * c**-0.0378)["b_se"] == pytest.approx(0.0, abs=1e-9)
    # Noise of 1% in the loss: the slope's standard error is the textbook sigma / sqrt(Sxx) in log space.
    noise = np.where(np.arange(12) % 2, 1.01, 1 / 1.01)
    x = np.log(c)
    resid = np.log(noise) - np.polyval(np.polyfit(x, np.log(noise), 1), x)
    want = np.sqrt((resid**2).sum() / 10 / ((x - x.mean()) ** 2).sum())
    assert power_law_with_ci(c, 7.32 * c**-0.0378 * noise)["b_se"] == pytest.approx(want, rel=1e-6) and want > 0
    assert power_law_with_ci(c[:2], c[:2] ** -0.1)["b_se"] is None


def test_frontier_keeps_lower_envelope_and_study_fits_it(tmp_path):
    a, b = 5.0, -0.05
    # Three model sizes: each run's curve meets the law at its compute-optimal point and sits above it
    # elsewhere (too small a model plateaus, too large a model is not trained enough yet).
    runs = []
    for i, opt in enumerate([1e16, 1e17, 1e18]):
        rows = []
        for c in np.geomspace(opt / 30, opt * 30, 9):
            gap = 0.02 * abs(np.log10(c / opt))  # 0 exactly at the run's optimum
            rows.append({"step": len(rows), "train_loss": 9.9, "macs": float(c), "val_loss": float(a * c**b + gap)})
            rows.append({"step": len(rows), "train_loss": 9.9})  # lines without val_loss are skipped
        d = str(tmp_path / f"run{i}")
        _write_run(d, rows)
        runs.append(d)
    points = read_run_points(runs[0])
    assert len(points) == 9 and points[0]["run"] == "run0"
    doc = scaling_study(runs)
    validate(doc, "scaling_fit")
    front = doc["frontier"]
    assert all(x["loss"] > y["loss"] for x, y in zip(front, front[1:], strict=False))  # strictly decreasing
    assert all(x["macs"] < y["macs"] for x, y in zip(front, front[1:], strict=False))
    # The three optima are on the frontier, and the fit through the frontier is close to the law.
    for opt in (1e16, 1e17, 1e18):
        assert any(p["macs"] == pytest.approx(opt) for p in front)
    assert doc["fit"]["b"] == pytest.approx(b, abs=0.01)
    assert doc["paper"] == {"a": 7.32, "b": -0.0378}
    png = plot_scaling(doc, str(tmp_path / "scaling.png"))
    assert os.path.getsize(png) > 1000


def test_flops_converted_to_macs_and_errors(tmp_path):
    _write_run(str(tmp_path / "r"), [{"step": 1, "flops": 4e12, "val_loss": 6.0}])
    assert read_run_points(str(tmp_path / "r"))[0]["macs"] == 2e12
    _write_run(str(tmp_path / "bad"), [{"step": 1, "val_loss": 6.0}])
    with pytest.raises(ValueError, match="macs"):
        read_run_points(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="neither val.jsonl nor metrics.jsonl"):
        read_run_points(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="frontier has 1 point"):
        scaling_study([str(tmp_path / "r")])


def test_frontier_drops_dominated_points():
    pts = [{"macs": 1.0, "loss": 5.0}, {"macs": 2.0, "loss": 6.0}, {"macs": 3.0, "loss": 4.0}, {"macs": 3.0, "loss": 4.5}]
    assert [p["macs"] for p in frontier(pts)] == [1.0, 3.0]


def test_pretrain_run_layout_compute_from_tokens_and_flops_per_token(tmp_path):
    """val.jsonl + metrics.jsonl (tokens_seen) + config.json (flops_per_token), as `toto-train pretrain` writes."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"flops_per_token": 6e6, "global_batch": 4, "seq_len": 100}))
    with open(run / "metrics.jsonl", "w") as f:
        for step in (10, 20):
            f.write(json.dumps({"step": step, "loss": 5.0, "tokens_seen": step * 400}) + "\n")
    with open(run / "val.jsonl", "w") as f:
        f.write(json.dumps({"step": 20, "val_loss": 4.5}) + "\n")
        f.write(json.dumps({"step": 30, "val_loss": 4.0}) + "\n")  # no metrics line: step x batch x seq_len
    pts = read_run_points(str(run))
    assert [p["macs"] for p in pts] == [20 * 400 * 3e6, 30 * 400 * 3e6]
    assert [p["loss"] for p in pts] == [4.5, 4.0]


def test_saturating_fit_recovers_a_known_law_within_its_intervals():
    from trainer.evals.scaling import fit_saturating, power_law_with_ci

    rng = np.random.default_rng(0)
    c = np.geomspace(1e15, 1e20, 16)
    E, a, b = 1.5, 20.0, -0.08
    loss = E + a * c**b + rng.normal(0, 2e-3, c.size)
    fit = fit_saturating(c, loss)
    for name, true in (("E", E), ("a", a), ("b", b)):
        lo, hi = fit[f"{name}_ci"]
        assert lo <= true <= hi and lo < fit[name] < hi, (name, fit)
    assert fit["E"] == pytest.approx(E, abs=0.1) and fit["b"] == pytest.approx(b, rel=0.15) and fit["r2"] > 0.999
    # The power law's intervals cover its exact parameters under multiplicative noise.
    pl = power_law_with_ci(c, 7.32 * c**-0.0378 * np.exp(rng.normal(0, 1e-3, c.size)))
    assert pl["b_ci"][0] < -0.0378 < pl["b_ci"][1] and pl["a_ci"][0] < 7.32 < pl["a_ci"][1]
    assert pl["b_ci"][1] - pl["b_ci"][0] < 1e-3
    with pytest.raises(ValueError, match="at least 4"):
        fit_saturating(c[:3], loss[:3])


def test_study_of_a_sweep_directory_fits_both_laws_and_plots_them(tmp_path):
    E, a, b = 2.0, 30.0, -0.1
    sweep = tmp_path / "sweep"
    for i, c in enumerate(np.geomspace(1e15, 1e19, 6)):
        _write_run(str(sweep / f"w{i}"), [{"step": 1, "macs": float(c), "val_loss": float(E + a * c**b)}])
    doc = scaling_study([str(sweep)])
    validate(doc, "scaling_fit")
    assert len(doc["runs"]) == 6 and len(doc["frontier"]) == 6
    sat = doc["saturating"]
    assert sat["E"] == pytest.approx(E, rel=1e-3) and sat["b"] == pytest.approx(b, rel=1e-3)
    assert sat["a"] == pytest.approx(a, rel=1e-2) and sat["r2"] == pytest.approx(1.0)
    assert doc["fit"]["b"] > b  # a pure power law flattens the exponent of a saturating curve
    assert os.path.getsize(plot_scaling(doc, str(tmp_path / "s.png"))) > 1000
    (tmp_path / "empty" / "notes").mkdir(parents=True)
    with pytest.raises(ValueError, match="sweep-lr"):
        scaling_study([str(tmp_path / "empty")])  # neither a run nor a directory of runs
