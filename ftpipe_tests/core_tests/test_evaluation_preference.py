"""Evaluation after preference tuning, on tiny models: preference accuracy (mean token log-probabilities of the
chosen and rejected answers), the final model's margin gain with its interval, the SFT model reported beside it, and
the gate's preference condition failing on a final model that lost what the SFT model preferred."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from ftpipe.config import EvaluationConfig
from ftpipe.core.evaluation import run_evaluation
from ftpipe.core.evaluation.card import card_evaluation
from ftpipe.core.evaluation.gate import gate_caveat
from ftpipe.core.evaluation.generation import conversation_logprobs, load_model
from ftpipe.core.evaluation.outputs import ModelOutputs
from ftpipe.core.evaluation.preference import (
    chosen_preferred, margin_words, mean_pair_logprobs, measure_preference, pair_conversations,
)
from ftpipe.core.preferences import write_preferences
from ftpipe_tests.tiny_model import COLORS, toy_rows, write_chat_parquet
from ftpipe_tests.trained_models import competent_base, lora_adapter, write_probe

EVAL_ROWS, PAIRS = 24, 30
CONFIG = EvaluationConfig(task_type="generation", max_new_tokens=6, batch_size=8, bootstrap_samples=500)
KEYS_WITHOUT_PREFERENCES = {  # metrics.json before preference tuning existed (with keys added since: the labels
    # without held-out rows, how many rows the base model ran, the answers' token limit against the references, the
    # labels the few-shot examples show, the training's warm start, the likely typos among the unheld labels, the
    # base answers in the task's form, the train rows, of all labels and of those without held-out rows, the
    # training's replay, each metric's change with its interval, a system prompt naming some labels only and the
    # few-shot examples' rows)
    "answer_token_limit", "likely_typos", "base_answers_in_form", "fewshot_labels", "trained_length", "warm_start",
    "trained_replay", "delta_intervals", "labels_past_max_rows", "unlisted_labels", "fewshot_rows",
    "references_over_limit", "longest_reference_tokens", "train_rows", "train_rows_of_unheld_labels",
    "base_cached", "base_rows_run", "base_loss", "base_perplexity", "base_score", "delta", "delta_ci_high", "delta_ci_low",
    "delta_vs_fewshot", "delta_vs_fewshot_ci_high", "delta_vs_fewshot_ci_low", "fewshot_examples",
    "fewshot_prompt_tokens", "fewshot_score", "finetuned_loss", "finetuned_perplexity", "finetuned_score",
    "forgetting", "forgetting_ci_high", "forgetting_ci_low", "judge_losses", "judge_pairs", "judge_ties",
    "judge_unclear_replies", "judge_win_rate", "judge_win_rate_ci_high", "judge_win_rate_ci_low", "judge_wins",
    "labels_without_heldout_rows", "metrics", "primary_metric", "probe_accuracy_by_skill", "probe_base_accuracy",
    "probe_base_loss", "probe_changes", "probe_finetuned_accuracy", "probe_finetuned_loss", "probe_rows", "prompt_tokens", "rows"}
SFT_KEYS = {"sft_score", "delta_vs_sft", "delta_vs_sft_ci_low", "delta_vs_sft_ci_high", "sft_loss", "sft_perplexity",
            "sft_forgetting", "sft_forgetting_ci_low", "sft_forgetting_ci_high", "probe_sft_accuracy",
            "probe_sft_loss"}
PREFERENCE_KEYS = {"preference_pairs", "preference_accuracy_base", "preference_accuracy_sft",
                   "preference_accuracy_final", "preference_baseline", "preference_delta", "preference_delta_ci_low",
                   "preference_delta_ci_high", "preference_margin_widened", "preference_margin_narrowed",
                   "preference_margin_gain", "preference_margin_gain_ci_low", "preference_margin_gain_ci_high",
                   "preference_margin_change_median"}


def color_pairs(count: int, seed: int) -> list[dict]:
    """Canonical paired preference rows on toy prompts: chosen is the fruit's color, rejected another color."""
    rng = random.Random(seed)
    pairs = []
    for row in toy_rows(count, seed=seed, source="pairs.jsonl"):
        chosen = row["messages"][-1]["content"]
        pairs.append({"id": row["id"], "prompt": row["messages"][:-1], "chosen": chosen,
                      "rejected": rng.choice(sorted(set(COLORS.values()) - {chosen})), "completion": None,
                      "label": None, "source": row["source"]})
    return pairs


