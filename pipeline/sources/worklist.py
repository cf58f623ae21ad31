"""The frozen work list: sorted items in one Parquet file, its sha256 in a JSON document beside it,
and the deterministic cut into input shards.

Layout of a work-list directory WL (local or s3://):

    WL/worklist.parquet   one row per work item, sorted by key: version 2 (written now) holds the
                          compact rows of pipeline.sources.items.WORKLIST_FILE_SCHEMA; version 1
                          (older lists, still read) the fields of ITEM_FIELDS
    WL/worklist.json      {"schema": "worklist", "version": 1 | 2, "sha256", "num_items", "dataset",
                           "root", "options", "report"}: written last, so its presence means "frozen"

Once frozen, a work list is never rewritten: `freeze_worklist` on an existing one returns it if
the content is identical and raises otherwise, and `ensure_worklist` lists storage only when no
frozen list exists yet. Whatever its version, a loaded list is held as WORKLIST_SCHEMA rows; its
sha256 is always that of its own file, so the jobs planned from a version-1 list resume.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import schemas
from pipeline.sources._fs import is_local, join, url_to_fs
from pipeline.sources.items import (
    ARROW_SCHEMA,
    DICT_COLUMNS,
    ITEM_FIELDS,
    WORKLIST_FILE_SCHEMA,
    WORKLIST_POOL,
    WORKLIST_SCHEMA,
    ListReport,
    compact_items,
    expand_items,
)

WORKLIST_PARQUET = "worklist.parquet"
WORKLIST_JSON = "worklist.json"
WORKLIST_VERSION = 2  # what freeze_worklist writes; load_worklist reads 1 and 2
# The Parquet columns of each version (v1: one column per item field; v2: the compact rows).
_FILE_SCHEMAS = {1: ARROW_SCHEMA, 2: WORKLIST_FILE_SCHEMA}


def _validate_doc(doc: dict) -> dict:
    """Validate a worklist.json document against schemas/worklist.v{version}.json."""
    if doc.get("schema") != "worklist":
        raise ValueError(f"not a work-list document (schema={doc.get('schema')!r}); expected 'worklist'")
    if doc.get("version") not in _FILE_SCHEMAS:
        raise ValueError(
            f"work list version {doc.get('version')!r} is not supported (this code reads versions "
            f"{sorted(_FILE_SCHEMAS)}); rebuild the work list with this version of toto"
        )
    try:
        schemas.validate(doc, "worklist")
    except schemas.SchemaError as e:
        raise ValueError(f"worklist.json is invalid: {e}") from None
    return doc


def _atomic_write(url: str, data: bytes, storage_options: dict | None) -> None:
    """Temp name + fsync + rename locally; a single PUT of the final key on object stores."""
    if is_local(url):
        path = url[len("file://") :] if url.startswith("file://") else url
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    fs, path = url_to_fs(url, storage_options)
    fs.pipe_file(path, data)


def _read_bytes(url: str, storage_options: dict | None) -> bytes:
    fs, path = url_to_fs(url, storage_options)
    return fs.cat_file(path)


def _exists(url: str, storage_options: dict | None) -> bool:
    fs, path = url_to_fs(url, storage_options)
    return fs.exists(path)


def items_to_table(items: list[dict] | pa.Table) -> pa.Table:
    """Work items (dicts with ITEM_FIELDS, or a table of ARROW_SCHEMA or WORKLIST_SCHEMA) as a
    table of WORKLIST_SCHEMA, in their order."""
    if isinstance(items, pa.Table):
        if items.schema.names == WORKLIST_SCHEMA.names:
            return items.cast(WORKLIST_SCHEMA) if not items.schema.equals(WORKLIST_SCHEMA) else items
        if items.schema.names != list(ITEM_FIELDS):
            raise ValueError(f"work-item table has columns {items.schema.names}; expected {list(ITEM_FIELDS)} "
                             f"(items) or {WORKLIST_SCHEMA.names} (a work list)")
        return compact_items(items.cast(ARROW_SCHEMA) if not items.schema.equals(ARROW_SCHEMA) else items)
    cols = {name: [it.get(name) for it in items] for name in ITEM_FIELDS}
    return compact_items(pa.table(cols, schema=ARROW_SCHEMA))


def _is_sorted(keys: pa.ChunkedArray) -> bool:
    if len(keys) < 2:
        return True
    return not pc.any(pc.less(keys[1:], keys[:-1])).as_py()


def sort_items(table: pa.Table) -> pa.Table:
    """Rows sorted by key (byte order of UTF-8 = Python's str order; stable for equal keys)."""
    if _is_sorted(table["key"]):
        return table
    idx = pc.sort_indices(table, sort_keys=[("key", "ascending")], memory_pool=WORKLIST_POOL)
    return pc.take(table, idx, memory_pool=WORKLIST_POOL)


ROW_GROUP_ROWS = 65536


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    """Deterministic Parquet bytes for a sorted item table (same rows + same pyarrow ⇒ same bytes).

    A WORKLIST_SCHEMA table is written as WORKLIST_FILE_SCHEMA (version 2: dictionary columns as
    plain strings, so how the dictionaries were built cannot change the bytes); an ARROW_SCHEMA
    table as itself (the version-1 layout). Page boundaries follow the input's chunks, so each row
    group is made contiguous before it is written: the bytes (and so the hash) of a list built
    from dicts, from an adapter's record batches or from a loaded Parquet file are the same. One
    row group is copied at a time, not the whole table.
    """
    file_schema = WORKLIST_FILE_SCHEMA if table.schema.names == WORKLIST_SCHEMA.names else table.schema
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, file_schema, compression="zstd", write_statistics=False) as w:
        for start in range(0, table.num_rows, ROW_GROUP_ROWS):
            group = table.slice(start, ROW_GROUP_ROWS).combine_chunks().cast(file_schema)
            w.write_table(group, row_group_size=ROW_GROUP_ROWS)
            del group
        if table.num_rows == 0:
            w.write_table(file_schema.empty_table(), row_group_size=ROW_GROUP_ROWS)
    return buf.getvalue()


