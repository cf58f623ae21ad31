"""The tokenization job: `toto-pipeline tokenize` on Ray Data, exactly once per input shard, resumable.

    from pipeline.jobs import TokenizeConfig, run_tokenize
    summary = run_tokenize(TokenizeConfig(dataset="folder", input="media/", output="tok/"))

Plain steps (decode an input shard, tokenize records, assemble and commit output shards) live in
pipeline.jobs.steps; pipeline.jobs.ray_job is the only module that knows Ray.
"""

from pipeline.jobs.config import TokenizeConfig
from pipeline.jobs.plan import JobError, JobPlan, prepare

__all__ = ["JobError", "JobPlan", "TokenizeConfig", "prepare", "ray_session", "run_tokenize"]


def run_tokenize(cfg: TokenizeConfig, **kw):  # imported lazily: Ray is heavy to import
    from pipeline.jobs.ray_job import run_tokenize as _run

    return _run(cfg, **kw)


def ray_session(cfg: TokenizeConfig):
    """A context in which several run_tokenize calls share one Ray (pipeline.jobs.ray_job.ray_session)."""
    from pipeline.jobs.ray_job import ray_session as _session

    return _session(cfg)
