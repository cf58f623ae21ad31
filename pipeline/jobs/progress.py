"""Live progress of a tokenization job on stderr, and its final table."""

from __future__ import annotations

import collections
import sys
import time
from typing import Any, TextIO

from pipeline.shards.store import reason_kind


class Progress:
    """Shards committed of planned, videos/images done, frames, tokens/s and errors, live."""

    def __init__(self, total_shards: int, done: list[dict], *, enabled: bool = True, file: TextIO = sys.stderr):
        self.total = total_shards
        self.skipped = len(done)
        self.file = file
        self.enabled = enabled
        self.items = self.frames = self.tokens = self.rows = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.t_start: float | None = None
        self.t_first: float | None = None
        self.t_last: float | None = None
        # (time, tokens so far) at each commit: the steady-state rate excludes actor start-up.
        self.commits: list[tuple[float, int]] = []
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total_shards, initial=self.skipped, desc="tokenize", unit="shard",
                             file=file, dynamic_ncols=True, mininterval=0.5)

    def start(self) -> None:
        """The stages are about to start (before actors exist)."""
        self.t_start = time.perf_counter()

    def counts(self, rows: int, frames: int, tokens: int) -> None:
        """Rows/frames/tokens tokenized since the last call (a retried batch may count twice here;
        the run summary's counts come from the sidecars)."""
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
        self.t_last = now
        self.rows += rows
        self.frames += frames
        self.tokens += tokens

    @property
    def work_s(self) -> float:
        """Seconds from starting the stages (actor start-up included) to the last record."""
        t0 = self.t_start if self.t_start is not None else self.t_first
        return (self.t_last - t0) if t0 is not None and self.t_last is not None else 0.0

    @property
    def steady_tokens_per_s(self) -> float | None:
        """Tokens/s between the first and the last commit: the pipeline's rate once it is full."""
        if len(self.commits) < 2 or self.commits[-1][0] <= self.commits[0][0]:
            return None
        (t0, n0), (t1, n1) = self.commits[0], self.commits[-1]
        return (n1 - n0) / (t1 - t0)

    def committed(self, sidecar: dict[str, Any]) -> None:
        self.t_last = time.perf_counter()
        self.commits.append((self.t_last, self.tokens))
        self.items += int(sidecar["counts"].get("inputs_ok", 0))
        for e in sidecar["errors"]:
            self.errors[reason_kind(e["reason"])] += 1
        if self._bar is not None:
            rate = self.tokens / self.work_s if self.work_s > 0 else 0.0
            self._bar.set_postfix_str(
                f"inputs={self.items} frames={self.frames} tok/s={rate:,.0f} errors={sum(self.errors.values())}",
                refresh=False,
            )
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def final_table(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"tokenize {summary['dataset']} → {summary['output']}", show_header=False)
        sh = summary["shards"]
        t.add_row("shards", f"{sh['committed']} written now, {sh['skipped']} already done, {sh['total']} total")
        c = summary["counts"]
        t.add_row("inputs", f"{c.get('inputs', 0):,} ({c.get('inputs_failed', 0):,} failed)")
        for k in ("rows", "frames", "tokens"):
            t.add_row(k, f"{c[k]:,}")
        t.add_row("tokens/s (this run)", f"{summary.get('tokens_per_s', 0):,.0f}")
        t.add_row("elapsed", f"{summary['elapsed_s']:.1f} s")
        for reason, n in summary["errors_by_reason"].items():
            t.add_row(f"  error: {reason}", str(n))
        t.add_row("tokenizer", summary["tokenizer"]["id"])
        Console(file=self.file).print(t)
