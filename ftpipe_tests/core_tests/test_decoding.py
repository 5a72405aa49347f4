"""The server's continuous batching (`Engine` and `decoding`) on a tiny model: the same greedy answers as the
evaluation's decoding whatever the rows decoded beside them, a short answer that does not wait for a long one, a
cancelled row that ends at its next token, a call (a hot swap) that runs between two steps while a long answer goes on
with the adapter it began with, and a long shared system prompt read once."""

from __future__ import annotations

import threading
import time

import pytest

from ftpipe.core.evaluation.generation import (
    decoded_answer, generate, load_model, pad_id_of, prompt_ids, stop_token_ids,
)
from ftpipe.core.server import decoding, prefixes
from ftpipe.core.server.catalog import Catalog, Release
from ftpipe.core.server.engine import Engine, Job
from ftpipe_tests.served import packaged_lora
from ftpipe_tests.tiny_model import long_system_prompt, toy_rows, with_system
from ftpipe_tests.trained_models import noisy_base

WAIT = 60  # seconds a test waits for an answer before it fails


class Answer:
    """One request's side: the tokens handed to it, and whether it ended."""

    def __init__(self, on_token=None):
        self.tokens: list[int] = []
        self.started, self.ended, self.cancelled = threading.Event(), threading.Event(), threading.Event()
        self.on_token = on_token
        self.job: Job | None = None  # the engine's side, once submitted

    def emit(self, token: int | None) -> None:
        if token is None:
            self.ended.set()
            return
        self.tokens.append(token)
        self.started.set()
        if self.on_token:
            self.on_token(self)

    def fail(self, error: BaseException) -> None:
        raise AssertionError(f"a request failed: {error!r}")

    def wait(self) -> Answer:
        assert self.ended.wait(WAIT), "the answer did not end"
        return self


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    """The tiny model with varied answers, its tokenizer, eight prompts of different lengths and the engine."""
    model, tokenizer = load_model(noisy_base(tiny_model_dir, tmp_path_factory.mktemp("decoding") / "base"))
    prompts = [row["messages"][:-1] for row in toy_rows(8, seed=7)]
    engine = Engine(max_batch=4)
    yield model, tokenizer, prompts, engine
    engine.stop()


def submit(served, prompt, answer: Answer, max_new_tokens: int, stops: bool = True, temperature: float = 0.0,
           top_p: float = 1.0) -> Answer:
    model, tokenizer, _, engine = served
    answer.job = Job(model, None, prompt_ids(tokenizer, prompt), max_new_tokens, temperature, top_p,
                     frozenset(stop_token_ids(model, tokenizer) if stops else ()), pad_id_of(tokenizer),
                     emit=answer.emit, fail=answer.fail, cancelled=answer.cancelled)
    engine.submit(answer.job)
    return answer


def test_rows_joining_a_running_batch_answer_as_each_prompt_decoded_alone(served) -> None:
    model, tokenizer, prompts, _ = served
    alone = generate(model, tokenizer, prompts, max_new_tokens=12, batch_tokens=1)
    assert len(set(alone)) > 4, "the prompts get different answers, so a mixed-up row shows"
    first = submit(served, prompts[0], Answer(), 12)
    assert first.started.wait(WAIT)
    answers = [first, *(submit(served, prompt, Answer(), 12) for prompt in prompts[1:])]  # more than a batch holds
    texts = [decoded_answer(tokenizer, answer.wait().tokens).strip() for answer in answers]
    assert texts == alone


def test_a_short_answer_ends_while_a_long_one_decodes(served) -> None:
    model, tokenizer, prompts, engine = served
    long = submit(served, prompts[1], Answer(), 300, stops=False)
    assert long.started.wait(WAIT)
    short = submit(served, prompts[2], Answer(), 3).wait()
    assert not long.ended.is_set() and len(long.tokens) < 300, "the short answer did not wait for the long one"
    assert decoded_answer(tokenizer, short.tokens).strip() == generate(
        model, tokenizer, prompts[2:3], max_new_tokens=3, batch_tokens=1)[0]
    assert len(long.wait().tokens) == 300


def test_a_cancelled_row_ends_at_its_next_token_and_the_others_go_on(served) -> None:
    _, _, prompts, _ = served
    kept = submit(served, prompts[3], Answer(), 10, stops=False)
    cancelled = submit(served, prompts[4], Answer(on_token=lambda answer: answer.cancelled.set()), 10, stops=False)
    assert len(cancelled.wait().tokens) == 1 and len(kept.wait().tokens) == 10


def test_sampling_follows_temperature_and_a_nucleus_of_one_token_is_greedy(served) -> None:
    model, tokenizer, prompts, _ = served
    greedy = generate(model, tokenizer, prompts, max_new_tokens=12, batch_tokens=1)

    def answers(**sampling) -> list[str]:
        asked = [submit(served, prompt, Answer(), 12, **sampling) for prompt in prompts]
        return [decoded_answer(tokenizer, answer.wait().tokens).strip() for answer in asked]

    assert answers(temperature=1.0, top_p=1e-6) == greedy
    assert answers(temperature=2.0) != greedy


