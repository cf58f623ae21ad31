"""Work items, the listing report and long-video segmentation.

A work item has these fields (ITEM_FIELDS, Arrow schema ARROW_SCHEMA: what an input shard's
`table` and `items` hold, and what `make_item` gives as a plain dict):

    key         str   "{dataset}/{video_id}/{chunk:05d}", the key of the item's first output row
    uri         str   local path or s3://... URL of the file (or of the tar holding it)
    dataset     str   e.g. "kinetics600", "imagenet", "folder"
    split       str   "train" / "val" / "test" / ...
    label       str | None
    video_id    str   [A-Za-z0-9_-]+ (no dots, no slashes): shared by all items of one video
    chunk       int   number of the item's first output chunk; the segments of one long video
                      number their chunks consecutively (segment i starts at i * chunks_per_segment)
    t_start     float seconds into the file where decoding starts
    t_end       float | None  seconds where it stops (None: end of the file)
    kind        str   "video" or "image"
    byte_offset int | None  for a member of a tar archive: where its bytes start in `uri`
    byte_size   int | None  ... and how many there are (None: the whole file)

Work lists hold the same items in fewer bytes (WORKLIST_SCHEMA, work-list version 2): adapters
gather items column by column (ItemColumns) straight into that form, `compact_items` and
`expand_items` convert between the two. The compact row drops what the key already says
(dataset, video_id and chunk: the key is `{dataset}/{video_id}/{chunk:05d}`), splits the uri into
its folder (`dir`, dictionary-encoded: a dataset has few folders) and file `name`, and
dictionary-encodes split, label and kind: ~110 bytes per item in memory instead of ~190.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

ITEM_FIELDS = (
    "key",
    "uri",
    "dataset",
    "split",
    "label",
    "video_id",
    "chunk",
    "t_start",
    "t_end",
    "kind",
    "byte_offset",
    "byte_size",
)

# The Arrow/Parquet schema of a work list: one column per ITEM_FIELDS entry, in that order. Changing
# it changes every work list's sha256 (and so every job's identity): never do it silently.
ARROW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("uri", pa.string()),
        ("dataset", pa.string()),
        ("split", pa.string()),
        ("label", pa.string()),
        ("video_id", pa.string()),
        ("chunk", pa.int64()),
        ("t_start", pa.float64()),
        ("t_end", pa.float64()),
        ("kind", pa.string()),
        ("byte_offset", pa.int64()),
        ("byte_size", pa.int64()),
    ]
)
assert tuple(ARROW_SCHEMA.names) == ITEM_FIELDS

_DICT = pa.dictionary(pa.int32(), pa.string())
# A uri as dir + name: dir keeps the last '/', so uri == dir + name exactly (a uri without '/' has
# dir ""). (?s): '.' also matches a newline, which POSIX and S3 names may hold.
URI_PARTS = r"(?s)^(?P<dir>.*/)?(?P<name>[^/]*)$"
# A work list's rows in memory (version 2): sorted by key; uri = dir + name. Dictionary columns are
# written to Parquet as plain strings (WORKLIST_FILE_SCHEMA: the file's bytes, so its sha256, then
# do not depend on how dictionaries were built) and read back dictionary-encoded.
WORKLIST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("dir", _DICT),
        ("name", pa.string()),
        ("split", _DICT),
        ("label", _DICT),
        ("kind", _DICT),
        ("t_start", pa.float64()),
        ("t_end", pa.float64()),
        ("byte_offset", pa.int64()),
        ("byte_size", pa.int64()),
    ]
)
WORKLIST_FILE_SCHEMA = pa.schema([f.with_type(pa.string()) if f.type == _DICT else f for f in WORKLIST_SCHEMA])
DICT_COLUMNS = tuple(f.name for f in WORKLIST_SCHEMA if f.type == _DICT)

# Arrow memory for work lists comes from the system allocator: Arrow's default mimalloc pool keeps
# the blocks that builders free while growing, which cost ~120 bytes of RSS per item on top of the
# items themselves (measured with version-1 rows, bench/plan_scale.py); malloc hands large blocks
# back to the OS.
WORKLIST_POOL = pa.system_memory_pool()

VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")
IMAGE_EXTS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

# The chunk duration the decoder uses by default: 64 frames at the 30 fps cap.
DEFAULT_CHUNK_SECONDS = 64 / 30
# Long videos are cut into items of at most about this many seconds (rounded down to whole chunks).
DEFAULT_MAX_ITEM_SECONDS = 60.0

_ID_OK = re.compile(r"^[A-Za-z0-9_-]+$")
_ID_BAD_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def make_key(dataset: str, video_id: str, chunk: int) -> str:
    """Row/item key `{dataset}/{video_id}/{chunk:05d}` (no dots, fixed width)."""
    return f"{dataset}/{video_id}/{chunk:05d}"


def safe_video_id(raw: str) -> str:
    """A video id usable inside keys: [A-Za-z0-9_-] only.

    Ids that are already safe are kept; others get their unsafe characters replaced and a short
    hash of the original appended, so two different raw names never map to the same id.
    """
    if _ID_OK.match(raw):
        return raw
    import hashlib

    digest = hashlib.sha1(raw.encode()).hexdigest()[:8]
    return f"{_ID_BAD_CHARS.sub('_', raw)}-{digest}"


def media_kind(path: str) -> str | None:
    """'video', 'image' or None from the file extension (case-insensitive)."""
    low = path.lower()
    if low.endswith(VIDEO_EXTS):
        return "video"
    if low.endswith(IMAGE_EXTS):
        return "image"
    return None


def _item_values(
    uri: str,
    dataset: str,
    split: str,
    label: str | None,
    video_id: str,
    kind: str,
    chunk: int = 0,
    t_start: float = 0.0,
    t_end: float | None = None,
    byte_offset: int | None = None,
    byte_size: int | None = None,
) -> tuple:
    """One item's values in ITEM_FIELDS order (validated and normalised like make_item)."""
    assert _ID_OK.match(video_id), video_id
    assert kind in ("video", "image"), kind
    return (
        make_key(dataset, video_id, chunk),
        uri,
        dataset,
        split,
        label,
        video_id,
        int(chunk),
        float(t_start),
        None if t_end is None else float(t_end),
        kind,
        byte_offset,
        byte_size,
    )


