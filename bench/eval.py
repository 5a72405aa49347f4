"""Evaluation generation throughput: ftpipe's batched greedy generation (left padding, KV cache, batches of
--batch-tokens tokens) against batches of 16 rows whatever their length and against one `generate` call per row,
side by side on the same prompts; what answers constrained to a label set cost, batched and one prompt at a time; an
evaluation's work on each prompt (answer it, rank the labels, score a reference) with one pass over the prompt against
a pass for each; and prompts that share a long start (a system prompt of --shared-words words, as few-shot examples are), answered and
label-ranked with that start run once (`shared_prefix`) against running it in every row; the general-skills probe
answered in decoding rounds whose ended rows leave the batch, with the output head given its last positions
contiguous, against one `generate` call per batch on the sliced positions; and labels that start alike (intent names,
labels written in JSON) ranked with each shared start run once per prompt (`option_tree`), against each label run
on its own.

    python bench/eval.py                                   # tiny random model, runs anywhere in about a minute
    python bench/eval.py --model .ftpipe/models/<fingerprint> --rows 32

Prints rows/s of each, the ratios (target >= 4x on CPU for batching), whether the outputs are identical, and rows/s
of answers constrained to --labels labels (`evaluation.constrain_to_labels`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ftpipe.core.evaluation import generation, label_likelihood
from ftpipe.core.evaluation.generation import generate, load_model
from ftpipe.core.evaluation.label_likelihood import constrained_answers
from ftpipe.core.evaluation.probe import PROBE_MAX_NEW_TOKENS, read_probe
from ftpipe.core.storage import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))  # the test helpers build the tiny model and the prompts
from ftpipe_tests.tiny_model import build_tiny_model  # noqa: E402
from ftpipe_tests.trained_models import noisy_base, varied_prompts  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    answers = fn()
    return answers, time.perf_counter() - start


@contextlib.contextmanager
def rows_per_batch(size: int):
    """The baseline: batches of `size` rows whatever their length, as before batches were sized in tokens."""
    real = generation.token_chunks
    generation.token_chunks = lambda order, lengths, budget: generation.chunks(order, size)
    try:
        yield
    finally:
        generation.token_chunks = real


def bench(model_dir: Path, rows: int, batch_tokens: int, max_new_tokens: int, label_count: int) -> None:
    model, tokenizer = load_model(model_dir)
    prompts = varied_prompts(rows)

    def answer(budget: int) -> list[str]:
        return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_tokens=budget)

    generate(model, tokenizer, prompts[:2], max_new_tokens=4, batch_tokens=batch_tokens)  # warm-up
    batched, batched_s = timed(lambda: answer(batch_tokens))
    with rows_per_batch(16):
        sixteen, sixteen_s = timed(lambda: answer(batch_tokens))
    single, single_s = timed(lambda: answer(1))
    same = sum(a == b == c for a, b, c in zip(batched, sixteen, single))
    print(f"eval generation benchmark: {rows} prompts, {max_new_tokens} new tokens max, model {model_dir}")
    print(f"  batched ({batch_tokens} tokens) {rows / batched_s:8.2f} rows/s  {batched_s:7.2f} s")
    print(f"  16 rows per batch    {rows / sixteen_s:8.2f} rows/s  {sixteen_s:7.2f} s")
    print(f"  one row per call     {rows / single_s:8.2f} rows/s  {single_s:7.2f} s")
    print(f"  ratio batched/single: {single_s / batched_s:.1f}x (target >= 4x on CPU); "
          f"batched in tokens/16 rows per batch: {sixteen_s / batched_s:.2f}x")
    print(f"  identical outputs: {same}/{rows}" + ("" if same == rows else "  <-- MISMATCH"))
    labels = [f"label_{i:02d}" for i in range(label_count)]
    constrained, constrained_s = timed(lambda: constrained_answers(model, tokenizer, prompts, labels))
    with one_prompt_per_batch():
        alone, alone_s = timed(lambda: constrained_answers(model, tokenizer, prompts, labels))
    same = sum(a == b for a, b in zip(constrained, alone))
    print(f"  constrained to {label_count} labels {rows / constrained_s:8.2f} rows/s  {constrained_s:7.2f} s"
          + ("" if set(constrained) <= set(labels) else "  <-- AN ANSWER OUTSIDE THE LABELS"))
    print(f"  the same, one prompt at a time {alone_s:7.2f} s: batched {alone_s / constrained_s:.2f}x, identical "
          f"outputs {same}/{rows}" + ("" if same == rows else "  <-- MISMATCH"))


@contextlib.contextmanager
def one_prompt_per_batch():
    """The baseline for label ranking: each prompt in a batch of its own, as before prompts were batched."""
    real = label_likelihood.BATCH_TOKENS
    label_likelihood.BATCH_TOKENS = 1
    try:
        yield
    finally:
        label_likelihood.BATCH_TOKENS = real


@contextlib.contextmanager
def every_row_runs_its_whole_prompt():
    """The baseline: no shared prefix, in generation, label ranking and scoring alike."""
    real = generation.shared_prefix
    generation.shared_prefix = lambda model, prompts: None
    try:
        yield
    finally:
        generation.shared_prefix = real


def bench_shared_prefix(model_dir: Path, rows: int, batch_tokens: int, max_new_tokens: int, label_count: int,
                        shared_words: int) -> None:
    model, tokenizer = load_model(model_dir)
    system = {"role": "system", "content": " ".join(f"rule{i % 50}" for i in range(shared_words))}
    prompts = [[system, prompt[-1]] for prompt in varied_prompts(rows)]
    labels = [f"label_{i:02d}" for i in range(label_count)]

    def answer():
        answers, answer_s = timed(lambda: generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                   batch_tokens=batch_tokens))
        ranked, rank_s = timed(lambda: constrained_answers(model, tokenizer, prompts, labels))
        return answers, answer_s, ranked, rank_s

    shared = answer()
    with every_row_runs_its_whole_prompt():
        whole = answer()
    prefix = len(generation.shared_prefix(model, [generation.prompt_ids(tokenizer, p) for p in prompts]).ids)
    print(f"shared prompt start: {rows} prompts starting with the same {prefix} tokens")
    for name, index in (("generation", 0), (f"{label_count} labels ranked", 2)):
        same = sum(a == b for a, b in zip(shared[index], whole[index]))
        print(f"  {name:<18} shared start run once {shared[index + 1]:7.2f} s, in every row {whole[index + 1]:7.2f} s:"
              f" {whole[index + 1] / shared[index + 1]:.1f}x, identical outputs {same}/{rows}"
              + ("" if same == rows else "  <-- MISMATCH"))


AREAS = ("card", "card_payment", "transfer", "top_up", "exchange", "cash_withdrawal", "pending", "declined")
MATTERS = ("arrival", "fee_charged", "not_recognised", "failed", "limits", "reverted", "wrong_amount", "support")


@contextlib.contextmanager
def every_label_on_its_own_branch():
    """The baseline: each continuation runs all its tokens, whatever starts it shares with another."""
    real = generation.option_tree

    def unshared(options: list[list[int]]) -> generation.OptionTree:
        nodes, paths = [], []
        for option in options:
            paths.append(list(range(len(nodes), len(nodes) + len(option) - 1)))
            nodes += [(depth, token, len(nodes) + depth - 1 if depth else -1) for depth, token in
                      enumerate(option[:-1])]
        return generation.OptionTree(nodes, paths)

    generation.option_tree = unshared
    try:
        yield
    finally:
        generation.option_tree = real


def bench_option_tree(model_dir: Path, rows: int, label_count: int, repeats: int) -> None:
    """`label_count` labels ranked after each prompt, each start labels share run once (`option_tree`) against each
    label on its own branch, alternately `repeats` times: intent names that share starts (`card_payment_limits`,
    `card_payment_fee_charged`, ...), and labels written in JSON (`{"category": "label_07", "priority": "high"}`)."""
    model, tokenizer = load_model(model_dir)
    names = [f"{area}_{matter}" for matter in MATTERS for area in AREAS][:label_count]
    rank(model, tokenizer, rows, "intent names", label_likelihood.whole_answers(model, tokenizer, names), repeats)
    written = [generation.encode(tokenizer, json.dumps({"category": f"label_{i:02d}", "priority": "high"}))
               for i in range(label_count)]
    rank(model, tokenizer, rows, "labels written in JSON", written, repeats)


def rank(model, tokenizer, rows: int, what: str, labels: list[list[int]], repeats: int) -> None:
    """`labels` (token ids) ranked after `rows` prompts, as a tree and on branches of their own, with the ratio."""
    prompts = varied_prompts(rows)
    options = [labels] * rows
    times: dict[str, list[float]] = {"tree": [], "branches": []}
    for _ in range(repeats):
        found, seconds = timed(lambda: label_likelihood.prompts_logprobs(model, tokenizer, prompts, options))
        times["tree"].append(seconds)
        with every_label_on_its_own_branch():
            each, seconds = timed(lambda: label_likelihood.prompts_logprobs(model, tokenizer, prompts, options))
        times["branches"].append(seconds)
    tree, branches = statistics.median(times["tree"]), statistics.median(times["branches"])
    same = sum(row.index(max(row)) == other.index(max(other)) for row, other in zip(found, each))
    diff = max(abs(a - b) for row, other in zip(found, each) for a, b in zip(row, other))
    print(f"{len(labels)} {what} ranked after {rows} prompts ({len(generation.option_tree(labels).nodes)} "
          f"tokens run of their {sum(len(option) - 1 for option in labels)}): shared starts run once "
          f"{tree:7.2f} s, each label on its own branch {branches:7.2f} s: {branches / tree:.2f}x, the same top label "
          f"{same}/{rows}, largest log-probability difference {diff:.2g}")


def bench_one_pass(model_dir: Path, rows: int, batch_tokens: int, max_new_tokens: int, label_count: int) -> None:
    """What an evaluation does with each held-out prompt (answer it, rank the labels after it, score its reference
    answer) with one pass over the prompt, against one pass for each."""
    model, tokenizer = load_model(model_dir)
    prompts = varied_prompts(rows)
    conversations = [p + [{"role": "assistant", "content": f"label_{i % label_count:02d}"}] for i, p in enumerate(prompts)]
    labels = [generation.encode(tokenizer, f"label_{i:02d}") for i in range(label_count)]
    references = [[ids[start:]] for ids, start in (generation.answer_tokens(tokenizer, c) for c in conversations)]

    def one_pass_each():
        answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_tokens=batch_tokens)
        ranked = label_likelihood.prompts_logprobs(model, tokenizer, prompts, [labels] * rows)
        scored = generation.conversation_logprobs(model, tokenizer, conversations, 16)
        return answers, [row + [logprob] for row, (logprob, _) in zip(ranked, scored)]

    def one_pass():
        done = generation.answers_and_logprobs(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                               batch_tokens=batch_tokens,
                                               continuations=[labels + reference for reference in references])
        return done.answers, done.logprobs

    (each, each_scores), each_s = timed(one_pass_each)
    (once, once_scores), once_s = timed(one_pass)
    same = sum(a == b for a, b in zip(each, once))
    largest = max(abs(a - b) for x, y in zip(each_scores, once_scores) for a, b in zip(x, y))
    print(f"answer, rank {label_count} labels and score the reference of {rows} prompts: one pass over each prompt "
          f"{once_s:7.2f} s, one pass each {each_s:7.2f} s: {each_s / once_s:.2f}x, identical answers {same}/{rows}"
          + ("" if same == rows else "  <-- MISMATCH") + f", log-probabilities within {largest:.1e}")


@contextlib.contextmanager
def one_decoding_round(model, sliced_head: bool):
    """The baselines for decoding: every row of a batch decoded for as long as the longest answer (one `generate`
    call), and with `sliced_head` the output head's input left as transformers slices it."""
    real, head = generation.ROUND_TOKENS, model.get_output_embeddings()
    hooks = dict(head._forward_pre_hooks)
    generation.ROUND_TOKENS = 10**6
    if sliced_head:
        head._forward_pre_hooks.clear()
    try:
        yield
    finally:
        generation.ROUND_TOKENS = real
        head._forward_pre_hooks.update(hooks)


