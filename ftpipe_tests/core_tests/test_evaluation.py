"""Evaluation: metrics, bootstrap, forgetting, batched generation and scoring on a tiny model, and the whole
run (eval gate, base-output cache, written files, MLflow logging)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ftpipe.config import EvaluationConfig
from ftpipe.core import evaluation as ev
from ftpipe_tests.tiny_model import COLORS, build_tiny_model, toy_rows, write_chat_parquet

EVAL_ROWS = 24


# ---------------------------------------------------------------- helpers shared with test_merging


def fit(model, tokenizer, rows: list[dict], *, steps: int, lr: float) -> None:
    """AdamW steps on the loss of the assistant answers of `rows` (one full batch), in place."""
    import torch

    scored = [ev._scored_tokens(tokenizer, row["messages"]) for row in rows]
    ids, mask = ev._pad([seq for seq, _ in scored], tokenizer.pad_token_id, left=False)
    labels = ids.masked_fill(mask == 0, ev.IGNORE)
    for row, (_, prompt_len) in enumerate(scored):
        labels[row, :prompt_len] = ev.IGNORE
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def load(path: Path):
    from ftpipe.core.modeling import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(path, method="lora")
    return model.eval(), tokenizer


def lora_adapter(base_dir: Path, out: Path, *, random_weights: bool, train_rows: list[dict] | None = None) -> Path:
    """A LoRA adapter on `base_dir`: identity (B = 0), random A and B, or trained on `train_rows`."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load(base_dir)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=not random_weights,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    if train_rows:
        fit(peft_model, tokenizer, train_rows, steps=80, lr=2e-2)
    peft_model.save_pretrained(out)
    return out


def competent_base(out: Path) -> Path:
    """The tiny model fully trained to name the fruit colors (a base model worth regressing from)."""
    model, tokenizer = load(build_tiny_model(out))
    fit(model, tokenizer, toy_rows(32, seed=1), steps=80, lr=2e-2)
    model.save_pretrained(out)
    return out


def noisy_base(out: Path) -> Path:
    """The tiny random model with weights shaken up: varied text instead of one repeated token, and activations
    large enough for a LoRA adapter on its linear layers to learn the colors."""
    import torch

    model, _ = load(build_tiny_model(out))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    model.save_pretrained(out)
    return out


def write_probe(path: Path) -> Path:
    rows = [{"id": f"p{i}", "skill": "colors", "reference": color,
             "messages": [{"role": "system", "content": "Answer with one word."},
                          {"role": "user", "content": f"What color is the {fruit}? ({90 + i})"}]}
            for i, (fruit, color) in enumerate(sorted(COLORS.items()))]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ---------------------------------------------------------------- parsing and metrics


@pytest.mark.parametrize(("text", "field", "label"), [
    ('{"label": "Billing"}', "label", "billing"),
    ('Sure! Here it is: {"label": "Bug-Report", "x": {"y": 1}} hope that helps', "label", "bugreport"),
    ('{"other": "a"} then {"label": "b"}', "label", None),  # the first {...} decides
    ("not json at all", "label", None),
    ('{"label": "billing"', "label", None),
    ("  Red. ", None, "red"),
    ("...", None, None),
])
def test_parse_label(text, field, label):
    assert ev.parse_label(text, field) == label