def make_item(
    *,
    uri: str,
    dataset: str,
    split: str,
    label: str | None,
    video_id: str,
    kind: str,
    chunk: int = 0,
    t_start: float = 0.0,
    t_end: float | None = None,
    byte_offset: int | None = None,
    byte_size: int | None = None,
) -> dict[str, Any]:
    return dict(zip(ITEM_FIELDS, _item_values(uri, dataset, split, label, video_id, kind, chunk, t_start, t_end,
                                              byte_offset, byte_size), strict=True))


def compact_items(items: pa.Table | pa.RecordBatch) -> pa.Table:
    """Items of ARROW_SCHEMA → the same rows as WORKLIST_SCHEMA (vectorised, in their order).

    Raises ValueError for a row whose key is not `{dataset}/{video_id}/{chunk:05d}` (the compact
    row keeps only the key, so the three must agree)."""
    # (Not pa.table(batch): a column taken from that table keeps the whole batch alive.)
    t = pa.Table.from_batches([items]) if isinstance(items, pa.RecordBatch) else items
    pool = WORKLIST_POOL
    for name in ("key", "uri", "dataset", "split", "video_id", "kind", "chunk"):
        if t[name].null_count:
            raise ValueError(f"work items with a null {name!r}: every item needs one (use make_item)")
    if t.num_rows:
        chunk = pc.utf8_lpad(pc.cast(t["chunk"], pa.string(), memory_pool=pool), 5, "0", memory_pool=pool)
        want = pc.binary_join_element_wise(t["dataset"], t["video_id"], chunk, pa.scalar("/", pa.string()),
                                           memory_pool=pool)
        bad = pc.not_equal(want, t["key"], memory_pool=pool)
        if pc.any(bad).as_py():
            i = pc.index(bad, True).as_py()
            raise ValueError(f"work item {t['key'][i].as_py()!r} has dataset/video_id/chunk giving key "
                             f"{want[i].as_py()!r}; build items with make_item / ItemColumns.add")
        del chunk, want, bad
    parts = pc.extract_regex(t["uri"], URI_PARTS, memory_pool=pool)
    if parts.null_count:  # cannot match nothing; a null here would freeze an item without its uri
        raise ValueError(f"{parts.null_count} uris could not be split into folder and name")
    cols = {
        "key": t["key"],
        "dir": pc.dictionary_encode(pc.struct_field(parts, [0]), memory_pool=pool),
        "name": pc.struct_field(parts, [1]),
        **{c: pc.dictionary_encode(t[c], memory_pool=pool) for c in ("split", "label", "kind")},
        **{c: t[c] for c in ("t_start", "t_end", "byte_offset", "byte_size")},
    }
    return pa.table(cols, schema=WORKLIST_SCHEMA)


