"""Writing, committing, listing and verifying token shards in an output location.

Commit protocol (DESIGN.md): the data file is written under a temporary name, fsynced and
renamed (on object stores: one upload of the final key); then the JSON sidecar is written the
same way. A shard exists exactly when its sidecar does. A data file without a sidecar, or a
temporary file, is debris: readers ignore it and :func:`clean_debris` removes it. So is a sidecar
whose data file is gone: a killed run's writers outlive its process group by seconds, and one that
renames a sidecar in between a rerun's listing and its clean-up is left with its data file
removed as debris (readers call it damage; the job's clean-up removes it and redoes the shard).
"""

from __future__ import annotations

import collections
import math
import re
import time
from typing import Any

import numpy as np

import schemas
from pipeline import storage
from pipeline.shards.arrow_format import FRAME_SUM, ArrowFileWriter, ArrowShardReader
from pipeline.shards.rows import normalize_row
from pipeline.shards.wds_format import TarFileWriter, TarShardReader

FORMATS = {"arrow": "arrow", "webdataset": "tar"}
SIDECAR_RE = re.compile(r"^shard-(\d{6})\.json$")
DATA_RE = re.compile(r"^shard-(\d{6})\.(arrow|tar)$")
MANIFEST = "manifest.json"


def _version() -> str:
    try:
        from importlib.metadata import version

        return f"toto {version('toto')}"
    except Exception:  # noqa: BLE001 - running from a source tree without metadata
        return "toto (source tree)"


def shard_name(shard_id: int) -> str:
    if not 0 <= shard_id <= 999_999:
        raise ValueError(f"shard id {shard_id} is outside 0..999999")
    return f"shard-{shard_id:06d}"


