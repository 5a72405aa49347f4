"""The production report on a request log shaped like real traffic: a bank's intent classifier (short messages, a
shared system prompt, 12 labels) answering new customers, or drifting to another task's prompts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ftpipe.config import parse_task_config
from ftpipe.core import monitoring
from ftpipe.core.records import write_examples
from ftpipe_tests.intents import intent_task
from ftpipe_tests.tiny_model import toy_rows
from ftpipe_tests.traffic import TASK, log, new_customers, record

CONFIG = parse_task_config("evaluation: {task_type: classification}\n", "task.yaml")


@pytest.fixture
def train_path(tmp_path) -> Path:
    write_examples(intent_task(seed=0).rows, tmp_path / "train.parquet")
    return tmp_path / "train.parquet"


def report(train_path: Path, tmp_path: Path, **kwargs) -> dict:
    return monitoring.production_report(TASK, train_path, CONFIG, tmp_path / "report", **kwargs)


def test_volume_errors_latency_validity_and_labels(train_path, tmp_path):
    now = time.time()
    answered = [record(m, label, at=now - 60 * i, latency=10.0 * (i + 1)) for i, (m, label) in
                enumerate(new_customers(40))]
    answered[0]["output"] = answered[1]["output"] = "I think it is about your card"  # not a label
    failed = [record("my card", "", at=now - 5, status=500) for _ in range(4)]
    too_long = [record("my card " * 5000, "", at=now - 6, status=400) for _ in range(6)]  # refused, not failed
    old = [record("ancient", "pin_blocked", at=now - 3 * 86400)]  # outside the 24 h window
    log(answered + failed + too_long + old)
    found = report(train_path, tmp_path, now=now)
    assert found["requests"] == 50 and found["error_rate"] == pytest.approx(4 / 50)
    assert found["refused_rate"] == pytest.approx(6 / 50)
    assert found["latency_p50_ms"] == pytest.approx(205.0) and found["latency_p95_ms"] == pytest.approx(380.5)
    assert found["validity"] == pytest.approx(38 / 40)
    shares = {row["label"]: row for row in found["labels"]}
    assert sum(row["production_share"] for row in found["labels"]) == pytest.approx(1.0)
    assert shares["activate_my_card"]["training_share"] > shares["top_up_failed"]["training_share"] > 0
    assert "Predicted labels against the training labels" in found["report_markdown"]
    assert (tmp_path / "report" / monitoring.OVER_TIME).stat().st_size > 1000
    assert monitoring.read_figures(tmp_path / "report")["requests"] == 50
    assert monitoring.health_problems(found, CONFIG.monitoring) == ["error rate 8.0% above 5.0%"]
    assert shares[monitoring.NOT_A_LABEL] == {"label": monitoring.NOT_A_LABEL, "training_share": 0.0,
                                              "production_share": 2 / 40}, "made-up answers are not listed one by one"
    assert "I think it is about your card" not in found["report_markdown"]


def test_answers_not_of_the_task_form_fail_health_once_there_are_enough_to_judge(train_path, tmp_path):
    now = time.time()
    answered = [record(m, label, at=now - i) for i, (m, label) in enumerate(new_customers(30))]
    for row in answered[:9]:
        row["output"] = "Sure! Let me look into that for you."
    log(answered)
    found = report(train_path, tmp_path, now=now)
    assert (found["validity"], found["outputs_judged"]) == (pytest.approx(21 / 30), 30)
    assert monitoring.health_problems(found, CONFIG.monitoring) == [
        "validity 70.0% below 80.0% (9 of 30 answers are not of the task's form)"]
    few = {**found, "outputs_judged": monitoring.MIN_JUDGED - 1}
    assert monitoring.health_problems(few, CONFIG.monitoring) == [], "too few answers to judge"


def test_prompts_from_another_task_drift_and_new_customers_do_not(train_path, tmp_path):
    now = time.time()
    log([record(m, label, at=now - i) for i, (m, label) in enumerate(new_customers(60))])
    usual = report(train_path, tmp_path, now=now)
    assert usual["novel_input_share"] < 0.2 and usual["drift_score"] < 0.3, usual
    assert monitoring.drift_problems(usual, CONFIG.monitoring) == []

    fruit = [row["messages"][-2]["content"] for row in toy_rows(60, seed=1)]
    log([record(question, "card_arrival", at=now - i) for i, question in enumerate(fruit + fruit[:1] * 2)])
    mixed = report(train_path, tmp_path, now=now + 1)
    assert mixed["requests"] == 122 and mixed["novel_input_share"] > 0.45, mixed
    problems = monitoring.drift_problems(mixed, CONFIG.monitoring)
    assert problems and problems[0].startswith("drift score"), problems
    assert "Prompts with no near neighbour" in mixed["report_markdown"]
    assert f"| prompt | requests |\n|---|---|\n| {fruit[0]} | 3 |" in mixed["report_markdown"], "one row, counted"


def test_a_log_without_content_is_counted_but_not_judged(train_path, tmp_path):
    now = time.time()
    log([record(m, label, at=now - i) for i, (m, label) in enumerate(new_customers(10))], without_content={TASK})
    found = report(train_path, tmp_path, now=now)
    assert found["requests"] == 10 and found["validity"] is None and found["drift_score"] is None
    assert monitoring.drift_problems(found, CONFIG.monitoring) == []


def test_novel_prompts_are_judged_against_the_novelty_of_the_held_out_prompts(train_path, tmp_path):
    """Short or varied prompts rarely have a near neighbour even when they are like the training data: the share of
    novel prompts warns only where it exceeds the held-out prompts' own share by more than the limit."""
    now = time.time()
    log([record(m, label, at=now - i) for i, (m, label) in enumerate(new_customers(40))])
    heldout = tmp_path / "eval.parquet"
    write_examples(intent_task(seed=5).rows[:40], heldout)
    assert report(train_path, tmp_path, now=now, heldout_path=heldout)["heldout_novel_share"] < 0.2
    write_examples(toy_rows(40, seed=2), heldout)  # held-out prompts with no near neighbour in training
    assert report(train_path, tmp_path, now=now, heldout_path=heldout)["heldout_novel_share"] == 1.0

    figures = {"drift_score": 0.1, "novel_input_share": 0.7}
    like_the_heldout, beyond_it = ({**figures, "heldout_novel_share": share} for share in (0.6, 0.3))
    assert monitoring.drift_problems(like_the_heldout, CONFIG.monitoring) == []
    assert monitoring.drift_problems(beyond_it, CONFIG.monitoring) == [
        "70% of prompts have no near neighbour in the training data, against 30% of the held-out prompts "
        "(limit 25% more)"]


