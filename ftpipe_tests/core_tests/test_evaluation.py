"""Evaluation on tiny models: batched generation, answer log-likelihoods and answers constrained to a label set,
then whole runs (the gate, the base cache, reuse when only thresholds change, few-shot and label-likelihood
baselines, constrained answers, checked final answers, a full fine-tune, the files, the LLM judge and a human
review round trip)."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest

from ftpipe.config import EvaluationConfig, JudgeConfig
from ftpipe.core.evaluation import evaluation_key, outputs, read_evaluation, run_evaluation, waiting_for_reviews
from ftpipe.core.evaluation.answer_budget import AnswerBudget
from ftpipe.core.evaluation.card import card_evaluation
from ftpipe.core.evaluation.chart import CHART, CHART_LINK, forgetting, gains, inline_chart, write_chart
from ftpipe.core.evaluation.forgetting import most_forgotten
from ftpipe.core.evaluation.report import evidence, summary_table
from ftpipe.core.evaluation.generation import (
    answer_tokens, answers_and_logprobs, conversation_logprobs, encode, generate, greedy_batches, load_finetuned,
    load_merged, load_model, loss_of, option_tree, prompt_ids, rows_can_leave, shared_prefix, token_chunks,
)
from ftpipe.core.evaluation.label_likelihood import constrained_answers, end_of_turn_ids
from ftpipe.core.evaluation.metrics import task_metrics
from ftpipe.core.evaluation.review import read_verdicts, write_review_sample
from ftpipe.core.evaluation.run import select_rows
from ftpipe.core.records import read_examples
from ftpipe.core.results import read_result
from ftpipe.core.storage import file_sha256
from ftpipe_tests.reviewer import fill
from ftpipe_tests.judge_endpoint import MODEL, prefers_the_reference, serving
from ftpipe_tests.tiny_model import COLORS, toy_rows, write_chat_parquet
from ftpipe_tests.trained_models import competent_base, lora_adapter, noisy_base, varied_prompts, write_probe

EVAL_ROWS = 24

# ---------------------------------------------------------------- generation and scoring


@pytest.fixture(scope="module")
def noisy_model(tmp_path_factory, tiny_model_dir):
    return load_model(noisy_base(tiny_model_dir, tmp_path_factory.mktemp("noisy") / "model"))


def test_batched_generation_equals_one_at_a_time(noisy_model):
    model, tokenizer = noisy_model
    prompts = varied_prompts(20)
    batched = generate(model, tokenizer, prompts, max_new_tokens=12, batch_tokens=400)
    single = generate(model, tokenizer, prompts, max_new_tokens=12, batch_tokens=1)
    assert batched == single
    assert len(set(batched)) > 5 and all(batched)  # real, varied outputs: padding errors would show


def test_rows_whose_answers_ended_leave_the_batch_and_no_answer_changes(noisy_model, monkeypatch):
    model, tokenizer = noisy_model
    prompts = varied_prompts(20)
    full = [encode(tokenizer, answer) for answer in generate(model, tokenizer, prompts, max_new_tokens=12,
                                                                 batch_tokens=1)]
    first_at: dict[int, set[int]] = {}  # token: the positions where it first comes in an answer
    for ids in full:
        for token in set(ids):
            first_at.setdefault(token, set()).add(ids.index(token))
    stop = max(first_at, key=lambda token: len(first_at[token]))  # answers end early, each at its own step
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tokenizer.eos_token_id, stop])
    decoding_rows, hook = _decoding_rows(model)
    try:
        batched = generate(model, tokenizer, prompts, max_new_tokens=12, batch_tokens=10_000)
    finally:
        hook.remove()
    assert batched == generate(model, tokenizer, prompts, max_new_tokens=12, batch_tokens=1)
    assert len(set(batched)) > 5
    assert decoding_rows[0] == len(prompts) > decoding_rows[-1]  # one batch, fewer rows as answers end
    assert sum(decoding_rows) < 0.8 * len(prompts) * 11  # 11 decoding steps after the prompts' pass
    scored = answers_and_logprobs(model, tokenizer, prompts, max_new_tokens=12, batch_tokens=10_000,
                                  continuations=[[encode(tokenizer, "red")] for _ in prompts])
    assert scored.answers == batched, "decoding on from the cache of the prompts' scoring pass, as evaluation does"


def _decoding_rows(model) -> tuple[list[int], object]:
    """The rows of every decoding step (one new token per row) the model runs, and the hook that counts them."""
    rows: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(len(kwargs["input_ids"]))
        if kwargs["input_ids"].shape[1] == 1 else None, with_kwargs=True)
    return rows, hook


def test_answers_complete_for_the_task_type_stop_early_and_are_the_full_answers_cut_there(noisy_model):
    from ftpipe.core.evaluation.metrics.base import AnswerEnd

    model, tokenizer = noisy_model
    prompts = varied_prompts(20)

    def first_word_end(text: str) -> int | None:  # a rule of the task type's kind: text after it changes nothing
        found = re.search(r"[A-Za-z]{2,}(?=[^A-Za-z])", text)
        return found.end() if found else None

    full = generate(model, tokenizer, prompts, max_new_tokens=12, batch_tokens=10_000)
    decoding_rows, hook = _decoding_rows(model)
    try:
        cut = answers_and_logprobs(model, tokenizer, prompts, max_new_tokens=12, batch_tokens=10_000,
                                   answer_end=AnswerEnd("first word", first_word_end, "…")).answers
    finally:
        hook.remove()
    assert cut == [answer if first_word_end(answer) is None else answer[:first_word_end(answer)] + "…"
                   for answer in full], "cut and marked"
    assert sum(first_word_end(answer) is not None for answer in full) >= len(prompts) // 2, "the rule applies"
    assert sum(decoding_rows) < 0.8 * len(prompts) * 11, "rows with a complete answer left the batch"


def _cut_as_generation_would(answer: str, answer_end) -> str:
    """`answer` as generation keeps it under `answer_end`: cut where the rule first finds a prefix complete."""
    for length in range(len(answer) + 1):
        if answer_end(answer[:length]) is not None:
            return answer_end.cut(answer[:length])
    return answer


@pytest.mark.parametrize("answer, end", [
    ('{"category": "billing", "priority": "high"} because the card was charged twice', 43),
    ('Sure: {"items": [{"sku": "A1"}], "note": "}"} and more', 45),
    ('{"category": "billing", "priority": ', None),  # not closed yet
    ("billing", None),
    ('{category: billing} then {"category": "billing"}', None),  # the first object is not JSON: read on
])
def test_a_json_answer_is_complete_where_its_first_object_closes_and_scores_as_the_whole_answer(answer, end):
    from ftpipe.core.evaluation.metrics.base import FIRST_JSON_OBJECT, first_json_object

    assert FIRST_JSON_OBJECT(answer) == end
    references = ['{"category": "billing", "priority": "high"}']
    extraction = task_metrics(EvaluationConfig(task_type="extraction"))
    classification = task_metrics(EvaluationConfig(task_type="classification", label_field="category"))
    assert extraction.answer_end(references) == classification.answer_end(references) == FIRST_JSON_OBJECT
    kept = _cut_as_generation_would(answer, FIRST_JSON_OBJECT)
    assert first_json_object(kept) == first_json_object(answer) and (end is None) == (kept == answer)
    for task in (extraction, classification):
        assert task.scores([kept], references).summary == task.scores([answer], references).summary


@pytest.mark.parametrize("answer, kept", [
    ("Billing", "Billing"),
    ("feature request.", "feature request."),
    ("Feature  REQUEST!\n", "Feature  REQUEST!\n"),  # spacing, case and punctuation aside, a label
    ("Feature-Request", "Feature-Request"),  # and so are a hyphen, an underscore or no space in place of the space
    ("feature_request", "feature_request"),
    ("feature requests", "feature requests…"),  # past the label at its last letter
    ("billing\nThe customer was charged twice.", "billing\nT…"),  # goes on past the label line
    ("I'm sorry to hear that. Let me help.", "I…"),  # no label starts so
    ("bill", "bill"),  # may still become one
])
def test_a_bare_label_answer_is_complete_once_it_can_no_longer_become_a_label_and_scores_as_the_whole(
        answer, kept):
    references = ["billing", "Feature request", "account"]
    classification = task_metrics(EvaluationConfig(task_type="classification"))
    answer_end = classification.answer_end(references + ["Billing"])
    assert answer_end.key == ["past the labels", ("account", "billing", "featurerequest"), "…"]
    assert _cut_as_generation_would(answer, answer_end) == kept
    for reference in references:
        assert classification.scores([kept], [reference]).summary == classification.scores(
            [answer], [reference]).summary
        assert classification.valid_outputs([kept], references) == classification.valid_outputs([answer], references)


def test_progress_lines_give_the_time_left_at_the_pace_so_far(monkeypatch):
    from types import SimpleNamespace

    clock = iter([100.0, 130.0, 160.0])
    monkeypatch.setattr(outputs, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    logged: list[str] = []
    report = outputs._progress(logged.append, "probe rows")
    for done in (0, 100, 300):
        report(done, 300)
    assert logged == ["answering 300 probe rows not answered before",
                      "answered 100/300 probe rows not answered before, ETA 60 s",
                      "answered 300/300 probe rows not answered before"]


def test_rows_leave_only_a_dynamic_cache_of_attention_layers(noisy_model, monkeypatch):
    model, _ = noisy_model
    assert rows_can_leave(model)
    monkeypatch.setattr(model.generation_config, "cache_implementation", "static")  # a fixed shape: one round
    assert not rows_can_leave(model)


def test_the_output_head_gets_the_last_positions_contiguous(noisy_model):
    """Sliced hidden states would make a frozen head's matmul broadcast its weight per row (a CPU's slowest path)."""
    import torch

    model, _ = noisy_model
    contiguous: list[bool] = []
    hook = model.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: contiguous.append(args[0].is_contiguous()))
    try:
        with torch.inference_mode():
            model(input_ids=torch.ones((3, 7), dtype=torch.long), logits_to_keep=1)
    finally:
        hook.remove()
    assert contiguous == [True]


def test_generation_batches_hold_many_short_rows_and_few_long_ones():
    lengths = [500, 120, 100, 100, 30, 30, 30, 30, 30, 30, 9000]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches = list(token_chunks(order, lengths, budget=400))
    assert batches == [[10], [0], [1, 2, 3], [4, 5, 6, 7, 8, 9]]  # a row over the budget still runs, alone


def test_skewed_prompts_behind_a_long_system_prompt_fill_each_batch_to_its_token_budget(noisy_model):
    model, tokenizer = noisy_model
    system = {"role": "system", "content": "You triage support tickets for a shop. " * 12}
    prompts = [[system, {"role": "user", "content": prompt[-1]["content"] * (40 if i % 5 == 0 else 1)}]
               for i, prompt in enumerate(varied_prompts(20))]  # a few long tickets among short ones
    needed = [len(prompt_ids(tokenizer, p)) + 12 for p in prompts]
    budget = 4 * min(needed)
    batches = [batch.indices for batch in greedy_batches(model, tokenizer, prompts, max_new_tokens=12,
                                                         batch_tokens=budget)]
    assert sorted(i for batch in batches for i in batch) == list(range(len(prompts)))
    assert all(len(batch) * max(needed[i] for i in batch) <= budget for batch in batches)
    assert [len(batch) for batch in batches[:2]] == [1, 1] and needed[batches[0][0]] == max(needed)  # long: alone
    assert max(map(len, batches)) >= 3  # the short rows share batches
    answers = generate(model, tokenizer, prompts, max_new_tokens=12, batch_tokens=budget)
    assert answers == generate(model, tokenizer, prompts, max_new_tokens=12, batch_tokens=1)


def test_a_long_shared_system_prompt_runs_once_and_changes_no_answer_or_score(noisy_model, monkeypatch):
    from ftpipe.core.evaluation import generation

    model, tokenizer = noisy_model
    system = {"role": "system", "content": "You triage support tickets for a shop. " * 12}
    prompts = [[system, prompt[-1]] for prompt in varied_prompts(20)]
    prefix = shared_prefix(model, [prompt_ids(tokenizer, p) for p in prompts])
    assert prefix is not None and len(prefix.ids) > 100

    def answers_and_scores():
        answers = generate(model, tokenizer, prompts, max_new_tokens=12, batch_tokens=400)
        conversations = [p + [{"role": "assistant", "content": a or "?"}] for p, a in zip(prompts, answers)]
        return answers, conversation_logprobs(model, tokenizer, conversations, batch_size=8)

    answers, scores = answers_and_scores()
    monkeypatch.setattr(generation, "shared_prefix", lambda model, prompts: None)
    unshared_answers, unshared_scores = answers_and_scores()
    assert answers == unshared_answers and len(set(answers)) > 5 and all(answers)
    assert [count for _, count in scores] == [count for _, count in unshared_scores]
    assert [logprob for logprob, _ in scores] == pytest.approx([logprob for logprob, _ in unshared_scores], rel=1e-4)


def reference_loss(model, tokenizer, conversations: list[list[dict]], batch_size: int) -> tuple[float, float]:
    return loss_of(conversation_logprobs(model, tokenizer, conversations, batch_size))


def test_reference_loss_scores_only_the_answer_tokens(noisy_model):
    import torch
    import torch.nn.functional as F

    model, tokenizer = noisy_model
    conversations = [prompt + [{"role": "assistant", "content": f"answer {i}"}]
                     for i, prompt in enumerate(varied_prompts(6))]
    ids, prompt_len = answer_tokens(tokenizer, conversations[0])
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    expected = F.cross_entropy(logits[prompt_len - 1:-1], torch.tensor(ids[prompt_len:])).item()
    loss, perplexity = reference_loss(model, tokenizer, conversations[:1], batch_size=1)
    assert loss == pytest.approx(expected, rel=1e-5) and perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    batched = reference_loss(model, tokenizer, conversations, batch_size=4)
    assert batched == pytest.approx(reference_loss(model, tokenizer, conversations, batch_size=1), rel=1e-5)


CONTINUATIONS = [
    ['{"label": "red"', '{"label": "green"', '{"label": "purple"'],  # a shared start, then different
    ["red", "reddish", "blue"],  # nothing shared
    ["red", "red green"],  # one is the start of another
    ["x"],
    ["card_arrival", "card_linking", "faq_08", "faq_12", "card_arrival"],  # starts two or more share, a repeat
]


def whole_sequence_logprob(model, prompt: list[int], continuation: list[int]) -> float:
    import torch

    ids = prompt + continuation
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    return sum(logprobs[i - 1, ids[i]].item() for i in range(len(prompt), len(ids)))


@pytest.mark.parametrize("system", [None, "You triage support tickets for a shop. " * 12])
def test_one_pass_over_each_prompt_answers_as_generation_does_and_scores_as_each_sequence_whole(noisy_model, system):
    model, tokenizer = noisy_model
    prompts = varied_prompts(len(CONTINUATIONS))
    if system:  # a long shared system prompt: it runs once, before every batch
        prompts = [[{"role": "system", "content": system}, prompt[-1]] for prompt in prompts]
        assert len(shared_prefix(model, [prompt_ids(tokenizer, p) for p in prompts]).ids) > 100
    encoded = [prompt_ids(tokenizer, prompt) for prompt in prompts]
    assert len({len(ids) for ids in encoded}) > 1, "prompts of different lengths: the batch is padded"
    continuations = [[encode(tokenizer, text) for text in texts] for texts in CONTINUATIONS]
    expected = [[whole_sequence_logprob(model, ids, option) for option in options]
                for ids, options in zip(encoded, continuations)]
    banking = continuations[-1]
    assert len(option_tree(banking).nodes) < sum(len(option) - 1 for option in banking), "each shared start runs once"
    done = answers_and_logprobs(model, tokenizer, prompts, max_new_tokens=12, batch_tokens=400,
                                continuations=continuations)
    assert done.answers == generate(model, tokenizer, prompts, max_new_tokens=12, batch_tokens=1)
    assert len(set(done.answers)) > 1 and all(done.answers)
    assert [len(row) for row in done.logprobs] == [len(row) for row in expected]
    for row, want in zip(done.logprobs, expected):
        assert row == pytest.approx(want, rel=1e-4)
    scored_only = answers_and_logprobs(model, tokenizer, prompts, max_new_tokens=0, batch_tokens=400,
                                       continuations=continuations)
    assert scored_only.answers == [""] * len(prompts)
    for row, want in zip(scored_only.logprobs, expected):
        assert row == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("system", [None, "You triage support tickets for a shop. " * 40])
def test_many_labels_after_short_or_long_prompts_are_ranked_in_batches_within_the_memory_budget(noisy_model,
                                                                                               monkeypatch, system):
    from ftpipe.core.evaluation import generation, label_likelihood

    model, tokenizer = noisy_model
    prompts = [([{"role": "system", "content": system}] if system else []) +
               [{"role": "user", "content": f"Ticket {i}: it broke."}] for i in range(24)]
    width = max(len(prompt_ids(tokenizer, prompt)) for prompt in prompts)
    options = [encode(tokenizer, f"cat {i}") for i in range(40)]  # 40 labels of about 5 tokens
    padded = {True: [], False: []}  # prompt batches (left padding) and continuation batches: (rows, tokens)
    real = generation.pad

    def recorded(sequences, pad_id, *, left):
        padded[left].append((len(sequences), sum(map(len, sequences))))
        return real(sequences, pad_id, left=left)

    copied = []  # rows of KV cache copied for the continuations
    real_rows_of = generation._rows_of
    monkeypatch.setattr(generation, "_rows_of", lambda cache, index: copied.append(len(index)) or real_rows_of(
        cache, index))
    monkeypatch.setattr(generation, "pad", recorded)
    found = label_likelihood.prompts_logprobs(model, tokenizer, prompts, [options] * len(prompts))
    assert max(rows for rows, _ in padded[True]) > 1, "prompts are batched"
    assert sum(copied) == len(prompts), "a prompt's cache is copied once for its labels"
    # a prompt's labels run after a copy of its KV cache: about 8,192 cached tokens a batch at most
    assert max(rows for rows, _ in padded[False]) * width <= generation.SCORING_TOKENS, (width, padded[False])
    # and at most 1,024 continuation tokens a batch: 200 MB of float log-probabilities over a 49k vocabulary
    assert max(tokens for _, tokens in padded[False]) <= 1024, padded[False]
    assert sum(tokens for _, tokens in padded[False]) < len(prompts) * sum(len(option) - 1 for option in options), \
        "the start every label shares runs once per prompt"
    alone = label_likelihood.prompts_logprobs(model, tokenizer, prompts[:1], [options])
    assert found[0] == pytest.approx(alone[0], rel=1e-4)


def test_constrained_answers_are_always_one_of_the_labels(noisy_model):
    import torch

    model, tokenizer = noisy_model
    labels = ["red", "reddish", "red green", '{"label": "purple"}', "x"]  # labels that start other labels too
    prompts = varied_prompts(12)
    answers = constrained_answers(model, tokenizer, prompts, labels)
    assert set(answers) <= set(labels) and len(set(answers)) > 1
    ending = end_of_turn_ids(model, tokenizer)
    assert tokenizer.decode(ending) == "<|im_end|>"
    for prompt, answer in zip(prompts[:3], answers):  # the likeliest whole answer, end of turn included
        scores = []
        for label in labels:
            ids = prompt_ids(tokenizer, prompt) + encode(tokenizer, label) + ending
            start = len(ids) - len(encode(tokenizer, label)) - len(ending)
            with torch.no_grad():
                logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            scores.append(sum(logprobs[i - 1, ids[i]].item() for i in range(start, len(ids))))
        assert answer == labels[scores.index(max(scores))]


# ---------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("evaluation")
    competent_base(tiny_model_dir, root / "base")
    lora_adapter(root / "base", root / "bad_adapter", random_weights=True)
    lora_adapter(root / "base", root / "identity_adapter", random_weights=False)
    write_chat_parquet(root / "eval.parquet", toy_rows(EVAL_ROWS + 6, seed=2))
    write_chat_parquet(root / "train.parquet", toy_rows(40, seed=7))
    write_probe(root / "probe.jsonl")
    return root


CLASSIFY = EvaluationConfig(task_type="classification", max_new_tokens=6, max_rows=EVAL_ROWS, batch_size=8,
                            bootstrap_samples=500)


def evaluate(root: Path, adapter: Path | str, out: Path, *, config: EvaluationConfig = CLASSIFY,
             base: Path | None = None, cache: Path | None = None, log=lambda line: None,
             label_typos: dict[str, str] | None = None) -> dict:
    return run_evaluation(
        base_model_dir=base or root / "base", base_fingerprint=str(base or "base"), adapter_dir=root / adapter,
        adapter_version=str(adapter), eval_path=root / "eval.parquet", eval_version="v1",
        train_path=root / "train.parquet", probe_path=root / "probe.jsonl", config=config,
        cache_dir=cache or out.parent / "cache", out_dir=out, log=log, label_typos=label_typos,
    )


@pytest.fixture()
def passes(monkeypatch) -> list[tuple[int, bool, int]]:
    """Every pass over prompts an evaluation makes: (prompts, whether it answers them, continuations it scores)."""
    calls: list[tuple[int, bool, int]] = []
    real = outputs.answers_and_logprobs

    def counting(model, tokenizer, prompts, *, max_new_tokens, continuations, **kwargs):
        calls.append((len(prompts), max_new_tokens > 0, sum(map(len, continuations))))
        return real(model, tokenizer, prompts, max_new_tokens=max_new_tokens, continuations=continuations, **kwargs)

    monkeypatch.setattr(outputs, "answers_and_logprobs", counting)
    return calls


def answered(passes: list[tuple[int, bool, int]]) -> list[int]:
    """The rows of every pass that answered them."""
    return [rows for rows, answers, _ in passes if answers]


def labels(rows: list[dict]) -> list[str]:
    """The labels of the held-out `rows` (as the references write them)."""
    return list(task_metrics(CLASSIFY).spellings([row["messages"][-1]["content"] for row in rows]).values())


def predicted(result: dict) -> list[dict]:
    """Every column's answers of an evaluation, per held-out row."""
    import pyarrow.parquet as pq

    return pq.read_table(result["predictions_path"], columns=["base_answer", "fewshot_answer",
                                                              "finetuned_answer"]).to_pylist()


