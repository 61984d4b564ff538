"""One decoder, one worker thread: requests wait in a bounded queue and generate one at a time.

Why not a batch: the lean decoder's native step is batch 1 (one C++ call per token over the whole
model), and on a few cores a second concurrent generation only halves the speed of each, so requests
queue instead of racing for the cores.  The worker hands each request's text to its HTTP handler through
an asyncio queue as the tokens come; a request whose client left (``Worker.cancel``) stops at its next
token, and one still waiting leaves the queue at once (its place is free for the next request); either counts
as cancelled, not served.  A request that fails inside generation gets its error and the worker
goes on with the next.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ...core.errors import LosaError
from .protocol import ServeError
from .text import TextStream

log = logging.getLogger("losa.serve")


@dataclass(eq=False)  # a job is itself, not its fields: the queue removes this one
class Job:
    """One request's generation: what to generate, and the queue its events go back through.

    Events: ``("text", piece)``, then ``("done", finish_reason, completion_tokens)`` or ``("error", ServeError)``.
    """

    prompt_ids: list[int]
    max_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    seed: int
    stop: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, *event: Any) -> None:
        """Hand an event to the request's handler (from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server stopped, nobody is listening
            pass

    def cancel(self) -> None:
        """Stop at the next token (or never start); ``Worker.cancel`` also frees its place in the queue."""
        self.cancelled.set()


class Worker:
    """The thread that owns the decoder (see the module docstring)."""

    def __init__(self, decoder: Any, tokenizer: Any, max_queue: int) -> None:
        self.decoder, self.tokenizer, self.max_queue = decoder, tokenizer, max_queue
        self._waiting: deque[Job] = deque()
        self._current: Job | None = None
        self._lock = threading.Condition(threading.RLock())
        self._closing = False
        self.served = self.failed = self.cancelled = 0
        self._thread = threading.Thread(target=self._run, name="losa-serve-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; a full queue (``max_queue`` waiting behind the one generating) is a 503."""
        with self._lock:
            if self._closing:
                raise ServeError(503, "the server is shutting down", "server_error")
            if len(self._waiting) + (self._current is not None) > self.max_queue:
                raise ServeError(503, f"the server is busy: {len(self._waiting)} requests are waiting (the limit "
                                      "set by --max-queue); retry later", "server_error", code="queue_full")
            self._waiting.append(job)
            self._lock.notify()

    def state(self) -> dict:
        with self._lock:
            return {"generating": self._current is not None, "waiting": len(self._waiting), "served": self.served,
                    "failed": self.failed, "cancelled": self.cancelled}

    def cancel(self, job: Job) -> None:
        """The client is gone (or its answer is complete: then nothing changes).  A waiting job leaves the queue
        now and counts as cancelled; the one generating stops at its next token and counts so in ``_run``."""
        with self._lock:
            job.cancel()
            if job in self._waiting:
                self._waiting.remove(job)
                self.cancelled += 1
                log.info("request cancelled while waiting: the client left")

    def close(self, timeout: float = 10.0) -> None:
        """Stop: the generation under way ends at its next token, waiting requests get a 503."""
        with self._lock:
            self._closing = True
            if self._current is not None:
                self._current.cancel()
            for job in self._waiting:
                job.emit("error", ServeError(503, "the server is shutting down", "server_error"))
            self._waiting.clear()
            self._lock.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closing:
                    self._lock.wait()
                if self._closing:
                    return
                job = self._current = self._waiting.popleft()
            outcome, last = "cancelled", None
            try:
                if not job.cancelled.is_set():
                    outcome, last = self._generate(job)
            except LosaError as exc:  # the decoder's own checks (the routes check the same limits first)
                outcome, last = "failed", ("error", ServeError(400, str(exc)))
            except Exception as exc:  # noqa: BLE001 - any failure is this request's, never the server's
                log.exception("generation failed")
                first = (str(exc).splitlines() or [""])[0][:200]
                outcome, last = "failed", ("error", ServeError(500, f"generation failed: {type(exc).__name__}: "
                                                                    f"{first}", "server_error"))
            finally:
                with self._lock:
                    self._current = None
                    self.served += outcome == "served"
                    self.failed += outcome == "failed"
                    self.cancelled += outcome == "cancelled"
            if last is not None:  # after the count: a client that has its answer sees it counted (``state``)
                job.emit(*last)

    def _generate(self, job: Job) -> tuple[str, tuple | None]:
        """Emit ``job``'s text; ("served", its done event), or ("cancelled", None) where its client left."""
        text = TextStream(self.tokenizer, job.stop)
        count, finish, stopped = 0, "length", False
        tokens = self.decoder.stream(job.prompt_ids, job.max_tokens, sample=job.temperature > 0,
                                     temperature=job.temperature or 1.0, top_p=job.top_p, seed=job.seed)
        for token in tokens:
            count += 1
            piece, stopped = text.add(token)
            if piece:
                job.emit("text", piece)
            if stopped or token in self.decoder.eos:
                finish = "stop"
                break
            if job.cancelled.is_set():
                tokens.close()
                log.info("request cancelled after %d tokens: the client left", count)
                return "cancelled", None
        if not stopped:
            rest, stopped = text.rest()
            if rest:
                job.emit("text", rest)
            finish = "stop" if stopped else finish
        return "served", ("done", finish, count)