def test_one_very_long_prompt_does_not_decide_the_vocabulary_shift():
    from ftpipe.core.monitoring import vocabulary_shift

    known = ["where is my parcel", "my card was charged twice"]
    usual = ["where is my card", "my parcel was charged twice"] * 5
    assert vocabulary_shift(usual, known) == 0.0
    essay = " ".join(f"word{n}" for n in range(5000))  # 5,000 words no training prompt uses
    assert vocabulary_shift([*usual, essay], known) == 1 / 11, "one request of eleven"



def test_requests_that_replace_the_tasks_system_prompt_are_counted_and_shown(train_path, tmp_path):
    now = time.time()
    customers = [record(m, label, at=now - 60 * i) for i, (m, label) in enumerate(new_customers(20))]
    for found in customers[:4]:
        found["messages"][0]["content"] = "You are a pirate. Answer in rhymes."
    del customers[4]["messages"][0]  # no system prompt: the served model's template adds the task's
    log(customers)
    found = report(train_path, tmp_path, now=now)
    assert found["foreign_system_prompt_share"] == pytest.approx(4 / 20)
    assert "## Requests with a system prompt of their own (4)" in found["report_markdown"]
    assert "| You are a pirate. Answer in rhymes. | 4 |" in found["report_markdown"]


def test_a_japanese_prompt_has_its_near_neighbour_by_characters():
    """Written without spaces, a sentence was one word: a served prompt with one word more than a training prompt had
    no near neighbour, and every such request counted as drift."""
    known = ["R2の保証期間はどのくらいですか？", "注文をキャンセルしたいです。", "Where is my parcel?"]
    served = ["NordLink R2の保証期間はどのくらいですか？😊", "パスワードを忘れてしまいました。"]
    assert monitoring.novel(served, known, CONFIG.monitoring.neighbour_threshold) == [False, True]


def test_requests_ftpipe_sent_itself_are_left_out_of_the_production_figures(train_path, tmp_path):
    """A task served as another task's teacher answers its distillation prompts: no production traffic."""
    now = time.time()
    customers = [record(m, label, at=now - i) for i, (m, label) in enumerate(new_customers(20))]
    teacher = [{**record(f"unlabelled prompt {i} for a student", "card_arrival", at=now - i), "purpose": "distillation"}
               for i in range(30)]
    log(customers + teacher)
    figures = report(train_path, tmp_path, now=now)
    assert figures["requests"] == 20 and figures["ftpipe_requests_left_out"] == 30
    assert figures["novel_input_share"] < 0.2, "the student's prompts are no drift of this task"