def test_bad_adapter_fails_the_gate_then_the_base_comes_from_the_cache(workspace, tmp_path, passes):
    cache = tmp_path / "cache"
    bad = evaluate(workspace, "bad_adapter", tmp_path / "bad", cache=cache)
    # base: held-out rows and probe; few-shot: held-out rows; fine-tuned: held-out rows and probe
    assert answered(passes) == [EVAL_ROWS, len(COLORS), EVAL_ROWS, EVAL_ROWS, len(COLORS)]
    assert not bad["base_cached"] and not bad["reused"]
    assert bad["rows"] == EVAL_ROWS and bad["primary_metric"] == "accuracy"
    assert bad["base_score"] >= 0.9 and bad["finetuned_score"] <= 0.2
    assert bad["base_answers_in_form"] >= bad["base_score"] * EVAL_ROWS and "in the task's form" not in (
        bad["report_markdown"]), "a base answering with labels is a baseline of the task itself"
    assert bad["delta"] < 0 and bad["delta_ci_low"] <= bad["delta"] <= bad["delta_ci_high"] < 0
    assert bad["passed"] is False
    assert any(c.startswith(f"delta_ci_low {bad['delta_ci_low']:.3f} <= min_improvement 0.000")
               for c in bad["failed_conditions"])
    assert bad["probe_base_accuracy"] > bad["probe_finetuned_accuracy"] and bad["forgetting_ci_low"] > 0.1
    assert any(c.startswith("forgetting") for c in bad["failed_conditions"])
    assert bad["finetuned_loss"] > bad["base_loss"] and bad["base_perplexity"] == pytest.approx(
        math.exp(bad["base_loss"]))

    passes.clear()
    same = evaluate(workspace, "identity_adapter", tmp_path / "same", cache=cache)
    assert same["base_cached"] and answered(passes) == [EVAL_ROWS, len(COLORS)]  # fine-tuned model only
    assert same["base_score"] == bad["base_score"] and same["base_loss"] == bad["base_loss"]
    assert same["fewshot_score"] == bad["fewshot_score"]
    assert same["finetuned_score"] == same["base_score"] and same["delta"] == 0.0  # B = 0: same model
    assert same["finetuned_loss"] == pytest.approx(same["base_loss"], rel=1e-6)
    [tie] = same["failed_conditions"]  # no gain: not promoted, and nothing forgotten
    assert same["passed"] is False and tie.startswith("delta_ci_low 0.000 <= min_improvement 0.000")
    assert same["forgetting"] == pytest.approx(0, abs=1e-6) and same["probe_changes"] == []


