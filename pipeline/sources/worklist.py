"""The frozen work list: sorted items in one Parquet file, its sha256 in a JSON document beside it,
and the deterministic cut into input shards.

Layout of a work-list directory WL (local or s3://):

    WL/worklist.parquet   one row per work item (fields of pipeline.sources.items.ITEM_FIELDS), sorted by key
    WL/worklist.json      {"schema": "worklist", "version": 1, "sha256", "num_items", "dataset", "root",
                           "options", "report"}: written last, so its presence means "frozen"

Once frozen, a work list is never rewritten: `freeze_worklist` on an existing one returns it if
the content is identical and raises otherwise, and `ensure_worklist` lists storage only when no
frozen list exists yet.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.sources._fs import is_local, join, url_to_fs
from pipeline.sources.items import ITEM_FIELDS, ListReport

WORKLIST_PARQUET = "worklist.parquet"
WORKLIST_JSON = "worklist.json"
WORKLIST_VERSION = 1

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



def _validate_doc(doc: dict) -> dict:
    """Validate a worklist.json document against schemas/worklist.v1.json."""
    import jsonschema

    if doc.get("schema") != "worklist":
        raise ValueError(f"not a work-list document (schema={doc.get('schema')!r}); expected 'worklist'")
    if doc.get("version") != WORKLIST_VERSION:
        raise ValueError(
            f"work list version {doc.get('version')!r} is not supported (this code reads version "
            f"{WORKLIST_VERSION}); rebuild the work list with this version of toto"
        )
    from importlib.resources import files

    schema = json.loads((files("schemas") / f"worklist.v{WORKLIST_VERSION}.json").read_text())
    try:
        jsonschema.validate(doc, schema)
    except jsonschema.ValidationError as e:
        raise ValueError(f"worklist.json is invalid: {e.message} at {list(e.absolute_path)}") from None
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


def items_to_parquet_bytes(items: list[dict]) -> bytes:
    """Deterministic Parquet bytes for sorted items (same items + same pyarrow ⇒ same bytes)."""
    cols = {name: [it.get(name) for it in items] for name in ITEM_FIELDS}
    table = pa.table(cols, schema=ARROW_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=65536, write_statistics=False)
    return buf.getvalue()


@dataclass
class WorkList:
    """A frozen work list: items sorted by key, and the sha256 of its Parquet file."""

    url: str
    items: list[dict]
    sha256: str
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class InputShard:
    """A contiguous run of work items; `id` is its index, `name` its fixed-width id."""

    id: int
    items: tuple[dict, ...]
    worklist_sha256: str

    @property
    def name(self) -> str:
        return f"shard-{self.id:06d}"

    @property
    def num_items(self) -> int:
        return len(self.items)

    def descriptor(self) -> dict:
        """`{id, worklist_sha256, num_items}`, the `input_shard` argument of ShardWriter.commit."""
        return {"id": self.id, "worklist_sha256": self.worklist_sha256, "num_items": self.num_items}


def freeze_worklist(
    items: list[dict],
    out_url: str,
    *,
    dataset: str,
    root: str,
    options: dict | None = None,
    report: ListReport | dict | None = None,
    storage_options: dict | None = None,
) -> WorkList:
    """Write items (sorted here by key) as WL/worklist.parquet + WL/worklist.json, once.

    If WL is already frozen: returns the existing list when its content hash equals these
    items', else raises ValueError (a frozen list is never replaced silently).
    Duplicate keys raise ValueError naming them.
    """
    items = sorted(items, key=lambda i: i["key"])
    keys = [i["key"] for i in items]
    dups = sorted({k for a, k in zip(keys, keys[1:], strict=False) if a == k})
    if dups:
        raise ValueError(f"{len(dups)} duplicate work-item keys, e.g. {dups[:3]}; video ids must be unique per dataset")
    data = items_to_parquet_bytes(items)
    sha = hashlib.sha256(data).hexdigest()
    json_url = join(out_url, WORKLIST_JSON)
    if _exists(json_url, storage_options):
        existing = load_worklist(out_url, storage_options=storage_options)
        if existing.sha256 != sha:
            raise ValueError(
                f"a different work list is already frozen at {out_url} (sha256 {existing.sha256[:12]}…, "
                f"{len(existing)} items; new listing {sha[:12]}…, {len(items)} items); use a new output "
                f"folder, or delete {json_url} to re-list on purpose"
            )
        return existing
    rep = report.to_dict() if isinstance(report, ListReport) else (report or {})
    doc = {
        "schema": "worklist",
        "version": WORKLIST_VERSION,
        "sha256": sha,
        "num_items": len(items),
        "dataset": dataset,
        "root": root,
        "options": dict(sorted((options or {}).items())),
        "report": rep,
    }
    _validate_doc(doc)
    # Parquet first, JSON last: the JSON's existence is what makes the list frozen.
    _atomic_write(join(out_url, WORKLIST_PARQUET), data, storage_options)
    _atomic_write(json_url, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), storage_options)
    return WorkList(url=out_url, items=items, sha256=sha, meta=doc)


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
    table = pq.read_table(io.BytesIO(data))
    items = table.to_pylist()
    if len(items) != doc["num_items"]:
        raise ValueError(f"{url}: {len(items)} rows but worklist.json says {doc['num_items']}")
    return WorkList(url=url, items=items, sha256=doc["sha256"], meta=doc)


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
    from pipeline.sources.adapters import list_items

    if _exists(join(out_url, WORKLIST_JSON), storage_options):
        return load_worklist(out_url, storage_options=storage_options), False
    items, report = list_items(dataset, root, storage_options=storage_options, **options)
    safe_opts = {k: v for k, v in options.items() if isinstance(v, (str, int, float, bool, list, type(None)))}
    wl = freeze_worklist(items, out_url, dataset=dataset, root=root, options=safe_opts, report=report,
                         storage_options=storage_options)
    return wl, True


def input_shards(worklist: WorkList | list[dict], items_per_shard: int, *, worklist_sha256: str | None = None) -> list[InputShard]:
    """Cut a work list into input shards of `items_per_shard` consecutive items (last one shorter).

    Pure function of (sorted items, items_per_shard): shard i holds items [i*n, (i+1)*n).
    """
    if items_per_shard < 1:
        raise ValueError(f"items_per_shard={items_per_shard}: must be >= 1 (e.g. 256)")
    if isinstance(worklist, WorkList):
        items, sha = worklist.items, worklist.sha256
    else:
        items = sorted(worklist, key=lambda i: i["key"])
        sha = worklist_sha256 or hashlib.sha256(items_to_parquet_bytes(items)).hexdigest()
    return [
        InputShard(id=i // items_per_shard, items=tuple(items[i : i + items_per_shard]), worklist_sha256=sha)
        for i in range(0, len(items), items_per_shard)
    ]