@dataclass
class WorkList:
    """A frozen work list: items sorted by key as a WORKLIST_SCHEMA table, and the sha256 of its
    Parquet file (of either version).

    `table` (compact rows) is what the job holds; `items_table(start, stop)` expands rows to
    ARROW_SCHEMA items and `items` to a list of dicts, which costs ~1.7 KB per item: use it for
    small lists only.
    """

    url: str
    table: pa.Table
    sha256: str
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def version(self) -> int:
        return int(self.meta.get("version", WORKLIST_VERSION))

    def items_table(self, start: int = 0, stop: int | None = None) -> pa.Table:
        """Rows [start, stop) as items (ARROW_SCHEMA)."""
        stop = self.table.num_rows if stop is None else stop
        return expand_items(self.table.slice(start, stop - start))

    @property
    def items(self) -> list[dict]:
        return self.items_table().to_pylist()


@dataclass(frozen=True)
class InputShard:
    """Rows [start, stop) of a sorted work list; `id` is its index, `name` its fixed-width id.

    Holds a reference to the whole work list's (compact, WORKLIST_SCHEMA) table, not a copy, and
    expands its own rows into items on demand, so a plan of any number of shards costs a few
    hundred bytes per shard. The job hands the decode stage the shard's row range of the work list
    (put into Ray's object store once), which the decode actor expands itself (`table` / `items`
    here).
    """

    id: int
    start: int
    stop: int
    worklist_sha256: str
    source: pa.Table = field(repr=False, compare=False)
    # Row index in the work list of `source`'s first row (0 unless `source` is already this slice).
    source_start: int = field(default=0, repr=False, compare=False)

    @property
    def name(self) -> str:
        return f"shard-{self.id:06d}"

    @property
    def num_items(self) -> int:
        return self.stop - self.start

    @property
    def rows(self) -> pa.Table:
        """The shard's compact rows (WORKLIST_SCHEMA): a zero-copy slice of the work list."""
        return self.source.slice(self.start - self.source_start, self.stop - self.start)

    @property
    def table(self) -> pa.Table:
        """The shard's items (ARROW_SCHEMA), expanded from its rows (a copy of this shard's only)."""
        return expand_items(self.rows)

    def __reduce__(self):
        # Pickling an Arrow slice would carry the whole work list's buffers (and its dictionaries):
        # send fresh compact rows of this shard only (what Ray does when a shard goes to another process).
        rows = compact_items(self.table).take(pa.array(range(self.num_items), type=pa.int64()))  # (copies the key slice)
        return (InputShard, (self.id, self.start, self.stop, self.worklist_sha256, rows, self.start))

    @property
    def items(self) -> tuple[dict, ...]:
        """The shard's items as dicts (fields of ITEM_FIELDS, in that order)."""
        return tuple(self.table.to_pylist())

    def descriptor(self) -> dict:
        """`{id, worklist_sha256, num_items}`, the `input_shard` argument of ShardWriter.commit."""
        return {"id": self.id, "worklist_sha256": self.worklist_sha256, "num_items": self.num_items}


