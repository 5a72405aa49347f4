"""What each model produced: answers (generated, or constrained to the label set) and label rankings on the
held-out rows, their reference loss, its probe answers and losses, and which answer of each held-out preference pair
it prefers. The base model's outputs, zero-shot and few-shot, are cached on disk, so evaluating a new fine-tuned
model only runs that model (and the SFT model it was preference-tuned from); every model's results are also cached
per row (answers, label candidates' and answers' log-probabilities: `RowCache`), so a grown eval split runs the
models on its new rows only."""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftpipe.config import EvaluationConfig
from ftpipe.core import readable
from ftpipe.core.evaluation.fewshot import fewshot_prompt
from ftpipe.core.evaluation.probe import PROBE_MAX_NEW_TOKENS
from ftpipe.core.evaluation.generation import (
    Batch, Progress, answer_tokens, answers_and_logprobs, conversation_logprobs, encode, inference_device, is_adapter,
    load_merged, load_model, loss_of, mean_prompt_tokens, prompt_ids,
)
from ftpipe.core.evaluation.label_likelihood import likeliest, top_label_correct, whole_answers
from ftpipe.core.evaluation.metrics import AnswerEnd, LabelChoices, TaskMetrics
from ftpipe.core.evaluation.preference import chosen_preferred, pair_conversations
from ftpipe.core.evaluation.row_cache import RowCache
from ftpipe.core.storage import write_text

CACHE_FORMAT = "5"  # bump when the cached content or the decoding code changes
OUTPUTS_FORMAT = "2"  # bump when the fields of ModelOutputs (cached whole for the base model) change

Log = Callable[[str], None]
TUNED = {"sft": "SFT", "finetuned": "fine-tuned"}  # the trained models, in the order they are evaluated


@dataclass
class ModelOutputs:
    """One model (or prompting) on the held-out rows, and on the probe when it was run there."""

    ids: list[str]
    answers: list[str]
    prompt_tokens: float  # mean per call
    label_correct: list[float] | None = None  # the top label by log-likelihood is the expected one (classification)
    loss: float | None = None
    perplexity: float | None = None
    probe_answers: list[str] = field(default_factory=list)
    probe_logprobs: list[float] = field(default_factory=list)
    probe_tokens: list[int] = field(default_factory=list)
    preference_logprobs: list[tuple[float, int]] | None = None  # (sum, tokens): each pair's chosen, then rejected
    seconds_per_row: float | None = None  # answering the held-out rows, per row (batched for a local model)
    rows_run: int = 0  # held-out rows run when these outputs were made (the others' came from the per-row cache)


@dataclass(frozen=True)
class Answering:
    """How answers are generated: at most `max_new_tokens` (0: none), ending at the end of the turn or where
    `answer_end` (the task type's, if any) finds them complete."""

    max_new_tokens: int
    answer_end: AnswerEnd | None = None

    @property
    def settings(self) -> Any:
        """The answers' settings in the per-row cache: the token limit, and the completion rule where there is one
        (so answers made without one keep their keys)."""
        return self.max_new_tokens if self.answer_end is None else [self.max_new_tokens, self.answer_end.key]


@dataclass(frozen=True)
class Heldout:
    """The held-out rows under evaluation, their prompts, the label set to rank (if any), the complete answers
answers are constrained to (if they are), the probe, the held-out preference pairs, where the task type finds
an answer complete (if anywhere before the end of the turn), and how many rows the model trained on."""

    rows: list[dict]
    probe: list[dict]
    choices: LabelChoices | None
    labels: list[str] | None = None
    pairs: list[dict] = field(default_factory=list)
    answer_end: AnswerEnd | None = None
    train_rows: int = 0

    @classmethod
    def of(cls, rows: list[dict], probe: list[dict], task: TaskMetrics, train_rows: list[dict] = (),
           constrained: bool = False, pairs: list[dict] | None = None) -> Heldout:
        """The rows, probe and preference `pairs` with the task type's label set over the held-out and train rows'
        references; `constrained`: answers are constrained to that set."""
        references, train_references = ([row["messages"][-1]["content"] for row in part] for part in (rows, train_rows))
        labels = task.label_answers(train_references + references) if constrained else None
        return cls(rows=rows, probe=probe, choices=task.label_choices(references, train_references),
                   labels=labels, pairs=pairs or [], answer_end=task.answer_end(train_references + references),
                   train_rows=len(train_rows))

    @property
    def ids(self) -> list[str]:
        return [row["id"] for row in self.rows]

    @property
    def prompts(self) -> list[list[dict]]:
        return [row["messages"][:-1] for row in self.rows]


