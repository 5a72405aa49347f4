"""Statistics and decisions of an evaluation, on planted numbers (no model): paired bootstrap, forgetting with its
interval and changed probe rows, the gate, the reuse key, and the choice of few-shot examples."""

from __future__ import annotations

import pytest

from ftpipe.config import EvaluationConfig
from ftpipe.core.evaluation import decide_gate, evaluation_key, waiting_for_reviews
from ftpipe.core.evaluation.fewshot import choose_examples, fewshot_prompt
from ftpipe.core.evaluation.forgetting import forgetting_score, measure_forgetting, most_forgotten
from ftpipe.core.evaluation.outputs import ModelOutputs
from ftpipe.core.evaluation.statistics import chance_of_at_least, paired_bootstrap, pairwise_summary, ratio_bootstrap
from ftpipe_tests.rows import row

# ---------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_true_delta_and_is_seeded():
    import numpy as np

    rng = np.random.default_rng(1)
    base = rng.normal(0.5, 0.2, 400)
    tuned = base + 0.05 + rng.normal(0, 0.1, 400)  # true delta 0.05
    delta, low, high = paired_bootstrap(base, tuned, samples=2000, seed=3)
    assert low < 0.05 < high and low < delta < high
    assert high - low < 0.05
    assert paired_bootstrap(base, tuned, samples=2000, seed=3) == (delta, low, high)
    assert paired_bootstrap(base, tuned, samples=2000, seed=4) != (delta, low, high)


def test_bootstrap_excludes_zero_for_a_clear_gain_and_not_for_noise():
    base = [0.0] * 50 + [1.0] * 50
    clear = [1.0] * 90 + [0.0] * 10
    assert paired_bootstrap(base, clear, samples=1000, seed=0)[1] > 0
    noise = [1.0] * 50 + [0.0] * 50  # same mean, every row flipped
    _, low, high = paired_bootstrap(base, noise, samples=1000, seed=0)
    assert low < 0 < high


def test_a_student_to_teacher_ratio_has_an_interval_though_some_resamples_miss_every_row_the_teacher_got_right():
    teacher = [1.0] * 3 + [0.0] * 40  # right on 3 of 43 rows: some resamples hold none of them
    student = [1.0, 0.0, 1.0] + [0.0] * 40
    ratio, low, high = ratio_bootstrap(teacher, student, samples=2000, seed=0)
    assert ratio == pytest.approx(2 / 3) and 0 <= low < ratio < high, (low, high)


# ---------------------------------------------------------------- forgetting


def test_the_chance_of_a_count_as_high_is_the_binomial_tail_even_for_many_trials():
    assert chance_of_at_least(2, 3, 0.5) == pytest.approx(0.5) and chance_of_at_least(1, 2, 0.1) == pytest.approx(0.19)
    assert chance_of_at_least(0, 5, 0.1) == 1.0 and chance_of_at_least(1, 5, 0.0) == 0.0
    assert 0 < chance_of_at_least(22_000, 100_000, 0.2) < 1e-40, "no overflow or underflow to a wrong answer"
    assert chance_of_at_least(19_800, 100_000, 0.2) > 0.9


def test_forgetting_is_the_larger_relative_worsening_floored_at_zero():
    assert forgetting_score(0.8, 0.6, 2.0, 2.1) == pytest.approx(0.25)  # accuracy drop dominates
    assert forgetting_score(0.8, 0.8, 2.0, 3.0) == pytest.approx(0.5)  # loss increase dominates
    assert forgetting_score(0.5, 0.9, 2.0, 1.0) == 0.0  # better on both
    assert forgetting_score(0.0, 0.0, 1.0, 1.0) == 0.0


def planted_probe(size: int, base_right: int, tuned_right: int) -> tuple[list[dict], ModelOutputs, ModelOutputs]:
    """A probe of `size` rows answered right by the base on the first `base_right`, by the fine-tuned model on the
    first `tuned_right`; both models have the same reference loss on every row."""
    probe = [{"id": f"p{i:03d}", "skill": "facts", "reference": "yes",
              "messages": [{"role": "system", "content": "Shared."}, {"role": "user", "content": f"Question {i}?"}]}
             for i in range(size)]

    def outputs(right: int) -> ModelOutputs:
        return ModelOutputs(ids=[], answers=[], prompt_tokens=0.0, probe_logprobs=[-2.0] * size,
                            probe_tokens=[2] * size, probe_answers=["yes" if i < right else "no" for i in range(size)])

    return probe, outputs(base_right), outputs(tuned_right)


