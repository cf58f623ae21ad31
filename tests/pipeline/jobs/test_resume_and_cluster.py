"""The job as users run it, in subprocesses: SIGKILL of the driver at random points then a rerun
equals an uninterrupted run byte for byte; s3:// input and output on a real S3 API server; and a
job submitted through Ray's Jobs API to a real `ray start --head` on 127.0.0.1."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from click.testing import CliRunner

from pipeline import storage
from pipeline.cli import main as cli
from pipeline.jobs import TokenizeConfig, run_tokenize
from pipeline.shards import committed_shards, debris, read_manifest, verify_shard

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SMALL_ARGS = ["--resolution", "64", "--max-fps", "10", "--chunk-frames", "4", "--batch-size", "8",
              "--rows-per-batch", "4", "--decode-cpus", "0.5", "--num-cpus", "2"]
SMALL = dict(resolution=64, max_fps=10.0, chunk_frames=4, batch_size=8, rows_per_batch=4, decode_cpus=0.5,
             num_cpus=2, progress=False)


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1", **extra)
    return env


def _start_job(args: list[str], **popen) -> subprocess.Popen:
    # Own session: the driver and the embedded Ray it starts form one group this test can end.
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "tokenize", *args, "--no-progress"],
                            cwd=REPO, env=_env(), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, **popen)


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait(timeout=60)


def _hashes(out: str, so=None) -> dict[str, str]:
    """data file → sha256 of its bytes (checked against its sidecar)."""
    got = {}
    for s in committed_shards(out, so):
        got[s["data_file"]] = storage.sha256_file(storage.join(out, s["data_file"]), so)
        assert got[s["data_file"]] == s["sha256"]
    return got


@pytest.mark.slow
def test_sigkill_at_random_points_then_rerun_equals_uninterrupted(ray_local, tmp_path, make_layout, tok_spec):
    lay = make_layout("folder", str(tmp_path / "data"))
    for i in range(3, 6):  # more inputs: more shards to be caught mid-way
        from pipeline.media import quadrant_frame, write_video

        write_video(str(tmp_path / "data" / "clips" / f"more{i}.mp4"), lambda k, t, i=i: quadrant_frame(32, 48, t + i, 3.0),
                    fps=10, num_frames=8)
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    run_tokenize(TokenizeConfig(dataset="folder", input=lay["root"], output=ref, items_per_shard=1, tokenizer=tok_spec,
                                **SMALL))
    want = _hashes(ref)
    assert len(want) == 10  # 7 good inputs + 3 bad ones, one per shard

    args = ["--dataset", "folder", "--input", lay["root"], "--output", out, "--items-per-shard", "1", "--tokenizer", tok_spec,
            *SMALL_ARGS]
    rng = random.Random(5)
    # Kill 1: as soon as the first shard is committed (the driver is mid-stream).
    p = _start_job(args)
    deadline = time.time() + 300  # the machine is shared: actors may take a while to start
    while time.time() < deadline and not (os.path.isdir(out) and any(n.startswith("shard-") and n.endswith(".json")
                                                                       for n in os.listdir(out))):
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)  # the driver only; its embedded Ray shares its fate
    # Counted at the kill: writer actors may commit the shards they hold while the embedded Ray
    # winds down, and on a loaded machine that can be all of them.
    first = len(committed_shards(out))
    assert 1 <= first < 10
    time.sleep(0.5)
    _kill_group(p)
    # Kill 2: at a random instant of the resumed run (start-up, listing, decoding or committing).
    p = _start_job(args)
    time.sleep(rng.uniform(1.0, 12.0))
    os.kill(p.pid, signal.SIGKILL)
    time.sleep(0.5)
    _kill_group(p)
    # Rerun to the end (in-process on the shared Ray): exactly the reference's shards.
    summary = run_tokenize(TokenizeConfig(dataset="folder", input=lay["root"], output=out, items_per_shard=1,
                                         tokenizer=tok_spec, **SMALL))
    assert _hashes(out) == want
    assert summary["shards"]["total"] == 10 and summary["shards"]["skipped"] >= first
    assert debris(out) == []
    names = set(os.listdir(out))
    assert names == set(want) | {f"shard-{i:06d}.json" for i in range(10)} | {
        "job.json", "worklist", "manifest.json", "run_summary.json"}
    assert read_manifest(out)["content_hash"] == read_manifest(ref)["content_hash"]


@pytest.mark.slow
def test_s3_input_and_output_on_moto(s3_server, tmp_path, make_layout, tok_spec):
    import s3fs

    so = s3_server["storage_options"]
    lay = make_layout("kinetics600", str(tmp_path / "data"))
    fs = s3fs.S3FileSystem(**so)
    bucket = s3_server["bucket"]
    fs.put(lay["root"] + "/", f"{bucket}/k600/", recursive=True)
    src, out = f"s3://{bucket}/k600", f"s3://{bucket}/tok/k600"
    args = ["--dataset", "kinetics600", "--input", src, "--output", out, "--items-per-shard", "2",
            "--format", "webdataset", "--endpoint-url", s3_server["endpoint_url"], "--tokenizer", tok_spec, *SMALL_ARGS]
    p = _start_job(args)
    log, _ = p.communicate(timeout=300)
    text = log.decode(errors="replace")
    assert p.returncode == 0, text
    sides = committed_shards(out, so)
    assert [s["shard_id"] for s in sides] == [0, 1]
    assert sum(s["counts"]["rows"] for s in sides) == 3 * 2  # 3 clips × 8 frames at 10 fps, 4 frames per row
    assert all(verify_shard(out, s, so) == [] for s in sides)
    res = CliRunner().invoke(cli, ["verify", out, "--endpoint-url", s3_server["endpoint_url"]])
    assert res.exit_code == 0 and "2/2 shards OK" in res.output
    # Credentials reach no log line and no document the job wrote.
    docs = [fs.cat_file(f) for f in fs.find(f"{bucket}/tok") if f.endswith(".json")]
    assert len(docs) >= 5
    for blob in [text.encode(), *docs]:
        assert s3_server["secret_key"].encode() not in blob and s3_server["access_key"].encode() not in blob


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_submit_to_a_real_ray_head_through_the_jobs_api(tmp_path, make_layout, tok_spec, monkeypatch):
    import uuid

    # Ray's token authentication, as a real cluster runs it: head and client share one token.
    token = uuid.uuid4().hex + uuid.uuid4().hex
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)

    lay = make_layout("imagenet", str(tmp_path / "data"))
    out = str(tmp_path / "tok")
    gcs, dash = _port(), _port()
    temp = tempfile.mkdtemp(prefix="/tmp/rh")  # short: Ray's unix sockets live under it
    env = _env(PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("PYTHONPATH")  # the job must get the project from its working_dir, not from this env
    head = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block", "--node-ip-address",
         "127.0.0.1", "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--num-cpus", "2", "--include-dashboard", "true", "--temp-dir", temp, "--disable-usage-stats",
         # Every port explicit and free: the shared local Ray of this session (and other users of the
         # machine) already hold Ray's default agent ports, and a head whose job agent cannot bind
         # answers every submission with "No available agent".
         "--dashboard-agent-listen-port", str(_port()), "--dashboard-agent-grpc-port", str(_port()),
         "--runtime-env-agent-port", str(_port()), "--metrics-export-port", str(_port()),
         "--ray-client-server-port", str(_port()), "--node-manager-port", str(_port()),
         "--object-manager-port", str(_port())],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        address = f"http://127.0.0.1:{dash}"
        import urllib.error
        import urllib.request

        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
                break
            except urllib.error.HTTPError:
                break  # it answers (with token auth on, 401 to this bare probe; the Jobs client sends the token)
            except OSError:
                if time.time() > deadline or head.poll() is not None:
                    raise RuntimeError("the Ray head did not come up") from None
                time.sleep(1)
        # `toto-pipeline submit` in its own process: it reads the token from its environment
        # (this test process may hold another one cached from the shared local Ray).
        sub = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "submit", "--address", address, "--install", "none",
             "--working-dir", REPO, "--", "tokenize", "--dataset", "imagenet", "--input", lay["root"], "--output", out,
             "--items-per-shard", "2", "--resolution", "64", "--batch-size", "8", "--decode-cpus", "0.5",
             "--tokenizer", tok_spec, "--no-progress"],
            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400,
        )
        assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
        assert sub.stdout.strip().endswith("SUCCEEDED") and "submitted raysubmit_" in sub.stderr
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
    sides = committed_shards(out)
    assert [s["shard_id"] for s in sides] == [0, 1] and sum(s["counts"]["rows"] for s in sides) == 3
    assert all(verify_shard(out, s) == [] for s in sides)
    summary = storage.read_json(os.path.join(out, "run_summary.json"), "run_summary")
    assert summary["settings"]["ray_address"] == "auto" and summary["counts"]["inputs_failed"] == 0


def _kinetics(root: str, n: int) -> None:
    """A Kinetics-600 layout of n short clips (one work item each)."""
    from pipeline.media import quadrant_frame, write_video

    os.makedirs(f"{root}/annotations", exist_ok=True)
    os.makedirs(f"{root}/train", exist_ok=True)
    lines = ["label,youtube_id,time_start,time_end,split"]
    for i in range(n):
        lines.append(f"lab{i % 3},v{i:03d},0,1,train")
        write_video(f"{root}/train/v{i:03d}_000000_000001.mp4", lambda k, t, i=i: quadrant_frame(32, 48, t + i, 3.0),
                    fps=10, num_frames=8)
    with open(f"{root}/annotations/train.csv", "w") as f:
        f.write("\n".join(lines) + "\n")


def _uncommitted(out: str) -> list[str]:
    """Data files written without their sidecar yet: commits in flight (or debris after a kill)."""
    try:
        names = set(os.listdir(out))
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith("shard-") and n.endswith(".arrow") and n[:12] + ".json" not in names)


@pytest.mark.slow
def test_process_group_kills_at_30_55_80_percent_with_commits_in_flight(ray_local, tmp_path, tok_spec):
    """Issue 14 point 6, as reported: a Kinetics-style job with many small input shards
    (--items-per-shard 2), its whole process group SIGKILLed at ~30%, 55% and 80% of an
    uninterrupted run's time (with --executors 2) — each kill moved to the first instant after that point at which a
    data file is on disk without its sidecar (commits in flight), when that comes soon — then rerun
    to the end: the committed shards equal the uninterrupted run's byte for byte."""
    root = str(tmp_path / "k600")
    _kinetics(root, 16)
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    base = ["--dataset", "kinetics600", "--input", root, "--items-per-shard", "2", "--tokenizer", tok_spec, *SMALL_ARGS]
    t0 = time.time()
    p = _start_job([*base, "--output", ref])
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log.decode(errors="replace")[-3000:]
    total = time.time() - t0
    want = _hashes(ref)
    assert len(want) == 8

    for frac in (0.30, 0.55, 0.80):
        # Killed while split over two executor actors (each its own Ray Data stream and pools, one
        # set of writers); the reference and the final rerun stream in the driver.
        p = _start_job([*base, "--output", out, "--executors", "2", "--cpu-actors", "2", "--tokenizer-cpus", "0.5"])
        t_kill = time.time() + frac * total
        while time.time() < t_kill and p.poll() is None:
            time.sleep(0.01)
        # Then wait (a little) for a commit in flight, to kill it mid-way.
        t_late = time.time() + 0.25 * total
        while time.time() < t_late and p.poll() is None and not _uncommitted(out):
            time.sleep(0.002)
        _kill_group(p)
    # Whether a kill landed between a data file and its sidecar is up to timing; make sure the
    # rerun meets that state too: what a kill mid-commit leaves is a data file under its final name
    # without a sidecar (the writer finished, the driver had not committed) and a staging temporary
    # (a writer mid-file). Two committed shards are put back into that state.
    os.makedirs(out, exist_ok=True)
    planted = sorted(n for n in os.listdir(out) if n.startswith("shard-") and n.endswith(".json"))[:2]
    for name in planted:
        os.unlink(os.path.join(out, name))
        with open(os.path.join(out, f".{name[:12]}.arrow{storage.TMP_MARK}999-deadbeef"), "wb") as f:
            f.write(b"half a shard")
    assert {n[:12] for n in planted} <= {n[:12] for n in _uncommitted(out)}
    summary = run_tokenize(TokenizeConfig(dataset="kinetics600", input=root, output=out, items_per_shard=2,
                                         tokenizer=tok_spec, **SMALL))
    assert _hashes(out) == want
    assert summary["shards"]["total"] == 8
    assert debris(out) == [] and _uncommitted(out) == []
    assert read_manifest(out)["content_hash"] == read_manifest(ref)["content_hash"]
