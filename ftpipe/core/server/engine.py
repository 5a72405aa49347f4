"""The server's decoding worker. One thread owns the models: requests queue up and join the running batch of their
model and sampling setting at its next step (`decoding`: continuous batching, each row with its own LoRA adapter,
as PEFT runs a batch with a different adapter per row), and each request gets its tokens as they are decoded.
Loading and swapping adapters run on the same thread between two steps, once the requests queued before them have
joined their batches, so a swap never races a step and no request waits for the answers already decoding."""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ftpipe.core.server.decoding import Decoding, read_start
from ftpipe.core.server.prefixes import STARTS_KEPT, Prefixes
from ftpipe.core.server.structured import Constraint

MAX_BATCH = 64


@dataclass
class Job:
    """One request's decoding: `emit(token)` for each new token, then `emit(None)`; `fail(error)` instead."""

    model: Any  # the loaded model (a PeftModel holding adapters, or a plain model)
    adapter: str | None  # the adapter's name in `model`; None: the model as it is
    prompt: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    stops: frozenset[int]
    pad_id: int
    emit: Callable[[int | None], None]
    fail: Callable[[BaseException], None]
    cancelled: threading.Event = field(default_factory=threading.Event)  # set: end the row at its next token
    cached_tokens: int = 0  # the prompt's first tokens taken from a kept start (`Prefixes.find`), not read again
    constraint: Constraint | None = None  # the answer's grammar (`response_format`); None: free text

    @property
    def batch_key(self) -> tuple:
        """Jobs that can decode in one batch: the same model and sampling settings."""
        return id(self.model), self.temperature, self.top_p if self.temperature > 0 else 1.0


class Engine:
    """The worker thread and its queue."""

    def __init__(self, max_batch: int = MAX_BATCH, prompt_starts: int = STARTS_KEPT):
        self.max_batch = max_batch
        self.prefixes = Prefixes(read_start, prompt_starts)  # emptied by calls that may load models or adapters
        self._running: dict[tuple, Decoding] = {}
        self._waiting: deque = deque()  # jobs, calls and the stop taken from the queue, not yet run
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="ftpipe-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def call(self, fn: Callable[[], Any], forget_starts: bool = True) -> Future:
        """Run `fn` on the worker thread between two steps, once the jobs submitted before it have joined their batches
        (`busy` says which adapters jobs use); its result (or error) comes back in the future. `forget_starts`: `fn`
        may load models or adapters, so the kept prompt starts go."""
        future: Future = Future()
        self._queue.put((fn, future, forget_starts))
        return future

    def busy(self) -> set[tuple[int, str | None]]:
        """(model id, adapter) of every job decoding or waiting to; for a call, which runs on the worker thread."""
        jobs = [job for decoding in self._running.values() for job in decoding.jobs]
        return {(id(job.model), job.adapter) for job in [*jobs, *self._waiting] if isinstance(job, Job)}

    def stop(self) -> None:
        """End the worker once the jobs submitted before are done."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        waiting, running = self._waiting, self._running
        while True:
            waiting.extend(_drained(self._queue, block=not waiting and not running))
            joining = self._joining(waiting, running)
            if not joining and waiting and (isinstance(waiting[0], tuple) or waiting[0] is None and not running):
                item = waiting.popleft()  # a call, or the stop once no row decodes
                if item is None:
                    return
                fn, future, forget_starts = item
                if forget_starts:
                    self.prefixes.clear()
                _call(fn, future)
            for key, jobs in joining.items():
                try:
                    running[key].admit(jobs)
                except Exception as error:  # noqa: BLE001 - the requests get it, the running rows and server go on
                    for job in jobs:
                        job.fail(error)
            for key, decoding in list(running.items()):
                if decoding.jobs:
                    try:
                        decoding.step()
                    except Exception as error:  # noqa: BLE001 - every request of the batch gets it, the server goes on
                        decoding.fail(error)
                if not decoding.jobs:
                    del running[key]

    def _joining(self, waiting: deque, running: dict[tuple, Decoding]) -> dict[tuple, list[Job]]:
        """The waiting jobs that join a running batch now, by batch: those before the first call or stop (which waits
        for them), in order, as many of each batch's as it has room for (the others wait, and only for their own
        batch)."""
        joining: dict[tuple, list[Job]] = {}
        full, left = set(), []
        while waiting and isinstance(waiting[0], Job):
            job = waiting.popleft()
            if job.batch_key not in running:
                running[job.batch_key] = Decoding(job.model, job.temperature, job.top_p, self.max_batch,
                                                  self.prefixes)
            if job.batch_key in full or running[job.batch_key].room() <= len(joining.get(job.batch_key, ())):
                full.add(job.batch_key)
                left.append(job)
            else:
                joining.setdefault(job.batch_key, []).append(job)
        waiting.extendleft(reversed(left))
        return joining


def _drained(jobs: queue.Queue, block: bool) -> list:
    """What the queue holds (waiting for a first item when `block`)."""
    items = [jobs.get()] if block else []
    while not jobs.empty():
        items.append(jobs.get_nowait())
    return items


def _call(fn: Callable[[], Any], future: Future) -> None:
    try:
        future.set_result(fn())
    except BaseException as error:  # noqa: BLE001 - handed back to the caller
        future.set_exception(error)
