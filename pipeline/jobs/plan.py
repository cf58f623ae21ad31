"""Before any work: job-level checks (fail fast), the frozen work list, the job plan, and which
input shards are still to do. Plain Python; no Ray.

Everything a job knows lives in its output location:

    OUT/worklist/worklist.parquet + worklist.json   the frozen, hashed work list (listed once)
    OUT/job.json                                      the plan (kind job_plan): settings, tokenizer,
                                                      work-list hash, number of input shards
    OUT/shard-NNNNNN.{arrow,tar} + .json              committed output shards (sidecar = committed)
    OUT/manifest.json, OUT/run_summary.json           written last

A rerun reads them back, so a job resumes on any machine or cluster that can reach OUT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import schemas
from pipeline import storage
from pipeline.jobs.config import TokenizeConfig
from pipeline.jobs.steps import tokenizer_info
from pipeline.shards import clean_debris, committed_shards
from pipeline.sources import InputShard, ensure_worklist, input_shards

JOB_PLAN = "job.json"
WORKLIST_DIR = "worklist"
RUN_SUMMARY = "run_summary.json"


class JobError(RuntimeError):
    """A job-level problem found before any work started; the message says what to do."""


@dataclass
class JobPlan:
    cfg: TokenizeConfig
    tokenizer: dict[str, Any]       # {id, sha256, vocab_size, downsample}
    codebook_size: int
    worklist_sha256: str
    num_items: int
    shards: list[InputShard]
    done: list[dict] = field(default_factory=list)       # sidecars of shards committed before this run
    committed: list[dict] = field(default_factory=list)  # sidecars this run committed (as written)
    pending: list[InputShard] = field(default_factory=list)
    listed_now: bool = False
    cleaned: list[str] = field(default_factory=list)
    plan_doc: dict = field(default_factory=dict)


def load_tokenizer_checked(spec: str) -> Any:
    """`pipeline.tokenizers.load_tokenizer(spec)`, with a JobError naming the spec on failure."""
    try:
        from pipeline.tokenizers import load_tokenizer
    except ImportError as e:
        raise JobError(f"pipeline.tokenizers is not available ({e}); install toto with its tokenizers") from None
    try:
        return load_tokenizer(spec)
    except Exception as e:  # noqa: BLE001 - any failure to load is a bad spec for the user
        raise JobError(
            f"--tokenizer {spec!r} cannot be loaded: {type(e).__name__}: {e}. Use 'demo' (bundled) or "
            "'dalle:DIR' / 'vqgan:DIR' / 'dvae:DIR' pointing at a converted tokenizer"
        ) from None


def _check_input(cfg: TokenizeConfig) -> None:
    try:
        fs, path = storage.url_to_fs(cfg.input, cfg.storage_options)
        ok = fs.isdir(path)
    except Exception as e:  # noqa: BLE001
        raise JobError(f"dataset root {storage.redact(cfg.input)} cannot be reached: {type(e).__name__}: {storage.redact(str(e))}") from None
    if not ok:
        raise JobError(f"dataset root {storage.redact(cfg.input)} does not exist or is not a folder; check --input")


def prepare(cfg: TokenizeConfig, tok: Any | None = None, precision: str | None = None) -> JobPlan:
    """Fail fast on job-level errors, then freeze/load the work list and compute what is left.

    `precision` is what the tokenizer actors will compute at (pipeline.jobs.ray_job.job_precision
    decides it from the cluster); default: cfg's, else fp32 (CPU actors).
    Raises JobError (before anything is written except a write probe) for an unwritable output,
    a tokenizer spec that does not load, a missing dataset root, or an output that already holds
    a different job (other settings, tokenizer, precision or work list).
    """
    so = cfg.storage_options
    plan_url = storage.join(cfg.output, JOB_PLAN)
    try:
        old_plan = storage.read_json(plan_url, "job_plan", so) if storage.exists(plan_url, so) else None
    except (OSError, PermissionError):
        old_plan = None  # unreadable output: check_writable below says why
    if old_plan is None:
        _check_input(cfg)  # a resumed job works from its frozen work list
    try:
        storage.check_writable(cfg.output, so)
    except RuntimeError as e:
        raise JobError(f"{e}; choose a writable --output") from None
    if tok is None:
        tok = load_tokenizer_checked(cfg.tokenizer)
    try:
        info = tokenizer_info(tok, precision or cfg.tokenizer_precision(gpu_actors=False))
    except ValueError as e:
        raise JobError(str(e)) from None
    codebook = int(info["vocab_size"])
    if not 2 <= codebook <= 65536:
        raise JobError(f"tokenizer {info['id']} has {codebook} codes; token shards store uint16 codes (at most 65536)")
    if cfg.resolution % info["downsample"]:
        raise JobError(f"--resolution {cfg.resolution} is not a multiple of the tokenizer's downsampling {info['downsample']}")
    if old_plan is not None:
        _check_same_job(cfg, info, old_plan)

    wl_url = storage.join(cfg.output, WORKLIST_DIR)
    list_opts: dict[str, Any] = {"chunk_seconds": cfg.decode_config().chunk_seconds}
    if cfg.splits:
        list_opts["splits"] = list(cfg.splits)
    if cfg.listing:
        list_opts["listing"] = cfg.listing
    try:
        wl, created = ensure_worklist(cfg.dataset, cfg.input, wl_url, storage_options=so, **list_opts)
    except ValueError as e:
        raise JobError(f"listing {cfg.dataset} at {storage.redact(cfg.input)} failed: {e}") from None
    # The work list stays one Arrow table; input shards are row ranges of it (no dict per item).
    items = wl.table.slice(0, cfg.limit) if cfg.limit else wl.table
    if not items.num_rows:
        raise JobError(f"{cfg.dataset} at {storage.redact(cfg.input)} lists no usable inputs; check --input and --dataset")
    shards = input_shards(items, cfg.items_per_shard, worklist_sha256=wl.sha256)
    if len(shards) > 1_000_000:
        raise JobError(f"{len(shards)} input shards exceed shard-999999; raise --items-per-shard")

    plan_doc = schemas.new_document(
        "job_plan",
        dataset=cfg.dataset,
        input=storage.redact(cfg.input),
        worklist_sha256=wl.sha256,
        worklist_file=f"{WORKLIST_DIR}/worklist.parquet",
        num_items=items.num_rows,
        num_input_shards=len(shards),
        settings=cfg.settings(),
        tokenizer=info,
    )
    if old_plan is not None:
        if old_plan["worklist_sha256"] != wl.sha256 or old_plan["num_input_shards"] != len(shards):
            raise JobError(f"{plan_url} belongs to another work list; use a new --output")
    else:
        storage.write_json(plan_url, plan_doc, "job_plan", so)

    # Only this job writes OUT, and its previous driver is gone: leftovers of a killed run go now.
    # One listing serves both; the sidecars are read once here (concurrently) and finish() reuses them.
    names = storage.listdir(cfg.output, so)
    cleaned = clean_debris(cfg.output, so, names=names)
    gone = {storage.basename(u) for u in cleaned}
    done = committed_shards(cfg.output, so, names=[n for n in names if n not in gone])
    by_id = {s.id: s for s in shards}
    for side in done:
        sid = side["shard_id"]
        if sid not in by_id or side["input_shard"]["worklist_sha256"] != wl.sha256:
            raise JobError(f"{cfg.output} holds shard {sid} of another work list; use a new --output")
        if side["tokenizer"]["sha256"] != info["sha256"]:
            raise JobError(f"{cfg.output} holds shard {sid} made by tokenizer {side['tokenizer']['id']}; use a new --output")
    done_ids = {s["shard_id"] for s in done}
    return JobPlan(
        cfg=cfg, tokenizer=info, codebook_size=codebook, worklist_sha256=wl.sha256, num_items=items.num_rows,
        shards=shards, done=done, pending=[s for s in shards if s.id not in done_ids], listed_now=created,
        cleaned=cleaned, plan_doc=plan_doc,
    )


def _check_same_job(cfg: TokenizeConfig, info: dict, old: dict) -> None:
    new_settings = cfg.settings()
    diff = {k: (old["settings"].get(k), v) for k, v in new_settings.items() if old["settings"].get(k) != v}
    diff.pop("tokenizer_spec", None)
    if diff:
        what = ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in sorted(diff.items()))
        raise JobError(f"{cfg.output} holds a job with other settings ({what}); rerun with the same options or use a new --output")
    old_sha = (old.get("tokenizer") or {}).get("sha256")
    if old_sha and old_sha != info["sha256"]:
        raise JobError(
            f"{cfg.output} was tokenized with {old['tokenizer']['id']}, not {info['id']}; use a new --output"
        )
    old_prec = (old.get("tokenizer") or {}).get("precision")
    if old_prec != info["precision"]:
        fix = (f"rerun with --precision {old_prec}" if old_prec else
               "it was made by a Toto that did not record the precision: finish it with that Toto")
        raise JobError(
            f"{cfg.output} holds codes computed at precision {old_prec or 'unrecorded'}, but this run would compute "
            f"{info['precision']} (codes of different precisions differ and must not share a dataset); {fix}, "
            "or use a new --output"
        )