@dataclass(frozen=True)
class Scoring:
    """Continuations scored right after each prompt, stored as one RowCache `kind`: prompt i's `items`, their
    `continuations` (token ids) and `value(logprobs, continuations)`, the values stored for the prompt's items."""

    kind: str
    items: list[list[Any]]
    continuations: list[list[list[int]]]
    value: Callable[[list[float], list[list[int]]], list[Any]]
    settings: Any = None


def _as_summed(logprobs: list[float], continuations: list[list[int]]) -> list[float]:
    return logprobs


def _with_counts(logprobs: list[float], continuations: list[list[int]]) -> list[list[float]]:
    return [[logprob, len(ids)] for logprob, ids in zip(logprobs, continuations)]


def _label_scoring(tokenizer, prompts: list[list[dict]], choices: LabelChoices) -> Scoring:
    """Every label candidate of every row, as the start of its answer."""
    items = [[(prompt, text) for text in candidates] for prompt, candidates in zip(prompts, choices.candidates)]
    return Scoring("label logprob", items, [[encode(tokenizer, text) for _, text in row] for row in items], _as_summed)


def _constrained_scoring(model, tokenizer, prompts: list[list[dict]], labels: list[str]) -> Scoring:
    """Each prompt's answer constrained to `labels`: the likeliest whole answer."""
    options = whole_answers(model, tokenizer, labels)
    return Scoring("constrained answer", [[prompt] for prompt in prompts], [options] * len(prompts),
                   lambda logprobs, _: [likeliest(labels, logprobs)], labels)


def _reference_scoring(tokenizer, conversations: list[list[dict]]) -> Scoring:
    """Each conversation's last message after the rest ((summed log-probability, tokens)); none for a conversation
    whose chat template writes the prompt differently from the prompt alone (it is scored whole instead)."""
    items, continuations = [], []
    for conversation in conversations:
        ids, prompt_length = answer_tokens(tokenizer, conversation)
        fits = ids[:prompt_length] == prompt_ids(tokenizer, conversation[:-1])
        items.append([conversation] if fits else [])
        continuations.append([ids[prompt_length:]] if fits else [])
    return Scoring("answer logprob", items, continuations, _with_counts)


def _progress(log: Log, rows: str) -> Progress:
    """Progress lines of answering `rows` (e.g. "probe rows"): as it starts, then after each batch with the time
    left at the pace so far (the longest prompts go first, so it errs long)."""
    started = time.perf_counter()

    def report(done: int, total: int) -> None:
        if done == 0:
            log(f"answering {total} {rows} not answered before")
            return
        left = (time.perf_counter() - started) / done * (total - done)
        log(f"answered {done}/{total} {rows} not answered before"
            + (f", ETA {readable.duration(left)}" if done < total else ""))

    return report