def bench_decoding(model_dir: Path, adapter: Path | None, batch_tokens: int, repeats: int) -> None:
    """The general-skills probe's prompts, whose answers end at different lengths (a fine-tuned model's, with
    `adapter`, end earlier than a base model's), each way `repeats` times in turn; medians."""
    model, tokenizer = (generation.load_finetuned(adapter, lambda: load_model(model_dir)) if adapter
                        else load_model(model_dir))
    prompts = [row["messages"] for row in read_probe(REPO_ROOT / "data/general/probe.jsonl")]

    def answer():
        return timed(lambda: generate(model, tokenizer, prompts, max_new_tokens=PROBE_MAX_NEW_TOKENS,
                                      batch_tokens=batch_tokens))

    generate(model, tokenizer, prompts[:8], max_new_tokens=4, batch_tokens=batch_tokens)  # warm-up
    runs: dict[str, list] = {"ours": [], "one round": [], "sliced head": []}
    for _ in range(repeats):
        runs["ours"].append(answer())
        with one_decoding_round(model, sliced_head=False):
            runs["one round"].append(answer())
        with one_decoding_round(model, sliced_head=True):
            runs["sliced head"].append(answer())
    seconds = {name: statistics.median(s for _, s in done) for name, done in runs.items()}
    same = sum(len({answers[i] for done in runs.values() for answers, _ in done}) == 1 for i in range(len(prompts)))
    print(f"decoding the probe's {len(prompts)} prompts ({PROBE_MAX_NEW_TOKENS} new tokens max, "
          f"{'fine-tuned' if adapter else 'base'} model, median of {repeats}): rounds of {generation.ROUND_TOKENS} "
          f"steps, ended rows leaving {seconds['ours']:6.2f} s; one round {seconds['one round']:6.2f} s "
          f"({seconds['one round'] / seconds['ours']:.2f}x); one round and the head on sliced positions "
          f"{seconds['sliced head']:6.2f} s ({seconds['sliced head'] / seconds['ours']:.2f}x); identical answers "
          f"{same}/{len(prompts)}" + ("" if same == len(prompts) else "  <-- MISMATCH"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a model dir (safetensors + tokenizer); default: tiny random model")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch-tokens", type=int, default=8192, help="evaluation.batch_tokens")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--labels", type=int, default=12, help="label set size for constrained answers")
    parser.add_argument("--shared-words", type=int, default=80, help="words of the system prompt every row shares")
    parser.add_argument("--adapter", type=Path, help="a LoRA adapter on --model for the decoding benchmark")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each way of decoding the probe or ranking")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or noisy_base(build_tiny_model(Path(tmp) / "tiny"), Path(tmp) / "noisy")
        bench(model_dir, args.rows, args.batch_tokens, args.max_new_tokens, args.labels)
        bench_one_pass(model_dir, args.rows, args.batch_tokens, args.max_new_tokens, args.labels)
        bench_shared_prefix(model_dir, args.rows, args.batch_tokens, args.max_new_tokens, args.labels,
                            args.shared_words)
        bench_decoding(model_dir, args.adapter, args.batch_tokens, args.repeats)
        bench_option_tree(model_dir, args.rows, args.labels, args.repeats)


if __name__ == "__main__":
    main()