def test_forgetting_comes_with_an_interval_that_narrows_with_more_probe_rows():
    small = measure_forgetting(*planted_probe(20, base_right=16, tuned_right=14), samples=2000, seed=0)
    large = measure_forgetting(*planted_probe(400, base_right=320, tuned_right=280), samples=2000, seed=0)
    for found in (small, large):
        assert found["forgetting"] == pytest.approx(0.125)  # 0.8 -> 0.7
        assert found["forgetting_ci_low"] <= found["forgetting"] <= found["forgetting_ci_high"]
    assert small["forgetting_ci_low"] == 0.0  # 2 rows of 20: no evidence
    assert large["forgetting_ci_low"] > 0.05
    small_width, large_width = (found["forgetting_ci_high"] - found["forgetting_ci_low"] for found in (small, large))
    assert large_width < small_width


def test_changed_probe_rows_are_listed_lost_first_with_the_users_message():
    probe, base, tuned = planted_probe(6, base_right=4, tuned_right=2)
    tuned.probe_answers[5] = "yes"  # gained one
    changes = measure_forgetting(probe, base, tuned, samples=200, seed=0)["probe_changes"]
    assert [(c["id"], c["change"]) for c in changes] == [("p002", "lost"), ("p003", "lost"), ("p005", "gained")]
    assert changes[0] == {"id": "p002", "skill": "facts", "message": "Question 2?", "reference": "yes",
                          "base_answer": "yes", "finetuned_answer": "no", "change": "lost"}


def test_a_skill_forgotten_behind_a_gain_in_another_fails_the_gate_by_name():
    """The fine-tuned model learnt to follow instructions and lost a third of its facts: the whole probe's accuracy
    even rose, so only the skill's own forgetting shows the loss."""
    facts, base, tuned = planted_probe(64, base_right=43, tuned_right=29)
    instruction, base_more, tuned_more = planted_probe(64, base_right=2, tuned_right=19)
    for row in instruction:
        row.update(id=row["id"].replace("p", "i"), skill="instruction")
    for side, more in ((base, base_more), (tuned, tuned_more)):
        for name in ("probe_logprobs", "probe_tokens", "probe_answers"):
            getattr(side, name).extend(getattr(more, name))
    found = measure_forgetting(facts + instruction, base, tuned, samples=2000, seed=0)
    assert found["forgetting"] == 0.0 and found["forgetting_ci_low"] == 0.0
    skills = found["probe_accuracy_by_skill"]
    assert skills["facts"]["forgetting"] == pytest.approx(14 / 43) and skills["facts"]["forgetting_ci_low"] > 0.1
    assert skills["instruction"]["forgetting"] == 0.0 == skills["instruction"]["forgetting_ci_high"]
    passed, failed = decide_gate(measured(**found), EvaluationConfig(max_forgetting=0.1))
    assert not passed and failed[0].startswith(
        "forgetting of the probe's facts skill 0.326 (95% CI 0.") and failed[0].endswith(
        "CI low > max_forgetting 0.100 (its accuracy 0.672 -> 0.453, over 64 rows; the whole probe's forgetting 0.000); "
        "to forget less: a lower training.learning_rate, fewer training.epochs (or training.max_steps) or more "
        "training.replay")
    unreplayed = decide_gate({**measured(**found), "trained_replay": 0.0}, EvaluationConfig(max_forgetting=0.1))[1]
    assert unreplayed[0].endswith("to forget less: training.replay (none in this training; 0.2 mixes the base model's "
                                  "own answers to general prompts into a fifth of the train rows), a lower "
                                  "training.learning_rate or fewer training.epochs (or training.max_steps)")
    assert most_forgotten(skills).startswith("facts 0.326 (95% CI 0.") and most_forgotten(skills).endswith(", 64 rows)")
    assert most_forgotten({"facts": skills["instruction"], "instruction": skills["instruction"]}) == "none", "no loss"
    assert most_forgotten({"facts": skills["facts"]}) == "none", "one skill: the whole probe's figure says it"


def test_no_probe_means_no_forgetting():
    found = measure_forgetting([], None, None, samples=200, seed=0)
    assert (found["forgetting"], found["forgetting_ci_low"], found["probe_rows"]) == (0.0, 0.0, 0)