def _at_once(model, tokenizer, rows: RowCache, prompts: list[list[dict]], answering: Answering,
             scorings: list[Scoring], batch_tokens: int, progress) -> int:
    """Store in `rows` what one pass over each prompt gives: its greedy answer (`answering`) and the values of each
    of `scorings` it lacks; return how many prompts ran. A prompt whose answer is stored is not answered again: a
    scoring it lacks (a label that new rows brought) runs alone."""
    answers = answering.max_new_tokens > 0
    unanswered = set(rows.missing("answer", prompts, answering.settings)) if answers else set()
    unscored: dict[int, list[Scoring]] = {}
    for scoring in scorings:
        owners = [row for row, items in enumerate(scoring.items) for _ in items]
        items = [item for row_items in scoring.items for item in row_items]
        for row in sorted({owners[index] for index in rows.missing(scoring.kind, items, scoring.settings)}):
            unscored.setdefault(row, []).append(scoring)
    if unanswered:
        _one_pass(model, tokenizer, rows, prompts, {row: unscored.get(row, []) for row in unanswered},
                  answering, batch_tokens, progress)
    if set(unscored) - unanswered:
        _one_pass(model, tokenizer, rows, prompts,
                  {row: wanted for row, wanted in unscored.items() if row not in unanswered}, Answering(0),
                  batch_tokens, None if answers else progress)  # answers constrained to labels are scorings
    return len(unanswered | set(unscored))


def _one_pass(model, tokenizer, rows: RowCache, prompts: list[list[dict]], work: dict[int, list[Scoring]],
              answering: Answering, batch_tokens: int, progress) -> None:
    """Answer (`answering`) the prompts of indices `work` and score their scorings in `work`, storing what `rows`
    lacks batch by batch (each value with its batch's time per prompt), so a stopped evaluation keeps what it did."""
    todo = sorted(work)
    if progress:
        progress(0, len(todo))
    batch_started = time.perf_counter()

    def store(batch: Batch) -> None:
        nonlocal batch_started
        done, now = [todo[index] for index in batch.indices], time.perf_counter()
        seconds, batch_started = (now - batch_started) / len(done), now
        if answering.max_new_tokens:
            rows.add("answer", [prompts[i] for i in done], batch.answers, batch.answer_seconds / len(done),
                     answering.settings)
        scored: dict[str, tuple[Scoring, list, list]] = {}  # kind: (scoring, items, values)
        for row, logprobs in zip(done, batch.logprobs):
            found = iter(logprobs)
            for scoring in work[row]:
                _, items, values = scored.setdefault(scoring.kind, (scoring, [], []))
                items += scoring.items[row]
                values += scoring.value([next(found) for _ in scoring.continuations[row]], scoring.continuations[row])
        for kind, (scoring, items, values) in scored.items():
            rows.add(kind, items, values, seconds, scoring.settings)

    answers_and_logprobs(
        model, tokenizer, [prompts[i] for i in todo], max_new_tokens=answering.max_new_tokens,
        batch_tokens=batch_tokens, answer_end=answering.answer_end,
        continuations=[[ids for scoring in work[i] for ids in scoring.continuations[i]] for i in todo],
        progress=progress, each_batch=store)


