"""The server's continuous batching (`Engine` and `decoding`) on a tiny model: the same greedy answers as the
evaluation's decoding whatever the rows decoded beside them, a short answer that does not wait for a long one, a
cancelled row that ends at its next token, and a call that waits for the rows before it."""

from __future__ import annotations

import threading

import pytest

from ftpipe.core.evaluation.generation import generate, load_model, pad_id_of, prompt_ids, stop_token_ids
from ftpipe.core.server import decoding
from ftpipe.core.server.engine import Engine, Job
from ftpipe_tests.tiny_model import toy_rows
from ftpipe_tests.trained_models import noisy_base

WAIT = 60  # seconds a test waits for an answer before it fails


class Answer:
    """One request's side: the tokens handed to it, and whether it ended."""

    def __init__(self, on_token=None):
        self.tokens: list[int] = []
        self.started, self.ended, self.cancelled = threading.Event(), threading.Event(), threading.Event()
        self.on_token = on_token

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
    engine.submit(Job(model, None, prompt_ids(tokenizer, prompt), max_new_tokens, temperature, top_p,
                      frozenset(stop_token_ids(model, tokenizer) if stops else ()), pad_id_of(tokenizer),
                      emit=answer.emit, fail=answer.fail, cancelled=answer.cancelled))
    return answer


def test_rows_joining_a_running_batch_answer_as_each_prompt_decoded_alone(served) -> None:
    model, tokenizer, prompts, _ = served
    alone = generate(model, tokenizer, prompts, max_new_tokens=12, batch_tokens=1)
    assert len(set(alone)) > 4, "the prompts get different answers, so a mixed-up row shows"
    first = submit(served, prompts[0], Answer(), 12)
    assert first.started.wait(WAIT)
    answers = [first, *(submit(served, prompt, Answer(), 12) for prompt in prompts[1:])]  # more than a batch holds
    texts = [tokenizer.decode(answer.wait().tokens, skip_special_tokens=True).strip() for answer in answers]
    assert texts == alone


def test_a_short_answer_ends_while_a_long_one_decodes_and_a_call_waits_for_both(served) -> None:
    model, tokenizer, prompts, engine = served
    long = submit(served, prompts[1], Answer(), 300, stops=False)
    assert long.started.wait(WAIT)
    short = submit(served, prompts[2], Answer(), 3).wait()
    assert not long.ended.is_set() and len(long.tokens) < 300, "the short answer did not wait for the long one"
    assert tokenizer.decode(short.tokens, skip_special_tokens=True).strip() == generate(
        model, tokenizer, prompts[2:3], max_new_tokens=3, batch_tokens=1)[0]
    assert engine.call(lambda: long.ended.is_set()).result(WAIT), "a call (an adapter swap) waits for the rows"
    assert len(long.tokens) == 300


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
        return [tokenizer.decode(answer.wait().tokens, skip_special_tokens=True).strip() for answer in asked]

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
    assert [tokenizer.decode(answer.wait().tokens, skip_special_tokens=True).strip() for answer in kept] == generate(
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
        assert tokenizer.decode(sampled.tokens, skip_special_tokens=True).strip() == generate(
            model, tokenizer, prompts[3:4], max_new_tokens=3, batch_tokens=1)[0]
        assert queued.wait() and long.ended.is_set()
    finally:
        engine.stop()