def _check_unique_keys(table: pa.Table) -> None:
    keys = table["key"]
    if len(keys) < 2:
        return
    same = pc.equal(keys[1:], keys[:-1])
    if pc.any(same).as_py():
        dups = sorted(set(keys[1:].filter(same).to_pylist()))
        raise ValueError(f"{len(dups)} duplicate work-item keys, e.g. {dups[:3]}; video ids must be unique per dataset")


def freeze_worklist(
    items: list[dict] | pa.Table,
    out_url: str,
    *,
    dataset: str,
    root: str,
    options: dict | None = None,
    report: ListReport | dict | None = None,
    storage_options: dict | None = None,
) -> WorkList:
    """Write items (dicts, or an ARROW_SCHEMA or WORKLIST_SCHEMA table; sorted here by key) as
    WL/worklist.parquet + WL/worklist.json (version 2), once.

    If WL is already frozen: returns the existing list (of whichever version) when it holds the
    same rows, else raises ValueError (a frozen list is never replaced silently).
    Duplicate keys raise ValueError naming them.
    """
    table = sort_items(items_to_table(items))
    _check_unique_keys(table)
    data = table_to_parquet_bytes(table)
    sha = hashlib.sha256(data).hexdigest()
    json_url = join(out_url, WORKLIST_JSON)
    if _exists(json_url, storage_options):
        existing = load_worklist(out_url, storage_options=storage_options)
        # A list of another version has another file hash for the same items: compare its rows in
        # this version's bytes instead.
        same = existing.sha256 if existing.version == WORKLIST_VERSION else hashlib.sha256(table_to_parquet_bytes(existing.table)).hexdigest()
        if same != sha:
            raise ValueError(
                f"a different work list is already frozen at {out_url} (sha256 {existing.sha256[:12]}…, "
                f"{len(existing)} items; new listing {sha[:12]}…, {table.num_rows} items); use a new output "
                f"folder, or delete {json_url} to re-list on purpose"
            )
        return existing
    rep = report.to_dict() if isinstance(report, ListReport) else (report or {})
    doc = {
        "schema": "worklist",
        "version": WORKLIST_VERSION,
        "sha256": sha,
        "num_items": table.num_rows,
        "dataset": dataset,
        "root": root,
        "options": dict(sorted((options or {}).items())),
        "report": rep,
    }
    _validate_doc(doc)
    # Parquet first, JSON last: the JSON's existence is what makes the list frozen.
    _atomic_write(join(out_url, WORKLIST_PARQUET), data, storage_options)
    del data
    _atomic_write(json_url, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), storage_options)
    return WorkList(url=out_url, table=table, sha256=sha, meta=doc)