def test_a_model_whose_cache_cannot_drop_rows_ends_its_batch_before_new_rows_join(served, monkeypatch) -> None:
    model, tokenizer, prompts, _ = served
    monkeypatch.setattr(decoding, "rows_can_leave", lambda model: False)  # as for a model with recurrent layers
    long = submit(served, prompts[5], Answer(), 40, stops=False)
    assert long.started.wait(WAIT)
    ended_before = submit(served, prompts[6], Answer(on_token=lambda answer: answer.cancelled.set()), 12)
    kept = [submit(served, prompt, Answer(), 12) for prompt in prompts[:3]]
    assert len(ended_before.wait().tokens) == 1 and long.ended.is_set(), "the new row waited for the running batch"
    assert [decoded_answer(tokenizer, answer.wait().tokens).strip() for answer in kept] == generate(
        model, tokenizer, prompts[:3], max_new_tokens=12, batch_tokens=1)


def test_a_request_waits_only_for_its_own_batch_when_that_one_is_full(served) -> None:
    model, tokenizer, prompts, _ = served
    engine = Engine(max_batch=1)
    try:
        one = (model, tokenizer, prompts, engine)
        long = submit(one, prompts[1], Answer(), 300, stops=False)
        assert long.started.wait(WAIT)
        queued = submit(one, prompts[2], Answer(), 3)  # the greedy batch is full: this one waits
        sampled = submit(one, prompts[3], Answer(), 3, temperature=1.0, top_p=1e-6).wait()  # a batch of its own
        assert not long.ended.is_set(), "the sampled request did not wait behind the full greedy batch"
        assert decoded_answer(tokenizer, sampled.tokens).strip() == generate(
            model, tokenizer, prompts[3:4], max_new_tokens=3, batch_tokens=1)[0]
        assert queued.wait() and long.ended.is_set()
    finally:
        engine.stop()


def with_system_prompt(prompts: list[list[dict]], topic: str = "color") -> list[list[dict]]:
    """The prompts with one long shared system prompt (8 rules about `topic`), as a task's requests come."""
    return [with_system(prompt, long_system_prompt(8, topic)) for prompt in prompts]


def counting(read, counts: list):
    """`read` (a `Prefixes` reader) that appends the length of each start it reads to `counts`."""
    def counted(model, adapter, ids, below):
        counts.append(len(ids))
        return read(model, adapter, ids, below)

    return counted


def test_a_long_shared_system_prompt_is_read_once_and_the_answers_do_not_change(served, monkeypatch) -> None:
    model, tokenizer, prompts, engine = served
    prompts = with_system_prompt(prompts)
    assert len(prompt_ids(tokenizer, prompts[0])) > 2 * prefixes.MIN_TOKENS
    alone = [generate(model, tokenizer, [prompt], max_new_tokens=12, batch_tokens=1)[0] for prompt in prompts]
    read = []
    monkeypatch.setattr(engine.prefixes, "read", counting(engine.prefixes.read, read))
    first = [submit(served, prompt, Answer(), 12).wait() for prompt in prompts[:2]]  # the second shares the start
    rest = [submit(served, prompt, Answer(), 12) for prompt in prompts[2:]]  # joining together, of unequal lengths
    texts = [decoded_answer(tokenizer, answer.wait().tokens).strip() for answer in first + rest]
    assert texts == alone
    assert len(read) == 1 and [answer.job.cached_tokens for answer in first + rest] == [0, 0] + [read[0]] * 6
    assert engine.call(lambda: len(engine.prefixes.starts)).result(WAIT) == 0, "a call may swap adapters: starts go"


def test_starts_are_kept_per_adapter_in_whole_blocks_and_the_least_recently_used_is_dropped(served) -> None:
    model, tokenizer, prompts, _ = served

    def jobs(topic: str, adapter: str | None = None) -> list[Job]:
        return [Job(model, adapter, prompt_ids(tokenizer, prompt), 4, 0.0, 1.0, frozenset(), 0, print, print)
                for prompt in with_system_prompt(prompts[:3], topic)]

    read = []
    kept = prefixes.Prefixes(counting(decoding.read_start, read), capacity=2)
    first, second, third = jobs("color")
    assert kept.find(first) is None, "nothing to share with yet"
    start = kept.find(second)
    shared = next(i for i, (a, b) in enumerate(zip(first.prompt, second.prompt)) if a != b)
    assert len(start.ids) % prefixes.BLOCK_TOKENS == 0 and shared - prefixes.BLOCK_TOKENS < len(start.ids) <= shared
    assert start.ids == second.prompt[:len(start.ids)] == first.prompt[:len(start.ids)]
    assert kept.find(jobs("color", adapter="other")[0]) is None, "another adapter's cache differs"
    assert kept.find(third) is start and third.cached_tokens == len(start.ids) and read == [len(start.ids)]
    other = jobs("shape")
    assert kept.find(other[0]) is None and kept.find(other[1]) is not None  # a second system prompt: a second start
    assert kept.find(third) is start  # used last: the shape start goes when a third start comes
    size = jobs("size")
    kept.find(size[0])
    found = kept.find(size[1])
    assert list(kept.starts.values()) == [start, found]
    assert all(prefixes.Prefixes(decoding.read_start, capacity=0).find(job) is None for job in jobs("color"))