def expand_items(table: pa.Table) -> pa.Table:
    """Rows of WORKLIST_SCHEMA → the same items as ARROW_SCHEMA (vectorised; a copy of these rows)."""
    if table.num_rows == 0:
        return ARROW_SCHEMA.empty_table()
    t = table.combine_chunks()
    parts = pc.split_pattern(t["key"], "/", max_splits=2, reverse=True)  # [dataset, video_id, chunk]

    def text(c: str) -> pa.ChunkedArray:
        return pc.cast(t[c], pa.string())

    cols = {
        "key": t["key"],
        # (the separator as a typed scalar: a Python "" makes this kernel ~15x slower)
        "uri": pc.binary_join_element_wise(text("dir"), t["name"], pa.scalar("", pa.string())),
        "dataset": pc.list_element(parts, 0),
        "split": text("split"),
        "label": text("label"),
        "video_id": pc.list_element(parts, 1),
        "chunk": pc.cast(pc.list_element(parts, 2), pa.int64()),
        **{c: t[c] for c in ("t_start", "t_end")},
        "kind": text("kind"),
        **{c: t[c] for c in ("byte_offset", "byte_size")},
    }
    return pa.table(cols, schema=ARROW_SCHEMA)


class ItemColumns:
    """Work items gathered column by column into compact record batches, without a dict per item.

    Python objects live only for the `flush_rows` items of the batch being filled; what stays is
    Arrow memory in the work list's compact form (WORKLIST_SCHEMA, ~110 bytes per item), so a
    listing of 1e6 items costs the driver ~1.3 GB less than a list of dicts.

    >>> cols = ItemColumns()
    >>> cols.add(uri="a.jpg", dataset="d", split="train", label=None, video_id="a", kind="image")
    >>> cols.extend(segment_video(item, 90.0))
    >>> table = cols.table()          # schema WORKLIST_SCHEMA, in the order added
    >>> expand_items(table)           # the same items as ARROW_SCHEMA
    """

    def __init__(self, flush_rows: int = 65536) -> None:
        self._flush_rows = flush_rows
        self._cols: list[list] = [[] for _ in ITEM_FIELDS]
        self._tables: list[pa.Table] = []
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def _append(self, values: tuple) -> None:
        for col, v in zip(self._cols, values, strict=True):
            col.append(v)
        self._n += 1
        if len(self._cols[0]) >= self._flush_rows:
            self._flush()

    def add(self, **fields: Any) -> None:
        """Add one item, given as make_item's keyword arguments (same names, defaults and checks)."""
        self._append(_item_values(**fields))

    def append(self, item: dict[str, Any]) -> None:
        """Add an item dict as made by make_item / segment_video."""
        self._append(tuple(item[k] for k in ITEM_FIELDS))

    def extend(self, items: list[dict[str, Any]]) -> None:
        for it in items:
            self.append(it)

    def _flush(self) -> None:
        if self._cols[0]:
            arrays = [pa.array(col, type=f.type, memory_pool=WORKLIST_POOL)
                      for col, f in zip(self._cols, ARROW_SCHEMA, strict=True)]
            self._cols = [[] for _ in ITEM_FIELDS]  # the Python values go before the compact copy is made
            batch = pa.RecordBatch.from_arrays(arrays, schema=ARROW_SCHEMA)
            del arrays
            self._tables.append(compact_items(batch))

    def table(self) -> pa.Table:
        """All items added so far, in that order, as one table of WORKLIST_SCHEMA (one chunk per batch)."""
        self._flush()
        if not self._tables:
            return WORKLIST_SCHEMA.empty_table()
        return pa.concat_tables(self._tables)