class ShardWriter:
    """Collects rows for one output shard and commits it atomically.

    >>> w = ShardWriter("out", 0, codebook_size=8192, tokenizer=tok, resolution=128)
    >>> w.add(row); ...
    >>> sidecar = w.commit(input_shard={"id": 0, "worklist_sha256": h, "num_items": 10}, errors=[])
    """

    def __init__(
        self,
        out_url: str,
        shard_id: int,
        *,
        codebook_size: int,
        tokenizer: dict[str, Any],
        resolution: int,
        format: str = "arrow",
        row_group_size: int = 64,
        compression: str | None = None,
        storage_options: dict | None = None,
        settings: dict[str, Any] | None = None,
        grid: tuple[int, int] | None = None,
    ):
        """``grid`` (h, w), when given, is checked against every row and recorded even for a shard
        with no rows (all inputs failed); otherwise it is taken from the first row."""
        if format not in FORMATS:
            raise ValueError(f"format={format!r}: choose one of {sorted(FORMATS)}")
        if not 2 <= codebook_size <= 65536:
            raise ValueError(
                f"codebook_size={codebook_size}: tokens are stored as uint16, so the codebook must have 2..65536 codes"
            )
        if row_group_size < 1:
            raise ValueError(f"row_group_size={row_group_size}: must be ≥ 1")
        if compression not in (None, "zstd"):
            raise ValueError(f"compression={compression!r}: choose None or 'zstd'")
        if compression and format != "arrow":
            raise ValueError("compression applies to the arrow format only; WebDataset tars are stored plain")
        for k in ("id", "sha256", "vocab_size", "downsample"):
            if k not in tokenizer:
                raise ValueError(f"tokenizer info lacks {k!r}; pass {{'id', 'sha256', 'vocab_size', 'downsample'}}")
        self.out_url = out_url
        self.shard_id = shard_id
        self.name = shard_name(shard_id)
        self.format = format
        self.codebook_size = codebook_size
        # precision (fp32 | tf32 | bf16): recorded when the caller knows it (the tokenize job always does);
        # values_per_token: P*P*3 for the patch tokenizer's pixel rows (pipeline/tokenizers/patch.py).
        self.tokenizer = {k: tokenizer[k] for k in ("id", "sha256", "vocab_size", "downsample", "precision",
                                                 "values_per_token")
                          if k in tokenizer}
        self.resolution = int(resolution)
        self.row_group_size = row_group_size
        self.compression = compression
        self.storage_options = storage_options
        self.settings = dict(settings or {})
        self.data_url = storage.join(out_url, f"{self.name}.{FORMATS[format]}")
        self.sidecar_url = storage.join(out_url, f"{self.name}.json")
        self._stage = storage.staging_file(self.data_url)
        self._tmp = self._stage.__enter__()
        self._file = ArrowFileWriter(self._tmp, compression) if format == "arrow" else TarFileWriter(self._tmp)
        self._pending: list[dict[str, Any]] = []
        self._rows = self._frames = self._tokens = 0
        if grid is not None and (len(grid) != 2 or min(grid) < 1):
            raise ValueError(f"grid={grid!r}: give (grid_h, grid_w), both ≥ 1")
        self._grid: tuple[int, int] | None = tuple(int(g) for g in grid) if grid is not None else None
        self._fps: set[float] = set()
        self._datasets: set[str] = set()
        self._splits: set[str] = set()
        self._done = False

    def add(self, row: dict[str, Any]) -> None:
        """Queue one row. ``row["tokens"]`` is kept by reference (not copied) until :meth:`commit`
        returns: rows sliced back to back from one array are written from it without a copy, so
        do not modify that array in place before the commit."""
        if self._done:
            raise RuntimeError(f"{self.name} is already committed or aborted")
        r = normalize_row(row, self.codebook_size)
        grid = (r["grid_h"], r["grid_w"])
        if self._grid is None:
            self._grid = grid
        elif grid != self._grid:
            raise ValueError(f"row {r['key']}: grid {grid} differs from the shard's {self._grid}; one grid per shard")
        self._pending.append(r)
        self._rows += 1
        self._frames += r["num_frames"]
        self._tokens += r["tokens"].size
        self._fps.add(r["fps"])
        self._datasets.add(r["dataset"])
        self._splits.add(r["split"])
        if len(self._pending) >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._file.write(self._pending)
            self._pending = []

    def abort(self) -> None:
        """Drop everything written so far (nothing reaches the final names)."""
        if not self._done:
            self._done = True
            self._file.abort()
            try:
                self._stage.__exit__(RuntimeError, RuntimeError("aborted"), None)
            except RuntimeError:
                pass

    def commit(
        self,
        *,
        input_shard: dict[str, Any],
        errors: list[dict[str, Any]] | None = None,
        timings: dict[str, float] | None = None,
        counts: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        """Write the data file, then the sidecar; returns the sidecar."""
        if self._done:
            raise RuntimeError(f"{self.name} is already committed or aborted")
        t0 = time.perf_counter()
        try:
            self._flush()
            self._file.close()  # fsyncs
            sha, size = self._file.digest()
            storage.commit_local_file(self._tmp, self.data_url, self.storage_options)
        except BaseException:
            self.abort()
            raise
        self._done = True
        grid = list(self._grid) if self._grid else [1, 1]
        errs = [{k: str(v) for k, v in e.items() if k in ("uri", "reason", "detail")} for e in (errors or [])]
        sidecar = schemas.new_document(
            "shard_sidecar",
            shard_id=self.shard_id,
            format=self.format,
            data_file=storage.basename(self.data_url),
            bytes=size,
            sha256=sha,
            compression=self.compression,
            row_group_size=self.row_group_size,
            tokenizer=self.tokenizer,
            codebook_size=self.codebook_size,
            resolution=self.resolution,
            grid=grid,
            fps=self._fps.pop() if len(self._fps) == 1 else None,
            datasets=sorted(self._datasets),
            splits=sorted(self._splits),
            counts={"rows": self._rows, "frames": self._frames, "tokens": self._tokens, **(counts or {})},
            input_shard={k: input_shard[k] for k in ("id", "worklist_sha256", "num_items")},
            errors=errs,
            timings={**{k: float(v) for k, v in (timings or {}).items()}, "commit_s": time.perf_counter() - t0},
            settings=self.settings,
            created_by=_version(),
        )
        if self.format == "arrow":
            # The data file holds a checksum per frame (column frame_sums): readers that fetch
            # single frames by range check what they read against it (no whole-file download).
            sidecar["checksums"] = {"frames": FRAME_SUM, "column": "frame_sums"}
        storage.write_json(self.sidecar_url, sidecar, "shard_sidecar", self.storage_options)
        return sidecar


class ShardReader:
    """Read a committed shard (arrow or webdataset) by row index.

    ``r.row(i)`` → dict with ``tokens`` as uint16 ``[num_frames, grid_h, grid_w]``; ``len(r)``;
    ``r.tokens(i)``; ``r.column(name)``; iteration over rows; ``r.sidecar``.
    """

    def __init__(self, data_url: str, sidecar: dict[str, Any], storage_options: dict | None = None):
        self.url = data_url
        self.sidecar = sidecar
        self.storage_options = storage_options
        if sidecar["format"] == "arrow":
            self._impl = ArrowShardReader(data_url, storage_options)
        else:
            self._impl = TarShardReader(data_url, storage_options)

    def __len__(self) -> int:
        return len(self._impl)

    def row(self, i: int) -> dict[str, Any]:
        return self._impl.row(i)

    def tokens(self, i: int) -> np.ndarray:
        return self._impl.tokens(i)

    def column(self, name: str) -> list:
        return self._impl.column(name)

    def iter_token_batches(self):
        """Sequential whole-shard read: (offsets [rows+1], flat uint16 values) per row group."""
        if isinstance(self._impl, ArrowShardReader):
            yield from self._impl.iter_token_batches()
            return
        for i in range(len(self)):
            t = self._impl.tokens(i).reshape(-1)
            yield np.array([0, t.size], dtype=np.int64), t

    def __iter__(self):
        for i in range(len(self)):
            yield self.row(i)

    def close(self) -> None:
        self._impl.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sidecar_url_for(url: str) -> tuple[str, str]:
    """(data-file URL, sidecar URL) from either of the two."""
    base = storage.basename(url)
    parent = url[: len(url) - len(base)].rstrip("/") or "."
    stem = base.split(".", 1)[0]
    if not re.match(r"^shard-\d{6}$", stem):
        raise ValueError(f"{url} is not a shard (expected shard-NNNNNN.arrow|.tar|.json)")
    side = storage.join(parent, f"{stem}.json")
    return parent, side


def open_shard(url: str, storage_options: dict | None = None, verify: bool = False) -> ShardReader:
    """Open a committed shard from its data file or sidecar URL; ``verify`` checks sha256 first."""
    parent, side_url = _sidecar_url_for(url)
    if not storage.exists(side_url, storage_options):
        raise FileNotFoundError(
            f"{url} has no sidecar {side_url}: the shard was never committed (debris from an interrupted run); "
            "rerun the job to produce it"
        )
    sidecar = storage.read_json(side_url, "shard_sidecar", storage_options)
    data_url = storage.join(parent, sidecar["data_file"])
    if verify:
        got = storage.sha256_file(data_url, storage_options)
        if got != sidecar["sha256"]:
            raise ValueError(f"{data_url}: sha256 {got} does not match its sidecar ({sidecar['sha256']}): the shard is corrupt")
    return ShardReader(data_url, sidecar, storage_options)


def committed_shards(
    out_url: str,
    storage_options: dict | None = None,
    *,
    known: list[dict[str, Any]] | None = None,
    names: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Sidecars of the committed shards under ``out_url``, sorted by shard id.

    One listing (or ``names``, the listing the caller already has) and one concurrent GET per
    sidecar that is not in ``known`` (sidecars the caller read before, e.g. at planning: they are
    reused, not fetched again). Every sidecar's data file must be in the listing.
    """
    names = storage.listdir(out_url, storage_options) if names is None else names
    present = set(names)
    have = {f"shard-{s['shard_id']:06d}.json": s for s in (known or [])}
    side_names = sorted(n for n in present if SIDECAR_RE.match(n))
    todo = [n for n in side_names if n not in have]
    fetched = storage.read_json_many([storage.join(out_url, n) for n in todo], "shard_sidecar", storage_options)
    have.update(zip(todo, fetched, strict=True))
    out = []
    for n in side_names:
        side = have[n]
        if side["data_file"] not in present:
            raise ValueError(
                f"{storage.join(out_url, n)} names {side['data_file']}, which is missing: the shard is not readable; "
                "rerun the same tokenize command to rebuild it (its clean-up removes such a sidecar)"
            )
        out.append(side)
    return out


def debris(out_url: str, storage_options: dict | None = None, *, names: list[str] | None = None) -> list[str]:
    """Files that belong to no committed shard: temporaries, data files without a sidecar, and
    sidecars without a data file (``shard-N.json`` with neither ``shard-N.arrow`` nor ``.tar``).

    ``names``: the listing of ``out_url`` when the caller has it (saves a LIST)."""
    names = storage.listdir(out_url, storage_options) if names is None else names
    sidecars = {m.group(1) for n in names if (m := SIDECAR_RE.match(n))}
    data = {m.group(1) for n in names if (m := DATA_RE.match(n))}
    out = []
    for n in names:
        d, s = DATA_RE.match(n), SIDECAR_RE.match(n)
        if (d and d.group(1) not in sidecars) or (s and s.group(1) not in data) or storage.TMP_MARK in n:
            out.append(storage.join(out_url, n))
    return out


def clean_debris(out_url: str, storage_options: dict | None = None, *, names: list[str] | None = None) -> list[str]:
    """Remove :func:`debris` found in one listing (``names``, or a new one); returns what it found.

    Safe while a killed run's writers still finish commits (they outlive its process group by
    seconds): a temporary they rename away between the listing and its removal is already gone,
    and a data file removed just after its late sidecar arrived leaves a sidecar without data,
    which the next clean-up removes. Nothing it removes was a committed shard when listed, so a
    job that replans from the same listing redoes every shard whose files it touched."""
    gone = debris(out_url, storage_options, names=names)
    for url in gone:
        try:
            storage.remove(url, storage_options)
        except FileNotFoundError:
            pass
    return gone


def build_manifest(
    out_url: str, storage_options: dict | None = None, *, sidecars: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The dataset manifest, rebuilt from the sidecars (never from anything else).

    ``sidecars``: the committed sidecars when the caller has just read them (committed_shards);
    otherwise they are read here."""
    sides = committed_shards(out_url, storage_options) if sidecars is None else sorted(sidecars, key=lambda s: s["shard_id"])
    if not sides:
        raise ValueError(f"{out_url} has no committed shards; nothing to describe")
    first = sides[0]
    for s in sides[1:]:
        for field in ("format", "codebook_size", "resolution", "grid"):
            if s[field] != first[field]:
                raise ValueError(
                    f"{out_url}: shard {s['shard_id']} has {field}={s[field]!r} but shard {first['shard_id']} has "
                    f"{first[field]!r}; one output location holds one tokenization"
                )
        if s["tokenizer"]["sha256"] != first["tokenizer"]["sha256"]:
            raise ValueError(f"{out_url}: shards {first['shard_id']} and {s['shard_id']} were made by different tokenizers")
        if s["tokenizer"].get("precision") != first["tokenizer"].get("precision"):
            raise ValueError(
                f"{out_url}: shards {first['shard_id']} and {s['shard_id']} were tokenized at precisions "
                f"{first['tokenizer'].get('precision', 'unrecorded')} and {s['tokenizer'].get('precision', 'unrecorded')}; "
                "one output location holds one tokenization: re-tokenize one of them into its own output"
            )
    fps = {s.get("fps") for s in sides}
    shards = [
        {
            "id": s["shard_id"],
            "data_file": s["data_file"],
            "sidecar": f"shard-{s['shard_id']:06d}.json",
            "rows": s["counts"]["rows"],
            "frames": s["counts"]["frames"],
            "tokens": s["counts"]["tokens"],
            "bytes": s["bytes"],
            "sha256": s["sha256"],
            "errors": len(s["errors"]),
        }
        for s in sides
    ]
    totals = {
        "shards": len(shards),
        **{k: sum(x[k] for x in shards) for k in ("rows", "frames", "tokens", "bytes", "errors")},
    }
    doc = schemas.new_document(
        "dataset_manifest",
        format=first["format"],
        tokenizer=first["tokenizer"],
        codebook_size=first["codebook_size"],
        resolution=first["resolution"],
        grid=first["grid"],
        fps=fps.pop() if len(fps) == 1 else None,
        datasets=sorted({d for s in sides for d in s.get("datasets", [])}),
        splits=sorted({d for s in sides for d in s.get("splits", [])}),
        shards=shards,
        totals=totals,
    )
    return schemas.with_content_hash(doc)


def write_manifest(
    out_url: str, storage_options: dict | None = None, *, sidecars: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Build the manifest (from ``sidecars`` when given, see build_manifest) and write it."""
    doc = build_manifest(out_url, storage_options, sidecars=sidecars)
    storage.write_json(storage.join(out_url, MANIFEST), doc, "dataset_manifest", storage_options)
    return doc


def read_manifest(out_url: str, storage_options: dict | None = None) -> dict[str, Any]:
    """The manifest of a token dataset; checks its content hash."""
    url = storage.join(out_url, MANIFEST)
    doc = storage.read_json(url, "dataset_manifest", storage_options)
    if schemas.content_hash(doc) != doc["content_hash"]:
        raise ValueError(f"{url}: content_hash does not match its content; rebuild it with `toto-pipeline status {out_url} --rebuild-manifest`")
    return doc


def verify_checks(sidecar: dict[str, Any]) -> list[str]:
    """Names of the checks :func:`verify_shard` runs on this shard's data, strongest last:
    ``"sha256"`` (whole file) always, ``"frames:mul32"`` when the sidecar records per-frame
    checksums (Arrow format 2); shape, row count and token range checks always follow."""
    sums = sidecar.get("checksums")
    return ["sha256", f"frames:{sums['frames']}"] if sums else ["sha256"]


def verify_shard(out_url: str, sidecar: dict[str, Any], storage_options: dict | None = None) -> list[str]:
    """Problems with one committed shard (empty when it is sound); :func:`verify_checks` names what ran.

    A sha256 mismatch does not stop the other checks: the per-frame checksums (where the sidecar
    records them) then say which rows and frames are damaged.
    """
    problems = []
    data_url = storage.join(out_url, sidecar["data_file"])
    got = storage.sha256_file(data_url, storage_options)
    if got != sidecar["sha256"]:
        problems.append(f"sha256 mismatch (file {got[:12]}…, sidecar {sidecar['sha256'][:12]}…): the data file is corrupt")
    try:
        with ShardReader(data_url, sidecar, storage_options) as r:
            n = len(r)
            if n != sidecar["counts"]["rows"]:
                problems.append(f"{n} rows, sidecar says {sidecar['counts']['rows']}")
            if sidecar.get("checksums"):
                impl = r._impl
                if not (isinstance(impl, ArrowShardReader) and impl.has_frame_sums):
                    problems.append(f"the sidecar records {sidecar['checksums']['frames']} frame checksums but the "
                                    "data file has no frame_sums column: it was replaced")
                else:
                    bad = impl.bad_frames()
                    keys = impl.column("key") if bad else []
                    for row, frame in bad[:20]:
                        problems.append(f"row {row} ({keys[row]}): frame {frame} fails its "
                                        f"{sidecar['checksums']['frames']} checksum")
                    if len(bad) > 20:
                        problems.append(f"... {len(bad) - 20} more frames fail their checksum")
            tokens = 0
            for i in range(n):
                row = r.row(i)
                t = row["tokens"]
                tokens += t.size
                if t.shape != (row["num_frames"], row["grid_h"], row["grid_w"]):
                    problems.append(f"row {row['key']}: tokens shape {t.shape} disagrees with its metadata")
                if t.size and int(t.max()) >= sidecar["codebook_size"]:
                    problems.append(f"row {row['key']}: token {int(t.max())} ≥ codebook {sidecar['codebook_size']}")
            if tokens != sidecar["counts"]["tokens"]:
                problems.append(f"{tokens} tokens, sidecar says {sidecar['counts']['tokens']}")
    except Exception as e:  # noqa: BLE001 - any read failure is a problem to report, not a crash
        problems.append(f"unreadable: {type(e).__name__}: {e}")
    return problems


def token_histogram(out_url: str, codebook_size: int, storage_options: dict | None = None, sidecars=None) -> np.ndarray:
    """Counts of each code over every committed shard (or the given sidecars)."""
    counts = np.zeros(codebook_size, dtype=np.int64)
    for s in sidecars if sidecars is not None else committed_shards(out_url, storage_options):
        with ShardReader(storage.join(out_url, s["data_file"]), s, storage_options) as r:
            for i in range(len(r)):
                counts += np.bincount(r.tokens(i).reshape(-1), minlength=codebook_size)[:codebook_size]
    return counts


def unigram_stats(counts: np.ndarray) -> dict[str, float]:
    """Coverage (fraction of codes seen) and entropy in bits of a token histogram."""
    total = int(counts.sum())
    if total == 0:
        return {"coverage": 0.0, "entropy_bits": 0.0, "max_entropy_bits": math.log2(len(counts)), "tokens": 0}
    p = counts[counts > 0] / total
    return {
        "coverage": float((counts > 0).mean()),
        "entropy_bits": float(-(p * np.log2(p)).sum()),
        "max_entropy_bits": math.log2(len(counts)),
        "tokens": total,
    }


_REASON_HEAD = re.compile(r"^[^:(]*")


def reason_kind(reason: str) -> str:
    """The kind of an error reason: its words before any ':' or '(' detail
    ('decoder error: ...' -> 'decoder error', 'no video stream (streams: audio)' -> 'no video stream')."""
    return _REASON_HEAD.match(reason).group(0).strip() or reason.strip()


def errors_by_reason(sidecars: list[dict[str, Any]]) -> dict[str, int]:
    """Error counts keyed by :func:`reason_kind`."""
    c: collections.Counter[str] = collections.Counter()
    for s in sidecars:
        for e in s["errors"]:
            c[reason_kind(e["reason"])] += 1
    return dict(sorted(c.items()))
