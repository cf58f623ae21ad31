"""Markdown reports with PNG plots: each of our numbers beside the paper's corresponding result."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

__all__ = ["Finding", "Report", "fmt", "significant", "paired_accuracy_diff"]

NOISE_Z = 2.0  # a difference counts when it exceeds two standard errors (about 95% two-sided)


def paired_accuracy_diff(correct_a: list[int], correct_b: list[int]) -> dict:
    """Two heads scored on the same samples (top-1 right = 1): the accuracy difference a − b in points
    and its paired standard error, from the discordant pairs as in McNemar's test:
    b = a right and b wrong, c = the reverse; diff = (b − c)/n; se = sqrt(b + c − (b − c)²/n)/n."""
    if len(correct_a) != len(correct_b) or not correct_a:
        raise ValueError(f"paired scores need the same samples: got {len(correct_a)} and {len(correct_b)}")
    a, b = [int(x) for x in correct_a], [int(x) for x in correct_b]
    n = len(a)
    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    var = max(0.0, only_a + only_b - (only_a - only_b) ** 2 / n)
    return {"diff": 100.0 * (only_a - only_b) / n, "se": 100.0 * math.sqrt(var) / n, "only_a": only_a,
            "only_b": only_b, "n": n}


def significant(diff: float, se: float) -> bool | None:
    """True/False when |diff| exceeds NOISE_Z standard errors (sign decides), None when within noise."""
    if abs(diff) <= NOISE_Z * se:
        return None
    return diff > 0


def fmt(x: float | None, digits: int = 1, unit: str = "") -> str:
    """A number for a table cell; '—' for missing values."""
    if x is None:
        return "—"
    return f"{x:.{digits}f}{unit}"


@dataclass
class Finding:
    """One of the paper's qualitative findings and whether our run reproduces it.

    ``holds`` is None when our difference is within noise (see `significant`)."""

    name: str
    paper: str
    ours: str
    holds: bool | None

    @property
    def verdict(self) -> str:
        if self.holds is None:
            return "inconclusive (within noise)"
        return "holds" if self.holds else "does not hold"


@dataclass
class Report:
    title: str
    out_dir: str
    intro: str = ""
    parts: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    def section(self, title: str, text: str = "") -> None:
        self.parts.append(f"## {title}\n")
        if text:
            self.parts.append(text.strip() + "\n")

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        self.parts.append("\n".join(lines) + "\n")

    def comparison(self, rows: list[tuple[str, str, str, str]]) -> None:
        """Rows of (what, ours, paper, note)."""
        self.table(["what", "ours", "paper", "note"], [list(r) for r in rows])

    def figure(self, path: str, caption: str) -> None:
        if not os.path.exists(path):
            raise ValueError(f"figure {path} does not exist; write the plot before adding it to the report")
        rel = os.path.relpath(path, self.out_dir)
        self.parts.append(f"![{caption}]({rel})\n\n*{caption}*\n")

    def finding(self, name: str, paper: str, ours: str, holds: bool | None) -> Finding:
        f = Finding(name, paper, ours, None if holds is None else bool(holds))
        self.findings.append(f)
        return f

    def render(self) -> str:
        out = [f"# {self.title}\n"]
        if self.intro:
            out.append(self.intro.strip() + "\n")
        if self.findings:
            out.append("## Findings at a glance\n")
            out.append(f"A finding is marked inconclusive when our difference is within {NOISE_Z:g} standard errors "
                       "(paired over the same scored samples for accuracies, McNemar's discordant pairs; paired over clips "
                       "for losses).\n")
            lines = ["| paper's finding | paper | ours | verdict |", "|---|---|---|---|"]
            lines += [f"| {f.name} | {f.paper} | {f.ours} | **{f.verdict}** |" for f in self.findings]
            out.append("\n".join(lines) + "\n")
        out.extend(self.parts)
        return "\n".join(out)

    def write(self, name: str = "report.md") -> str:
        from pipeline.storage import atomic_write_bytes

        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, name)
        atomic_write_bytes(path, self.render().encode())
        return path
