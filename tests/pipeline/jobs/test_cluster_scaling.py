"""The job on multi-node Ray clusters started by these tests (never the session's shared Ray):

- an autoscaling cluster from zero workers — a head with 0 CPUs, a CPU node type and a "GPU" node
  type that declares GPU: 1 with no device behind it — run by Ray's autoscaler with its fake
  multi-node provider (the one `ray.cluster_utils.AutoscalingCluster` drives): the job's GPU
  request makes the autoscaler start the GPU node, the tokenizer runs there (on CPU, as torch finds
  no CUDA), decode runs on CPU nodes, run_summary.json says so, and the bytes equal an embedded run;
- a static cluster of the same shape (head + CPU node + GPU-declaring node, all up before the job
  starts: min_workers = max_workers), same checks.

The head is a `ray start --head` process with every port explicit, its own --temp-dir and its own
session; the provider starts the worker nodes (real raylets) from it, so ending the head's process
group ends the cluster. Not `AutoscalingCluster.start()` / `Cluster` themselves: the first runs
`ray stop --force` (every Ray process on the machine, other users' included) and needs an
example.yaml this Ray wheel does not ship, so the provider is loaded as an "external" one; the
second writes the machine-wide /tmp/ray/ray_current_cluster, which redirects any other
`ray.init()` on the machine to it. (Worker nodes started with `ray start --address` alongside
proved fragile here: their raylets give up when the dashboard agent starts slowly on a loaded
machine.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from pipeline import storage
from pipeline.jobs import TokenizeConfig, run_tokenize
from pipeline.shards import committed_shards

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _node_ip() -> str:
    import ray._private.services

    return ray._private.services.get_node_ip_address()


def _env(token: str, **extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("RAY_ADDRESS", None)
    env.update(RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""), **extra)
    return env


def _node_ports() -> list[str]:
    # Every port explicit and free: the session's shared Ray and other users hold Ray's defaults.
    return ["--dashboard-agent-listen-port", str(_port()), "--dashboard-agent-grpc-port", str(_port()),
            "--runtime-env-agent-port", str(_port()), "--metrics-export-port", str(_port()),
            "--node-manager-port", str(_port()), "--object-manager-port", str(_port())]


def _start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(p.pid, sig)
                p.wait(timeout=20)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


def _head(gcs: int, temp: str, env: dict, extra: list[str] = ()) -> subprocess.Popen:
    return _start(["--head", "--port", str(gcs), "--num-cpus", "0", "--include-dashboard", "false",
                   "--temp-dir", temp, "--ray-client-server-port", str(_port()), *_node_ports(), *extra], env)


def _wait_nodes(address: str, n: int, env: dict, procs: list[subprocess.Popen], timeout_s: float = 300) -> None:
    """Until `n` nodes are alive in the cluster at `address`; fails if one of `procs` exits or
    time runs out."""
    deadline = time.time() + timeout_s
    code = (f"import ray; ray.init(address='{address}', log_to_driver=False); "
            "print('ALIVE', sum(1 for x in ray.nodes() if x['Alive']))")
    while True:
        dead = [p.args for p in procs if p.poll() is not None]
        assert not dead, f"a Ray node process exited: {dead}"
        probe = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
        alive = [int(w.split()[1]) for w in probe.stdout.splitlines() if w.startswith("ALIVE")]
        if alive and alive[-1] >= n:
            return
        assert time.time() < deadline, f"{alive} of {n} nodes alive after {timeout_s} s: {probe.stderr[-2000:]}"
        time.sleep(2)


def _fake_cluster_config(tmp_path, gcs_address: str, *, min_workers: int) -> str:
    """Autoscaler config for Ray's fake multi-node provider (worker nodes are real raylets on this
    machine): a 0-CPU head, a CPU node type and a "GPU" node type declaring GPU: 1."""
    config = {
        "cluster_name": f"toto-{uuid.uuid4().hex[:6]}", "max_workers": 2, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 10, "docker": {}, "auth": {},
        "provider": {"type": "external", "module": FAKE_PROVIDER, "gcs_address": gcs_address,
                     "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_node": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": min_workers, "max_workers": 1},
            "gpu_node": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": min_workers,
                         "max_workers": 1},
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
        "rsync_filter": [], "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }
    path = tmp_path / f"cluster-{min_workers}.json"
    path.write_text(json.dumps(config))
    return str(path)


def _run_job(args: list[str], env: dict) -> str:
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", "tokenize", *args, "--no-progress"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=420)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stderr


def _job_args(lay: dict, out: str, tok_spec: str, address: str) -> list[str]:
    return ["--dataset", "imagenet", "--input", lay["root"], "--output", out, "--items-per-shard", "2",
            "--resolution", "64", "--batch-size", "8", "--decode-cpus", "1", "--tokenizer-cpus", "1",
            "--tokenizer", tok_spec, "--ray-address", address, "--num-gpus", "1", "--writers", "1"]


def _reference(tmp_path, lay: dict, tok_spec: str) -> dict[str, str]:
    ref = str(tmp_path / "ref")
    run_tokenize(TokenizeConfig(dataset="imagenet", input=lay["root"], output=ref, items_per_shard=2, resolution=64,
                                batch_size=8, decode_cpus=0.5, num_cpus=2, tokenizer=tok_spec, progress=False))
    return {s["data_file"]: s["sha256"] for s in committed_shards(ref)}


def _check_placement(out: str) -> dict:
    summary = storage.read_json(os.path.join(out, "run_summary.json"), "run_summary")
    pl = summary["placement"]
    tok_nodes = pl["tokenize"]["nodes"]
    # The tokenizer ran only where a GPU is declared, and on CPU there (torch sees no CUDA).
    assert tok_nodes and all(n["resources"].get("GPU") == 1 for n in tok_nodes), pl
    assert pl["tokenize"]["devices"].keys() == {"cpu"}
    # Decode ran on CPU-only worker nodes: not the 0-CPU head, not the GPU node.
    dec_nodes = pl["decode"]["nodes"]
    assert dec_nodes and all(not n["head"] and n["resources"].get("GPU", 0) == 0 and n["resources"]["CPU"] > 0
                             for n in dec_nodes), pl
    assert sum(n["shards"] for n in dec_nodes) == 2 and sum(n["shards"] for n in pl["write"]["nodes"]) == 2
    assert summary["settings"]["stages"]["tokenize"] == {"min": 1, "max": 1, "num_gpus": 1, "num_cpus": 1.0}
    return summary


@pytest.mark.slow
def test_autoscaling_cluster_from_zero_workers_starts_a_gpu_node_for_the_tokenizer(ray_local, tmp_path, make_layout,
                                                                                   tok_spec):
    lay = make_layout("imagenet", str(tmp_path / "data"))
    want = _reference(tmp_path, lay, tok_spec)
    token = uuid.uuid4().hex * 2
    ip, gcs = _node_ip(), _port()
    temp = tempfile.mkdtemp(prefix="/tmp/ra")  # short: Ray's unix sockets live under it
    env = _env(token, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    head = _head(gcs, temp, env, ["--autoscaling-config", _fake_cluster_config(tmp_path, f"{ip}:{gcs}", min_workers=0)])
    try:
        out = str(tmp_path / "out")
        _run_job(_job_args(lay, out, tok_spec, f"{ip}:{gcs}"), env)
    finally:
        _stop([head])
    assert {s["data_file"]: s["sha256"] for s in committed_shards(out)} == want
    summary = _check_placement(out)
    assert summary["shards"] == {"total": 2, "committed": 2, "skipped": 0}


@pytest.mark.slow
def test_static_multi_node_cluster(ray_local, tmp_path, make_layout, tok_spec):
    """The same three node kinds, all up before the job starts (min_workers = max_workers = 1):
    the job finds the GPU node there and nothing has to scale."""
    lay = make_layout("imagenet", str(tmp_path / "data"))
    want = _reference(tmp_path, lay, tok_spec)
    token = uuid.uuid4().hex * 2
    ip, gcs = _node_ip(), _port()
    temp = tempfile.mkdtemp(prefix="/tmp/rs")
    env = _env(token, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    head = _head(gcs, temp, env, ["--autoscaling-config", _fake_cluster_config(tmp_path, f"{ip}:{gcs}", min_workers=1)])
    try:
        _wait_nodes(f"{ip}:{gcs}", 3, env, [head])
        out = str(tmp_path / "out")
        _run_job(_job_args(lay, out, tok_spec, f"{ip}:{gcs}"), env)
    finally:
        _stop([head])
    assert {s["data_file"]: s["sha256"] for s in committed_shards(out)} == want
    _check_placement(out)
