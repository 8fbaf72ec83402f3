"""One engine thread, fed by a bounded first-come-first-served queue.

The model is not thread-safe (it keeps one KV cache for reuse), and on a CPU
one forward pass already uses every core, so a single thread runs all model
work. Requests wait in a ``queue.Queue`` in arrival order; when it holds
``max_queue`` requests a new one is refused at once (``QueueFull``, HTTP 429)
rather than left to time out. Each job reports back to its request's event
loop through an ``asyncio.Queue``; a job whose client went away is skipped, or
stopped between two decoding steps.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any

from ..errors import Llama2npError
from ..llama import Llama2


class QueueFull(Exception):
    """No room in the queue for another request."""


class Job:
    """One request's work (``work.run(model, emit, cancelled)``) and the channel its results come back on."""

    def __init__(self, work, loop: asyncio.AbstractEventLoop):
        self.work, self.loop = work, loop
        self.events: asyncio.Queue = asyncio.Queue()  # ("piece", index, text), ("done", result), ("error", exc)
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """The client went away: skip the job, or stop it at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def send(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def run(self, model: Llama2) -> None:
        try:
            result = self.work.run(model, lambda i, piece: self.send("piece", i, piece), lambda: self.cancelled)
        except Llama2npError as e:  # a request the engine refused: the client gets its message
            self.send("error", e)
        except Exception as e:  # noqa: BLE001  (a bug must not kill the engine thread; the client gets a 500)
            self.send("crash", e)
        else:
            self.send("done", result)


class Worker:
    """The engine thread and its queue."""

    def __init__(self, model: Llama2, max_queue: int):
        self.model = model
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.busy = False
        self._thread = threading.Thread(target=self._loop, name="llama2np-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the server's queue is full ({self.queue.maxsize} requests waiting); "
                            "retry later") from None

    def stop(self) -> None:
        self.queue.put(None)
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while (job := self.queue.get()) is not None:
            if job.cancelled:
                continue
            self.busy = True
            try:
                job.run(self.model)
            finally:
                self.busy = False
