"""Settings of one tokenization job, validated on construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.sources import ADAPTERS

FORMATS = ("arrow", "webdataset")
PRECISIONS = ("fp32", "tf32", "bf16")  # = pipeline.tokenizers.numerics.PRECISIONS (not imported: no torch here)
# Datasets whose rows may hold a single frame each (images); the tokenizer stage asks Ray for enough
# of their rows to fill a forward pass.
SINGLE_FRAME_DATASETS = ("imagenet", "folder")
# Work items per input (= output) shard when not given. An input shard is one event for Ray Data's
# executor and one output file: 64 ten-second clips are ~5e6 tokens at 128 px, 64 images only
# 16 384, so image datasets get shards of 16 384 items (~4e6 tokens, ~8 MB of uint16).
DEFAULT_ITEMS_PER_SHARD = 64
IMAGE_ITEMS_PER_SHARD = 16384
IMAGE_DATASETS = ("imagenet",)
GPU_MIN_FORWARD = 256  # = VisualTokenizer.GPU_MIN_FORWARD: frames per forward on a GPU at least
# Every block and every tokenizer call is an event for Ray Data's executor, which runs in the
# driver process: its cost per token falls with the frames an event carries (BENCHMARKS.md "driver
# cost per token"). On GPUs (thousands of frames/s each) events carry this many bytes of frames;
# on CPUs (a demo, this laptop-scale machine) they stay small so that work starts and ends promptly.
# A decode block is built and copied ~3 times in its actor (frames, Arrow table, object store):
# 256 MB keeps a 1-CPU decode actor under ~1 GB, which CPU nodes with 2 GB per core hold.
GPU_DECODE_BLOCK_BYTES = 256 << 20  # decode output block: ≈ 5 500 frames at 128 px
CPU_DECODE_BLOCK_BYTES = 32 << 20
GPU_CALL_BYTES = 1 << 30            # frames per GPU tokenizer call: ≈ 21 800 at 128 px (≈ 3 s of an H100)
# Tokenizer GPUs per Ray Data executor when `executors` is not given. One executor's cost is per
# block it moves; at the GPU defaults one core keeps up with ~95-240 H100s (BENCHMARKS.md "driver
# cost per token"), so 64 leaves it at most ~2/3 busy on a slow head or worker core.
EXECUTOR_GPUS = 64


@dataclass(frozen=True)
class TokenizeConfig:
    """What `toto-pipeline tokenize` does; every field has a CLI option of the same name.

    dataset:          adapter name (pipeline.sources.ADAPTERS).
    input:            dataset root (local path or s3://).
    output:           output location (local path or s3://): shards, sidecars, job.json, worklist/,
                      manifest.json and run_summary.json. All job state lives here and only here.
    tokenizer:        spec for pipeline.tokenizers.load_tokenizer ("demo", "dalle:DIR", ...).
    resolution:       frame side in px fed to the tokenizer.
    fps:              output frame rate; None = the video's native rate capped at max_fps.
    max_fps:          cap on the output rate (also fixes the chunk window chunk_frames / max_fps).
    chunk_frames:     most frames in one token row.
    format:           "arrow" (Arrow IPC) or "webdataset" (tar).
    items_per_shard:  work items per input shard = per output shard; None = IMAGE_ITEMS_PER_SHARD
                      (16 384) for image datasets (imagenet), DEFAULT_ITEMS_PER_SHARD (64) otherwise.
    limit:            process only the first N work items (sorted by key); None = all.
    splits:           restrict the listing to these splits (None = all the adapter finds).
    listing:          a text file (local or s3://, .gz/.zst accepted) of paths relative to `input`,
                      one per line, listed instead of storage (e.g. made from an S3 Inventory report);
                      read once, when the work list is first frozen (docs/datasets.md).
    ray_address:      None = embedded local Ray; "auto" or "HOST:PORT" / "ray://..." = join a cluster.
    num_cpus:         CPUs of the embedded Ray (None = all cores of this machine).
    num_gpus:         up to this many tokenizer actors on GPUs (one GPU each). On a cluster the pool
                      starts with one actor and grows with the work; its GPU requests are what make
                      an autoscaling cluster start GPU nodes, so N may exceed the GPUs up at submit.
                      None = the GPUs the cluster has when the job starts; 0 = CPU tokenizer actors.
                      Embedded Ray: at most this machine's GPUs.
    decode_concurrency: most decode actors (each decodes one input shard at a time in a watchdog
                      subprocess). None: on a cluster no bound (the pool grows while shards wait
                      and CPUs can be had); embedded, the CPUs left after the other actors.
    decode_cpus:      CPUs reserved per decode actor (fractional is allowed).
    decode_threads:   FFmpeg threads per decode (0 = FFmpeg chooses); None = 1 on a cluster (ray_address
                      given: one decode actor per core, where per-core throughput is highest
                      single-threaded, BENCHMARKS.md) and 0 embedded.
    tokenizer_cpus:   CPUs reserved per CPU tokenizer actor (also its torch thread count, rounded up).
    cpu_actors:       most tokenizer actors when there is no GPU.
    writers:          shard writer actors (hold the tokens of the shards in flight, encode, hash and
                      upload data files); None = one per 8 tokenizer actors (at least one).
    writer_cpus:      CPUs reserved per writer actor (0 lets them share any node, the head included).
    executors:        Ray Data streaming executors the pending shards are split across (each runs
                      its own decode and tokenizer pools over every executors-th shard; all feed the
                      same writers). 1 runs it in the driver process; more run in executor actors
                      (1 CPU each on a cluster) so that no one process pays Ray Data's cost per block
                      for the whole cluster. None = one per EXECUTOR_GPUS tokenizer GPUs (at least 1).
    batch_size:       frames per tokenizer forward pass (at least GPU_MIN_FORWARD on a GPU).
    rows_per_batch:   token rows (chunks) per tokenizer-stage batch handed over by Ray Data, at least;
                      raised so that a batch holds a forward pass of frames (tokenizer_batch_rows).
    decode_block_mb:  MB of frames per decode output block (a block closes at the first chunk past it);
                      None = 256 with GPU tokenizer actors, 32 without. Each block is an event for the
                      driver (its cost per token falls with the size) and costs ~3x its size in its
                      decode actor's memory while it is built.
    precision:        tokenizer arithmetic, "fp32" | "tf32" | "bf16" (docs/tokenizers.md); None = bf16
                      when the tokenizer actors get GPUs, fp32 on CPUs. Recorded in job.json and the
                      sidecars; a resume or a mix refuses shards of another precision.
    decode_timeout_s: per-input decode time limit; a hang costs one input, not the job.
    progress:         live progress display on stderr.
    """

    dataset: str
    input: str
    output: str
    tokenizer: str = "demo"
    resolution: int = 128
    fps: float | None = None
    max_fps: float = 30.0
    chunk_frames: int = 64
    format: str = "arrow"
    items_per_shard: int | None = None
    limit: int | None = None
    splits: tuple[str, ...] | None = None
    listing: str | None = None
    ray_address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    decode_concurrency: int | None = None
    decode_cpus: float = 1.0
    decode_threads: int | None = None
    tokenizer_cpus: float = 1.0
    cpu_actors: int = 1
    writers: int | None = None
    writer_cpus: float = 0.0
    executors: int | None = None
    batch_size: int = 64
    rows_per_batch: int = 16
    decode_block_mb: float | None = None
    precision: str | None = None
    decode_timeout_s: float = 300.0
    compression: str | None = None
    progress: bool = True
    storage_options: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        def bad(name: str, value: object, fix: str) -> None:
            raise ValueError(f"TokenizeConfig.{name}={value!r} is invalid: {fix}")

        if self.dataset not in ADAPTERS:
            bad("dataset", self.dataset, f"choose one of {sorted(ADAPTERS)}")
        for name in ("input", "output", "tokenizer"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                bad(name, v, "give a non-empty string")
        if self.format not in FORMATS:
            bad("format", self.format, f"choose one of {FORMATS}")
        if not isinstance(self.resolution, int) or not 8 <= self.resolution <= 4096:
            bad("resolution", self.resolution, "use an int in [8, 4096], e.g. 128")
        if not isinstance(self.chunk_frames, int) or self.chunk_frames < 1:
            bad("chunk_frames", self.chunk_frames, "use an int >= 1, e.g. 64")
        if self.items_per_shard is None:
            object.__setattr__(self, "items_per_shard", IMAGE_ITEMS_PER_SHARD if self.dataset in IMAGE_DATASETS
                               else DEFAULT_ITEMS_PER_SHARD)
        if not isinstance(self.items_per_shard, int) or self.items_per_shard < 1:
            bad("items_per_shard", self.items_per_shard, "use an int >= 1, e.g. 64")
        if self.listing is not None and (not isinstance(self.listing, str) or not self.listing.strip()):
            bad("listing", self.listing, "give the path or URL of a listing file, or None to list storage")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            bad("limit", self.limit, "use None (everything) or an int >= 1")
        if self.num_cpus is not None and self.num_cpus < 1:
            bad("num_cpus", self.num_cpus, "use None (all cores) or an int >= 1")
        if self.num_gpus is not None and self.num_gpus < 0:
            bad("num_gpus", self.num_gpus, "use None (all GPUs), 0 (CPU tokenizers) or a positive int")
        if self.decode_concurrency is not None and self.decode_concurrency < 1:
            bad("decode_concurrency", self.decode_concurrency, "use None (auto) or an int >= 1")
        for name in ("decode_cpus", "tokenizer_cpus"):
            if not 0 < getattr(self, name) <= 256:
                bad(name, getattr(self, name), "use a positive number of CPUs, e.g. 1 or 0.5")
        if self.writers is not None and (not isinstance(self.writers, int) or not 1 <= self.writers <= 4096):
            bad("writers", self.writers, "use None (one per 8 tokenizer actors) or an int in [1, 4096]")
        if self.executors is not None and (not isinstance(self.executors, int) or not 1 <= self.executors <= 1024):
            bad("executors", self.executors, f"use None (one per {EXECUTOR_GPUS} tokenizer GPUs) or an int in [1, 1024]")
        if not 0 <= self.writer_cpus <= 256:
            bad("writer_cpus", self.writer_cpus, "use a number of CPUs >= 0, e.g. 0 or 1")
        for name in ("cpu_actors", "batch_size", "rows_per_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                bad(name, v, "use an int >= 1")
        if self.decode_block_mb is not None and not 0 < self.decode_block_mb <= 4096:
            bad("decode_block_mb", self.decode_block_mb, "use None (256 on GPUs, 32 on CPUs) or a number in (0, 4096]")
        if self.precision is not None and self.precision not in PRECISIONS:
            bad("precision", self.precision, f"choose one of {PRECISIONS}, or None (bf16 on GPUs, fp32 on CPUs)")
        if self.precision == "tf32" and self.num_gpus == 0:
            bad("precision", self.precision, "tf32 runs on GPUs only; with num_gpus=0 use fp32 or bf16")
        if self.decode_threads is not None and (not isinstance(self.decode_threads, int) or self.decode_threads < 0):
            bad("decode_threads", self.decode_threads, "use None (1 on a cluster, else 0), 0 (FFmpeg chooses) or an int >= 1")
        if not self.decode_timeout_s > 0:
            bad("decode_timeout_s", self.decode_timeout_s, "use a positive number of seconds")
        if self.compression not in (None, "zstd"):
            bad("compression", self.compression, "use None or 'zstd' (arrow only)")
        if self.compression and self.format != "arrow":
            bad("compression", self.compression, "compression applies to --format arrow only")
        # DecodeConfig validates fps / max_fps / resolution combinations with its own messages.
        self.decode_config()

    def decode_config(self):  # -> DecodeConfig (import kept local: config is imported by the CLI)
        from pipeline.decode import DecodeConfig

        return DecodeConfig(
            resolution=self.resolution,
            fps=self.fps,
            max_fps=self.max_fps,
            chunk_frames=self.chunk_frames,
            timeout_s=self.decode_timeout_s,
            threads=self.decode_threads if self.decode_threads is not None else (1 if self.ray_address else 0),
        )

    def tokenizer_precision(self, gpu_actors: bool) -> str:
        """The precision the tokenizer actors compute at: the explicit one, else bf16 on GPUs and fp32 on CPUs."""
        if self.precision == "tf32" and not gpu_actors:
            raise ValueError("--precision tf32 runs on GPUs only, and this job's tokenizer actors have none; "
                             "use --precision fp32 or bf16, or give the cluster GPUs")
        if self.precision is not None:
            return self.precision
        return "bf16" if gpu_actors else "fp32"

    def tokenizer_batch_rows(self, gpu_actors: bool) -> int:
        """Rows per tokenizer-stage batch: rows_per_batch, raised until the rows hold the frames of
        one call when each row has as few frames as this dataset's rows can have (1 for images,
        chunk_frames for videos). A call's frames: on CPUs one forward pass (batch_size); on GPUs
        GPU_CALL_BYTES of frames at this resolution (many forward passes of batch_size, at least
        GPU_MIN_FORWARD), so that Ray Data's work per call is spread over many tokens."""
        if gpu_actors:
            frames = max(self.batch_size, GPU_MIN_FORWARD, GPU_CALL_BYTES // (3 * self.resolution ** 2))
        else:
            frames = self.batch_size
        per_row = 1 if self.dataset in SINGLE_FRAME_DATASETS else self.chunk_frames
        return max(self.rows_per_batch, math.ceil(frames / per_row))

    def decode_block_bytes(self, gpu_actors: bool) -> int:
        """Bytes of frames per decode output block (a block closes at the first chunk past it)."""
        if self.decode_block_mb is not None:
            return max(1, int(self.decode_block_mb * (1 << 20)))
        return GPU_DECODE_BLOCK_BYTES if gpu_actors else CPU_DECODE_BLOCK_BYTES

    def settings(self) -> dict[str, Any]:
        """What decides the output bytes: a rerun into the same output must have the same settings."""
        return {
            "dataset": self.dataset,
            "resolution": self.resolution,
            "fps": self.fps,
            "max_fps": self.max_fps,
            "chunk_frames": self.chunk_frames,
            "format": self.format,
            "compression": self.compression,
            "items_per_shard": self.items_per_shard,
            "limit": self.limit,
            "splits": list(self.splits) if self.splits else None,
            "tokenizer_spec": self.tokenizer,
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("storage_options")
        d["splits"] = list(self.splits) if self.splits else None
        return d
