"""Many local files, read-only, in one contiguous range of virtual memory.

The loader reads a frame as ``HW`` consecutive uint16 values at a known offset of some shard's data
file. With one memory map per shard, a batch needs one numpy call per shard it touches, and at
scale (thousands of shards, 64 random clips per batch) that is one call per clip. Mapping every
data file of a token dataset into one reserved address range makes the whole dataset one array:
file ``k`` starts at element ``base[k]``, and a batch's frames (or whole strided clips) of all
shards are gathered with one fancy index.

How: reserve the range with an anonymous ``PROT_NONE`` mapping (address space only: no memory,
no swap), then map each file over its part of it with ``MAP_FIXED`` (read-only, shared). Files
start on page boundaries; the bytes between a file's end and the next page stay unmapped, so the
caller must only index inside files (:meth:`FileArena.check_extents` makes sure up front).
POSIX only (Linux, macOS); :func:`supported` says whether this platform has it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys

import numpy as np

_PROT_NONE, _PROT_READ = 0, mmap.PROT_READ
_MAP_FIXED = 0x10  # the same value on Linux, macOS and the BSDs (not exported by the mmap module)
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = None


def _lib():
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
        libc.munmap.restype = ctypes.c_int
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc = libc
    return _libc


def supported() -> bool:
    """Whether files can be mapped into one range here (64-bit Linux or macOS with a C library)."""
    if sys.platform not in ("linux", "darwin") or sys.maxsize < 2**62:
        return False
    try:
        _lib()
    except (OSError, AttributeError):
        return False
    return True


def _oserror(what: str, path: str | None = None) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}", path)


class FileArena:
    """Read-only uint16 view of ``paths`` laid end to end (each on a page boundary).

    ``base[k]`` is the uint16 element where file ``k`` starts in :attr:`u16`; ``elements[k]`` is
    its length in uint16 elements. Every view of :attr:`u16` keeps the arena alive (the buffer
    under it refers back to the arena), so the files are unmapped only once no view is left.
    """

    def __init__(self, paths: list[str]):
        if not supported():
            raise OSError("mapping files into one address range needs 64-bit Linux or macOS")
        libc = _lib()
        page = mmap.PAGESIZE
        sizes = np.asarray([os.stat(p).st_size for p in paths], dtype=np.int64)
        spans = (sizes + page - 1) // page * page
        offsets = np.zeros(len(paths), dtype=np.int64)
        np.cumsum(spans[:-1], out=offsets[1:])
        self.nbytes = max(int(spans.sum()), page)
        self.base = offsets // 2
        self.elements = sizes // 2
        self._addr: int | None = None
        addr = libc.mmap(None, self.nbytes, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if addr in (None, _MAP_FAILED):
            raise _oserror(f"reserving {self.nbytes} bytes of address space")
        self._addr = addr
        try:
            for p, off, size in zip(paths, offsets.tolist(), sizes.tolist(), strict=True):
                if size == 0:
                    continue
                fd = os.open(p, os.O_RDONLY)
                try:
                    if os.fstat(fd).st_size != size:
                        raise OSError(f"{p} changed size while it was being mapped")
                    got = libc.mmap(addr + off, size, _PROT_READ, mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
                    if got != addr + off:
                        raise _oserror("mapping a file into the arena", p)
                finally:
                    os.close(fd)  # the mapping keeps the file open
        except BaseException:
            self._unmap()
            raise
        buf = (ctypes.c_char * self.nbytes).from_address(addr)
        buf._arena = self  # a cycle, on purpose: numpy views → buffer → arena (unmapped last)
        self.u16 = np.frombuffer(buf, dtype=np.uint16)
        self.u16.flags.writeable = False

    def check_extents(self, file: np.ndarray, start: np.ndarray, length: np.ndarray) -> None:
        """Raise ``ValueError`` unless every ``[start, start + length)`` (uint16 elements, int64
        arrays) lies inside file ``file``: an index past a file's end would read unmapped memory."""
        file = np.asarray(file, dtype=np.int64)
        end = np.asarray(start, dtype=np.int64) + np.asarray(length, dtype=np.int64)
        bad = np.flatnonzero((np.asarray(start) < 0) | (end > self.elements[file]))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"{bad.size} token ranges lie outside their data file (the first: file {int(file[i])}, elements "
                f"[{int(start[i])}, {int(end[i])}) of {int(self.elements[file[i]])}); the shards do not match "
                "the index: rebuild the mix"
            )

    def _unmap(self) -> None:
        if getattr(self, "_addr", None) is not None:  # (None too when __init__ failed early)
            _lib().munmap(self._addr, self.nbytes)  # the files and the reservation together
            self._addr = None

    def __del__(self) -> None:
        self._unmap()