def model_outputs(model, tokenizer, prompts: list[list[dict]], heldout: Heldout, config: EvaluationConfig, log: Log,
                  name: str, rows: RowCache, *, full: bool = True) -> ModelOutputs:
    """One model's outputs for `prompts` (one per held-out row), computed only for inputs not in `rows`, with one
    pass over each prompt for its answer, label ranking and reference; `full` adds the reference loss, the probe and
    the preference pairs."""
    conversations = [row["messages"] for row in heldout.rows]
    ranked = _label_scoring(tokenizer, prompts, heldout.choices) if heldout.choices is not None else None
    constrained = (_constrained_scoring(model, tokenizer, prompts, heldout.labels)
                   if heldout.labels is not None else None)
    references = _reference_scoring(tokenizer, conversations) if full else None
    if constrained:
        log(f"{name}: answering {len(prompts)} held-out rows with one of {len(heldout.labels)} labels")
    answering = Answering(0 if constrained else config.max_new_tokens, heldout.answer_end)
    ran = _at_once(model, tokenizer, rows, prompts, answering,
                   [scoring for scoring in (constrained, ranked, references) if scoring], config.batch_tokens,
                   _progress(lambda text: log(f"{name}: {text}"), "held-out rows"))
    if ran < len(prompts):
        log(f"{name}: {len(prompts) - ran} of {len(prompts)} held-out rows' results from the per-row cache")
    kind, settings = ("constrained answer", heldout.labels) if constrained else ("answer", answering.settings)
    outputs = ModelOutputs(ids=heldout.ids, answers=rows.stored(kind, prompts, settings),
                           prompt_tokens=mean_prompt_tokens(tokenizer, prompts),
                           seconds_per_row=rows.seconds_per_item(kind, prompts, settings), rows_run=ran)
    if ranked:
        candidates = [item for items in ranked.items for item in items]
        outputs.label_correct = top_label_correct(heldout.choices, rows.stored(ranked.kind, candidates))
        log(f"{name}: the top label by likelihood is right on {sum(outputs.label_correct):.0f}/{len(prompts)} "
            "held-out rows")
    if full:
        def logprobs(conversations: list[list[dict]]) -> list[tuple[float, int]]:
            return rows.values("answer logprob", conversations, lambda missing: conversation_logprobs(
                model, tokenizer, missing, config.batch_size))

        outputs.loss, outputs.perplexity = loss_of(logprobs(conversations))
        log(f"{name}: held-out loss {outputs.loss:.4f} (perplexity {outputs.perplexity:.2f})")
        _add_probe(model, tokenizer, heldout.probe, config.batch_tokens, outputs, rows, logprobs,
                   lambda text: log(f"{name}: {text}"))
        if heldout.pairs:
            outputs.preference_logprobs = logprobs(pair_conversations(heldout.pairs))
            log(f"{name}: prefers the chosen answer in {sum(chosen_preferred(outputs.preference_logprobs)):.0f}/"
                f"{len(heldout.pairs)} held-out preference pairs")
    return outputs


def _add_probe(model, tokenizer, probe: list[dict], batch_tokens: int, outputs: ModelOutputs, rows: RowCache,
               logprobs: Callable[[list[list[dict]]], list[tuple[float, int]]], log: Log) -> None:
    """The probe's answers and the log-probabilities of its references, one pass over each prompt for both."""
    if not probe:
        return
    prompts = [row["messages"] for row in probe]
    conversations = [row["messages"] + [{"role": "assistant", "content": row["reference"]}] for row in probe]
    ran = _at_once(model, tokenizer, rows, prompts, Answering(PROBE_MAX_NEW_TOKENS),
                   [_reference_scoring(tokenizer, conversations)], batch_tokens,
                   _progress(log, "probe rows"))
    outputs.probe_answers = rows.stored("answer", prompts, PROBE_MAX_NEW_TOKENS)
    sums = logprobs(conversations)
    outputs.probe_logprobs = [logprob for logprob, _ in sums]
    outputs.probe_tokens = [count for _, count in sums]
    log(f"probe: {len(probe)} rows answered and their references scored"
        + (f" ({len(probe) - ran} from the per-row cache)" if ran < len(probe) else ""))


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True).encode()).hexdigest()[:24]


def cached_outputs(path: Path, ids: list[str], compute: Callable[[], ModelOutputs],
                   log: Log) -> tuple[ModelOutputs, bool]:
    """(outputs, whether they came from `path`): read when made for exactly these rows, else computed and cached."""
    if path.is_file():
        cached = ModelOutputs(**json.loads(path.read_text()))
        if cached.ids == ids:
            log(f"outputs from cache {path.name}")
            return cached, True
    outputs = compute()
    write_text(path, json.dumps(asdict(outputs)))
    return outputs, False