@pytest.fixture
def swapping(tmp_path, served):
    """Releases 1 and 2 of task `alpha` (two random adapters on the served model), a catalog, an engine serving
    release 1, and `answer(max_new_tokens, route, on_token)` asking the first prompt of the route (alpha's now)."""
    model, tokenizer, prompts, _ = served
    base = tmp_path / "base"
    model.save_pretrained(base), tokenizer.save_pretrained(base)
    first, second = (Release("alpha", "champion", seed, packaged_lora(base, tmp_path, f"v{seed}", seed), base)
                     for seed in (1, 2))
    catalog, engine = Catalog(), Engine(max_batch=4)

    def sync(release: Release):
        return engine.call(lambda: catalog.sync([release], engine.busy()))

    def answer(max_new_tokens: int, route=None, on_token=None) -> Answer:
        route = route or catalog.routes["alpha"]
        engine.submit(Job(route.model, route.adapter, prompt_ids(tokenizer, prompts[0]), max_new_tokens, 0.0, 1.0,
                          frozenset(), route.pad_id, emit=(asked := Answer(on_token)).emit, fail=asked.fail))
        return asked

    sync(first).result(WAIT)
    yield catalog, engine, sync, answer, second
    engine.stop()


def loaded(catalog: Catalog) -> set[str]:
    return set(catalog.routes["alpha"].model.peft_config)


def test_a_hot_swap_runs_while_a_long_answer_ends_with_the_adapter_it_began_with(swapping) -> None:
    catalog, engine, sync, answer, second = swapping
    alone = answer(120).wait().tokens
    slow = answer(120, on_token=lambda _: time.sleep(0.02))  # 2.4 s or more
    assert slow.started.wait(WAIT) and sync(second).result(WAIT) == {"alpha": 2}
    assert not slow.ended.is_set(), "the swap did not wait for the answer decoding"
    assert catalog.lingering and loaded(catalog) == {"alpha-v1", "alpha-v2"}
    assert answer(12).wait().tokens != alone[:12], "a new request gets the new adapter at once"
    assert slow.wait().tokens == alone, "the answer begun before the swap ended with its own adapter"
    sync(second).result(WAIT)
    assert not catalog.lingering and loaded(catalog) == {"alpha-v2"}


def test_requests_routed_to_the_old_adapter_just_before_a_swap_are_answered_with_it(swapping) -> None:
    catalog, engine, sync, answer, second = swapping
    old_route, alone = catalog.routes["alpha"], answer(12).wait().tokens
    for _ in range(2):  # the swap, then the refresh that would unload the old adapter
        held = threading.Event()
        engine.call(held.wait)  # the engine busy, as while an adapter loads
        swap = sync(second)
        late = answer(12, route=old_route)  # its handler read the route before the swap: it waits behind it
        held.set()
        assert swap.result(WAIT) == {"alpha": 2} and late.wait().tokens == alone
    sync(second).result(WAIT)
    assert loaded(catalog) == {"alpha-v2"}


def test_a_conversations_next_turn_reads_its_earlier_turns_after_the_kept_system_prompt(served) -> None:
    import torch

    model, tokenizer, prompts, _ = served
    system = with_system_prompt(prompts[:1])[0][0]
    question = {"role": "user", "content": " ".join(f"Is the fruit number {i} red or green?" for i in range(12))}
    turns = [[system, question], [system, question, {"role": "assistant", "content": "red"},
                                  {"role": "user", "content": "And the plum?"}]]
    turns.append([*turns[1], {"role": "assistant", "content": "purple"}, {"role": "user", "content": "And a lime?"}])
    other, *conversation = (Job(model, None, prompt_ids(tokenizer, prompt), 4, 0.0, 1.0, frozenset(), 0, print, print)
                            for prompt in [with_system_prompt(prompts[1:2])[0], *turns])
    kept = prefixes.Prefixes(decoding.read_start)
    assert kept.find(other) is None
    system_start = kept.find(conversation[0])
    earlier_turns = kept.find(conversation[1])  # read after a copy of the system prompt's
    assert conversation[1].cached_tokens == len(system_start.ids) < len(earlier_turns.ids) - prefixes.MIN_TOKENS
    assert kept.find(conversation[2]) is earlier_turns and conversation[2].cached_tokens == len(earlier_turns.ids)
    whole = decoding.read_start(model, None, earlier_turns.ids)
    assert all(torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)
               for a, b in zip(earlier_turns.cache.layers, whole.cache.layers))
