"""Dataset sources: adapters that list a dataset into work items, the frozen work list, input shards.

Public API (plain Python, no Ray):

    from pipeline.sources import list_items, ensure_worklist, freeze_worklist, load_worklist, input_shards

    table, report = list_table("kinetics600", "s3://bucket/k600", storage_options=None,
                               splits=["train"], max_item_seconds=60, chunk_seconds=64/30)
    print(report.summary())          # counts of missing/unmatched files + a few examples each
    wl = freeze_worklist(table, "out/worklist", dataset="kinetics600", root="s3://bucket/k600", report=report)
    wl, created = ensure_worklist("kinetics600", "s3://bucket/k600", "out/worklist")  # lists only once
    wl = load_worklist("out/worklist")              # verifies the Parquet sha256; wl.table is Arrow
    for shard in input_shards(wl, items_per_shard=256):
        shard.id, shard.name ("shard-000000"), shard.start, shard.stop (rows of wl.table),
        shard.rows (zero-copy slice of the compact rows), shard.table (its items, ARROW_SCHEMA),
        shard.items (tuple of item dicts),
        shard.descriptor()

Work items live in Arrow tables of compact rows (WORKLIST_SCHEMA, work-list version 2) from
listing to input shard (ItemColumns in the adapters, never a dict per item); an input shard
expands its own rows to ARROW_SCHEMA items (expand_items); `list_items` and `WorkList.items` give
dicts for small lists.

Datasets (ADAPTERS): kinetics400, kinetics600, kinetics700, ego4d, howto100m, imagenet, folder, cater.
Layouts: docs/datasets.md. Work-item fields: pipeline.sources.items (module docstring).
`chunk_seconds` must equal the decoder's `DecodeConfig.chunk_seconds` (chunk_frames / max_fps) so
the chunks of a long video's items number consecutively.
"""

from pipeline.sources.adapters import (
    ADAPTERS,
    list_items,
    list_table,
    list_tar_members,
    probe_duration,
    probe_video_header,
)
from pipeline.sources.items import (
    ARROW_SCHEMA,
    DEFAULT_CHUNK_SECONDS,
    DEFAULT_MAX_ITEM_SECONDS,
    ITEM_FIELDS,
    WORKLIST_SCHEMA,
    ItemColumns,
    ListReport,
    compact_items,
    expand_items,
    make_item,
    make_key,
    safe_video_id,
    segment_video,
)
from pipeline.sources.worklist import (
    InputShard,
    WorkList,
    ensure_worklist,
    freeze_worklist,
    input_shards,
    load_worklist,
)

__all__ = [
    "ADAPTERS",
    "DEFAULT_CHUNK_SECONDS",
    "DEFAULT_MAX_ITEM_SECONDS",
    "ARROW_SCHEMA",
    "ITEM_FIELDS",
    "InputShard",
    "ItemColumns",
    "ListReport",
    "WORKLIST_SCHEMA",
    "WorkList",
    "compact_items",
    "ensure_worklist",
    "expand_items",
    "freeze_worklist",
    "input_shards",
    "list_items",
    "list_table",
    "list_tar_members",
    "load_worklist",
    "make_item",
    "make_key",
    "probe_duration",
    "probe_video_header",
    "safe_video_id",
    "segment_video",
]