# ---------------------------------------------------------------- the gate


def measured(**values) -> dict:
    metrics = {"primary_metric": "accuracy", "base_score": 0.2, "finetuned_score": 0.8, "delta_ci_low": 0.4,
               "forgetting": 0.3, "forgetting_ci_low": 0.05, "forgetting_ci_high": 0.5, "probe_base_accuracy": 0.9,
               "probe_finetuned_accuracy": 0.63, "probe_base_loss": 1.0, "probe_finetuned_loss": 1.1,
               "fewshot_score": 0.7, "delta_vs_fewshot_ci_low": -0.05, "probe_accuracy_by_skill": {}}
    return {**metrics, **values}


def test_forgetting_fails_the_gate_only_when_its_interval_is_above_the_threshold():
    config = EvaluationConfig(max_forgetting=0.1)
    assert decide_gate(measured(), config) == (True, [])  # point estimate 0.3 > 0.1, but the CI low is 0.05
    passed, failed = decide_gate(measured(forgetting_ci_low=0.15), config)
    assert not passed and failed == [
        "forgetting 0.300 (95% CI 0.150 … 0.500): CI low > max_forgetting 0.100 "
        "(probe accuracy 0.900 -> 0.630, probe loss 1.000 -> 1.100); to forget less: a lower training.learning_rate, "
        "fewer training.epochs (or training.max_steps) or more training.replay"]


def test_the_gate_follows_the_thresholds_it_is_given():
    metrics = measured(delta_ci_low=0.1)
    assert decide_gate(metrics, EvaluationConfig(min_improvement=0.05))[0] is True
    passed, failed = decide_gate(metrics, EvaluationConfig(min_improvement=0.2))
    assert not passed and failed[0].startswith("delta_ci_low 0.100 <= min_improvement 0.200 (accuracy 0.200 -> 0.800)")


def test_an_extraction_that_fails_on_whole_objects_but_gets_more_fields_right_is_told_the_finer_metric():
    fields = {"base": {"exact_match": 0.0, "field_accuracy": 0.05}, "finetuned": {"exact_match": 0.024,
                                                                                  "field_accuracy": 0.595}}
    metrics = measured(primary_metric="exact_match", base_score=0.0, finetuned_score=0.024, delta_ci_low=-0.01,
                       metrics=fields)
    passed, failed = decide_gate(metrics, EvaluationConfig())
    assert not passed and failed[0] == (
        "delta_ci_low -0.010 <= min_improvement 0.000 (exact_match 0.000 -> 0.024); its field_accuracy rose 0.050 -> "
        "0.595: evaluation.extraction_metric: field_accuracy judges the share of fields right instead, finer on few "
        "rows or objects of many fields")
    fields["finetuned"]["field_accuracy"] = 0.05
    assert decide_gate(metrics, EvaluationConfig())[1][0].endswith("(exact_match 0.000 -> 0.024)"), "no gain to judge"


def test_a_model_that_only_ties_the_base_does_not_pass_the_default_gate():
    tie = measured(base_score=0.0, finetuned_score=0.0, delta_ci_low=0.0)  # e.g. one held-out row, both wrong
    passed, failed = decide_gate(tie, EvaluationConfig())
    assert not passed and failed == ["delta_ci_low 0.000 <= min_improvement 0.000 (accuracy 0.000 -> 0.000)"]
    assert decide_gate(measured(delta_ci_low=0.01), EvaluationConfig()) == (True, [])


def test_the_gate_can_require_beating_few_shot():
    strict = EvaluationConfig(require_beats_fewshot=True)
    passed, failed = decide_gate(measured(), strict)
    assert not passed and failed[0].startswith("delta_vs_fewshot_ci_low -0.050 <= min_improvement 0.000")
    assert decide_gate(measured(delta_vs_fewshot_ci_low=0.02), strict) == (True, [])
    assert "no few-shot baseline" in decide_gate(measured(fewshot_score=None), strict)[1][0]


