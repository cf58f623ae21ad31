"""Growth with the work: listing + planning time and driver peak memory for 1e4..1e6 work items,
and the bytes that tar listing and header probes fetch from an S3 API (moto), each against a
baseline measured in the same run.

Listing is `ensure_worklist` (adapter → Arrow table → sorted, hashed, frozen worklist.parquet);
planning is `pipeline.jobs.plan.prepare` on the frozen list (load + verify sha256, cut into input
shards, one LIST, clean debris, read the committed sidecars: half the shards are committed
beforehand), then the hand-over to the decode stage (`ray_job.stream_inputs`: a row range per
pending shard and the work list loaded into Ray's object store once by a task, then the dataset's
read tasks, one block per shard, as `_stream` builds them),
whose peak is reported with planning's. Each phase runs in a fresh process; its memory is the process's peak RSS minus its
RSS just before the phase, per work item.

  generated  the folder adapter over a generated listing file of N image paths (`listing=`)
  flat tree  the same over N real (empty) files in one local folder (N = 1e4)
  moto       the same over N objects in a moto S3 bucket, output (sidecars) on moto too (N = 1e4)
  dicts      baseline: the frozen list held as one dict per item (what the job held before)

Then, on moto: sidecars read one GET at a time (the old committed_shards) vs read_json_many;
tar listing bytes ÷ archive bytes, against tarfile over s3fs's default read-ahead file (the old
list_tar_members); header-probe bytes per video, against PyAV over the default s3fs file (the old
probe_duration).

    python bench/plan_scale.py [--sizes 10000,100000,1000000] [--items-per-shard 64] [--real-items 10000] [--skip-s3]

Targets (issue 14): time per item flat or falling with N; <= 300 bytes of driver memory per item;
1e6 items listed + planned in <= 120 s; tar bytes <= 2% of the archive; probe <= 256 KB per video.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import types

TOK = types.SimpleNamespace(id="bench-tokenizer:" + "ab" * 32, sha256="ab" * 32, vocab_size=8192, downsample=8)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KB on Linux


# ---------------------------------------------------------------------------------------------
# child phases (each in its own process)
# ---------------------------------------------------------------------------------------------


def _warm_imports() -> None:
    # Modules the phases import lazily: loaded before the baseline RSS, so it is not counted per item.
    import jsonschema  # noqa: F401
    import pyarrow.compute  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import s3fs  # noqa: F401

    import schemas
    from pipeline.sources import adapters  # noqa: F401

    schemas.validate(template_sidecar("cd" * 32), "shard_sidecar")


def child_list(a: argparse.Namespace) -> dict:
    from pipeline.sources import ensure_worklist

    _warm_imports()
    so = json.loads(a.so) if a.so else None
    opts = {"probe": False}
    if a.listing:
        opts["listing"] = a.listing
    r0 = rss_bytes()
    t0 = time.perf_counter()
    wl, created = ensure_worklist("folder", a.root, f"{a.out}/worklist", storage_options=so, **opts)
    dt = time.perf_counter() - t0
    assert created and len(wl) == a.n, (created, len(wl))
    return {"s": dt, "bytes_per_item": (peak_bytes() - r0) / a.n, "sha256": wl.sha256}


def child_plan(a: argparse.Namespace) -> dict:
    import ray

    from pipeline.jobs.config import TokenizeConfig
    from pipeline.jobs.plan import prepare
    from pipeline.jobs.ray_job import _shard_rows, stream_inputs

    _warm_imports()
    so = json.loads(a.so) if a.so else None
    cfg = TokenizeConfig(dataset="folder", input=a.root, output=a.out, items_per_shard=a.items_per_shard,
                         progress=False, storage_options=so)
    # The job's driver has Ray up before it hands the plan over: started before the baseline (a
    # fixed cost, not per item).
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    import ray.data  # noqa: F401 - its import (~40 MB) is a fixed cost too

    r0 = rss_bytes()
    t0 = time.perf_counter()
    plan = prepare(cfg, TOK)
    dt = time.perf_counter() - t0
    assert plan.num_items == a.n and len(plan.done) == (len(plan.shards) + 1) // 2, (plan.num_items, len(plan.done))
    mem = (peak_bytes() - r0) / a.n
    # What the job does next with the plan (ray_job._execute, then _stream): the decode stage's
    # input, one row range per pending shard and the work list loaded into the object store by a
    # task, then the dataset's read tasks. The driver's peak over both phases is what a job pays.
    t0 = time.perf_counter()
    shards, worklist = stream_inputs(ray, cfg, plan)
    ray.wait(worklist)  # loaded by a task, in the object store
    index = [ray.put(shards)]
    ds = ray.data.read_datasource(_shard_rows(len(shards)), num_cpus=0, override_num_blocks=len(shards))
    handover_s = time.perf_counter() - t0
    out = {"s": dt, "bytes_per_item": mem, "shards": len(plan.shards), "done": len(plan.done),
           "rows_bytes_per_item": plan.shards[0].source.nbytes / a.n, "handover_s": handover_s,
           "handover_bytes_per_item": (peak_bytes() - r0) / a.n, "pending": len(shards)}
    del ds, worklist, index
    ray.shutdown()
    return out


def child_dicts(a: argparse.Namespace) -> dict:
    from pipeline.sources import load_worklist

    _warm_imports()
    r0 = rss_bytes()
    t0 = time.perf_counter()
    items = load_worklist(f"{a.out}/worklist").items  # one dict per item, as load_worklist returned before
    dt = time.perf_counter() - t0
    assert len(items) == a.n
    return {"s": dt, "bytes_per_item": (peak_bytes() - r0) / a.n}


def run_child(phase: str, **kw) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", phase]
    for k, v in kw.items():
        if v is not None:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{phase} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------


def rel_paths(n: int) -> list[str]:
    # Flat, ImageNet-like names: "img/n01440764_0000042.jpg"
    return [f"img/n{i % 1000:08d}_{i:07d}.jpg" for i in range(n)]


def commit_half(out: str, so: dict | None, n: int, items_per_shard: int) -> None:
    """Sidecars (and data files) for the even input shards, as a killed job would leave them."""
    from pipeline import storage
    from pipeline.sources import load_worklist

    wl = load_worklist(f"{out}/worklist", storage_options=so)
    tmpl = template_sidecar(wl.sha256)
    shards = -(-n // items_per_shard)
    files: dict[str, bytes] = {}
    for sid in range(0, shards, 2):
        side = dict(tmpl, shard_id=sid, data_file=f"shard-{sid:06d}.arrow",
                    input_shard={"id": sid, "worklist_sha256": wl.sha256,
                                 "num_items": min(items_per_shard, n - sid * items_per_shard)})
        files[f"shard-{sid:06d}.json"] = (json.dumps(side, sort_keys=True, indent=2) + "\n").encode()
        files[f"shard-{sid:06d}.arrow"] = b""
    if storage.is_local(out):
        os.makedirs(out, exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(out, name), "wb") as f:
                f.write(data)
    else:
        fs, path = storage.url_to_fs(out, so)
        fs.pipe({f"{path}/{k}": v for k, v in files.items()})


def moto_server():
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench-secret")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    import boto3

    ep = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=ep, region_name="us-east-1").create_bucket(Bucket="bench")
    return server, {"client_kwargs": {"endpoint_url": ep}}


# ---------------------------------------------------------------------------------------------
# parts
# ---------------------------------------------------------------------------------------------


def scale_case(name: str, n: int, root: str, out: str, so: dict | None, listing: str | None, ipsh: int) -> dict:
    sj = json.dumps(so) if so else None
    lst = run_child("list", n=n, root=root, out=out, so=sj, listing=listing)
    commit_half(out, so, n, ipsh)
    plan = run_child("plan", n=n, root=root, out=out, so=sj, items_per_shard=ipsh)
    return {"case": name, "n": n, "list": lst, "plan": plan}


def growth(sizes: list[int], ipsh: int, s3: dict | None, work: str, n_real: int) -> list[dict]:
    rows = []
    for n in sizes:
        d = os.path.join(work, f"gen-{n}")
        os.makedirs(os.path.join(d, "root"))  # the files themselves are only in the listing
        listing = os.path.join(d, "files.txt")
        with open(listing, "w") as f:
            f.write("\n".join(rel_paths(n)) + "\n")
        row = scale_case("generated", n, os.path.join(d, "root"), os.path.join(d, "out"), None, listing, ipsh)
        row["dicts"] = run_child("dicts", n=n, out=os.path.join(d, "out"))
        rows.append(row)
        shutil.rmtree(d)
    n = n_real
    if not n:
        return rows
    d = os.path.join(work, "flat")
    for rel in rel_paths(n):
        p = os.path.join(d, "root", rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        open(p, "wb").close()
    rows.append(scale_case("flat tree", n, os.path.join(d, "root"), os.path.join(d, "out"), None, None, ipsh))
    shutil.rmtree(d)
    if s3 is not None:
        import fsspec

        fs = fsspec.filesystem("s3", **s3)
        fs.pipe({f"bench/scale/root/{rel}": b"" for rel in rel_paths(n)})
        rows.append(scale_case("moto", n, "s3://bench/scale/root", "s3://bench/scale/out", s3, None, ipsh))
    return rows


def sidecar_reads(s3: dict, count: int = 400) -> dict:
    import fsspec

    from pipeline import storage

    side = template_sidecar("cd" * 32)
    fs = fsspec.filesystem("s3", **s3)
    fs.pipe({f"bench/sides/shard-{i:06d}.json": json.dumps(dict(side, shard_id=i)).encode() for i in range(count)})
    urls = [f"s3://bench/sides/shard-{i:06d}.json" for i in range(count)]
    t0 = time.perf_counter()
    one = [storage.read_json(u, "shard_sidecar", s3) for u in urls]
    t_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    many = storage.read_json_many(urls, "shard_sidecar", s3)
    t_many = time.perf_counter() - t0
    assert one == many
    return {"count": count, "sequential_s": t_one, "concurrent_s": t_many}


def template_sidecar(worklist_sha256: str) -> dict:
    """A real sidecar (of an empty shard) that the bench copies under other shard ids."""
    from pipeline.shards import ShardWriter

    info = {"id": TOK.id, "sha256": TOK.sha256, "vocab_size": TOK.vocab_size, "downsample": TOK.downsample}
    return ShardWriter(tempfile.mkdtemp(), 0, codebook_size=8192, tokenizer=info, resolution=128,
                       grid=(16, 16)).commit(input_shard={"id": 0, "worklist_sha256": worklist_sha256, "num_items": 1})


def tar_bytes(s3: dict, members: int, member_bytes: int) -> dict:
    import io
    import tarfile

    import fsspec
    import numpy as np

    from pipeline.sources import list_tar_members

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(members):
            # JPEG sizes vary around their mean; a few names exceed 100 bytes (GNU long names).
            data = rng.bytes(int(member_bytes * rng.uniform(0.5, 1.5)))
            name = f"n04000000_{i}.JPEG" if i % 50 else "long/" * 25 + f"n04000000_{i}.JPEG"
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    fs = fsspec.filesystem("s3", **s3)
    fs.pipe_file("bench/tars/n04000000.tar", buf.getvalue())
    url = "s3://bench/tars/n04000000.tar"
    t0 = time.perf_counter()
    idx = list_tar_members(url, s3)
    t_new = time.perf_counter() - t0
    # Baseline: the previous implementation, tarfile over s3fs's default (read-ahead) file.
    fs2 = fsspec.filesystem("s3", skip_instance_cache=True, **s3)
    t0 = time.perf_counter()
    with fs2.open("bench/tars/n04000000.tar", "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
        old = [(m.name, m.offset_data, m.size) for m in tf if m.isreg()]
        old_bytes = f.cache.total_requested_bytes
    t_old = time.perf_counter() - t0
    assert old == idx.members
    return {"members": members, "archive": idx.archive_bytes, "new_bytes": idx.bytes_fetched, "new_s": t_new,
            "old_bytes": old_bytes, "old_s": t_old}


def probe_bytes(s3: dict, videos: int, work: str) -> dict:
    import av
    import fsspec
    import numpy as np

    from pipeline.media import write_video
    from pipeline.sources import probe_video_header

    fs = fsspec.filesystem("s3", **s3)
    rng = np.random.default_rng(3)
    sizes, new, old, durs = [], [], [], []
    for i in range(videos):
        ext = ("mp4", "webm", "mkv")[i % 3]
        local = os.path.join(work, f"v{i}.{ext}")
        kw = {"codec": "libvpx-vp9"} if ext == "webm" else {}
        write_video(local, lambda j, t: rng.integers(0, 256, (120, 160, 3), dtype=np.uint8), fps=15,
                    num_frames=150 if ext != "webm" else 45, **kw)
        sizes.append(os.path.getsize(local))
        fs.put_file(local, f"bench/videos/v{i}.{ext}")
        dur, fetched = probe_video_header(f"s3://bench/videos/v{i}.{ext}", s3)
        new.append(fetched)
        durs.append(dur)
        fs2 = fsspec.filesystem("s3", skip_instance_cache=True, **s3)
        with fs2.open(f"bench/videos/v{i}.{ext}", "rb") as f:
            av.open(f, metadata_errors="ignore").close()
            old.append(f.cache.total_requested_bytes)
    assert all(d is not None for d in durs), durs
    return {"videos": videos, "file_bytes": sizes, "new_bytes": new, "old_bytes": old}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--items-per-shard", type=int, default=64)
    ap.add_argument("--skip-s3", action="store_true")
    ap.add_argument("--real-items", type=int, default=10000, help="size of the flat-tree and moto cases (0: skip)")
    ap.add_argument("--tar-members", type=int, default=300)
    ap.add_argument("--member-bytes", type=int, default=110_000)
    ap.add_argument("--videos", type=int, default=6)
    # child-process arguments
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--so", help=argparse.SUPPRESS)
    ap.add_argument("--listing", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        fn = {"list": child_list, "plan": child_plan, "dicts": child_dicts}[a.child]
        print(json.dumps(fn(a)))
        return
    sizes = sorted(int(x) for x in a.sizes.split(","))
    work = tempfile.mkdtemp(prefix="toto-plan-scale-")
    server, s3 = (None, None) if a.skip_s3 else moto_server()
    try:
        rows = growth(sizes, a.items_per_shard, s3, work, a.real_items)
        print(f"\nListing + planning ({a.items_per_shard} items per input shard, half the shards committed before "
              f"planning; memory = peak RSS growth per item)")
        print(f"{'case':<10} {'items':>9} {'list s':>8} {'plan s':>8} {'total s':>8} {'us/item':>8} "
              f"{'list B/it':>10} {'plan B/it':>10} {'dicts B/it':>11} {'mem ratio':>9}")
        base = next(r for r in rows if r["case"] == "generated")
        base_us = (base["list"]["s"] + base["plan"]["s"]) / base["n"] * 1e6
        for r in rows:
            tot = r["list"]["s"] + r["plan"]["s"]
            us = tot / r["n"] * 1e6
            peak = max(r["list"]["bytes_per_item"], r["plan"]["bytes_per_item"])
            dicts = r.get("dicts", {}).get("bytes_per_item")
            ratio = f"{peak / dicts:9.2f}" if dicts else f"{'':>9}"
            dtxt = f"{dicts:11.0f}" if dicts else f"{'':>11}"
            print(f"{r['case']:<10} {r['n']:>9} {r['list']['s']:8.2f} {r['plan']['s']:8.2f} {tot:8.2f} {us:8.1f} "
                  f"{r['list']['bytes_per_item']:10.0f} {r['plan']['bytes_per_item']:10.0f} {dtxt} {ratio}")
        gen = [r for r in rows if r["case"] == "generated"]
        # Per-item cost net of each phase's fixed overhead: the growth between consecutive sizes.
        for lo, hi in zip(gen, gen[1:], strict=False):
            dn = hi["n"] - lo["n"]
            marg = {k: (hi[k]["bytes_per_item"] * hi["n"] - lo[k]["bytes_per_item"] * lo["n"]) / dn
                    for k in ("list", "plan", "dicts")}
            print(f"marginal {lo['n']:.0e} -> {hi['n']:.0e}: list {marg['list']:.0f} B/item, plan {marg['plan']:.0f} "
                  f"B/item, dicts {marg['dicts']:.0f} B/item (ratio {max(marg['list'], marg['plan']) / marg['dicts']:.2f})")
        for r in gen:
            p = r["plan"]
            print(f"{r['n']:.0e} items: compact rows {p['rows_bytes_per_item']:.0f} B/item in memory; handing the "
                  f"{p['pending']} pending shards to the decode stage (row ranges, the work list loaded by a task, the "
                  f"dataset's read tasks) {p['handover_s']:.2f} s, driver peak with planning "
                  f"{p['handover_bytes_per_item']:.0f} B/item")
        print("growth: time per item relative to the smallest generated size: "
              + ", ".join(f"{r['n']:.0e}: {(r['list']['s'] + r['plan']['s']) / r['n'] * 1e6 / base_us:.2f}x" for r in gen))
        if s3 is not None:
            sc = sidecar_reads(s3)
            print(f"\nSidecars on moto: {sc['count']} read one GET at a time {sc['sequential_s']:.2f} s, "
                  f"read_json_many {sc['concurrent_s']:.2f} s ({sc['sequential_s'] / sc['concurrent_s']:.1f}x faster)")
            tb = tar_bytes(s3, a.tar_members, a.member_bytes)
            print(f"\nTar listing on moto ({tb['members']} members, {tb['archive'] / 1e6:.1f} MB): header ranges fetched "
                  f"{tb['new_bytes']:,} B = {100 * tb['new_bytes'] / tb['archive']:.2f}% of the archive in {tb['new_s']:.2f} s; "
                  f"tarfile over the default s3fs file fetched {tb['old_bytes']:,} B = "
                  f"{100 * tb['old_bytes'] / tb['archive']:.1f}% in {tb['old_s']:.2f} s")
            pb = probe_bytes(s3, a.videos, work)
            print(f"\nHeader probes on moto ({pb['videos']} videos of {min(pb['file_bytes']) / 1e6:.1f}-"
                  f"{max(pb['file_bytes']) / 1e6:.1f} MB, mp4/webm/mkv):")
            for f, nb, ob in zip(pb["file_bytes"], pb["new_bytes"], pb["old_bytes"], strict=True):
                print(f"  file {f:>10,} B   ranged probe {nb:>9,} B ({nb / 1024:6.1f} KB)   default s3fs file {ob:>10,} B")
            print(f"  max ranged probe {max(pb['new_bytes']) / 1024:.1f} KB per video; "
                  f"mean old/new bytes {sum(pb['old_bytes']) / sum(pb['new_bytes']):.1f}x")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