def unpaired(pairs: list[dict]) -> list[dict]:
    """The same prompts as unpaired (KTO) rows: the chosen answer marked desirable."""
    return [{**pair, "chosen": None, "rejected": None, "completion": pair["chosen"], "label": True} for pair in pairs]


def swapped(pairs: list[dict]) -> list[dict]:
    return [{**pair, "chosen": pair["rejected"], "rejected": pair["chosen"]} for pair in pairs]


def query_identity_adapter(base_dir: Path, out: Path) -> Path:
    """An adapter on the attention queries only, with B = 0: the base model itself, through fewer modules than the
    all-linear adapters of `lora_adapter`."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(base_dir)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny random model as the base, a full fine-tune of it that knows the colors, identity adapters (the base
    itself) and a random one, held-out rows, preference pairs (paired and unpaired files) and the probe."""
    root = tmp_path_factory.mktemp("preference")
    (root / "base").symlink_to(tiny_model_dir)
    competent_base(tiny_model_dir, root / "competent")
    lora_adapter(tiny_model_dir, root / "identity", random_weights=False)
    lora_adapter(tiny_model_dir, root / "random", random_weights=True)
    query_identity_adapter(tiny_model_dir, root / "identity_queries")
    write_chat_parquet(root / "eval.parquet", toy_rows(EVAL_ROWS, seed=2))
    write_chat_parquet(root / "train.parquet", toy_rows(40, seed=7))
    write_preferences(color_pairs(PAIRS, seed=5) + unpaired(color_pairs(4, seed=6)), root / "pairs.parquet")
    write_preferences(unpaired(color_pairs(PAIRS, seed=5)), root / "unpaired.parquet")
    write_probe(root / "probe.jsonl")
    return root


def evaluate(root: Path, final: str, out: Path, *, sft: str | None, preferences: str | None,
             config: EvaluationConfig = CONFIG, cache: Path | None = None, log=lambda line: None) -> dict:
    return run_evaluation(
        base_model_dir=root / "base", base_fingerprint="base", adapter_dir=root / final, adapter_version=final,
        eval_path=root / "eval.parquet", eval_version="v1", train_path=root / "train.parquet",
        probe_path=root / "probe.jsonl", config=config, cache_dir=cache or out.parent / "cache", out_dir=out,
        log=log, sft_adapter_dir=root / sft if sft else None, sft_adapter_version=sft,
        preference_eval_path=root / preferences if preferences else None,
    )


# ---------------------------------------------------------------- scoring pairs