def test_the_gate_can_require_beating_the_most_common_label():
    from ftpipe.core.evaluation.gate import gate_caveat
    from ftpipe.core.evaluation.report import verdict

    strict = EvaluationConfig(require_beats_majority=True)
    below = measured(majority_score=0.82, delta_vs_majority_ci_low=-0.08, delta_vs_majority_ci_high=0.04)
    assert decide_gate(below, EvaluationConfig()) == (True, []), "not shown to be worse: no caveat, a pass"
    assert gate_caveat(below, EvaluationConfig()) is None
    assert decide_gate(below, strict) == (False, [
        "delta_vs_majority_ci_low -0.080 <= min_improvement 0.000 (accuracy most common label 0.820 -> fine-tuned "
        "0.800)"])
    assert decide_gate(measured(majority_score=0.5, delta_vs_majority_ci_low=0.1), strict) == (True, [])
    assert decide_gate(measured(), strict)[1] == [
        "require_beats_majority, but no most-common-label baseline was measured (not a classification, or no labelled "
        "train rows)"]
    assert "must beat the most common label" in verdict(False, [], strict)
    worse = {**below, "delta_vs_majority_ci_high": -0.01}
    assert gate_caveat(worse, strict) is None, "the gate judges it then"


def test_a_pass_says_when_few_shot_prompting_scores_higher_and_beating_it_is_not_required():
    from ftpipe.core.evaluation.gate import gate_caveat
    from ftpipe.core.evaluation.report import verdict

    behind = measured(fewshot_score=0.85, delta_vs_fewshot_ci_high=-0.02)
    caveat = gate_caveat(behind, EvaluationConfig())
    assert caveat == ("few-shot prompting of the base model scores higher (0.850 against 0.800, the gain over it has "
                      "a 95% CI high of -0.020); evaluation.require_beats_fewshot: true holds such a model back")
    assert verdict(True, [], EvaluationConfig(), caveat=caveat).endswith(f". **But {caveat}.**")
    assert gate_caveat(measured(delta_vs_fewshot_ci_high=0.01), EvaluationConfig()) is None, "not shown to be worse"
    assert gate_caveat(behind, EvaluationConfig(require_beats_fewshot=True)) is None, "the gate judges it then"


def test_a_pass_says_when_answering_the_most_common_label_every_time_scores_higher():
    from ftpipe.core.evaluation.gate import gate_caveat

    skewed = measured(majority_score=0.9, delta_vs_majority_ci_high=-0.03)  # a label of 9 rows in 10
    assert gate_caveat(skewed, EvaluationConfig()) == (
        "answering every row with the train rows' most common label scores higher (0.900 against 0.800, the gain "
        "over it has a 95% CI high of -0.030): the model tells the labels apart worse than no model; "
        "evaluation.require_beats_majority: true holds such a model back")
    assert gate_caveat(measured(majority_score=0.9, delta_vs_majority_ci_high=0.02), EvaluationConfig()) is None


def test_the_gate_requires_a_preference_gain_only_when_preference_pairs_were_evaluated():
    pairs = {"preference_pairs": 20, "preference_baseline": "sft", "preference_margin_widened": 0,
             "preference_margin_narrowed": 0, "preference_margin_gain_ci_low": 0.0, "preference_delta_ci_low": 0.1}
    assert decide_gate(measured(), EvaluationConfig(min_preference_gain=0.5)) == (True, [])  # no pairs: as before
    passed, failed = decide_gate(measured(**pairs), EvaluationConfig())  # an unchanged model, whatever its accuracy
    assert not passed and failed == [
        "preference_margin_gain_ci_low 0.000 <= min_preference_gain 0.000 (final vs sft: the chosen answer's margin "
        "over the rejected one widened on 0 and narrowed on 0 of 20 pairs)"]
    assert decide_gate(measured(**pairs), EvaluationConfig(min_preference_gain=-0.2)) == (True, [])
    versus_base = {**pairs, "preference_baseline": "base", "preference_margin_widened": 7,
                   "preference_margin_narrowed": 9, "preference_margin_gain_ci_low": -0.4}
    assert "(final vs base: the chosen answer's margin over the rejected one widened on 7 and narrowed on 9 of 20 " \
           "pairs)" in decide_gate(measured(**versus_base), EvaluationConfig())[1][0]


def test_the_review_gate_waits_for_human_verdicts_apart_from_the_metric_gate():
    config = EvaluationConfig(task_type="generation", require_human_review=3)
    assert waiting_for_reviews(0, config) == "waiting for 3 human verdicts (have 0)"
    assert waiting_for_reviews(2, config) == "waiting for 3 human verdicts (have 2)"
    assert waiting_for_reviews(3, config) is None and waiting_for_reviews(0, EvaluationConfig()) is None
    assert decide_gate(measured(), config) == (True, [])  # verdicts come later: the metric gate does not wait