def test_classification_accuracy_macro_f1_and_unparseable_counts_wrong():
    references = ['{"label": "a"}', '{"label": "a"}', '{"label": "b"}', '{"label": "b"}']
    answers = ['{"label": "a"}', "I think a", '{"label": "b"}', '{"label": "a"}']
    scores = ev.task_scores(EvaluationConfig(task_type="classification", label_field="label"), answers, references)
    assert scores["rows"]["accuracy"] == [1.0, 0.0, 1.0, 0.0]
    assert scores["summary"]["accuracy"] == 0.5
    # a: tp 1, fp 1, fn 1 -> 0.5; b: tp 1, fp 0, fn 1 -> 2/3
    assert scores["summary"]["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert scores["labels"]["predicted"] == ["a", None, "b", "a"]


def test_confusion_table_counts_reference_by_prediction():
    table = ev.confusion_table(["a", "a", "b", "b", "b"], ["a", None, "b", "zzz", "a"])
    lines = table.splitlines()
    assert lines[0] == "| reference / predicted | a | b | (other) | (unparseable) |"
    assert lines[2] == "| a | 1 | 0 | 0 | 1 |"
    assert lines[3] == "| b | 1 | 1 | 1 | 0 |"


def test_extraction_metrics():
    references = ['{"name": "Ann", "age": 3}', '{"name": "Bob", "age": 4}', '{"name": "Cy", "age": 5}']
    answers = ['Result: {"name": "Ann", "age": 3}.', '{"name": "Bob", "age": 40}', "no json here"]
    scores = ev.task_scores(EvaluationConfig(task_type="extraction"), answers, references)
    assert scores["rows"]["json_valid"] == [1.0, 1.0, 0.0]
    assert scores["rows"]["exact_match"] == [1.0, 0.0, 0.0]
    assert scores["rows"]["field_accuracy"] == [1.0, 0.5, 0.0]
    assert scores["summary"]["field_accuracy_by_field"] == {"age": pytest.approx(1 / 3), "name": pytest.approx(2 / 3)}


def test_generation_metrics():
    references = ["The apple is red.", "The lime is green", "Grüße aus Köln"]
    answers = ["the apple is red", "a lime is very green", "Grüße aus Bonn"]
    scores = ev.task_scores(EvaluationConfig(task_type="generation"), answers, references)["rows"]
    assert scores["exact_match"] == [1.0, 0.0, 0.0]
    assert scores["rouge_l"][0] == pytest.approx(1.0)
    # lcs "lime is green" = 3; P 3/5, R 3/4 -> F 2/3; token F1: overlap 3 -> 6/9
    assert scores["rouge_l"][1] == pytest.approx(2 / 3)
    assert scores["token_f1"][1] == pytest.approx(2 / 3)
    assert scores["rouge_l"][2] == pytest.approx(2 / 3)  # non-ASCII words are words too


def test_check_references_refuses_unreadable_references_before_generation():
    rows = [{"id": "r1", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "plain"}]}]
    with pytest.raises(ValueError, match="not a JSON object.*r1"):
        ev.check_references(rows, EvaluationConfig(task_type="extraction"))
    ev.check_references(rows, EvaluationConfig(task_type="generation"))


def test_select_rows_takes_first_n_by_id():
    rows = [{"id": i} for i in ("c", "a", "d", "b")]
    assert [r["id"] for r in ev.select_rows(rows, 2)] == ["a", "b"]
    assert len(ev.select_rows(rows, None)) == 4


# ---------------------------------------------------------------- bootstrap and forgetting


def test_bootstrap_ci_contains_true_delta_and_is_seeded():
    import numpy as np

    rng = np.random.default_rng(1)
    base = rng.normal(0.5, 0.2, 400)
    tuned = base + 0.05 + rng.normal(0, 0.1, 400)  # true delta 0.05
    delta, low, high = ev.paired_bootstrap(base, tuned, samples=2000, seed=3)
    assert low < 0.05 < high and low < delta < high
    assert high - low < 0.05
    assert ev.paired_bootstrap(base, tuned, samples=2000, seed=3) == (delta, low, high)
    assert ev.paired_bootstrap(base, tuned, samples=2000, seed=4) != (delta, low, high)


def test_bootstrap_excludes_zero_for_a_clear_gain_and_not_for_noise():
    base = [0.0] * 50 + [1.0] * 50
    clear = [1.0] * 90 + [0.0] * 10
    assert ev.paired_bootstrap(base, clear, samples=1000, seed=0)[1] > 0
    noise = [1.0] * 50 + [0.0] * 50  # same mean, every row flipped
    _, low, high = ev.paired_bootstrap(base, noise, samples=1000, seed=0)
    assert low < 0 < high


