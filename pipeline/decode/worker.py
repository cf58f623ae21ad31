"""Decoding in a worker subprocess under a per-input time limit.

FFmpeg and image codecs are native code: a malformed file can hang or crash the process that
decodes it. `DecodeWorker` keeps one long-lived subprocess that decodes items one at a time and
streams chunk records back over a pipe; the parent enforces `cfg.timeout_s` per item (counted
from when the item is sent to a worker that has finished starting, so a slow start on a loaded
machine never times an input out). On a
timeout or a crash the subprocess is killed, the item becomes an error record, and the next item
starts a fresh subprocess. Results are all-or-nothing per item: chunks are held until the item
finishes, so a failure never leaves a partial video behind (the output stays deterministic).

Test hook: the environment variable TOTO_DECODE_FAULT="hang:<text>" or "crash:<text>" makes the
worker sleep forever / abort on items whose uri contains <text> (tests of the watchdog only).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterable, Iterator
from typing import Any

from pipeline.decode.config import DecodeConfig, DecodeError

FAULT_ENV = "TOTO_DECODE_FAULT"
# Starting a worker (spawn + imports) is not part of any item's time limit; this bounds it apart.
STARTUP_TIMEOUT_S = 120.0


def error_record(item: dict, reason: str) -> dict:
    """{"type": "error", "key", "uri", "reason"}; `{uri, reason}` is what shard sidecars store."""
    return {"type": "error", "key": item.get("key"), "uri": item["uri"], "reason": reason}


def iter_decode_item(item: dict, cfg: DecodeConfig, storage_options: dict | None = None) -> Iterator[dict]:
    """Stream one item's chunk records in this process; raises DecodeError with a readable reason."""
    if item.get("kind") == "image":
        from pipeline.decode.image import decode_image

        yield from decode_image(item, cfg, storage_options)
    else:
        from pipeline.decode.video import decode_video

        yield from decode_video(item, cfg, storage_options)


def decode_item(item: dict, cfg: DecodeConfig, storage_options: dict | None = None) -> list[dict]:
    """Decode one item in this process (no isolation): its chunk records, or [error record]."""
    try:
        return list(iter_decode_item(item, cfg, storage_options))
    except DecodeError as e:
        return [error_record(item, e.reason)]
    except Exception as e:  # a bug or an unexpected library error still costs only this input
        return [error_record(item, f"decoder error: {type(e).__name__}: {e}")]


def _quiet_ffmpeg() -> None:
    try:
        import av.logging

        av.logging.set_level(av.logging.PANIC)
    except Exception:
        pass


def _fault(uri: str) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if ":" not in spec:
        return
    what, text = spec.split(":", 1)
    if text and text in uri:
        if what == "hang":
            while True:
                time.sleep(3600)
        if what == "crash":
            os.abort()


def _worker_main(conn: Any, cfg_dict: dict, storage_options: dict | None) -> None:
    # The parent owns interrupts; a Ctrl-C must not leave a half-sent message.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _quiet_ffmpeg()
    cfg = DecodeConfig.from_dict(cfg_dict)
    # Import the decoders before saying "ready", so an item's time limit never pays for start-up.
    import pipeline.decode.image  # noqa: F401
    import pipeline.decode.video  # noqa: F401

    conn.send(("ready", None))
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        try:
            _fault(item["uri"])
            for rec in iter_decode_item(item, cfg, storage_options):
                conn.send(("chunk", rec))
            conn.send(("done", None))
        except DecodeError as e:
            conn.send(("error", e.reason))
        except Exception as e:
            conn.send(("error", f"decoder error: {type(e).__name__}: {e}"))


class DecodeWorker:
    """One decoding subprocess with a watchdog. Use as a context manager or call close().

        with DecodeWorker(cfg) as w:
            for item in items:
                for rec in w.decode(item):   # chunk records, or exactly one error record
                    ...
    """

    def __init__(self, cfg: DecodeConfig | None = None, storage_options: dict | None = None) -> None:
        self.cfg = cfg or DecodeConfig()
        self.storage_options = storage_options
        self._ctx = mp.get_context(self.cfg.start_method)
        self._proc: Any = None
        self._conn: Any = None
        self.restarts = 0

    def _start(self) -> bool:
        """Start the subprocess and wait (up to STARTUP_TIMEOUT_S) until it has imported everything."""
        parent, child = self._ctx.Pipe(duplex=True)
        self._proc = self._ctx.Process(
            target=_worker_main, args=(child, self.cfg.to_dict(), self.storage_options), daemon=True,
            name="toto-decode-worker",
        )
        self._proc.start()
        child.close()
        self._conn = parent
        try:
            if parent.poll(STARTUP_TIMEOUT_S) and parent.recv()[0] == "ready":
                return True
        except (EOFError, OSError):
            pass
        self._kill()
        return False

    def _kill(self) -> None:
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(timeout=10)
        if self._conn is not None:
            self._conn.close()
        self._proc, self._conn = None, None
        self.restarts += 1

    def decode(self, item: dict) -> list[dict]:
        """Decode one item in the subprocess: its chunk records, or [one error record]."""
        if self._proc is None or not self._proc.is_alive():
            if self._proc is not None:
                self._kill()
            if not self._start():
                return [error_record(item, f"decoder crashed: worker did not start within {STARTUP_TIMEOUT_S:g} s")]
        deadline = time.monotonic() + self.cfg.timeout_s
        try:
            self._conn.send(item)
        except (BrokenPipeError, OSError):
            self._kill()
            return [error_record(item, "decoder crashed before reading the input")]
        chunks: list[dict] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._conn.poll(remaining):
                self._kill()
                return [error_record(item, f"timeout: no result within {self.cfg.timeout_s:g} s")]
            try:
                kind, payload = self._conn.recv()
            except (EOFError, OSError, ConnectionResetError):
                proc = self._proc
                proc.join(timeout=5)
                code = proc.exitcode
                self._kill()
                how = f"signal {-code} ({signal.Signals(-code).name})" if code is not None and code < 0 else f"exit code {code}"
                return [error_record(item, f"decoder crashed: worker process died with {how}")]
            if kind == "chunk":
                chunks.append(payload)
            elif kind == "done":
                return chunks
            else:
                return [error_record(item, payload)]

    def close(self) -> None:
        if self._proc is not None:
            try:
                self._conn.send(None)
                self._proc.join(timeout=5)
            except (BrokenPipeError, OSError):
                pass
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(timeout=5)
            self._conn.close()
            self._proc, self._conn = None, None

    def __enter__(self) -> DecodeWorker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def decode_items(
    items: Iterable[dict], cfg: DecodeConfig | None = None, storage_options: dict | None = None, *, isolate: bool = True
) -> Iterator[dict]:
    """Decode items in order, yielding each item's chunk records or its one error record.

    isolate=True (default) decodes in a DecodeWorker subprocess under cfg.timeout_s per item;
    isolate=False decodes in this process (no protection against hangs or crashes).
    """
    cfg = cfg or DecodeConfig()
    if not isolate:
        for item in items:
            yield from decode_item(item, cfg, storage_options)
        return
    with DecodeWorker(cfg, storage_options) as w:
        for item in items:
            yield from w.decode(item)
