"""The serving engine: one model, one KV cache, one worker thread, a bounded queue of requests.

Requests run one at a time (a small device has one set of weights and one cache to give); each
streams its pieces back to the asyncio loop that asked. A request cancelled (the client went away,
or the drain at shutdown ran out of time) stops at the next token. The worker's heartbeat, taken
at every token and every idle half second, is what the systemd watchdog is fed from: a hung
generation stops it, and systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from edge_awq.generate import Piece, SamplingArgs, generate

log = logging.getLogger(__name__)


def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_TRIM = _malloc_trim()


def trim_heap() -> None:
    """Give the heap's freed pages back to the system (glibc's malloc_trim): a long prompt's buffers, freed
    once it is answered or refused, would otherwise stay resident and the server's memory only grow."""
    if _TRIM is not None:
        _TRIM(0)


class QueueFull(Exception):
    """Every place in the queue is taken: answer 503 and ask the client to retry."""


class Draining(Exception):
    """The service is stopping: no new requests."""


_ids = itertools.count(1)


@dataclass
class Job:
    """One request: its prompt, how to sample, and where its pieces go."""

    prompt: list[int]
    sampling: SamplingArgs
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)  # Piece, an Exception, then None
    cancel: threading.Event = field(default_factory=threading.Event)
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    created: float = field(default_factory=time.monotonic)
    started: float | None = None  # when the engine took it (created..started: time in the queue)
    first_token: float | None = None
    finished: float | None = None
    completion_tokens: int = 0

    def _emit(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class Engine:
    def __init__(self, llm, queue_size: int):
        """llm: an ``edge_awq.api.LLM`` (its weights, backend, tokenizer and preallocated cache)."""
        self.llm = llm
        self.w, self.ops, self.tokenizer, self.cache, self.ctx = llm.weights, llm.ops, llm.tokenizer, llm.cache, llm.info.ctx
        self._queue: queue.Queue[Job] = queue.Queue()
        # one running and queue_size waiting, counted from submit to the end of the run: a burst that
        # arrives before the worker has taken the first job finds its place all the same
        self._capacity, self._admitted, self._admit = queue_size + 1, 0, threading.Lock()
        self._running: Job | None = None
        self._stop = threading.Event()
        self.draining = False
        self.heartbeat = time.monotonic()
        self._thread = threading.Thread(target=self._work, name="edge-awq-engine", daemon=True)

    def warm_up(self) -> None:
        """Prefill a short prompt and decode two tokens (compiles the kernels, touches the weights) before saying READY."""
        text = "Hello! This warm-up runs a prompt of a few words, then decodes two tokens."
        ids = self.tokenizer.encode(text, bos=self.tokenizer.add_bos)[: self.ctx // 2] or [0]
        for _ in generate(self.w, self.ops, self.tokenizer, ids, SamplingArgs(max_new_tokens=2), self.cache):
            pass
        self.heartbeat = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        if self.draining:
            raise Draining()
        with self._admit:
            if self._admitted >= self._capacity:
                raise QueueFull()
            self._admitted += 1
        self._queue.put_nowait(job)

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def alive(self, within: float) -> bool:
        """The worker took a step (a token, or an idle check) in the last `within` seconds."""
        return self._thread.is_alive() and time.monotonic() - self.heartbeat < within

    def drain(self, timeout: float) -> None:
        """Stop taking requests; those in flight get `timeout` seconds to finish, then are cancelled."""
        self.draining = True
        t = threading.Timer(timeout, self.cancel_all)
        t.daemon = True
        t.start()

    def idle(self) -> bool:
        return self._running is None and self._queue.empty()

    def cancel_all(self) -> None:
        if self._running is not None:
            self._running.cancel.set()
        for job in list(self._queue.queue):
            job.cancel.set()

    def stop(self) -> None:
        self.cancel_all()
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _work(self) -> None:
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            try:
                job = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            self._running = job
            try:
                self._run(job)
            finally:
                self._running = None
                job.finished = time.monotonic()
                with self._admit:
                    self._admitted -= 1
                job._emit(None)
                trim_heap()

    def _run(self, job: Job) -> None:
        job.started = time.monotonic()
        if job.cancel.is_set():
            job._emit(Piece("", None, "cancelled"))
            return
        eos = self.tokenizer.eos_ids
        try:
            for piece in generate(self.w, self.ops, self.tokenizer, job.prompt, job.sampling, self.cache):
                self.heartbeat = time.monotonic()
                if piece.token is not None and piece.token not in eos:
                    job.completion_tokens += 1
                if job.first_token is None:
                    job.first_token = time.monotonic()
                if job.cancel.is_set():
                    job._emit(Piece(piece.text, piece.token, "cancelled"))
                    return
                job._emit(piece)
                if piece.finish:
                    return
        except Exception as e:  # a request must never take the worker down
            log.exception("%s failed", job.id)
            job._emit(e)