def test_forgetting_is_the_larger_relative_worsening_floored_at_zero():
    assert ev.forgetting_score(0.8, 0.6, 2.0, 2.1) == pytest.approx(0.25)  # accuracy drop dominates
    assert ev.forgetting_score(0.8, 0.8, 2.0, 3.0) == pytest.approx(0.5)  # loss increase dominates
    assert ev.forgetting_score(0.5, 0.9, 2.0, 1.0) == 0.0  # better on both
    assert ev.forgetting_score(0.0, 0.0, 1.0, 1.0) == 0.0


# ---------------------------------------------------------------- generation and scoring on a tiny model


@pytest.fixture(scope="module")
def noisy_model(tmp_path_factory):
    return load(noisy_base(tmp_path_factory.mktemp("noisy") / "model"))


def varied_prompts(count: int) -> list[list[dict]]:
    rows = toy_rows(count, seed=3)
    for i, row in enumerate(rows):
        row["messages"][0]["content"] = "Answer with one word. " * (i % 6 + 1)
    return [row["messages"][:-1] for row in rows]


def test_batched_generation_equals_one_at_a_time(noisy_model):
    model, tokenizer = noisy_model
    prompts = varied_prompts(20)
    batched = ev.generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=8)
    single = ev.generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=1)
    assert batched == single
    assert len(set(batched)) > 5 and all(batched)  # real, varied outputs: padding errors would show


def test_reference_loss_scores_only_the_answer_tokens(noisy_model):
    import torch
    import torch.nn.functional as F

    model, tokenizer = noisy_model
    conversations = [prompt + [{"role": "assistant", "content": f"answer {i}"}]
                     for i, prompt in enumerate(varied_prompts(6))]
    ids, prompt_len = ev._scored_tokens(tokenizer, conversations[0])
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    expected = F.cross_entropy(logits[prompt_len - 1:-1], torch.tensor(ids[prompt_len:])).item()
    loss, perplexity = ev.reference_loss(model, tokenizer, conversations[:1], batch_size=1)
    assert loss == pytest.approx(expected, rel=1e-5) and perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    batched = ev.reference_loss(model, tokenizer, conversations, batch_size=4)
    assert batched == pytest.approx(ev.reference_loss(model, tokenizer, conversations, batch_size=1), rel=1e-5)


# ---------------------------------------------------------------- the whole run


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaluation")
    competent_base(root / "base")
    lora_adapter(root / "base", root / "bad_adapter", random_weights=True)
    lora_adapter(root / "base", root / "identity_adapter", random_weights=False)
    write_chat_parquet(root / "eval.parquet", toy_rows(EVAL_ROWS + 6, seed=2))
    write_probe(root / "probe.jsonl")
    return root


def evaluate(root: Path, adapter: str, config: EvaluationConfig, base: str = "base", **kwargs) -> dict:
    return ev.run_evaluation(
        base_model_dir=root / base, base_fingerprint=base, adapter_dir=root / adapter,
        eval_path=root / "eval.parquet", eval_version="v1", probe_path=root / "probe.jsonl", config=config,
        cache_dir=root / "cache", out_dir=root / "out" / adapter, log=lambda line: None, **kwargs,
    )


