"""Decoding work items into fixed-size RGB frames, with bad-input isolation.

Public API (plain Python, no Ray):

    from pipeline.decode import DecodeConfig, decode_items, decode_item, DecodeWorker, error_record

    cfg = DecodeConfig(resolution=128, fps=None, max_fps=30, chunk_frames=64, timeout_s=300)
    for rec in decode_items(shard.items, cfg, storage_options=None):   # one worker subprocess
        if rec["type"] == "error":
            errors.append({"uri": rec["uri"], "reason": rec["reason"]})
        else:
            rec["frames"]      # uint8 (T, R, R, 3), T <= chunk_frames; RGB, rotation applied
            rec["key"], rec["dataset"], rec["split"], rec["video_id"], rec["chunk"], rec["label"],
            rec["t_start"], rec["fps"], rec["num_frames"], rec["uri"]

Records per item are all-or-nothing: an item gives its chunk records, or exactly one error record
`{"type": "error", "key", "uri", "reason"}` whose reason starts with one of "zero bytes",
"truncated", "no video stream", "timeout", "decoder crashed", "decompression bomb",
"missing file" or "decoder error: ...". Images give one chunk of one frame with fps 0.0.
`decode_item` decodes in-process (returns a list); `iter_decode_item` streams and raises
DecodeError. Pass `cfg.chunk_seconds` to the work-list builders so long-video items line up.

Threads: `threads=0` lets FFmpeg use every core for one video; when many decode tasks share a
node (Ray), use `threads=1` and one task per core. Per-core throughput, the choice of the AREA
interpolation and what it implies for decode cores per GPU are in BENCHMARKS.md ("Decode").
"""

from pipeline.decode.config import INTERPOLATIONS, DecodeConfig, DecodeError
from pipeline.decode.worker import DecodeWorker, decode_item, decode_items, error_record, iter_decode_item

__all__ = [
    "INTERPOLATIONS",
    "DecodeConfig",
    "DecodeError",
    "DecodeWorker",
    "decode_item",
    "decode_items",
    "error_record",
    "iter_decode_item",
]
