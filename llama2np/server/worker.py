"""One engine thread, fed by a bounded first-come-first-served queue, decoding every running request together.

The model is not thread-safe (it keeps one KV cache for reuse), and on a CPU
one forward pass already uses every core, so a single thread runs all model
work. Requests wait in a ``queue.Queue`` in arrival order; when it holds
``max_queue`` requests a new one is refused at once (``QueueFull``, HTTP 429)
rather than left to time out. Between two decoding steps the thread takes
every waiting request into the engine's decode loop (``engine.Engine``), so a
request waits at most one step to start; it is prefilled, then decodes in the
same forward pass as every other running request. Each job
reports back to its request's event loop through an ``asyncio.Queue``; a job
whose client went away is skipped, or dropped at the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any

from ..errors import Llama2npError
from ..llama import Llama2
from .engine import Engine, Request, Stats


class QueueFull(Exception):
    """No room in the queue for another request."""


class Job:
    """One request's work (``work.start(engine, emit)``, later ``work.finish(model, requests)``) and the
    channel its results come back on."""

    def __init__(self, work, loop: asyncio.AbstractEventLoop, stream: bool = True):
        """stream: send the text as it is made (else only the result: no wake-up of the loop per token)."""
        self.work, self.loop, self.stream = work, loop, stream
        # ("piece", index, text), then one of ("done", result), ("error", exc), ("crash", exc), ("cancelled",)
        self.events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self.requests: list[Request] = []  # its engine requests, once started

    def cancel(self) -> None:
        """The client went away: skip the job, or stop it at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def send(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def piece(self, index: int, text: str) -> None:
        if self.stream and text and not self.cancelled:
            self.send("piece", index, text)

    def start(self, engine: Engine) -> list[Request]:
        """The job's engine requests; a refused one reports its error and gives none."""
        try:
            self.requests = self.work.start(engine, self.piece)
        except Llama2npError as e:  # a request the engine refused: the client gets its message
            self.send("error", e)
            self.requests = []
        except Exception as e:  # noqa: BLE001
            self.send("crash", e)
            self.requests = []
        return self.requests

    def finish(self, model: Llama2) -> None:
        try:
            result = self.work.finish(model, self.requests)
        except Llama2npError as e:
            self.send("error", e)
        except Exception as e:  # noqa: BLE001  (a bug must not kill the engine thread; the client gets a 500)
            self.send("crash", e)
        else:
            self.send("done", result)


class Worker:
    """The engine thread and its queue."""

    def __init__(self, model: Llama2, max_queue: int):
        self.stats = Stats()  # the decode loop's counts since the start (forward passes, tokens)
        self.model, self.engine = model, Engine(model, self.stats)
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.busy = False
        self.running = 0  # engine requests in the decode loop
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
        running: list[Job] = []  # jobs in the decode loop, in arrival order
        owner: dict[int, tuple[Job, int]] = {}  # id(request) -> (its job, its choice index)
        while True:
            new = self._take(block=not running)
            if None in new:
                return
            starting = []
            for job in new:
                if job.cancelled:
                    job.send("cancelled")
                    continue
                requests = job.start(self.engine)
                if requests:
                    running.append(job)
                    owner.update({id(r): (job, i) for i, r in enumerate(requests)})
                    starting += requests
            self.busy, self.running = bool(running), len(owner)
            try:
                self.engine.add(starting)
                for job in running:
                    if job.cancelled:
                        for r in job.requests:
                            r.cancel()
                events = self.engine.step() if self.engine.running else []
            except Exception as e:  # noqa: BLE001  (a bug must not kill the engine thread: fail what is running)
                for job in running:
                    job.send("crash", e)
                running, owner = [], {}
                self.engine = Engine(self.model, self.stats)
                continue
            for r, text in events:
                job, index = owner[id(r)]
                job.piece(index, text)
            for job in [j for j in running if all(r.done for r in j.requests)]:
                running.remove(job)
                for r in job.requests:
                    owner.pop(id(r), None)
                if job.cancelled:  # the waiting handler ends too
                    job.send("cancelled")
                else:
                    job.finish(self.model)
            self.busy, self.running = bool(running), len(owner)

    def _take(self, block: bool) -> list:
        """Every job waiting now (waiting for the first one when ``block``)."""
        jobs = [self.queue.get()] if block else []
        while True:
            try:
                jobs.append(self.queue.get_nowait())
            except queue.Empty:
                return jobs
