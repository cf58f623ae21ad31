"""Submit a `toto-pipeline` command to a Ray cluster through Ray's Jobs API."""

from __future__ import annotations

import os
import shlex
import time
from typing import Any

# Never upload these with the working directory (build outputs, data, venvs, caches).
EXCLUDES = [".git", ".venv", "**/__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", "build", "dist",
            "demo-out", "runs", "tmp", "*.arrow", "*.tar", "*.mp4", "*.webm"]


def project_root() -> str:
    """The source tree that holds pipeline/ (uploaded as the job's working_dir)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def project_dependencies(root: str) -> list[str]:
    """`[project].dependencies` of pyproject.toml, minus torch (the cluster image brings a CUDA torch)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return [d for d in deps if not d.replace(" ", "").lower().startswith("torch")]


def build_runtime_env(install: str, working_dir: str, env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """working_dir (this source tree, importable on every node) + pip per `install`:

    "deps": pip-install the project's dependencies (not torch) into the job's environment;
    "none": the cluster image already has them (infra/Dockerfile does).
    """
    if install not in ("deps", "none"):
        raise ValueError(f"install={install!r}: choose 'deps' or 'none'")
    env: dict[str, Any] = {"working_dir": working_dir, "excludes": EXCLUDES}
    if install == "deps":
        env["pip"] = {"packages": project_dependencies(working_dir), "pip_check": False}
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env


def entrypoint_for(args: list[str]) -> str:
    """`python -m pipeline.cli ARGS` joining the cluster (the driver runs on the head node)."""
    if not args:
        raise ValueError("nothing to submit: give a command after '--', e.g. -- tokenize --dataset ...")
    args = list(args)
    if args[0] == "tokenize" and not any(a == "--ray-address" or a.startswith("--ray-address=") for a in args):
        args += ["--ray-address", "auto"]
    return "python -m pipeline.cli " + " ".join(shlex.quote(a) for a in args)


def submit(address: str, args: list[str], *, install: str = "deps", working_dir: str | None = None,
           wait: bool = True, poll_s: float = 2.0, env_vars: dict[str, str] | None = None,
           agent_wait_s: float = 120.0, echo=print) -> tuple[str, str]:
    """Submit; with wait, stream the job's logs and return (job id, final status)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    # A head that just started answers before its job agent is up ("No available agent to submit
    # job"): retry that for a while instead of failing a fresh cluster's first submission.
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            job_id = client.submit_job(
                entrypoint=entrypoint_for(args),
                runtime_env=build_runtime_env(install, working_dir or project_root(), env_vars),
                metadata={"tool": "toto-pipeline submit"},
            )
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)
    echo(f"submitted {job_id} to {address}; follow with: ray job logs --address {address} -f {job_id}")
    if not wait:
        return job_id, str(client.get_job_status(job_id))
    seen = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > seen:
            echo(logs[seen:].rstrip("\n"))
            seen = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return job_id, str(status.value if hasattr(status, "value") else status)
        time.sleep(poll_s)