def test_a_system_prompt_that_names_some_labels_only_is_said_in_the_report(workspace, tmp_path):
    root = tmp_path / "cut"
    root.mkdir()
    for name in ("base", "bad_adapter", "train.parquet", "probe.jsonl"):
        (root / name).symlink_to(workspace / name)
    listing = "Answer with one color: red, yellow, purple, gree"  # cut off mid-list
    write_chat_parquet(root / "eval.parquet", [{**row, "messages": [{"role": "system", "content": listing},
                                                                     *row["messages"][1:]]}
                                               for row in read_examples(workspace / "eval.parquet")])
    found = evaluate(root, "bad_adapter", tmp_path / "out")
    said = re.fullmatch(r"the system prompt of 24 rows names 3 of the 6 labels of the held-out and train answers, "
                        r"not (.+) \(it ends '.+ purple, gree'\): the model is told of some labels only; list them all "
                        r"in data.system_prompt", found["unlisted_labels"])
    assert said and set(said.group(1).split(", ")) == {"green", "violet", "brown"}
    assert "The system prompt of 24 rows names 3 of the 6 labels" in found["report_markdown"]


def test_a_grown_eval_split_runs_the_models_on_its_new_rows_only_and_measures_as_a_cold_run(
        workspace, tmp_path, passes):
    cache, first_rows = tmp_path / "cache", EVAL_ROWS - 8

    rows, train = read_examples(workspace / "eval.parquet"), read_examples(workspace / "train.parquet")
    before, every = labels(select_rows(rows, first_rows)), labels(train + rows)
    trained = Counter(row["messages"][-1]["content"].strip() for row in train)
    missing = sorted((label for label in every if label not in before), key=lambda label: -trained[label])
    typos = {missing[0]: before[0], before[1]: before[0]}  # as cleaning would name them; before[1] is held out
    first = evaluate(workspace, "bad_adapter", tmp_path / "first", cache=cache,
                     config=CLASSIFY.model_copy(update={"max_rows": first_rows}), label_typos=typos)
    assert missing and first["labels_without_heldout_rows"] == missing, "the train rows have a label these have not"
    assert first["train_rows_of_unheld_labels"] == {label: trained[label] for label in missing}
    assert first["train_rows"] == len(train)
    named = ", ".join(f"{label} ×{trained[label]}" for label in missing)  # each with its train rows, the most first
    assert f"({named}) {'have' if len(missing) > 1 else 'has'} no held-out row" in first["report_markdown"]
    past = [label for label in missing if label in labels(select_rows(rows, None)[first_rows:])]
    assert past and first["labels_past_max_rows"] == past, "held out, but past evaluation.max_rows"
    one = len(past) == 1
    assert (f"{', '.join(past)} {'has' if one else 'have'} held-out rows past evaluation.max_rows: a larger max_rows "
            f"scores {'it' if one else 'them'}") in first["report_markdown"]
    assert f"{'has' if len(missing) == 1 else 'have'} no held-out row evaluated" in first["report_markdown"]
    assert first["likely_typos"] == {missing[0]: before[0]}, "named where a typo has no held-out row, and only there"
    assert f"{missing[0]!r} looks like a typo of {before[0]!r}: correct it in the raw files" in first["report_markdown"]
    passes.clear()
    logged: list[str] = []
    grown = evaluate(workspace, "bad_adapter", tmp_path / "grown", cache=cache, log=logged.append)
    # base, few-shot and fine-tuned answer the 8 new rows and rank every label of the train and held-out rows on
    # them (base and fine-tuned score their references too); the old rows had every label ranked already, and
    # nobody answers or scores the probe again
    new, with_references = (8, True, 8 * len(every)), (8, True, 8 * len(every) + 8)
    assert passes == [with_references, new, with_references] and not grown["base_cached"]
    assert grown["base_rows_run"] == 8
    started = logged.index("base: answering 8 held-out rows not answered before")  # before the work, for long work
    assert "base: answered 8/8 held-out rows not answered before" in logged[started + 1:]
    paced = [line for line in logged if " to come, about " in line]
    assert len(paced) == 2 and re.fullmatch(r"base: answered in \d+ s; few-shot and fine-tuned to come, about \d+ s "
                                            r"at the pace so far \(less for answers in the cache\)", paced[0])
    assert paced[1].startswith("few-shot: answered in ") and "; fine-tuned to come, about " in paced[1]
    assert grown["passed"] is False and logged[-1].startswith("eval gate failed: ") and logged[-1].endswith(
        f"; failed: {'; '.join(grown['failed_conditions'])}"), "the log names what failed, as the check does"
    assert (f"This evaluation generated the base outputs for 8 of {EVAL_ROWS} held-out rows and took the others from "
            "the cache.") in grown["report_markdown"]
    assert grown["labels_without_heldout_rows"] == [] and "no held-out row" not in grown["report_markdown"]
    cold = evaluate(workspace, "bad_adapter", tmp_path / "cold", cache=tmp_path / "cold-cache")
    assert predicted(grown) == predicted(cold) and len(predicted(cold)) == EVAL_ROWS
    for name in ("base_score", "fewshot_score", "finetuned_score", "probe_base_accuracy", "probe_finetuned_accuracy",
                 "metrics"):  # "metrics": every column's scores, label likelihood accuracy included
        assert grown[name] == cold[name], name
    assert "label_likelihood_accuracy" in cold["metrics"]["fewshot"]
    for name in ("base_loss", "finetuned_loss", "forgetting"):  # sums over rows batched differently
        assert grown[name] == pytest.approx(cold[name], rel=1e-5, abs=1e-6), name


