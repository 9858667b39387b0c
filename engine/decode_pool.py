"""A pool of decode worker processes with a hard wall-clock limit per clip.

A thread can not interrupt a decoder stuck in C code that holds the GIL (decord
does this on some files), so each decode runs in a worker process that is
killed and replaced when its clip overruns; the clip fails with
`DecodeTimeout` and the others keep flowing. Workers are started with
``spawn`` (safe beside threads and torch), and the job queue is bounded, so
`submit` blocks instead of piling up bytes in memory.

    with DecodePool(workers=4) as pool:
        futures = [pool.submit(data, Sampling.uniform(8), timeout=10) for data in clips]
        frames = [f.result() for f in futures]   # Frames, or raises DecodeError
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from engine.decode import DecodeLimits, Frames, Sampling, decode_video
from engine.errors import DecodeError, DecodeTimeout, SampleError

_STOP = None


def _worker_main(conn, fn: Callable[..., Frames]) -> None:
    """Runs in the worker: decode what arrives, send back the result or the error."""
    while True:
        try:
            job = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if job is _STOP:
            return
        data, sampling, backend, limits = job
        try:
            out: tuple[bool, Any] = (True, fn(data, sampling, backend, limits))
        except SampleError as exc:
            out = (False, exc)
        except Exception as exc:  # noqa: BLE001 - anything else still must reach the caller, typed
            out = (False, DecodeError("decoder-error", f"{type(exc).__name__}: {exc}"))
        try:
            conn.send(out)
        except (BrokenPipeError, OSError):
            return


class _Slot:
    """One worker process and the thread that feeds it jobs and watches its clock."""

    def __init__(self, pool: "DecodePool", index: int):
        self.pool, self.index = pool, index
        self.proc: mp.process.BaseProcess | None = None
        self.conn = None
        self.thread = threading.Thread(target=self._run, name=f"decode-slot-{index}", daemon=True)
        self.thread.start()

    def _start(self) -> None:
        parent, child = self.pool._ctx.Pipe(duplex=True)
        self.proc = self.pool._ctx.Process(target=_worker_main, args=(child, self.pool.fn),
                                           name=f"pseudocap-decode-{self.index}", daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent

    def _kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join(timeout=5)
            self.pool.restarts += 1
        if self.conn is not None:
            self.conn.close()
        self.proc = self.conn = None

    def _run(self) -> None:
        while True:
            item = self.pool._jobs.get()
            if item is _STOP:
                break
            future, job, timeout = item
            if not future.set_running_or_notify_cancel():
                continue
            if self.proc is None or not self.proc.is_alive():
                self._kill()
                self._start()
            t0 = time.perf_counter()
            try:
                self.conn.send(job)
                if self.conn.poll(timeout):
                    ok, value = self.conn.recv()
                    future.decode_seconds = time.perf_counter() - t0  # worker time, for the job's time split
                    future.set_result(value) if ok else future.set_exception(value)
                else:
                    self._kill()
                    future.set_exception(DecodeTimeout(
                        "timeout", f"decode took longer than {timeout:g} s; the worker was killed"))
            except (EOFError, BrokenPipeError, OSError) as exc:
                code = self.proc.exitcode if self.proc is not None else None
                self._kill()
                future.set_exception(DecodeError("decoder-crashed", f"the decode worker died (exit code {code}, "
                                                 f"{type(exc).__name__})"))
        if self.conn is not None:
            try:
                self.conn.send(_STOP)
            except (BrokenPipeError, OSError):
                pass
        if self.proc is not None:
            self.proc.join(timeout=5)
            if self.proc.is_alive():
                self.proc.kill()


class DecodePool:
    """Decodes clips in ``workers`` processes, each clip bounded by a timeout.

    Args:
        workers: worker processes (each decodes one clip at a time).
        fn: the decode function, a picklable top-level callable with
            `decode_video`'s signature ``(data, sampling, backend, limits)``.
        queue_size: jobs waiting beyond those in flight; `submit` blocks when full.
        default_timeout: seconds per clip when `submit` is not given one.
    """

    def __init__(self, workers: int = 2, fn: Callable[..., Frames] = decode_video, queue_size: int | None = None,
                 default_timeout: float = 60.0, start_method: str = "spawn"):
        if workers < 1:
            raise ValueError(f"DecodePool needs at least 1 worker, got {workers}")
        self.fn, self.default_timeout = fn, default_timeout
        self.restarts = 0  # workers killed (timeouts, crashes): a health signal for job stats
        self._ctx = mp.get_context(start_method)
        self._jobs: queue.Queue = queue.Queue(maxsize=queue_size or 2 * workers)
        self._closed = False
        self._slots = [_Slot(self, i) for i in range(workers)]

    def submit(self, data: bytes, sampling: Sampling = Sampling(n=8), backend: str = "auto",
               limits: DecodeLimits = DecodeLimits(), timeout: float | None = None) -> Future:
        """Queues one clip; the future resolves to `Frames` or raises a `DecodeError`."""
        if self._closed:
            raise RuntimeError("DecodePool is closed")
        future: Future = Future()
        self._jobs.put((future, (data, sampling, backend, limits), timeout or self.default_timeout))
        return future

    def decode(self, data: bytes, sampling: Sampling = Sampling(n=8), backend: str = "auto",
               limits: DecodeLimits = DecodeLimits(), timeout: float | None = None) -> Frames:
        return self.submit(data, sampling, backend, limits, timeout).result()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for _ in self._slots:
            self._jobs.put(_STOP)
        for slot in self._slots:
            slot.thread.join(timeout=10)

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_shared: dict[int, DecodePool] = {}
_shared_lock = threading.Lock()


def shared_pool(threads: int = 1) -> DecodePool:
    """A process-wide single-worker pool behind ``decode_video(..., timeout=...)``."""
    with _shared_lock:
        pool = _shared.get(threads)
        if pool is None:
            pool = _shared[threads] = DecodePool(workers=1)
            atexit.register(pool.close)
        return pool