def load_worklist(url: str, *, storage_options: dict | None = None, verify: bool = True) -> WorkList:
    """Read a frozen work list; with verify, a Parquet file whose sha256 differs raises ValueError."""
    json_url = join(url, WORKLIST_JSON)
    if not _exists(json_url, storage_options):
        raise ValueError(f"no frozen work list at {url} ({WORKLIST_JSON} missing); create it with freeze_worklist/ensure_worklist")
    doc = _validate_doc(json.loads(_read_bytes(json_url, storage_options)))
    data = _read_bytes(join(url, WORKLIST_PARQUET), storage_options)
    if verify:
        got = hashlib.sha256(data).hexdigest()
        if got != doc["sha256"]:
            raise ValueError(
                f"{join(url, WORKLIST_PARQUET)} is corrupt or was modified: sha256 {got[:12]}… but "
                f"{WORKLIST_JSON} records {doc['sha256'][:12]}…; restore it or re-list into a new folder"
            )
    version = doc["version"]
    file_schema = _FILE_SCHEMAS[version]
    # One thread, no pre-buffering: decoding row group after row group keeps the temporaries to
    # one group's size (read_table's parallel decode held ~2x the table at its peak). Version 2's
    # string columns with few values come back dictionary-encoded, as they are held.
    pf = pq.ParquetFile(pa.BufferReader(data), pre_buffer=False,
                        read_dictionary=list(DICT_COLUMNS) if version == 2 else None)
    if pf.schema_arrow.names != file_schema.names:
        raise ValueError(f"{join(url, WORKLIST_PARQUET)} has columns {pf.schema_arrow.names}, not "
                         f"{file_schema.names} (work list version {version}); re-list into a new folder")
    table = pf.read(use_threads=False)
    del data, pf
    table = table.cast(WORKLIST_SCHEMA) if version == 2 else compact_items(table.cast(ARROW_SCHEMA))
    if table.num_rows != doc["num_items"]:
        raise ValueError(f"{url}: {table.num_rows} rows but worklist.json says {doc['num_items']}")
    return WorkList(url=url, table=table, sha256=doc["sha256"], meta=doc)


def ensure_worklist(
    dataset: str,
    root: str,
    out_url: str,
    *,
    storage_options: dict | None = None,
    **options: Any,
) -> tuple[WorkList, bool]:
    """Load the frozen work list at out_url, or list the dataset once and freeze it.

    Returns (work list, created). A rerun finds worklist.json and never lists storage again.
    """
    from pipeline.sources.adapters import list_table

    if _exists(join(out_url, WORKLIST_JSON), storage_options):
        return load_worklist(out_url, storage_options=storage_options), False
    table, report = list_table(dataset, root, storage_options=storage_options, **options)
    safe_opts = {k: v for k, v in options.items() if isinstance(v, (str, int, float, bool, list, type(None)))}
    wl = freeze_worklist(table, out_url, dataset=dataset, root=root, options=safe_opts, report=report,
                         storage_options=storage_options)
    return wl, True


def input_shards(
    worklist: WorkList | pa.Table | list[dict], items_per_shard: int, *, worklist_sha256: str | None = None
) -> list[InputShard]:
    """Cut a work list into input shards of `items_per_shard` consecutive items (last one shorter).

    Pure function of (sorted items, items_per_shard): shard i holds items [i*n, (i+1)*n). A table
    or list that is not sorted by key is sorted first; without `worklist_sha256` the hash is that
    of the items' Parquet bytes (what freeze_worklist would record).
    """
    if items_per_shard < 1:
        raise ValueError(f"items_per_shard={items_per_shard}: must be >= 1 (e.g. 256)")
    if isinstance(worklist, WorkList):
        table, sha = worklist.table, worklist.sha256
    else:
        table = sort_items(items_to_table(worklist))
        sha = worklist_sha256 or hashlib.sha256(table_to_parquet_bytes(table)).hexdigest()
    n = table.num_rows
    return [
        InputShard(id=i // items_per_shard, start=i, stop=min(n, i + items_per_shard), worklist_sha256=sha, source=table)
        for i in range(0, n, items_per_shard)
    ]