def test_a_stopped_evaluation_keeps_the_batches_it_finished_and_the_next_one_answers_only_the_rest(
        workspace, tmp_path):
    cache, batched = tmp_path / "cache", CLASSIFY.model_copy(update={"batch_tokens": 256})  # a few rows a batch

    def ctrl_c_after_a_batch(line: str) -> None:
        if line.startswith("base: answered ") and not line.startswith(f"base: answered {EVAL_ROWS}/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(workspace, "bad_adapter", tmp_path / "stopped", cache=cache, config=batched, log=ctrl_c_after_a_batch)
    logged: list[str] = []
    resumed = evaluate(workspace, "bad_adapter", tmp_path / "resumed", cache=cache, config=batched, log=logged.append)
    [answering] = [line for line in logged if line.startswith("base: answering ") and "held-out" in line]
    assert 0 < int(answering.split()[2]) < EVAL_ROWS, answering
    cold = evaluate(workspace, "bad_adapter", tmp_path / "cold", cache=tmp_path / "cold-cache", config=batched)
    assert predicted(resumed) == predicted(cold)
    for name in ("base_score", "fewshot_score", "finetuned_score", "metrics"):
        assert resumed[name] == cold[name], name
    assert resumed["base_loss"] == pytest.approx(cold["base_loss"], rel=1e-5)


def test_answers_stop_past_the_labels_with_the_scores_of_whole_answers_and_keyed_apart_in_the_cache(
        workspace, tmp_path, passes, monkeypatch):
    from ftpipe.core.evaluation.metrics.classification import STOPPED, Classification

    past_the_labels = Classification.answer_end
    monkeypatch.setattr(Classification, "answer_end", lambda self, references: None)  # to the end of the turn
    whole = evaluate(workspace, "bad_adapter", tmp_path / "whole", cache=tmp_path / "cache")
    monkeypatch.setattr(Classification, "answer_end", past_the_labels)
    passes.clear()
    stopped = evaluate(workspace, "bad_adapter", tmp_path / "stopped", cache=tmp_path / "cache")
    assert answered(passes) == [EVAL_ROWS] * 3, "answered again, each column; the probe's answers kept"
    for name in ("base_score", "fewshot_score", "finetuned_score", "metrics", "passed"):
        assert stopped[name] == whole[name], name
    pairs = [(row[column], full[column]) for row, full in zip(predicted(stopped), predicted(whole)) for column in row]
    assert all(full.startswith(cut.removesuffix(STOPPED)) for cut, full in pairs)
    assert sum(cut != full for cut, full in pairs) >= EVAL_ROWS // 2, "answers past the labels stop early"


def test_changing_gate_thresholds_flips_the_gate_without_generating(workspace, tmp_path, passes):
    out = tmp_path / "out"
    failed = evaluate(workspace, "bad_adapter", out)
    assert failed["passed"] is False and "Eval gate: FAILED" in failed["report_markdown"]
    written = (out / "metrics.json").stat().st_mtime_ns
    passes.clear()

    lenient = CLASSIFY.model_copy(update={"min_improvement": -2.0, "max_forgetting": 1e4})
    passed = evaluate(workspace, "bad_adapter", out, config=lenient)
    assert answered(passes) == [] and passed["reused"] is True
    assert (out / "metrics.json").stat().st_mtime_ns == written
    assert passed["failed_conditions"] == [] and passed["passed"] is True
    assert "Eval gate: PASSED** (min_improvement -2, max_forgetting 10000)" in passed["report_markdown"]
    assert (out / CHART).read_bytes() == write_chart(passed, tmp_path, lenient).read_bytes(), "its bars redrawn"
    assert passed["delta_ci_low"] == failed["delta_ci_low"]

    evaluate(workspace, "bad_adapter", out, config=CLASSIFY.model_copy(update={"max_new_tokens": 5}))
    assert answered(passes)  # a setting that changes outputs does generate again


def test_published_files_result_and_report(workspace, tmp_path):
    import pandas as pd

    out = tmp_path / "out"
    result = evaluate(workspace, "bad_adapter", out)
    predictions = pd.read_parquet(out / "predictions.parquet")
    assert len(predictions) == EVAL_ROWS and list(predictions["id"]) == sorted(predictions["id"])
    assert {"message", "prompt", "reference", "base_answer", "fewshot_answer", "finetuned_answer", "base_accuracy",
            "finetuned_accuracy", "base_label", "finetuned_label", "finetuned_label_likelihood_accuracy", "delta",
            "delta_vs_fewshot"} <= set(predictions.columns)
    assert predictions["message"].str.startswith("What color is the").all()
    assert predictions["delta"].mean() == pytest.approx(result["delta"])
    train = [row["messages"][-1]["content"] for row in read_examples(workspace / "train.parquet")]
    top = Counter(train).most_common(1)[0][0]  # the toy task's labels are its whole answers
    assert predictions["majority_answer"].eq(top).all() and result["majority_answer"] == top
    assert result["majority_score"] == pytest.approx(predictions["reference"].eq(top).mean())
    assert result["majority_score"] > 0, "the toy task's held-out rows hold its most common label"
    assert result["warm_start"] is None and "continued the previous adapter" not in result["report_markdown"]
    assert result["delta_vs_majority"] == pytest.approx(result["finetuned_score"] - result["majority_score"])
    assert (f"The train rows' most common label as every answer (`{top}`): {result['majority_score']:.3f}; fine-tuned "
            f"vs that {result['delta_vs_majority']:+.3f} (95% paired-bootstrap CI ") in result["report_markdown"]
    assert "| fine-tuned | most common label | fine-tuned − base (95% CI) |" in result["report_markdown"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["delta_intervals"]["accuracy"] == [result["delta_ci_low"], result["delta_ci_high"]]
    low, high = metrics["delta_intervals"]["macro_f1"]
    change = result["metrics"]["finetuned"]["macro_f1"] - result["metrics"]["base"]["macro_f1"]
    assert low <= change <= high and low < high
    macro_f1_row = next(line for line in result["report_markdown"].splitlines() if line.startswith("| macro_f1 |"))
    assert macro_f1_row.endswith(f" | {change:+.3f} ({low:+.3f} … {high:+.3f}) |"), "macro-F1's change with its CI"
    assert metrics["delta_ci_low"] == result["delta_ci_low"] and metrics["base_score"] == result["base_score"]
    assert not {"passed", "failed_conditions", "report_markdown"} & set(metrics)  # the gate is decided on reading
    strict = read_evaluation(out, CLASSIFY.model_copy(update={"require_beats_majority": True}))
    assert f"delta_vs_majority_ci_low {result['delta_vs_majority_ci_low']:.3f} <= min_improvement 0.000" in " ".join(
        strict["failed_conditions"]) and "must beat the most common label" in strict["report_markdown"]

    stored = read_result(out, "eval_report")
    assert stored.reuse_key == evaluation_key(
        base_fingerprint="base", adapter_version="bad_adapter", eval_version="v1", probe_rows=None, config=CLASSIFY,
        train_version=file_sha256(workspace / "train.parquet"), probe_hash=file_sha256(workspace / "probe.jsonl"))

    report = (out / "report.md").read_text()
    assert report == result["report_markdown"] and "Eval gate: FAILED" in report
    assert (out / CHART).read_bytes().startswith(b"\x89PNG") and f"]({CHART})" in report, "the chart beside the report"
    assert [(label, value) for label, value, *_ in gains(result)] == [
        ("over the base model", result["delta"]), ("over few-shot", result["delta_vs_fewshot"]),
        ("over the most common label", result["delta_vs_majority"])]
    skills = result["probe_accuracy_by_skill"]
    expected = ["whole probe", *skills] if len(skills) > 1 else ["whole probe"]
    assert [label for label, *_ in forgetting(result)] == expected
    assert "data:image/png;base64," in inline_chart(report, out) and "data:image" not in report, "embedded for the UI"
    assert "## Confusion table (fine-tuned)" in report and "## Confusion table (few-shot)" in report
    regressions = report.split("## Worst regressions")[1].split("## General-skills probe")[0]
    assert regressions.count("\n| ") - 1 == min(10, int((predictions["delta"] < 0).sum()))
    assert "| What color is the" in regressions and "Answer with one word" not in regressions
    assert "| fine-tuned answer | fine-tuned − base |" in regressions, "no column of the one most common label"
    assert report.split("## Largest improvements")[1].startswith("\n\n_none_")
    assert "| base | few-shot | fine-tuned |" in report and f"| accuracy | {result['base_score']:.3f} |" in report
    assert "| held-out loss |" in report and "seconds per held-out row" not in report, "no teacher: no time row"
    assert "Held-out loss: the mean loss per token of the reference answers" in report, "why eval_loss differs"
    assert "| colors | 6 | 1.000 |" in report  # probe accuracy by skill
    assert result["fewshot_labels"] == [5, 6] and ("Its examples show 5 of the task's 6 labels: a weak baseline for "
                                                   "the others") in report, "5 examples cannot show 6 labels"
    lost = report.split("### Rows that changed (base → fine-tuned)")[1]
    assert lost.count("| lost |") == len([c for c in result["probe_changes"] if c["change"] == "lost"]) > 0


def test_the_model_card_gives_the_verdict_with_its_thresholds_baselines_overrides_and_forgetting_by_skill(
        workspace, tmp_path):
    result = evaluate(workspace, "bad_adapter", tmp_path / "out")
    assert "By skill, the most forgotten" not in result["report_markdown"], "no skill lost anything"
    colors = result["probe_accuracy_by_skill"]["colors"]
    result["probe_accuracy_by_skill"]["arithmetic"] = {**colors, "base": 0.0, "finetuned": 0.0, "forgetting": 0.0,
                                                      "forgetting_ci_low": 0.0, "forgetting_ci_high": 0.0}
    card = card_evaluation(result, CLASSIFY, "evaluation:\n  max_forgetting: 0.2\ntraining: {max_steps: 3}\n")
    assert card.startswith("**Eval gate: FAILED** (min_improvement 0, max_forgetting 0.1): delta_ci_low ")
    assert f"base {result['base_score']:.3f}, fine-tuned {result['finetuned_score']:.3f}" in card
    assert f"(few-shot): {result['fewshot_score']:.3f}" in card and "Forgetting " in card
    assert f"Forgetting by probe skill (most forgotten: {most_forgotten(result['probe_accuracy_by_skill'])}):" in card
    assert "| arithmetic | 6 | 0.000 | 0.000 |" in card and "| colors | 6 | 1.000 |" in card
    assert "answers no row of arithmetic right: accuracy cannot drop there" in card
    assert f"{summary_table(result)}\n\n{CHART_LINK}" in card, "the chart after the scores"
    confusion = result["report_markdown"].split("## Confusion table (fine-tuned)\n\n")[1].split("\n\n## ")[0]
    assert f"Confusion table (fine-tuned):\n\n{confusion}" in card and "Confusion table (few-shot)" not in card
    assert card.endswith(
        "Evaluation settings changed from task.yaml for this run:\n\n```yaml\nevaluation:\n  max_forgetting: 0.2\n```")
    assert "the base outputs" not in card, "where outputs came from is the report's business"
    result["probe_accuracy_by_skill"]["colors"] = {**colors, "forgetting": 0.5, "forgetting_ci_low": 0.2,
                                                   "forgetting_ci_high": 0.8}
    [forgetting] = [part for part in evidence(result) if part.startswith("Forgetting ")]
    assert forgetting.endswith(" By skill, the most forgotten is colors 0.500 (95% CI 0.200 … 0.800, 6 rows); the "
                               "gate reads each skill too."), "what the whole probe's figure can hide"


def test_answers_get_room_for_the_longest_reference_and_a_shorter_limit_set_is_reported(workspace, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workspace / "base")
    fitted = AnswerBudget.of(None, ["red", "order " * 120], tokenizer)
    longest = max(fitted.reference_tokens)
    assert longest >= 120 and fitted.tokens == longest + longest // 4 and fitted.cut_off == 0
    assert AnswerBudget.of(None, ["red"], tokenizer).tokens == 48  # short answers keep the default
    default = evaluate(workspace, "bad_adapter", tmp_path / "default")
    assert (default["answer_token_limit"], default["references_over_limit"]) == (CLASSIFY.max_new_tokens, 0)
    assert "longer than the answers' limit" not in default["report_markdown"]

    rows = toy_rows(8, seed=2)  # references of four words, answers limited to two tokens
    for row in rows:
        row["messages"][-1]["content"] = " ".join([row["messages"][-1]["content"]] * 4)
    write_chat_parquet(tmp_path / "long" / "eval.parquet", rows)
    for name in ("base", "bad_adapter", "train.parquet", "probe.jsonl"):
        (tmp_path / "long" / name).symlink_to(workspace / name)
    config = EvaluationConfig(task_type="generation", max_new_tokens=2, bootstrap_samples=200)
    short = evaluate(tmp_path / "long", "bad_adapter", tmp_path / "short", config=config)
    assert (short["answer_token_limit"], short["references_over_limit"]) == (2, 8)
    assert "**8 of 8 reference answers are longer than the answers' limit of 2 tokens" in short["report_markdown"]
    assert "leave it unset to fit the references" in short["report_markdown"]


def test_rows_longer_than_the_training_max_length_are_scored_apart_and_a_warm_start_is_said(workspace, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    from ftpipe.core.results import Result
    from ftpipe.core.modeling import chat_length

    tokenizer = AutoTokenizer.from_pretrained(workspace / "base")
    rows = read_examples(workspace / "eval.parquet")[:EVAL_ROWS]
    lengths = [chat_length(tokenizer, row["messages"]) for row in rows]
    limit = sorted(lengths)[len(lengths) // 2]
    over = sum(length > limit for length in lengths)
    assert 0 < over < EVAL_ROWS, lengths
    trained = tmp_path / "trained_adapter"
    shutil.copytree(workspace / "bad_adapter", trained)
    warm = {"from": "abc123", "new_rows": 3, "replayed_rows": 9}
    Result("lora_adapter", "key", {"training": {"max_length": limit, "too_long": "drop", "lora": {"r": 8}}},
           inputs={"warm_start": warm}).write(trained)

    result = evaluate(workspace, trained, tmp_path / "out")
    assert result["trained_length"] == {"max_length": limit, "too_long": "drop", "rows_over": over}
    assert result["trained_replay"] == 0.0, "no replay written: none (the gate's advice puts replay first)"
    report = result["report_markdown"]
    assert result["warm_start"] == warm and ("The fine-tuned model continued the previous adapter "
                                             "(`retrain.warm_start`) on 3 new and 9 replayed train rows") in report
    assert (f"## Rows longer than the training's max_length\n\n{over} of {EVAL_ROWS} held-out rows are longer than "
            f"training.max_length ({limit} tokens). Train rows that long were left out of the training") in report
    table = report.split("## Rows longer than the training's max_length")[1].split("##")[0]
    assert f"| over {limit} tokens | {over} |" in table and f"| the others | {EVAL_ROWS - over} |" in table
    untrained = evaluate(workspace, "bad_adapter", tmp_path / "untrained")
    assert untrained["trained_length"] is None and "Rows longer than" not in untrained["report_markdown"]
    assert untrained["trained_replay"] is None


def test_fewshot_and_label_likelihood_baselines(workspace, tmp_path):
    import pandas as pd

    result = evaluate(workspace, "bad_adapter", tmp_path / "out")
    assert result["fewshot_examples"] == 5 and 0 <= result["fewshot_score"] <= 1
    train = {row["id"]: row["source"] for row in read_examples(workspace / "train.parquet")}
    shown = result["fewshot_rows"]
    assert len(shown) == 5 and all(train[row["id"]] == row["source"] for row in shown), "the train rows it showed"
    assert f"its examples are the train rows of {', '.join(row['source'] for row in shown)}." in result[
        "report_markdown"]
    assert result["delta_vs_fewshot"] == pytest.approx(result["finetuned_score"] - result["fewshot_score"])
    assert result["delta_vs_fewshot_ci_low"] <= result["delta_vs_fewshot"] <= result["delta_vs_fewshot_ci_high"]
    assert result["fewshot_prompt_tokens"] > 3 * result["prompt_tokens"] > 0  # five extra exchanges per call
    predictions = pd.read_parquet(tmp_path / "out" / "predictions.parquet")
    assert (predictions["fewshot_answer"] != predictions["base_answer"]).any()  # the examples reach the model
    likelihood = {side: result["metrics"][side]["label_likelihood_accuracy"]
                  for side in ("base", "fewshot", "finetuned")}
    assert likelihood["base"] >= 0.9 and likelihood["finetuned"] < 0.5 and 0 <= likelihood["fewshot"] <= 1
    assert "copy_score" not in result and "copy_answer" not in predictions, "a label is no copy of the input"


SYSTEM = "You are the support desk's note writer. " * 8  # a long shared system prompt, as real tasks have


def summary_rows(count: int, *, start: int = 0) -> list[dict]:
    """Tickets (one sentence that matters, then 1-6 sentences of filler: skewed lengths) and one-line summaries that
    reword that first sentence."""
    import hashlib

    items = ["laptop", "phone charger", "desk lamp", "monitor", "keyboard", "headset", "printer"]
    rows = []
    for index in range(start, start + count):
        item = items[index % len(items)]
        ticket = (f"The {item} from order {1000 + index} arrived broken and the customer wants a refund. "
                  + "They called twice and waited on hold for a long time. " * (1 + index % 6))
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ticket},
                    {"role": "assistant", "content": f"Refund wanted: {item} of order {1000 + index} arrived broken."}]
        rows.append({"id": hashlib.sha256(ticket.encode()).hexdigest()[:16], "messages": messages,
                     "source": f"tickets.jsonl:{index + 1}"})
    return rows


def test_free_text_is_scored_beside_a_copy_of_the_input_and_a_pass_says_when_copying_scores_higher(
        workspace, tmp_path):
    import pandas as pd

    from ftpipe.core.evaluation.gate import gate_caveat

    eval_rows, train_rows = summary_rows(16), summary_rows(30, start=100)
    write_chat_parquet(tmp_path / "eval.parquet", eval_rows)
    write_chat_parquet(tmp_path / "train.parquet", train_rows)
    config = EvaluationConfig(task_type="generation", max_new_tokens=12, batch_size=8, bootstrap_samples=500,
                              fewshot_k=0, min_improvement=-1.0)  # a pass whatever the tiny model says
    result = run_evaluation(
        base_model_dir=workspace / "base", base_fingerprint="base", adapter_dir=workspace / "identity_adapter",
        adapter_version="identity", eval_path=tmp_path / "eval.parquet", eval_version="tickets",
        train_path=tmp_path / "train.parquet", probe_path=None, config=config, cache_dir=tmp_path / "cache",
        out_dir=tmp_path / "out")
    predictions = pd.read_parquet(tmp_path / "out" / "predictions.parquet")
    words = sorted(len(row["messages"][-1]["content"].split()) for row in train_rows)[len(train_rows) // 2]
    assert words == 8
    assert predictions["copy_answer"].tolist() == [" ".join(m.split()[:words]) for m in predictions["message"]]
    assert result["copy_score"] == pytest.approx(predictions["copy_rouge_l"].mean()) and result["copy_score"] > 0.3
    assert result["delta_vs_copy"] == pytest.approx(result["finetuned_score"] - result["copy_score"])
    assert result["delta_vs_copy_ci_high"] < 0, "a tiny random model does not beat copying"
    references = [len(row["messages"][-1]["content"].split()) for row in eval_rows]
    assert result["answer_words"]["reference"] == pytest.approx(sum(references) / len(references))
    assert result["answer_words"]["copy"] == 8
    caveat = gate_caveat(result, config)
    assert result["passed"] and caveat.startswith(
        f"copying the opening of the user's message scores higher ({result['copy_score']:.3f} against ")
    report = result["report_markdown"]
    assert f"**But {caveat}.**" in report
    assert "| metric | base | fine-tuned | copy of the input | fine-tuned − base (95% CI) |" in report
    assert "| answer words | " in report and "Answers average 8 words in the references" in report, report
    assert "cut to the train answers' median length (the copies average 8 words): " in report
    assert "## Reading free-text scores\n\nROUGE-L and token F1 count the words" in report, "what the scores miss"


def test_the_copy_of_a_japanese_message_is_as_long_as_a_typical_answer_in_characters() -> None:
    """Counted by spaces, Japanese answers were a word or two long: too short for a copy baseline, which vanished."""
    from ftpipe.core.evaluation.copy_baseline import answer_words, copy_outputs
    from ftpipe_tests.rows import row

    train = [row(f"質問{i}", answer) for i, answer in enumerate(
        ["保証期間はお買い上げから二年間です。", "ファームウェアを最新版に更新してください。", "はい、マイページから変更できます。"])]
    heldout = [row("NordLink R2の保証期間はどのくらいですか？購入日は去年の四月です。", "二年間です。")]
    copied = copy_outputs(heldout, train)
    assert answer_words([row["messages"][-1]["content"] for row in train]) == pytest.approx((17 + 20 + 15) / 3)
    # the median answer's 17 words: 2 in Latin letters, then 15 characters (punctuation is no word)
    assert copied is not None and copied.answers == ["NordLink R2の保証期間はどのくらいですか？購"]


def test_the_chart_keeps_its_labels_inside_the_image(tmp_path) -> None:
    from PIL import Image

    skill = {"forgetting": 0.58, "forgetting_ci_low": 0.4, "forgetting_ci_high": 0.74}
    gains = {f"delta{over}{end}": value for over in ("", "_vs_fewshot", "_vs_majority")
             for end, value in (("", 0.07), ("_ci_low", -0.1), ("_ci_high", 0.12))}
    metrics = {"primary_metric": "accuracy", **gains, "probe_rows": 308, "forgetting": 0.0, "forgetting_ci_low": 0.0,
               "forgetting_ci_high": 0.09, "probe_accuracy_by_skill": {
                   "facts": skill, **{name: dict.fromkeys(skill, 0.0) for name in ("arithmetic", "formatting")}}}
    image = Image.open(write_chart(metrics, tmp_path, EvaluationConfig())).convert("L")
    edges = [image.getpixel((x, y)) for x in (0, image.width - 1) for y in range(image.height)]
    assert min(edges) == 255, "no text runs off the left or right edge"


def test_the_chart_draws_the_gates_bars_where_they_fall_among_the_intervals(tmp_path) -> None:
    from PIL import Image

    intervals = {f"delta{end}": value for end, value in (("", 0.07), ("_ci_low", -0.1), ("_ci_high", 0.12))}
    metrics = {"primary_metric": "accuracy", **intervals, "probe_rows": 308, "forgetting": 0.02,
               "forgetting_ci_low": 0.0, "forgetting_ci_high": 0.09, "probe_accuracy_by_skill": {}}

    def red_columns(config: EvaluationConfig) -> tuple[int, int]:
        """Columns holding a red pixel, in the gains panel (left) and the forgetting panel (right)."""
        image = Image.open(write_chart(metrics, tmp_path, config)).convert("RGB")
        red = {x for x in range(image.width) for y in range(0, image.height, 2)
               if (pixel := image.getpixel((x, y)))[0] > 170 and max(pixel[1:]) < 110}
        return sum(x < image.width // 2 for x in red), sum(x >= image.width // 2 for x in red)

    left, right = red_columns(EvaluationConfig())
    assert left == 0 and right > 0, "max_forgetting 0.1 among the forgetting intervals; min_improvement 0: the 0 line"
    left, right = red_columns(EvaluationConfig(min_improvement=0.05, max_forgetting=1e4))
    assert left > 0 and right == 0, "min_improvement drawn; a max_forgetting far off is only named"


def test_a_long_conversation_is_shown_in_the_reports_tables_to_its_last_turn() -> None:
    """The turn a reference answers is the last: cut from the end, a long conversation hid it."""
    from ftpipe.core.evaluation.report import showcase

    earlier = " ".join(f"user: question {i} about my router assistant: answer {i}" for i in range(8))
    conversation = {"id": "c", "message": f"{earlier} user: great, thank you", "user_turns": 9}
    single = {"id": "s", "message": "Dear team, " + "my router blinks red again. " * 12, "user_turns": 1}
    records = [{**record, "reference": "You're welcome!", "base_answer": "?", "finetuned_answer": "You're welcome!",
                "delta": 1.0} for record in (conversation, single)]
    table = showcase(records, improvements=True)
    assert "| …" in table and "user: great, thank you | You're welcome! |" in table
    assert "| Dear team, my router blinks red again." in table, "one long message keeps its start"


def test_a_full_finetune_is_evaluated_as_a_whole_model(workspace, tiny_model_dir, tmp_path, monkeypatch):
    assert not list((workspace / "base").glob("adapter*"))  # the competent base: every weight trained
    full = {"base": tiny_model_dir, "cache": tmp_path / "cache"}
    result = evaluate(workspace, workspace / "base", tmp_path / "out", **full)
    assert result["base_score"] <= 0.2 and result["finetuned_score"] >= 0.9
    assert result["delta_ci_low"] > 0.5 and result["passed"] is True
    in_form = sum(r["base_label"] in {r["reference"] for r in result["records"]} for r in result["records"])
    assert result["base_answers_in_form"] == in_form < EVAL_ROWS / 2, "the random base answers other text"
    ranked = {side: result["metrics"][side]["label_likelihood_accuracy"] for side in ("base", "finetuned")}
    assert (f"The base model answered {in_form} of {EVAL_ROWS} held-out rows in the task's form, so the delta over it "
            "counts learning the form as much as the task; the few-shot baseline (shown the form) and the top label "
            f"by likelihood, which reads no answer (base {ranked['base']:.3f}, fine-tuned {ranked['finetuned']:.3f}) "
            "say how much is the task.") in result["report_markdown"]
    over = "over few-shot (the base answered too few rows in the task's form)"
    assert f"## Largest improvements {over}" in result["report_markdown"]
    assert f"## Worst regressions {over}" in result["report_markdown"], "not the rows the base answered in prose"
    improvements = result["report_markdown"].split(f"## Largest improvements {over}")[1]
    assert "| fine-tuned answer | fine-tuned − few-shot |" in improvements, "the change named by what it is over"

    def no_base_model(*args):
        raise AssertionError("the base model was loaded although its outputs are cached")

    monkeypatch.setattr(outputs, "load_model", no_base_model)
    again = evaluate(workspace, workspace / "base", tmp_path / "again", **full)
    assert again["base_cached"] and again["finetuned_score"] == result["finetuned_score"]


def test_an_adapter_is_evaluated_merged_into_its_base_as_base_plus_adapter_answers(workspace):
    def base():
        return load_model(workspace / "base")

    adapted, tokenizer = load_finetuned(workspace / "bad_adapter", base)
    merged, _ = load_merged(workspace / "bad_adapter", base)
    assert hasattr(adapted, "peft_config") and not hasattr(merged, "peft_config")  # no LoRA path left to run
    prompts = varied_prompts(16)
    answers = generate(adapted, tokenizer, prompts, max_new_tokens=8, batch_tokens=400)
    assert generate(merged, tokenizer, prompts, max_new_tokens=8, batch_tokens=400) == answers
    assert len(set(answers)) > 1  # the adapter changes the answers, differently per prompt
    conversations = [prompt + [{"role": "assistant", "content": "red"}] for prompt in prompts]
    pairs = zip(conversation_logprobs(adapted, tokenizer, conversations, 8),
                conversation_logprobs(merged, tokenizer, conversations, 8))
    assert all(abs(a[0] - b[0]) < 1e-4 and a[1] == b[1] for a, b in pairs)
    full, _ = load_merged(workspace / "base", lambda: pytest.fail("a full fine-tune needs no base model"))
    assert not hasattr(full, "peft_config")


def test_good_adapter_passes_with_a_positive_interval(tmp_path, tiny_model_dir):
    noisy_base(tiny_model_dir, tmp_path / "noisy_base")
    lora_adapter(tmp_path / "noisy_base", tmp_path / "good", random_weights=False, train_rows=toy_rows(32, seed=1))
    write_chat_parquet(tmp_path / "eval.parquet", toy_rows(EVAL_ROWS, seed=2))
    write_chat_parquet(tmp_path / "train.parquet", toy_rows(40, seed=7))
    write_probe(tmp_path / "probe.jsonl")
    config = EvaluationConfig(task_type="generation", max_new_tokens=6, batch_size=8, bootstrap_samples=500)
    result = evaluate(tmp_path, "good", tmp_path / "out", config=config, base=tmp_path / "noisy_base")
    assert result["primary_metric"] == "rouge_l" and result["base_score"] < 0.1 and result["finetuned_score"] >= 0.5
    assert result["delta_ci_low"] > 0.3 and result["passed"] is True and result["failed_conditions"] == []
    assert result["metrics"]["finetuned"]["exact_match"] >= 0.5
    assert "label_likelihood_accuracy" not in result["metrics"]["base"]  # generation has no label set


def test_answers_constrained_to_the_label_set_never_make_up_a_label(workspace, tmp_path, passes):
    import pandas as pd

    config = CLASSIFY.model_copy(update={"constrain_to_labels": True})
    result = evaluate(workspace, "bad_adapter", tmp_path / "out", config=config)
    assert answered(passes) == [len(COLORS), len(COLORS)]  # the probe only: held-out answers are chosen, not generated
    predictions = pd.read_parquet(tmp_path / "out" / "predictions.parquet")
    for side in ("base", "fewshot", "finetuned"):
        assert set(predictions[f"{side}_answer"]) <= set(COLORS.values())  # even from random adapter weights
    assert result["base_score"] >= 0.9 and result["finetuned_score"] < 0.5


def test_final_answers_are_extracted_checked_and_shown(workspace, tmp_path, passes):
    import pandas as pd

    config = EvaluationConfig(task_type="generation", answer_pattern=r"(\w+)", max_new_tokens=6, max_rows=EVAL_ROWS,
                              batch_size=8, bootstrap_samples=500)
    result = evaluate(workspace, "bad_adapter", tmp_path / "out", config=config)
    assert result["primary_metric"] == "answer_exact_match" and result["base_score"] >= 0.9
    predictions = pd.read_parquet(tmp_path / "out" / "predictions.parquet")
    assert (predictions["reference_final_answer"] == predictions["reference"]).all()
    assert (predictions["base_final_answer"] == predictions["reference"]).mean() >= 0.9
    assert "| user message | reference final answer | base final answer | few-shot final answer | fine-tuned final " \
           "answer | fine-tuned answer | fine-tuned − base |" in result["report_markdown"]
    assert "| lenient_answer_match | " in result["report_markdown"], "beside the strict match in the summary"
    assert predictions["base_lenient_answer_match"].mean() >= predictions["base_answer_exact_match"].mean()

    passes.clear()
    refused = config.model_copy(update={"answer_pattern": r"#### (\S+)"})
    with pytest.raises(ValueError, match=f"{EVAL_ROWS} held-out reference.* has no final answer matching"):
        evaluate(workspace, "bad_adapter", tmp_path / "refused", config=refused)
    assert answered(passes) == []  # refused before any generation


def picks_the_reference(row: dict, new_side: str) -> str:
    """A reviewer who picks the answer equal to the reference (tie when neither or both are)."""
    a, b = (row[side] == row["reference"] for side in ("answer_a", "answer_b"))
    return "A" if a and not b else "B" if b and not a else "tie"


def test_the_judge_and_a_human_review_round_trip_through_the_gate(workspace, tmp_path, monkeypatch):
    import pandas as pd

    monkeypatch.setenv("JUDGE_KEY", "local")
    with serving(prefers_the_reference) as endpoint:
        judge = JudgeConfig(base_url=endpoint.base_url, model=MODEL, api_key_env="JUDGE_KEY", max_pairs=10)
        config = EvaluationConfig(task_type="generation", max_new_tokens=6, max_rows=EVAL_ROWS, batch_size=8,
                                  bootstrap_samples=500, min_improvement=-2.0, max_forgetting=1e4,
                                  require_human_review=8, judge=judge)
        result = evaluate(workspace, "bad_adapter", tmp_path / "out", config=config)
    # the base names the colors, the random adapter does not: the judge prefers the base
    assert result["judge_pairs"] == 10 and result["judge_losses"] >= 8 and result["judge_win_rate_ci_high"] < 0.5
    assert result["passed"] is True and waiting_for_reviews(result["human_verdicts"], config) is not None
    assert "No human verdicts yet: the gate waits for 8." in result["report_markdown"]
    assert result["human_verdicts"] == 0 and result["judge_human_agreement"] is None

    records = pd.read_parquet(tmp_path / "out" / "predictions.parquet").to_dict("records")
    sample = write_review_sample(records, tmp_path / "human_review", rows=10)
    fill(tmp_path / "human_review", tmp_path / "reviews" / "ann.csv", picks_the_reference, reviewer="Ann")
    verdicts = read_verdicts(tmp_path / "reviews", sample["review_key"])
    reviewed = read_evaluation(tmp_path / "out", config, verdicts)
    assert reviewed["passed"] is True and waiting_for_reviews(reviewed["human_verdicts"], config) is None
    assert reviewed["human_verdicts"] == 10 and reviewed["human_losses"] == result["judge_losses"]
    assert reviewed["judge_human_agreement"] == 1.0 and reviewed["judge_human_pairs"] == 10  # the same rows
    report = reviewed["report_markdown"]
    assert "Blind human review, 10 verdicts: the fine-tuned model against the base 0 wins" in report
    assert "The judge agrees with 1.000 of the 10 human verdicts" in report
