"""Tar indexing and header probes by explicit byte ranges: parity with tarfile, bytes fetched
against a real S3 API server (moto), and bad archives reported instead of raised."""

from __future__ import annotations

import io
import os
import tarfile

import fsspec
import numpy as np
import pytest

from pipeline.media import write_video
from pipeline.sources import list_items, list_tar_members, probe_video_header
from pipeline.sources.tar_index import index_tar, safe_member_name


def _tar_bytes(fmt: int, members: list[tuple[str, bytes | None, bytes]]) -> bytes:
    """members: (name, data or None, tar type)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data, typ in members:
            ti = tarfile.TarInfo(name)
            ti.type = typ
            if typ == tarfile.SYMTYPE or typ == tarfile.LNKTYPE:
                ti.linkname = "n1_a.JPEG" if typ == tarfile.LNKTYPE else "/etc/passwd"
            if data is not None:
                ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _tarfile_listing(data: bytes) -> tuple[list[tuple[str, int, int]], list[str]]:
    """What the previous implementation (tarfile over a stream) listed."""
    members, rejected = [], []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for m in tf:
            if not m.isreg() or not safe_member_name(m.name):
                rejected.append(m.name)
            else:
                members.append((m.name, m.offset_data, m.size))
    return members, rejected


MIXED = [
    ("n1_a.JPEG", os.urandom(1000), tarfile.REGTYPE),
    ("sub/dir/n1_b.JPEG", os.urandom(513), tarfile.REGTYPE),
    ("d/" + "long_" * 30 + ".JPEG", os.urandom(2048), tarfile.REGTYPE),  # > 100 chars
    ("ünïcødé_ñ.JPEG", os.urandom(7), tarfile.REGTYPE),
    ("empty.JPEG", b"", tarfile.REGTYPE),
    ("adir", None, tarfile.DIRTYPE),
    ("link.JPEG", None, tarfile.SYMTYPE),
    ("hard.JPEG", None, tarfile.LNKTYPE),
    ("../evil.JPEG", os.urandom(3), tarfile.REGTYPE),
    ("/abs.JPEG", os.urandom(3), tarfile.REGTYPE),
    ("fifo", None, tarfile.FIFOTYPE),
]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_index_matches_tarfile_for_gnu_pax_and_ustar(tmp_path, fmt):
    members = MIXED if fmt != tarfile.USTAR_FORMAT else [
        # ustar has no long names or non-ASCII: a long path goes into the 155-byte prefix field.
        (n if n.isascii() else "plain.JPEG", d, t) for n, d, t in MIXED
        if len(n) < 100 or n.startswith("d/")
    ]
    if fmt == tarfile.USTAR_FORMAT:
        members = [("q/" * 40 + "n1_p.JPEG", os.urandom(50), tarfile.REGTYPE)] + [m for m in members if not m[0].startswith("d/")]
    data = _tar_bytes(fmt, members)
    path = tmp_path / "a.tar"
    path.write_bytes(data)
    idx = index_tar(fsspec.filesystem("file"), str(path))
    want_members, want_rejected = _tarfile_listing(data)
    assert idx.members == want_members
    assert idx.rejected == want_rejected
    assert {"../evil.JPEG", "/abs.JPEG", "adir", "link.JPEG", "hard.JPEG", "fifo"} <= set(idx.rejected)
    for name, off, size in idx.members:  # the offsets point at the members' bytes
        want = next(d for n, d, _ in members if n == name)
        assert data[off : off + size] == want
    assert idx.archive_bytes == len(data)
    assert idx.bytes_fetched < len(data)


def test_global_pax_header_and_pax_size_apply(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "global"}) as tf:
        for name, size in (("x/a.JPEG", 10), ("b.JPEG", 600)):
            ti = tarfile.TarInfo(name)
            ti.size = size
            ti.pax_headers = {"path": f"renamed/{name}"}
            tf.addfile(ti, io.BytesIO(bytes(size)))
    (tmp_path / "p.tar").write_bytes(buf.getvalue())
    idx = index_tar(fsspec.filesystem("file"), str(tmp_path / "p.tar"))
    assert [(n, s) for n, _, s in idx.members] == [("renamed/x/a.JPEG", 10), ("renamed/b.JPEG", 600)]
    assert idx.members == _tarfile_listing(buf.getvalue())[0]


def test_bad_archives_are_reported_not_raised(tmp_path):
    (tmp_path / "n00000001.tar").write_bytes(b"not a tar at all" * 64)
    good = _tar_bytes(tarfile.USTAR_FORMAT, [(f"n00000002_{i}.JPEG", os.urandom(900), tarfile.REGTYPE) for i in range(3)])
    # Corrupt the third header: the first two members are kept and the damage is named.
    third = 2 * (512 + 1024)
    bad = bytearray(good)
    bad[third + 148 : third + 156] = b"9999999\x00"
    (tmp_path / "n00000002.tar").write_bytes(bytes(bad))
    items, report = list_items("imagenet", str(tmp_path))
    assert [i["video_id"] for i in items] == ["n00000002_0", "n00000002_1"]
    assert report.problems == {"rejected_tar_member": 1, "unreadable_tar": 1}
    assert report.examples["rejected_tar_member"] == [f"n00000002.tar:<bad header at byte {third}>"]
    assert "n00000001.tar: ValueError" in report.examples["unreadable_tar"][0]
    assert "not a tar archive" in report.examples["unreadable_tar"][0]


def test_tar_listing_on_s3_reads_headers_only(s3_server, tmp_path):
    so = s3_server["storage_options"]
    fs = fsspec.filesystem("s3", **so)
    root = f"s3://{s3_server['bucket']}/in21k-ranges"
    rng = np.random.default_rng(0)
    n, size = 40, 30_000
    data = _tar_bytes(tarfile.USTAR_FORMAT, [(f"n00000007_{i}.JPEG", rng.bytes(size), tarfile.REGTYPE) for i in range(n)])
    fs.pipe_file(f"{root}/n00000007.tar", data)
    (tmp_path / "n00000007.tar").write_bytes(data)
    idx = list_tar_members(f"{root}/n00000007.tar", so)
    assert idx.members == _tarfile_listing(data)[0]
    # One 512-byte header per member plus the end-of-archive block: 1.7% of the archive.
    assert idx.bytes_fetched == 512 * (n + 1)
    assert idx.bytes_fetched / idx.archive_bytes <= 0.02
    remote, _ = list_items("imagenet", root, storage_options=so)
    local, _ = list_items("imagenet", str(tmp_path))
    strip = [{k: v for k, v in it.items() if k != "uri"} for it in remote]
    assert strip == [{k: v for k, v in it.items() if k != "uri"} for it in local]
    assert {it["uri"] for it in remote} == {f"{root}/n00000007.tar"}


def _noisy_video(path: str, seconds: float, fps: int = 10) -> str:
    rng = np.random.default_rng(1)
    return write_video(path, lambda i, t: rng.integers(0, 256, (96, 128, 3), dtype=np.uint8), fps=fps,
                       num_frames=int(seconds * fps))


@pytest.mark.parametrize("ext", ["mp4", "webm"])
def test_header_probe_on_s3_reads_a_bounded_range(s3_server, tmp_path, ext):
    so = s3_server["storage_options"]
    fs = fsspec.filesystem("s3", **so)
    local = str(tmp_path / f"v.{ext}")
    if ext == "mp4":
        _noisy_video(local, 12.0)
    else:
        rng = np.random.default_rng(2)
        write_video(local, lambda i, t: rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), fps=10, num_frames=60,
                    codec="libvpx-vp9")
    url = f"s3://{s3_server['bucket']}/probe/v.{ext}"
    fs.put_file(local, url)
    file_bytes = os.path.getsize(local)
    dur_remote, fetched = probe_video_header(url, so)
    dur_local, local_fetched = probe_video_header(local)
    assert dur_remote == pytest.approx(dur_local) and dur_remote == pytest.approx(12.0 if ext == "mp4" else 6.0, abs=0.15)
    assert local_fetched == 0  # local files are opened directly
    assert 0 < fetched <= 256 << 10
    assert fetched < file_bytes / 4, (fetched, file_bytes)
    # An unreadable object gives no duration (the decoder reports it later) and no exception.
    fs.pipe_file(f"s3://{s3_server['bucket']}/probe/junk.{ext}", b"\x00" * 5000)
    assert probe_video_header(f"s3://{s3_server['bucket']}/probe/junk.{ext}", so)[0] is None