def segment_video(
    item: dict[str, Any],
    duration: float | None,
    *,
    max_item_seconds: float = DEFAULT_MAX_ITEM_SECONDS,
    chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
) -> list[dict[str, Any]]:
    """Cut one video item covering [t_start, t_end or duration) into items of bounded duration.

    Each segment lasts a whole number of chunks (`chunk_seconds` each, the decoder's chunk
    window), so segment i's first chunk is `i * chunks_per_segment` and the chunk numbers of a
    video's items are consecutive. The last segment runs to the end of the file (`t_end=None`)
    when the item did, so a duration that was slightly off in the metadata loses no frames.
    With an unknown duration the item is returned unchanged (one item, decoded to the end).
    """
    if max_item_seconds <= 0 or chunk_seconds <= 0:
        raise ValueError(
            f"max_item_seconds={max_item_seconds}, chunk_seconds={chunk_seconds}: both must be > 0"
        )
    start = item["t_start"]
    end = item["t_end"] if item["t_end"] is not None else duration
    if end is None or end - start <= 0:
        return [item]
    chunks_per_segment = max(1, math.floor(max_item_seconds / chunk_seconds + 1e-9))
    seg = chunks_per_segment * chunk_seconds
    n = max(1, math.ceil((end - start) / seg - 1e-6))
    if n == 1:
        return [item]
    out = []
    for i in range(n):
        last = i == n - 1
        t_end = item["t_end"] if last else start + (i + 1) * seg
        out.append(
            make_item(
                uri=item["uri"],
                dataset=item["dataset"],
                split=item["split"],
                label=item["label"],
                video_id=item["video_id"],
                kind="video",
                chunk=item["chunk"] + i * chunks_per_segment,
                t_start=start + i * seg,
                t_end=t_end,
                byte_offset=item["byte_offset"],
                byte_size=item["byte_size"],
            )
        )
    return out


@dataclass
class ListReport:
    """What an adapter found: item counts and the problems it saw, with a few examples each.

    `problems` maps a problem name (e.g. "missing_file", "unmatched_file", "bad_row") to its
    count; `examples` maps the same name to at most `max_examples` strings.
    """

    dataset: str
    root: str
    num_items: int = 0
    num_files: int = 0
    problems: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def add(self, problem: str, example: str) -> None:
        self.problems[problem] = self.problems.get(problem, 0) + 1
        ex = self.examples.setdefault(problem, [])
        if len(ex) < self.max_examples:
            ex.append(example)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "root": self.root,
            "num_items": self.num_items,
            "num_files": self.num_files,
            "problems": dict(sorted(self.problems.items())),
            "examples": {k: list(v) for k, v in sorted(self.examples.items())},
        }

    def summary(self) -> str:
        """Human-readable lines: counts first, then a few examples of each problem."""
        lines = [f"{self.dataset} at {self.root}: {self.num_items} items from {self.num_files} files"]
        for name, count in sorted(self.problems.items()):
            lines.append(f"  {name.replace('_', ' ')}: {count}")
            for ex in self.examples.get(name, []):
                lines.append(f"    e.g. {ex}")
        return "\n".join(lines)