def direct_mean_logprob(model, tokenizer, prompt: list[dict], answer: str) -> float:
    """Mean log-probability of the tokens the chat template adds for `answer` after `prompt`, one forward pass."""
    import torch

    opening = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=False)
    start = len(tokenizer(opening, add_special_tokens=False)["input_ids"])
    ids = tokenizer(whole, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    return sum(logprobs[i - 1, ids[i]].item() for i in range(start, len(ids))) / (len(ids) - start)


def flat(pairs: list[tuple[float, float]]) -> list[float]:
    return [value for both in pairs for value in both]


def mean_logprobs(model, tokenizer, pairs: list[dict], batch_size: int) -> list[tuple[float, float]]:
    return mean_pair_logprobs(conversation_logprobs(model, tokenizer, pair_conversations(pairs), batch_size))


def preference_correct(model, tokenizer, pairs: list[dict], batch_size: int) -> list[float]:
    return chosen_preferred(conversation_logprobs(model, tokenizer, pair_conversations(pairs), batch_size))


def test_pairs_are_scored_by_the_mean_token_log_probability_of_each_answer(workspace):
    model, tokenizer = load_model(workspace / "base")
    pairs = color_pairs(8, seed=4)
    for i, pair in enumerate(pairs[:4]):  # answers of different lengths: a sum would favour the shorter one
        pair["rejected"] = " ".join([pair["rejected"]] * (i + 2))
    expected = [(direct_mean_logprob(model, tokenizer, p["prompt"], p["chosen"]),
                 direct_mean_logprob(model, tokenizer, p["prompt"], p["rejected"])) for p in pairs]
    found = flat(mean_logprobs(model, tokenizer, pairs, batch_size=4))
    assert found == pytest.approx(flat(expected), rel=1e-4)
    assert flat(mean_logprobs(model, tokenizer, pairs, batch_size=1)) == pytest.approx(found, rel=1e-5)
    assert preference_correct(model, tokenizer, pairs, batch_size=4) == [
        float(chosen > rejected) for chosen, rejected in expected]


def test_a_model_that_learned_the_answers_prefers_the_chosen_ones(workspace):
    model, tokenizer = load_model(workspace / "competent")
    pairs = color_pairs(PAIRS, seed=5)
    assert sum(preference_correct(model, tokenizer, pairs, batch_size=8)) >= 0.9 * PAIRS
    assert sum(preference_correct(model, tokenizer, swapped(pairs), batch_size=8)) <= 0.1 * PAIRS


def planted(**answers: list[tuple[float, int, float, int]] | None) -> dict[str, ModelOutputs]:
    """Each side's outputs with only its pairs' (chosen sum, tokens, rejected sum, tokens) log-probabilities."""
    return {side: ModelOutputs(ids=[], answers=[], prompt_tokens=0.0, preference_logprobs=values and [
        both for c, c_tokens, r, r_tokens in values for both in ((c, c_tokens), (r, r_tokens))])
        for side, values in answers.items()}


def outcomes(correct: list[float]) -> list[tuple[float, int, float, int]]:
    """Pairs whose chosen answer leads by 1 nat where `correct` says 1.0, and trails by 1 where it says 0.0."""
    return [(-1.0 if value else -2.0, 1, -1.0 if not value else -2.0, 1) for value in correct]


def test_the_gain_is_measured_against_the_sft_model_else_the_base():
    base, sft, final = [0.0] * 40 + [1.0] * 60, [0.0] * 20 + [1.0] * 80, [0.0] * 5 + [1.0] * 95
    base, sft, final = outcomes(base), outcomes(sft), outcomes(final)
    found = measure_preference(planted(base=base, sft=sft, finetuned=final), samples=1000, seed=0)
    assert (found["preference_pairs"], found["preference_baseline"]) == (100, "sft")
    assert (found["preference_accuracy_base"], found["preference_accuracy_sft"],
            found["preference_accuracy_final"]) == (0.6, 0.8, 0.95)
    assert found["preference_delta"] == pytest.approx(0.15)
    assert 0 < found["preference_delta_ci_low"] < 0.15 < found["preference_delta_ci_high"]
    assert (found["preference_margin_widened"], found["preference_margin_narrowed"]) == (15, 0)
    assert found["preference_margin_gain"] == pytest.approx(0.15)
    without_sft = measure_preference(planted(base=base, finetuned=final), samples=1000, seed=0)
    assert without_sft["preference_baseline"] == "base" and without_sft["preference_accuracy_sft"] is None
    assert without_sft["preference_delta"] == pytest.approx(0.35)
    assert measure_preference(planted(base=None, finetuned=None), samples=100, seed=0) == {}  # no pairs scored


def test_the_gate_reads_margins_which_move_where_verbose_rejected_answers_hold_the_accuracy_still():
    # 20 pairs: a 10-token chosen answer, a 40-token repetitive rejected one likelier per token under every model
    sft = [(-10.0, 10, -20.0, 40)] * 20
    final = [(-8.0, 10, -24.0, 40)] * 17 + [(-12.0, 10, -20.0, 40)] * 3  # margin 10 -> 16 on 17, 10 -> 8 on 3
    found = measure_preference(planted(base=sft, sft=sft, finetuned=final), samples=1000, seed=0)
    assert found["preference_accuracy_sft"] == found["preference_accuracy_final"] == 0.0
    assert found["preference_delta"] == found["preference_delta_ci_low"] == found["preference_delta_ci_high"] == 0.0
    assert (found["preference_margin_widened"], found["preference_margin_narrowed"]) == (17, 3)
    assert found["preference_margin_gain"] == pytest.approx(0.7) and found["preference_margin_gain_ci_low"] > 0.2

    nudged = [(c + 1e-5, ct, r, rt) for c, ct, r, rt in sft]  # the same model, scored in other batches
    unchanged = measure_preference(planted(base=sft, sft=sft, finetuned=nudged), samples=1000, seed=0)
    assert unchanged["preference_margin_gain"] == 0.0 and (unchanged["preference_margin_widened"],
                                                           unchanged["preference_margin_narrowed"]) == (0, 0)
    assert unchanged["preference_margin_gain_ci_low"] == pytest.approx(-unchanged["preference_margin_gain_ci_high"])
    assert unchanged["preference_margin_gain_ci_low"] < 0, "no pair moved: the gate's default threshold is not met"


def test_a_margin_gain_on_every_one_of_a_few_pairs_keeps_an_interval_that_a_bootstrap_would_shrink_to_a_point():
    sft = [(-10.0, 10, -12.0, 10)] * 12
    final = [(-9.99, 10, -12.5, 10)] * 12  # every pair's margin nudged wider, by 0.51 nats
    found = measure_preference(planted(base=sft, sft=sft, finetuned=final), samples=1000, seed=0)
    assert (found["preference_margin_widened"], found["preference_margin_gain"]) == (12, 1.0)
    assert found["preference_margin_gain_ci_high"] == pytest.approx(1.0)
    assert found["preference_margin_gain_ci_low"] == pytest.approx(0.515, abs=1e-3), "12 of 12: Wilson's 0.757 … 1"


# ---------------------------------------------------------------- whole runs


def test_a_final_model_that_lost_the_sft_models_preferences_fails_the_gate(workspace, tmp_path):
    import pandas as pd

    lost = evaluate(workspace, "identity", tmp_path / "lost", sft="competent", preferences="pairs.parquet")
    assert lost["preference_pairs"] == PAIRS and lost["preference_baseline"] == "sft"  # unpaired rows left out
    assert lost["preference_accuracy_sft"] >= 0.9
    assert lost["preference_accuracy_final"] == lost["preference_accuracy_base"] < 0.7  # identity: the base itself
    assert lost["preference_delta_ci_high"] < 0 and lost["passed"] is False
    assert lost["preference_margin_narrowed"] >= 0.9 * PAIRS and lost["preference_margin_gain_ci_high"] < -0.7
    assert (f"preference_margin_gain_ci_low {lost['preference_margin_gain_ci_low']:.3f} <= min_preference_gain 0.000 "
            f"(final vs sft: the chosen answer's margin over the rejected one widened on "
            f"{lost['preference_margin_widened']} and narrowed on {lost['preference_margin_narrowed']} of {PAIRS} "
            f"pairs, by a median {lost['preference_margin_change_median']:+.3g} nats)" in lost["failed_conditions"])
    assert lost["preference_margin_change_median"] < -1, "the SFT model's lead lost by whole nats"
    assert f"a pair's margin moved by a median {lost['preference_margin_change_median']:+.3g} nats" in (
        lost["report_markdown"])
    assert lost["sft_score"] >= 0.9 and lost["finetuned_score"] == lost["base_score"] < 0.1
    assert lost["delta_vs_sft_ci_high"] < 0 and lost["metrics"]["sft"]["exact_match"] >= 0.9
    assert lost["probe_sft_accuracy"] > lost["probe_finetuned_accuracy"] and lost["sft_forgetting"] == 0.0
    predictions = pd.read_parquet(tmp_path / "lost" / "predictions.parquet")
    assert {"sft_answer", "sft_rouge_l", "finetuned_answer", "delta"} <= set(predictions.columns)
    assert (predictions["sft_answer"] == predictions["reference"]).mean() >= 0.9

    report = lost["report_markdown"]
    assert "min_preference_gain 0)" in report.split("\n\n")[1]  # the verdict names the threshold
    section = report.split("## Preference tuning")[1]
    assert "| metric | base | SFT | final |" in section
    assert (f"| preference accuracy ({PAIRS} pairs) | {lost['preference_accuracy_base']:.3f} | "
            f"{lost['preference_accuracy_sft']:.3f} | {lost['preference_accuracy_final']:.3f} |") in section
    scores = (lost["base_score"], lost["sft_score"], lost["finetuned_score"])
    assert "| rouge_l | {:.3f} | {:.3f} | {:.3f} |".format(*scores) in section
    assert "| metric | base | few-shot | SFT | fine-tuned | fine-tuned − base (95% CI) |" in report
    card = card_evaluation(lost, CONFIG)
    assert f"Preference tuning:\n\n{section.split(chr(10) + '## ')[0].strip()}" in card, "the card shows the stage"
    assert f"narrowed it on {lost['preference_margin_narrowed']}:" in card

    lenient = CONFIG.model_copy(update={"min_preference_gain": -2.0, "min_improvement": -2.0})
    reread = evaluate(workspace, "identity", tmp_path / "lost", sft="competent", preferences="pairs.parquet",
                      config=lenient)
    assert reread["reused"] is True and reread["passed"] is True  # a gate threshold re-decides without re-scoring


def test_a_final_model_that_gained_preferences_passes_and_the_base_scores_come_from_the_cache(workspace, tmp_path):
    cache = tmp_path / "cache"
    first = evaluate(workspace, "identity", tmp_path / "first", sft="competent", preferences="pairs.parquet",
                     cache=cache)
    gained = evaluate(workspace, "competent", tmp_path / "gained", sft="identity", preferences="pairs.parquet",
                      cache=cache)
    assert gained["base_cached"] and gained["preference_accuracy_base"] == first["preference_accuracy_base"]
    assert gained["preference_accuracy_sft"] == gained["preference_accuracy_base"]
    assert gained["preference_accuracy_final"] == first["preference_accuracy_sft"]
    assert gained["preference_delta_ci_low"] > 0 and gained["delta_ci_low"] > 0
    assert gained["preference_margin_widened"] >= 0.9 * PAIRS and gained["preference_margin_gain_ci_low"] > 0.7
    assert gained["passed"] is True and gained["failed_conditions"] == []
    strict = CONFIG.model_copy(update={"min_preference_gain": 1.0})
    again = evaluate(workspace, "competent", tmp_path / "gained", sft="identity", preferences="pairs.parquet",
                     config=strict, cache=cache)
    assert again["reused"] and again["failed_conditions"] == [
        f"preference_margin_gain_ci_low {gained['preference_margin_gain_ci_low']:.3f} <= min_preference_gain 1.000 "
        f"({margin_words(gained)})"]


def test_without_preference_pairs_the_measurements_are_those_of_before(workspace, tmp_path):
    plain = evaluate(workspace, "random", tmp_path / "plain", sft=None, preferences="missing.parquet")
    assert set(json.loads((tmp_path / "plain" / "metrics.json").read_text())) == KEYS_WITHOUT_PREFERENCES
    assert set(plain["metrics"]) == {"base", "fewshot", "finetuned"}
    assert "## Preference tuning" not in plain["report_markdown"]
    assert "min_preference_gain" not in plain["report_markdown"]

    # a preference stage on unpaired rows only (kto): the SFT model is reported, no preference accuracy
    kto = evaluate(workspace, "identity_queries", tmp_path / "kto", sft="random", preferences="unpaired.parquet")
    assert set(json.loads((tmp_path / "kto" / "metrics.json").read_text())) == KEYS_WITHOUT_PREFERENCES | SFT_KEYS
    assert kto["sft_score"] == plain["finetuned_score"] and kto["sft_loss"] == pytest.approx(plain["finetuned_loss"])
    assert kto["finetuned_loss"] == pytest.approx(kto["base_loss"])  # applied to the bare base, not the SFT model
    assert "preference accuracy" not in kto["report_markdown"].split("## Preference tuning")[1]
    unchecked = "no held-out preference pair (a chosen and a rejected answer) checked what the preference stage changed"
    assert unchecked in gate_caveat(kto, CONFIG), "a pass says the preference stage went unchecked"

    paired = evaluate(workspace, "competent", tmp_path / "paired", sft=None, preferences="pairs.parquet")
    assert set(json.loads((tmp_path / "paired" / "metrics.json").read_text())) == (
        KEYS_WITHOUT_PREFERENCES | PREFERENCE_KEYS)
    assert paired["preference_baseline"] == "base" and paired["preference_accuracy_sft"] is None
    assert "| metric | base | final |" in paired["report_markdown"]
    assert not any(unchecked in (gate_caveat(found, CONFIG) or "") for found in (plain, paired)), "pairs or no stage"


def test_a_new_final_model_is_evaluated_alone_beside_its_unchanged_sft_model(workspace, tmp_path):
    cache = tmp_path / "cache"
    first = evaluate(workspace, "random", tmp_path / "one", sft="identity", preferences="pairs.parquet", cache=cache)
    lines: list[str] = []
    second = evaluate(workspace, "identity_queries", tmp_path / "two", sft="identity", preferences="pairs.parquet",
                      cache=cache, log=lines.append)
    assert any(line.startswith("fine-tuned: ") for line in lines), "the new final model is evaluated"
    assert not any(line.startswith(("SFT: ", "base: ")) for line in lines), "the SFT and base outputs are cached"
    assert (second["sft_score"], second["preference_accuracy_sft"]) == (first["sft_score"],
                                                                         first["preference_accuracy_sft"])
    assert second["finetuned_score"] == second["sft_score"], "both are the base model itself (B = 0)"
