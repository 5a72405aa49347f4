"""Continuous batching: the rows of one model and sampling setting decode together, one token a step. A request that
arrives joins the running batch at the next step (its prompt read on its own, its KV cache then set beside the
others', all left-padded to one length), and a row that is done leaves at once, so a short answer never waits for a
long one. A prompt that begins with a kept start (`prefixes`: a task's long system prompt) reads only the rest. A model
whose cache cannot drop rows (`rows_can_leave`) keeps its rows until the last is done, and new rows wait for that.
A row with a `response_format` picks its tokens within its answer's grammar (`structured`)."""

from __future__ import annotations

from ftpipe.core.evaluation.generation import SharedPrefix, prompt_batch, read_prefix, rows_can_leave
from ftpipe.core.server.prefixes import Prefixes
from ftpipe.core.server import structured

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


class Decoding:
    """A running batch: its jobs (`Job`), their KV cache, attention mask, next token positions and last tokens."""

    def __init__(self, model, temperature: float, top_p: float, max_rows: int, prefixes: Prefixes | None = None):
        self.model, self.max_rows = model, max_rows
        self.elastic = rows_can_leave(model)
        self.prefixes = prefixes if self.elastic else None
        self.choose = _sampler(temperature, top_p)
        self.jobs: list = []
        self.counts: list[int] = []
        self.done: list[bool] = []
        self.cache = self.mask = self.positions = self.tokens = None

    def room(self) -> int:
        """How many more jobs can join now."""
        return self.max_rows - len(self.jobs) if self.elastic or not self.jobs else 0

    def admit(self, jobs: list) -> None:
        """Read the prompts of `jobs` and take their first tokens; they decode with the others from the next step.
        Prompts that begin with the same kept start are read together after a copy of its cache."""
        groups: dict[int, tuple[SharedPrefix | None, list]] = {}
        for job in jobs:
            start = self.prefixes.find(job) if self.prefixes else None
            groups.setdefault(id(start), (start, []))[1].append(job)
        for start, group in groups.values():
            self._admit(group, start)

    def _admit(self, jobs: list, start: SharedPrefix | None) -> None:
        from transformers import DynamicCache

        ids, mask = prompt_batch([job.prompt for job in jobs], jobs[0].pad_id, start)
        positions, skip = (mask.cumsum(-1) - 1).clamp(min=0), len(start.ids) if start else 0
        if start:
            cache = start.cache_for(len(jobs))
        else:
            cache = DynamicCache() if self.elastic else DynamicCache(config=self.model.config)
        device = self.model.device
        out = forward(self.model, [job.adapter for job in jobs], input_ids=ids[:, skip:].to(device),
                      attention_mask=mask.to(device), position_ids=positions[:, skip:].to(device), cache=cache,
                      logits_to_keep=1)
        tokens = self._next(out.logits[:, -1], [job.constraint for job in jobs])
        lengths = mask.sum(-1).to(device)
        if self.jobs:
            self._join(out.cache, mask.to(device), lengths, tokens)
        else:
            self.cache, self.mask, self.positions, self.tokens = out.cache, mask.to(device), lengths, tokens
        self.jobs += jobs
        self.counts += [0] * len(jobs)
        self.done += [False] * len(jobs)
        self._hand_out(range(len(self.jobs) - len(jobs), len(self.jobs)), tokens.tolist())
        self._leave()

    def step(self) -> None:
        """Decode one token of every row."""
        import torch

        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.jobs), 1))], dim=1)
        out = forward(self.model, [job.adapter for job in self.jobs], input_ids=self.tokens[:, None],
                      attention_mask=self.mask, position_ids=self.positions[:, None], cache=self.cache)
        constraints = [None if done else job.constraint for job, done in zip(self.jobs, self.done)]
        self.cache, self.positions = out.cache, self.positions + 1
        self.tokens = self._next(out.logits[:, -1], constraints)
        self._hand_out(range(len(self.jobs)), self.tokens.tolist())
        self._leave()

    def fail(self, error: BaseException) -> None:
        """Hand `error` to every job still decoding, and end the batch."""
        for job, done in zip(self.jobs, self.done):
            if not done:
                job.fail(error)
        self.jobs = []

    def _next(self, logits, constraints: list):
        """Each row's next token, within its answer's grammar where it has one (a row that is done has none)."""
        return self.choose(structured.mask(logits, constraints))

    def _hand_out(self, rows, tokens: list[int]) -> None:
        """Each row's new token to its job, unless it ends the row (a stop token, the job cancelled); the row ends
        after it when its budget is spent or its structured answer complete."""
        for row, token in zip(rows, tokens):
            job = self.jobs[row]
            if self.done[row]:
                continue
            if token in job.stops or job.cancelled.is_set():
                self._finish(row)
                continue
            job.emit(token)
            self.counts[row] += 1
            complete = job.constraint is not None and job.constraint.accept(token)
            if complete or self.counts[row] >= job.max_new_tokens:
                self._finish(row)

    def _finish(self, row: int) -> None:
        self.done[row] = True
        self.jobs[row].emit(None)

    def _join(self, cache, mask, lengths, tokens) -> None:
        """Set the new rows' cache, mask, positions and first tokens beside the running ones, both left-padded to the
        longer length."""
        import torch
        from torch.nn.functional import pad as pad_left
        from transformers import DynamicCache

        width = max(self.mask.shape[1], mask.shape[1])
        grow = lambda tensor, dim: pad_left(tensor, (0, 0) * dim + (width - tensor.shape[-dim - 1], 0))  # noqa: E731
        self.cache = DynamicCache([(torch.cat([grow(old.keys, 1), grow(new.keys, 1)]),
                                    torch.cat([grow(old.values, 1), grow(new.values, 1)]))
                                   for old, new in zip(self.cache.layers, cache.layers)])
        self.mask = torch.cat([grow(self.mask, 0), grow(mask, 0)])
        self.positions, self.tokens = torch.cat([self.positions, lengths]), torch.cat([self.tokens, tokens])

    def _leave(self) -> None:
        """Drop the rows that are done (all of them at once when the cache cannot drop rows), and the padding no row
        needs any more."""
        import torch

        going = [row for row, done in enumerate(self.done) if not done]
        if len(going) == len(self.jobs) or (going and not self.elastic):
            return
        if not going:
            self.jobs, self.counts, self.done = [], [], []
            return
        self.jobs, self.counts, self.done = ([values[row] for row in going]
                                             for values in (self.jobs, self.counts, self.done))
        index = torch.tensor(going, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.tokens = self.mask[index], self.positions[index], self.tokens[index]
        unused = int(self.mask.any(dim=0).int().argmax())  # leading columns that are padding in every row
        if unused:
            self.mask = self.mask[:, unused:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]


def forward(model, adapters: list[str | None], **inputs):
    """One pass of `model` that keeps its KV cache, each row with its LoRA adapter (None: the base model)."""
    import torch

    with torch.inference_mode():
        return model(use_cache=True, **inputs, **adapter_names(model, adapters))


def adapter_names(model, adapters: list[str | None]) -> dict[str, list[str]]:
    """The pass inputs that give each row its LoRA adapter (none for a model without adapters)."""
    return {"adapter_names": [adapter or BASE_ADAPTER for adapter in adapters]} if hasattr(model, "peft_config") else {}


def read_start(model, adapter: str | None, ids: list[int], below: SharedPrefix | None = None) -> SharedPrefix | None:
    """A prompt start `ids` read with `adapter`, after the kept start `below` (`Prefixes`' reader: `read_prefix`)."""
    return read_prefix(model, ids, below, **adapter_names(model, [adapter]))


def _sampler(temperature: float, top_p: float):
    """The next token from a step's logits: the most likely (temperature 0), else sampled as the OpenAI API samples,
    with `temperature` and nucleus `top_p`."""
    import torch
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    if temperature <= 0:
        return lambda logits: logits.argmax(dim=-1)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature),
                                   *([TopPLogitsWarper(top_p)] if top_p < 1 else [])])
    return lambda logits: torch.multinomial(warpers(None, logits.float()).softmax(dim=-1), 1).squeeze(1)