@pytest.fixture()
def generate_calls(monkeypatch) -> list[int]:
    """Counts rows passed to `evaluation.generate`, one entry per call."""
    calls: list[int] = []
    real = ev.generate

    def counting(model, tokenizer, prompts, **kwargs):
        calls.append(len(prompts))
        return real(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(ev, "generate", counting)
    return calls


CLASSIFY = EvaluationConfig(task_type="classification", max_new_tokens=6, max_rows=EVAL_ROWS, batch_size=8,
                            bootstrap_samples=500)


def test_bad_adapter_fails_the_gate_then_the_base_comes_from_the_cache(workspace, generate_calls):
    bad = evaluate(workspace, "bad_adapter", CLASSIFY)
    assert not bad["base_cached"] and generate_calls == [EVAL_ROWS, len(COLORS), EVAL_ROWS, len(COLORS)]
    assert bad["rows"] == EVAL_ROWS and bad["primary_metric"] == "accuracy"
    assert bad["base_score"] >= 0.9 and bad["finetuned_score"] <= 0.2
    assert bad["delta"] < 0 and bad["delta_ci_low"] <= bad["delta"] <= bad["delta_ci_high"] < 0
    assert bad["passed"] is False
    assert any(c.startswith(f"delta_ci_low {bad['delta_ci_low']:.4f} < min_improvement 0.0000")
               for c in bad["failed_conditions"])
    assert bad["probe_base_accuracy"] > bad["probe_finetuned_accuracy"] and bad["forgetting"] > 0.1
    assert any(c.startswith("forgetting") for c in bad["failed_conditions"])
    assert bad["finetuned_loss"] > bad["base_loss"] and bad["base_perplexity"] == pytest.approx(
        math.exp(bad["base_loss"]))

    generate_calls.clear()
    same = evaluate(workspace, "identity_adapter", CLASSIFY)
    assert same["base_cached"] and generate_calls == [EVAL_ROWS, len(COLORS)]  # fine-tuned model only
    assert same["base_score"] == bad["base_score"] and same["base_loss"] == bad["base_loss"]
    assert same["finetuned_score"] == same["base_score"] and same["delta"] == 0.0  # B = 0: same model
    assert same["finetuned_loss"] == pytest.approx(same["base_loss"], rel=1e-6)
    assert same["passed"] is True and same["failed_conditions"] == []
    assert same["forgetting"] == pytest.approx(0, abs=1e-6)


def test_outputs_written_for_the_report(workspace):
    import pandas as pd

    result = evaluate(workspace, "bad_adapter", CLASSIFY)
    out = workspace / "out" / "bad_adapter"
    predictions = pd.read_parquet(out / "predictions.parquet")
    assert len(predictions) == EVAL_ROWS and list(predictions["id"]) == sorted(predictions["id"])
    assert {"prompt", "reference", "base_answer", "finetuned_answer", "base_accuracy", "finetuned_accuracy",
            "base_label", "finetuned_label", "delta"} <= set(predictions.columns)
    assert predictions["delta"].mean() == pytest.approx(result["delta"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["delta_ci_low"] == result["delta_ci_low"] and "report_markdown" not in metrics
    report = (out / "report.md").read_text()
    assert report == result["report_markdown"] and "Eval gate: FAILED" in report
    assert "## Confusion table (fine-tuned)" in report and "(unparseable)" in report
    regressions = report.split("## Worst regressions")[1]
    assert regressions.count("\n| ") - 1 == min(10, int((predictions["delta"] < 0).sum()))
    assert report.split("## Largest improvements")[1].startswith("\n\n_none_")


def test_good_adapter_passes_with_a_positive_interval(tmp_path):
    build_tiny_model(tmp_path / "random_base")
    noisy_base(tmp_path / "noisy_base")
    lora_adapter(tmp_path / "noisy_base", tmp_path / "good", random_weights=False, train_rows=toy_rows(32, seed=1))
    write_chat_parquet(tmp_path / "eval.parquet", toy_rows(EVAL_ROWS, seed=2))
    write_probe(tmp_path / "probe.jsonl")
    config = EvaluationConfig(task_type="generation", max_new_tokens=6, batch_size=8, bootstrap_samples=500)
    result = evaluate(tmp_path, "good", config, base="noisy_base")
    assert result["primary_metric"] == "rouge_l" and result["base_score"] < 0.1 and result["finetuned_score"] >= 0.5
    assert result["delta_ci_low"] > 0.3 and result["passed"] is True and result["failed_conditions"] == []
    assert result["metrics"]["finetuned"]["exact_match"] >= 0.5


def test_log_to_mlflow_adds_metrics_and_table_to_the_training_run(workspace, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("toy", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    result = evaluate(workspace, "bad_adapter", CLASSIFY)
    ev.log_to_mlflow(run_id, result, result["predictions_path"], tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.data.metrics["eval_delta"] == pytest.approx(result["delta"])
    assert run.data.metrics["eval_passed"] == 0.0 and run.data.tags["eval_passed"] == "false"
    assert run.data.metrics["eval_finetuned_macro_f1"] == pytest.approx(result["metrics"]["finetuned"]["macro_f1"])
    logged = {item.path for item in client.list_artifacts(run_id, "evaluation")}
    assert logged == {"evaluation/report.md", "evaluation/predictions.json"}
