"""The LLM judge against a real local HTTP server that answers like an OpenAI chat-completions endpoint: blind
requests, both orders, a position-biased judge giving ties, the key from the environment, errors that name the
endpoint."""

from __future__ import annotations

import json
import re

import pytest

from ftpipe.config import JudgeConfig
from ftpipe.core.evaluation.judge import combine, judge_metrics, judge_outcomes, parse_choice
from ftpipe_tests.judge_endpoint import MODEL, PAIR, Endpoint, prefers_the_reference, serving


def records() -> list[dict]:
    """Rows 0-5: fine-tuned right, base wrong; 6-7: base right; 8-9: both wrong; 10-11: the same answer."""
    rows = []
    for i in range(12):
        right, wrong = f"Answer {i}", f"Wrong {i}"
        pairs = [(wrong, right)] * 6 + [(right, wrong)] * 2 + [(wrong, f"Other {i}")] * 2 + [(right, right)] * 2
        base, tuned = pairs[i]
        rows.append({"id": f"r{i:02d}", "message": f"Question {i}?", "prompt": f"user: Question {i}?",
                     "reference": right, "base_answer": base, "finetuned_answer": tuned})
    return rows


def judge(endpoint: Endpoint, **settings) -> JudgeConfig:
    return JudgeConfig(base_url=endpoint.base_url, model=MODEL, api_key_env="FTPIPE_TEST_JUDGE_KEY", **settings)


@pytest.fixture(autouse=True)
def judge_key(monkeypatch) -> None:
    monkeypatch.setenv("FTPIPE_TEST_JUDGE_KEY", "sk-test-123")


def test_each_pair_is_judged_blind_in_both_orders():
    with serving(prefers_the_reference) as endpoint:
        outcomes, unclear = judge_outcomes(records(), judge(endpoint), log=lambda line: None)
    expected = ["win"] * 6 + ["loss"] * 2 + ["tie"] * 4
    assert [outcomes[f"r{i:02d}"] for i in range(12)] == expected and unclear == 0
    asked = endpoint.requests
    assert len(asked) == 2 * 10  # identical answers are a tie without asking
    assert {r["path"] for r in asked} == {"/v1/chat/completions"} and {r["auth"] for r in asked} == {
        "Bearer sk-test-123"}
    assert {r["model"] for r in asked} == {MODEL} and {r["temperature"] for r in asked} == {0}
    shown = [PAIR.search(r["messages"][-1]["content"]).groups()[1:] for r in asked]
    assert sorted(shown) == sorted((b, a) for a, b in shown)  # every pair asked in both orders
    assert not any("base" in json.dumps(r["messages"]).lower() or "fine" in json.dumps(r["messages"]).lower()
                   for r in asked)  # blind: no model is named


def test_a_judge_that_always_says_a_gives_ties_not_wins():
    with serving(lambda user: "A") as endpoint:
        found = judge_metrics(records(), judge(endpoint), log=lambda line: None)
    assert (found["judge_pairs"], found["judge_wins"], found["judge_losses"], found["judge_ties"]) == (12, 0, 0, 12)
    assert found["judge_win_rate_ci_low"] < found["judge_win_rate"] == 0.5 < found["judge_win_rate_ci_high"]


def test_the_win_rate_and_max_pairs():
    rows = records()
    with serving(prefers_the_reference) as endpoint:
        found = judge_metrics(rows, judge(endpoint), log=lambda line: None)
        few = judge_metrics(records(), judge(endpoint, max_pairs=4), log=lambda line: None)
    assert found["judge_win_rate"] == pytest.approx((6 + 0.5 * 4) / 12)
    assert found["judge_win_rate_ci_low"] < found["judge_win_rate"] < found["judge_win_rate_ci_high"]
    assert [r["judge_outcome"] for r in rows][:8] == ["win"] * 6 + ["loss"] * 2
    assert few["judge_pairs"] == 4
    assert judge_metrics(records(), None, log=print)["judge_win_rate"] is None  # no judge configured


@pytest.mark.parametrize(("reply", "choice"), [
    ("A", "A"), ("b", "B"), ("**B**", "B"), ("Tie.", "tie"), ("A is better because", "A"), ("Neither", None),
    ("", None),
])
def test_replies_are_read_from_their_first_word(reply, choice):
    assert parse_choice(reply) == choice


def test_both_orders_must_agree_for_a_win_or_a_loss():
    assert combine("B", "A") == "win" and combine("A", "B") == "loss"
    assert combine("A", "A") == combine("B", "B") == combine("tie", "A") == combine(None, "A") == "tie"


def test_unclear_replies_count_as_no_preference_and_errors_name_the_endpoint(monkeypatch):
    with serving(lambda user: "Well, it depends.") as endpoint:
        outcomes, unclear = judge_outcomes(records(), judge(endpoint), log=lambda line: None)
        assert set(outcomes.values()) == {"tie"} and unclear == 20
        with pytest.raises(RuntimeError, match=f"judge judge-2 at {re.escape(endpoint.base_url)}: .*not found"):
            judge_outcomes(records(), JudgeConfig(base_url=endpoint.base_url, model="judge-2", api_key_env=None),
                           log=lambda line: None)
        monkeypatch.delenv("FTPIPE_TEST_JUDGE_KEY")
        with pytest.raises(ValueError, match="environment variable FTPIPE_TEST_JUDGE_KEY is not set"):
            judge_outcomes(records(), judge(endpoint), log=lambda line: None)
