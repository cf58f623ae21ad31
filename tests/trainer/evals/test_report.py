import pytest

from trainer.evals.report import Report, fmt


def test_report_renders_findings_tables_and_figures(tmp_path):
    fig = tmp_path / "plots" / "a.png"
    fig.parent.mkdir()
    fig.write_bytes(b"\x89PNG fake")
    r = Report("Demo", str(tmp_path), intro="Small run.")
    r.finding("attention beats average", "61.1 vs 53.2", "70.0 vs 60.0", True)
    r.finding("middle layer best", "~50%", "100%", False)
    r.section("Probes", "Text.")
    r.comparison([("attention top-1", fmt(70.0), fmt(61.1), "ImageNet, large")])
    r.figure(str(fig), "sweep")
    text = open(r.write()).read()
    assert text.startswith("# Demo")
    assert "| attention beats average | 61.1 vs 53.2 | 70.0 vs 60.0 | **holds** |" in text
    assert "| middle layer best | ~50% | 100% | **does not hold** |" in text
    assert "## Probes" in text and "| attention top-1 | 70.0 | 61.1 | ImageNet, large |" in text
    assert "![sweep](plots/a.png)" in text
    assert fmt(None) == "—" and fmt(0.4567, 2, "%") == "0.46%"
    with pytest.raises(ValueError, match="does not exist"):
        r.figure(str(tmp_path / "missing.png"), "x")


def test_significance_and_inconclusive_verdict(tmp_path):
    from trainer.evals.report import paired_accuracy_diff, significant

    # 100 samples, 20 right only under a, 10 only under b: diff 10 points, se = sqrt(30 - 1)/100 = 5.39
    # points, so the gap is within 2 se; the same 10 points from 10 vs 0 discordant pairs is not.
    a = [1] * 20 + [0] * 10 + [1] * 40 + [0] * 30
    b = [0] * 20 + [1] * 10 + [1] * 40 + [0] * 30
    d = paired_accuracy_diff(a, b)
    assert (d["diff"], d["only_a"], d["only_b"]) == (10.0, 20, 10) and d["se"] == pytest.approx(29 ** 0.5)
    se = d["se"]
    tight = paired_accuracy_diff([1] * 10 + [0] * 90, [0] * 100)
    assert significant(tight["diff"], tight["se"]) is True and tight["se"] == pytest.approx(3.0)
    assert significant(10.0, se) is None
    assert significant(15.0, se) is True and significant(-15.0, se) is False
    assert significant(0.0, 0.0) is None  # a tie is never a finding
    r = Report("T", str(tmp_path))
    r.finding("x", "p", "o", None)
    assert "| x | p | o | **inconclusive (within noise)** |" in r.render()