def test_win_rate_counts_a_tie_half_with_a_score_interval_that_keeps_its_width_on_one_sided_verdicts():
    outcomes = ["win"] * 30 + ["tie"] * 10 + ["loss"] * 10
    found = pairwise_summary("human", outcomes)
    assert (found["human_wins"], found["human_ties"], found["human_losses"]) == (30, 10, 10)
    assert found["human_win_rate"] == pytest.approx(0.7)
    assert 0.5 < found["human_win_rate_ci_low"] < 0.7 < found["human_win_rate_ci_high"] < 0.85
    swept = pairwise_summary("human", ["win"] * 10)  # ten verdicts cannot make a win rate of 1 certain
    assert swept["human_win_rate"] == 1.0 and swept["human_win_rate_ci_high"] == pytest.approx(1.0)
    assert swept["human_win_rate_ci_low"] == pytest.approx(0.722, abs=1e-3)  # Wilson's 10 / (10 + 1.96²)
    ties = pairwise_summary("judge", ["tie"] * 8)
    assert ties["judge_win_rate_ci_low"] < 0.5 < ties["judge_win_rate_ci_high"]
    assert ties["judge_win_rate_ci_low"] + ties["judge_win_rate_ci_high"] == pytest.approx(1.0)
    empty = pairwise_summary("judge", [])
    assert empty["judge_wins"] == 0 and empty["judge_win_rate"] is None and empty["judge_win_rate_ci_low"] is None


# ---------------------------------------------------------------- the reuse key


def test_the_evaluation_key_ignores_gate_thresholds_but_not_what_changes_outputs():
    inputs = {"base_fingerprint": "b", "adapter_version": "a", "eval_version": "e", "train_version": "t",
              "probe_hash": "p", "probe_rows": 40, "sft_adapter_version": "s", "preference_version": "v"}
    key = evaluation_key(**inputs, config=EvaluationConfig())
    gate = EvaluationConfig(min_improvement=0.3, max_forgetting=0.5, require_beats_fewshot=True, require_human_review=5,
                            min_preference_gain=0.1)
    assert evaluation_key(**inputs, config=gate) == key
    assert evaluation_key(**inputs, config=EvaluationConfig(max_new_tokens=7)) != key
    assert evaluation_key(**inputs, config=EvaluationConfig(fewshot_k=2)) != key
    assert evaluation_key(**inputs, config=EvaluationConfig(answer_pattern="#### (\\S+)")) != key
    assert evaluation_key(**inputs, config=EvaluationConfig(bootstrap_samples=500)) != key
    for name in inputs:
        assert evaluation_key(**{**inputs, name: "other"}, config=EvaluationConfig()) != key, name


# ---------------------------------------------------------------- few-shot examples


def labelled(label: str, index: int) -> dict:
    return row(f"Ticket {index}", f'{{"label": "{label}"}}', system="Classify.")


def test_fewshot_examples_are_reproducible_cover_the_labels_and_never_held_out_rows():
    train = [labelled("a", i) for i in range(20)] + [labelled("b", i) for i in range(20, 24)] + [labelled("c", 99)]
    held_out = {train[-1]["id"], train[0]["id"]}
    label_of = lambda example: example["messages"][-1]["content"]  # noqa: E731
    picked = choose_examples(train, 5, held_out, group=label_of)
    assert len(picked) == 5 and not {p["id"] for p in picked} & held_out
    assert {label_of(p) for p in picked} == {'{"label": "a"}', '{"label": "b"}'}  # c only in a held-out row
    assert choose_examples(list(reversed(train)), 5, held_out, group=label_of) == picked
    assert choose_examples(train[:2], 5, set(), group=label_of) == choose_examples(train[:2], 2, set(), label_of)


def test_fewshot_prompt_puts_the_examples_between_system_prompt_and_question():
    examples = [labelled("a", 1), labelled("b", 2)]
    prompt = labelled("c", 3)["messages"][:-1]
    assert [(m["role"], m["content"]) for m in fewshot_prompt(prompt, examples)] == [
        ("system", "Classify."), ("user", "Ticket 1"), ("assistant", '{"label": "a"}'),
        ("user", "Ticket 2"), ("assistant", '{"label": "b"}'), ("user", "Ticket 3")]
