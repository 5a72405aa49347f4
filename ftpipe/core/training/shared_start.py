"""Evaluation passes that read a shared prompt start once. When the rows of an evaluation batch all begin with the
same long run of prompt tokens (a task's system prompt), that start runs once per evaluation and every row continues
from a copy of its KV cache: the same eval loss, token accuracy and entropy as TRL's pass over the whole rows, without
running the start again for every row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ftpipe.core.evaluation.generation import IGNORE, SharedPrefix, pad, read_prefix, shared_start_length

MIN_SHARED_TOKENS = 64  # a shorter shared start runs with each row
LOGIT_BUDGET = 2**24  # logits (float32) of a group of rows: 64 MB


@dataclass
class Scores:
    """Sums over the labelled tokens of a batch: negative log-likelihood, top-1 hits and entropy."""

    nll: Any = 0.0
    hits: Any = 0
    entropy: Any = 0.0
    tokens: Any = 0

    def __add__(self, other: Scores) -> Scores:
        return Scores(self.nll + other.nll, self.hits + other.hits, self.entropy + other.entropy,
                      self.tokens + other.tokens)


def batch_rows(inputs: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
    """(token ids, labels) of each row of a collated batch: padding-free (one sequence, positions restarting at 0 at
    each row) or padded (an attention mask)."""
    if "attention_mask" not in inputs and "position_ids" in inputs:
        ids, labels = inputs["input_ids"][0].tolist(), inputs["labels"][0].tolist()
        starts = (inputs["position_ids"][0] == 0).nonzero().flatten().tolist()
        return [(ids[a:b], labels[a:b]) for a, b in zip(starts, [*starts[1:], len(ids)])]
    keep = inputs["attention_mask"].bool()
    return [(row[mask].tolist(), labels[mask].tolist())
            for row, labels, mask in zip(inputs["input_ids"], inputs["labels"], keep)]


def start_length(rows: list[tuple[list[int], list[int]]]) -> int:
    """How many leading tokens of every row can run once: shared by all rows, and none of them (but the first) a
    target, so no row's loss needs their logits."""
    unlabelled = min(next((i for i, label in enumerate(labels) if label != IGNORE), len(labels)) for _, labels in rows)
    return min(shared_start_length([ids for ids, _ in rows]), unlabelled - 1)


def evaluated_lengths(rows: list[list[int]]) -> list[int]:
    """The tokens an evaluation reads of eval rows with these token ids: a long start they all share once, then each
    row's rest (every row whole without one)."""
    start = shared_start_length(rows)
    if start < MIN_SHARED_TOKENS:
        return [len(ids) for ids in rows]
    return [start] + [len(ids) - start for ids in rows]


def scores_after_start(model, rows: list[tuple[list[int], list[int]]], prefix: SharedPrefix, pad_id: int) -> Scores:
    """The `Scores` of `rows` that all begin with the `prefix` read before, in groups of rows whose logits fit
    LOGIT_BUDGET."""
    longest = max(len(ids) for ids, _ in rows) - len(prefix.ids)
    size = max(1, LOGIT_BUDGET // (longest * model.config.get_text_config().vocab_size))
    total = Scores()
    for first in range(0, len(rows), size):
        total = total + _group_scores(model, rows[first:first + size], prefix, pad_id)
    return total


def _group_scores(model, rows: list[tuple[list[int], list[int]]], prefix: SharedPrefix, pad_id: int) -> Scores:
    import torch

    start = len(prefix.ids)
    ids, mask = pad([row[start:] for row, _ in rows], pad_id, left=False)
    labels, _ = pad([row_labels[start:] for _, row_labels in rows], IGNORE, left=False)
    device = model.device
    attention = torch.cat([torch.ones(len(rows), start, dtype=torch.long), mask], dim=1).to(device)
    positions = (torch.arange(ids.shape[1]) + start).expand(len(rows), -1).to(device)
    logits = model(input_ids=ids.to(device), attention_mask=attention, position_ids=positions,
                   cache=prefix.cache_for(len(rows)), use_cache=True).logits[:, :-1].float()
    targets = labels[:, 1:].to(device)
    scored = targets != IGNORE
    log_probs = logits.log_softmax(-1)
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    hits = logits.argmax(-1) == targets
    return Scores(-(picked * scored).sum(), (hits & scored).sum(), (entropy * scored).sum(), scored.sum())


class SharedStartEvaluation:
    """An SFT trainer whose loss-only evaluation steps run a long prompt start all rows of a batch share once per
    evaluation (`scores_after_start`); other batches go through TRL's own step. Mix it in before the trainer class."""

    _start: tuple | None = None  # (start ids, its `SharedPrefix` or None: not kept) in the evaluation running

    def evaluate(self, *args, **kwargs):
        self._start = None  # the weights may have changed since the last evaluation (or the best ones been loaded)
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._start = None

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        rows = batch_rows(inputs) if prediction_loss_only and "labels" in inputs else []
        start = self._earlier_start(rows, start_length(rows)) if rows else 0
        if start < MIN_SHARED_TOKENS or self._start_cache(model, rows[0][0][:start]) is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        import torch

        with torch.no_grad():
            scores = scores_after_start(model, rows, self._start[1], self.processing_class.pad_token_id or 0)
        self._record(scores)
        return (scores.nll / scores.tokens.clamp(min=1)).detach(), None, None

    def _earlier_start(self, rows: list[tuple[list[int], list[int]]], start: int) -> int:
        """`start`, or the length of the start an earlier batch of this evaluation ran, when the rows (which share
        their first `start` tokens) begin with it: it is not run again."""
        earlier = self._start[0] if self._start else []
        return len(earlier) if earlier and len(earlier) <= start and rows[0][0][:len(earlier)] == earlier else start

    def _start_cache(self, model, ids: list[int]):
        """The `SharedPrefix` of `ids`, read once an evaluation (None: the model's cache cannot be continued)."""
        if self._start is None or self._start[0] != ids:
            self._start = (ids, read_prefix(model, ids))
        return self._start[1]

    def _record(self, scores: Scores) -> None:
        """Entropy and token accuracy as TRL's evaluation step records them."""
        gather = self.accelerator.gather_for_metrics
        tokens = gather(scores.tokens).sum().clamp(min=1)
        metrics = self._metrics["eval"]
        metrics["entropy"].append((gather(scores.entropy).sum() / tokens).item())
        metrics["mean_token_accuracy"].append((gather(scores.hits).sum() / tokens).item())
        metrics["num_tokens"] = [self._total_train_tokens]
