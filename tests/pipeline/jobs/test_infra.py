"""infra/ manifests stay in step with the CLI, and the submit helper builds what the Jobs API needs."""

from __future__ import annotations

import os
import shlex

import yaml

from pipeline.jobs.cli import tokenize_cmd
from pipeline.jobs.submit import build_runtime_env, entrypoint_for, project_dependencies

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _load(name: str) -> dict:
    with open(os.path.join(REPO, "infra", name)) as f:
        return yaml.safe_load(f)


def test_kuberay_manifests_have_a_gpu_group_and_a_valid_entrypoint():
    rc = _load("raycluster.yaml")
    assert rc["kind"] == "RayCluster" and rc["apiVersion"] == "ray.io/v1"
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    gpu = groups["gpu-tokenize"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu["nvidia.com/gpu"]) == int(groups["gpu-tokenize"]["rayStartParams"]["num-gpus"]) == 8
    assert "nvidia.com/gpu" not in groups["cpu-decode"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"

    rj = _load("rayjob.yaml")
    assert rj["kind"] == "RayJob"
    assert {g["groupName"] for g in rj["spec"]["rayClusterSpec"]["workerGroupSpecs"]} == set(groups)
    argv = shlex.split(rj["spec"]["entrypoint"])
    assert argv[:2] == ["toto-pipeline", "tokenize"]
    ctx = tokenize_cmd.make_context("tokenize", argv[2:])  # every option in the manifest exists
    assert ctx.params["ray_address"] == "auto" and ctx.params["batch_size"] == 512
    # The job asks for up to --num-gpus tokenizer GPUs: exactly what the job's GPU group can give.
    jg = {g["groupName"]: g for g in rj["spec"]["rayClusterSpec"]["workerGroupSpecs"]}["gpu-tokenize"]
    assert ctx.params["num_gpus"] == jg["maxReplicas"] * int(jg["rayStartParams"]["num-gpus"])
    # Writer actors reserve no CPU by default, so they fit on the 0-CPU head the manifests ship.
    assert ctx.params["writer_cpus"] == 0


def test_launcher_yaml_has_cpu_decode_and_gpu_tokenizer_nodes():
    c = _load("ray-cluster.yaml")
    nodes = c["available_node_types"]
    assert nodes["head"]["resources"] == {"CPU": 0}
    assert nodes["cpu_decode"]["resources"].get("GPU", 0) == 0 and nodes["cpu_decode"]["resources"]["CPU"] > 0
    assert nodes["gpu_tokenize"]["resources"]["GPU"] == 8
    assert c["head_node_type"] == "head"
    # Autoscaling from zero workers: the job's pending actors start the nodes.
    assert nodes["cpu_decode"]["min_workers"] == nodes["gpu_tokenize"]["min_workers"] == 0
    assert "--autoscaling-config" in " ".join(c["head_start_ray_commands"])


def test_submit_runtime_env_and_entrypoint():
    env = build_runtime_env("deps", REPO)
    assert env["working_dir"] == REPO and ".venv" in env["excludes"] and ".git" in env["excludes"]
    pkgs = env["pip"]["packages"]
    assert any(p.startswith("ray[data]") for p in pkgs) and not any(p.startswith("torch") for p in pkgs)
    assert pkgs == project_dependencies(REPO)
    assert "pip" not in build_runtime_env("none", REPO)
    e = entrypoint_for(["tokenize", "--dataset", "folder", "--input", "a b", "--output", "s3://x/y"])
    assert e == "python -m pipeline.cli tokenize --dataset folder --input 'a b' --output s3://x/y --ray-address auto"
    assert entrypoint_for(["status", "out"]) == "python -m pipeline.cli status out"
    assert entrypoint_for(["tokenize", "--ray-address", "10.0.0.1:6379"]).endswith("--ray-address 10.0.0.1:6379")
