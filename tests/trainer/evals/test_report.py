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
    from trainer.evals.report import accuracy_diff_se, significant

    # 60% vs 50% over 100 samples: se = 100*sqrt((.24+.25)/100) = 7.0 -> a 10-point gap is within 2 se.
    se = accuracy_diff_se(60.0, 50.0, 100)
    assert se == pytest.approx(7.0)
    assert significant(10.0, se) is None
    assert significant(15.0, se) is True and significant(-15.0, se) is False
    assert significant(0.0, 0.0) is None  # a tie is never a finding
    r = Report("T", str(tmp_path))
    r.finding("x", "p", "o", None)
    assert "| x | p | o | **inconclusive (within noise)** |" in r.render()
