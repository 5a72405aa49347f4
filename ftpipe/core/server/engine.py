"""Batched generation for the server. One worker thread owns the models: requests queue up, and each time the worker
is free it decodes every waiting request of one model together, each row with its own LoRA adapter (PEFT runs a
batch with a different adapter per row), handing each request its tokens as they are decoded. Loading and swapping
adapters run on the same thread between batches, so a swap never races a batch."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ftpipe.core.evaluation.generation import pad

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch
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

    @property
    def batch_key(self) -> tuple:
        """Jobs that can share one `generate` call: the same model and sampling settings."""
        return id(self.model), self.temperature, self.top_p if self.temperature > 0 else 1.0


class _Rows:
    """Streamer and stopping criterion of one batch: routes each step's tokens to their jobs, and ends a row at a
    stop token or its own token budget."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs
        self.counts = [0] * len(jobs)
        self.done = [False] * len(jobs)
        self.prompt_seen = False

    def put(self, tokens) -> None:
        if not self.prompt_seen:  # the first call hands over the prompts
            self.prompt_seen = True
            return
        for row, token in enumerate(tokens.tolist()):
            if self.done[row]:
                continue
            job = self.jobs[row]
            if token in job.stops or job.cancelled.is_set():
                self._finish(row)
                continue
            job.emit(token)
            self.counts[row] += 1
            if self.counts[row] >= job.max_new_tokens:
                self._finish(row)

    def end(self) -> None:
        for row in range(len(self.jobs)):
            if not self.done[row]:
                self._finish(row)

    def _finish(self, row: int) -> None:
        self.done[row] = True
        self.jobs[row].emit(None)

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


class Engine:
    """The worker thread and its queue."""

    def __init__(self, max_batch: int = MAX_BATCH):
        self.max_batch = max_batch
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="ftpipe-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the worker thread between batches; its result (or error) comes back in the future."""
        future: Future = Future()
        self._queue.put((fn, future))
        return future

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            while len(items) < self.max_batch and not self._queue.empty():
                items.append(self._queue.get_nowait())
            jobs: dict[tuple, list[Job]] = {}
            for item in items:
                if item is None:
                    return
                if isinstance(item, Job):
                    jobs.setdefault(item.batch_key, []).append(item)
                else:
                    _call(*item)
            for batch in jobs.values():
                _decode(batch)


def _call(fn: Callable[[], Any], future: Future) -> None:
    try:
        future.set_result(fn())
    except BaseException as error:  # noqa: BLE001 - handed back to the caller
        future.set_exception(error)


def _decode(jobs: list[Job]) -> None:
    """Generate for `jobs` (one model, one sampling setting) in one batch, left-padded."""
    import torch
    from transformers import StoppingCriteriaList

    first = jobs[0]
    ids, mask = pad([job.prompt for job in jobs], first.pad_id, left=True)
    rows = _Rows(jobs)
    kwargs: dict[str, Any] = {}
    if hasattr(first.model, "peft_config"):
        kwargs["adapter_names"] = [job.adapter or BASE_ADAPTER for job in jobs]
    sampling = {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p} \
        if first.temperature > 0 else {"do_sample": False}
    try:
        with torch.inference_mode():
            first.model.generate(
                input_ids=ids.to(first.model.device), attention_mask=mask.to(first.model.device),
                max_new_tokens=max(job.max_new_tokens for job in jobs), eos_token_id=sorted(set().union(
                    *(job.stops for job in jobs))), pad_token_id=first.pad_id, streamer=rows,
                stopping_criteria=StoppingCriteriaList([rows]), num_beams=1, use_cache=True, **sampling, **kwargs)
        rows.end()
    except Exception as error:  # noqa: BLE001 - every request of the batch gets it, the server goes on
        for row, job in enumerate(jobs):
            if not rows.done[row]:
                job.fail(error)
