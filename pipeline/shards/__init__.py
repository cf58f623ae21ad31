"""Token shards: one writer/reader interface over two formats (Arrow IPC, WebDataset tar)."""

from pipeline.shards.rows import COLUMNS, META_COLUMNS, check_key, make_key, normalize_row
from pipeline.shards.store import (
    MANIFEST,
    ShardReader,
    ShardWriter,
    build_manifest,
    clean_debris,
    committed_shards,
    debris,
    errors_by_reason,
    open_shard,
    read_manifest,
    reason_kind,
    shard_name,
    token_histogram,
    unigram_stats,
    verify_checks,
    verify_shard,
    write_manifest,
)

__all__ = [
    "COLUMNS", "META_COLUMNS", "MANIFEST", "ShardReader", "ShardWriter", "build_manifest", "check_key",
    "clean_debris", "committed_shards", "debris", "errors_by_reason", "make_key", "normalize_row", "reason_kind",
    "open_shard", "read_manifest", "shard_name", "token_histogram", "unigram_stats", "verify_checks", "verify_shard",
    "write_manifest",
]