class Pace:
    """The time each model took to answer so far, and a log line, as each is done, of how long the models still to
    come (`names`, in order) take at that pace: the whole evaluation's time left, where each model's progress lines
    give only its own."""

    def __init__(self, names: list[str], log: Log):
        self.names, self.log, self.took = names, log, []

    def timed(self, name: str, compute: Callable[[], ModelOutputs]) -> Callable[[], ModelOutputs]:
        """`compute` (model `name` answering), followed by the line on the models to come."""
        def run() -> ModelOutputs:
            started = time.perf_counter()
            found = compute()
            self.took.append(time.perf_counter() - started)
            rest = self.names[self.names.index(name) + 1:]
            if rest:
                left = sum(self.took) / len(self.took) * len(rest)
                self.log(f"{name}: answered in {readable.duration(self.took[-1])}; {' and '.join(rest)} to come, about "
                         f"{readable.duration(left)} at the pace so far (less for answers in the cache)")
            return found

        return run


def all_outputs(*, base_model_dir: Path, base_key: dict[str, Any], tuned: dict[str, tuple[Path, str]],
                heldout: Heldout, examples: list[dict], config: EvaluationConfig, cache_dir: Path,
                trust_remote_code: bool, log: Log) -> tuple[dict[str, ModelOutputs], int]:
    """({base, fewshot (when there are examples), sft and finetuned (the keys of `tuned`, TUNED's): outputs},
    how many held-out rows the base model ran zero-shot (none when its outputs came from the cache)). `tuned` maps
    each trained model to its folder (adapter or full) and the version of its weights.

    Every model's outputs are cached by its version (a preference stage trained again does not evaluate its
    unchanged SFT model again). The base model is loaded only when needed: for outputs not in the cache, and for an
    adapter to be applied to; the first adapter gets the loaded one, a later adapter a fresh one (an adapter changes
    its base in place). A full fine-tune is loaded whole after the base model is released.
    """
    base = functools.cache(lambda: load_model(base_model_dir, trust_remote_code))
    key = cache_key(**base_key, device=inference_device(), outputs=OUTPUTS_FORMAT)
    base_weights = cache_key(base=base_key["base"], device=inference_device())
    base_rows = RowCache(cache_dir / f"rows-{base_weights}.jsonl")
    outputs: dict[str, ModelOutputs] = {}
    pace = Pace(["base", *(["few-shot"] if examples else []), *(TUNED[side] for side in TUNED if side in tuned)], log)
    outputs["base"], base_from_file = cached_outputs(
        cache_dir / f"base-{key}.json", heldout.ids,
        pace.timed("base", lambda: model_outputs(*base(), heldout.prompts, heldout, config, log, "base", base_rows)),
        log)
    if examples:
        prompts = [fewshot_prompt(p, examples) for p in heldout.prompts]
        fewshot_key = cache_key(base=key, examples=[e["id"] for e in examples])
        outputs["fewshot"], _ = cached_outputs(
            cache_dir / f"fewshot-{fewshot_key}.json", heldout.ids,
            pace.timed("few-shot", lambda: model_outputs(*base(), prompts, heldout, config, log, "few-shot", base_rows,
                                                         full=False)), log)
    applied: list[Path] = []  # the adapters applied to the loaded base model so far

    def tuned_outputs(side: str, folder: Path, version: str) -> ModelOutputs:
        if applied or not is_adapter(folder):
            base.cache_clear()  # a full fine-tune needs no base model; a second adapter needs one the first left alone
        applied.append(folder)
        model, tokenizer = load_merged(folder, base, trust_remote_code)
        rows = RowCache(cache_dir / f"rows-{cache_key(base=base_weights, weights=version)}.jsonl")
        return model_outputs(model, tokenizer, heldout.prompts, heldout, config, log, TUNED[side], rows)

    for side in (side for side in TUNED if side in tuned):
        folder, version = tuned[side]
        outputs[side], _ = cached_outputs(cache_dir / f"tuned-{cache_key(base=key, weights=version)}.json",
                                          heldout.ids,
                                          pace.timed(TUNED[side], lambda: tuned_outputs(side, folder, version)), log)
    return outputs, 0 if base_from_file else outputs["base"].rows_run
