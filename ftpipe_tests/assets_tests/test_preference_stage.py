"""The preference stage through Dagster: SFT, then DPO / ORPO / KTO from the SFT adapter on the tiny model, its
metadata and MLflow run, the evaluation of base, SFT and final models on held-out pairs, and the gate's preference
condition."""

import random
from pathlib import Path

import dagster as dg
import pytest
from mlflow.tracking import MlflowClient

from ftpipe.__main__ import preference_line
from ftpipe.core.layout import TaskLayout, mlflow_db
from ftpipe.definitions import defs
from ftpipe.partitions import task_partitions
from ftpipe_tests.builders import LENIENT_GATE, TRAINING, check, make_task, materialization
from ftpipe_tests.tiny_model import COLORS, toy_rows

PREFERENCE_METADATA = ("objective", "adapter_path", "train_loss", "eval_loss", "reward_accuracy", "reward_margin",
                       "pairs_train", "pairs_eval", "tokens_per_second", "mlflow_run_id", "likelihood_displacement")
STAGE = ", stages: [sft, {objective}], preference: {{learning_rate: 0.01, max_steps: 4}}}}\n"


def pairs(count: int, *, seed: int, swapped: bool = False) -> list[dict]:
    """Preference pairs on the fruit prompts: the fruit's color over another color (the other way when `swapped`)."""
    rng = random.Random(seed)
    found = []
    for index in range(count):
        fruit = rng.choice(sorted(COLORS))
        right, wrong = COLORS[fruit], rng.choice([c for c in sorted(COLORS.values()) if c != COLORS[fruit]])
        chosen, rejected = (wrong, right) if swapped else (right, wrong)
        prompt = f"Which color does the {fruit} have? [{index}]"
        found.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return found


def preference_task(data_dir: Path, model: Path, objective: str, *, swapped: bool = False,
                    gate: str = LENIENT_GATE) -> str:
    """The toy chat task plus 60 preference pairs on the tiny model in `model`, trained SFT then `objective`."""
    chat_rows = [{"messages": r["messages"]} for r in toy_rows(60, seed=3)]
    training = TRAINING.replace("}\n", STAGE.format(objective=objective))
    make_task(data_dir, "prefs", {"chat.jsonl": chat_rows, "pairs.jsonl": pairs(60, seed=5, swapped=swapped)},
              f"base_model: {model}\nsplit: {{eval_fraction: 0.25}}\n{training}{gate}")
    return "prefs"


def finetune(instance: dg.DagsterInstance, task: str, selection: list[str] | None = None):
    instance.add_dynamic_partitions(task_partitions.name, [task])
    job = defs.resolve_job_def("finetune_job")
    keys = [dg.AssetKey(name) for name in selection] if selection else None
    return job.execute_in_process(instance=instance, partition_key=task, asset_selection=keys, raise_on_error=False)


@pytest.mark.slow
def test_dpo_after_sft_is_tracked_evaluated_and_merged(ftpipe_env: Path, tiny_model_dir: Path) -> None:
    task = preference_task(ftpipe_env, tiny_model_dir, "dpo")
    with dg.instance_for_test() as instance:
        result = finetune(instance, task)
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        stage = materialization(result, "preference_adapter")
        assert all(key in stage for key in PREFERENCE_METADATA), sorted(stage)
        assert stage["objective"] == "dpo" and stage["pairs_train"] + stage["pairs_eval"] <= 60
        assert "data:image/png;base64" in stage["reward_curve"]
        logged = MlflowClient(f"sqlite:///{mlflow_db()}").get_metric_history(stage["mlflow_run_id"], "rewards/margins")
        assert logged, "every logging step's reward margin reaches MLflow"
        sft = materialization(result, "lora_adapter")
        assert sft["mlflow_run_id"] != stage["mlflow_run_id"], "each stage is its own MLflow run"

        report = materialization(result, "eval_report")
        for key in ("preference_accuracy_base", "preference_accuracy_sft", "preference_accuracy_final",
                    "preference_delta_ci_low", "preference_margin_gain_ci_low", "sft_score", "finetuned_score"):
            assert isinstance(report[key], float), key
        summary = preference_line(report, "dpo")  # as the run's summary says it
        assert (f"of {report['preference_pairs']} pairs, by a median {report['preference_margin_change_median']:+.3g} "
                "nats (margin gain") in summary, summary
        merged = materialization(result, "merged_model")
        assert merged["registered_version"] == 1
        card = merged["model_card"]
        assert "| max_steps | 6 |" in card and "| preference.max_steps | 4 |" in card, "each stage's own settings"
        assert f"| sft_mlflow_run_id | {sft['mlflow_run_id']} |" in card
        pairs = materialization(result, "heldout_split")
        assert (f"| held-out preference pairs | {pairs['eval_pairs']} |\n| train preference pairs | "
                f"{pairs['train_pairs']} |") in card, "the pairs behind the preference stage"

        again = finetune(instance, task)
        assert materialization(again, "preference_adapter")["reused"] is True, "an unchanged stage is not retrained"


@pytest.mark.slow
def test_orpo_then_kto_train_from_the_sft_adapter(ftpipe_env: Path, tiny_model_dir: Path) -> None:
    """As a user switching the stage's objective: the second stage starts from the same SFT adapter."""
    task = preference_task(ftpipe_env, tiny_model_dir, "orpo")

    def trained(result, objective: str) -> None:
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        stage = materialization(result, "preference_adapter")
        assert stage["objective"] == objective and isinstance(stage["train_loss"], float)
        assert Path(stage["adapter_path"]).parent == TaskLayout(task).path("preference_adapter")

    with dg.instance_for_test() as instance:
        trained(finetune(instance, task, ["raw_examples", "deduplicated_examples", "heldout_split", "base_model",
                                          "lora_adapter", "preference_adapter"]), "orpo")
        task_yaml = ftpipe_env / "tasks" / task / "task.yaml"
        task_yaml.write_text(task_yaml.read_text().replace("stages: [sft, orpo]", "stages: [sft, kto]"))
        trained(finetune(instance, task, ["preference_adapter"]), "kto")


@pytest.mark.slow
def test_the_gate_fails_when_the_stage_learned_to_prefer_worse_answers(ftpipe_env: Path, tiny_model_dir: Path) -> None:
    task = preference_task(ftpipe_env, tiny_model_dir, "dpo", swapped=True,
                           gate="evaluation: {min_improvement: -2.0, max_forgetting: 1.0, min_preference_gain: 0.0}\n")
    with dg.instance_for_test() as instance:
        result = finetune(instance, task)
        gate = check(result, "eval_report_gate")
        assert not gate.passed and "preference_margin_gain_ci_low" in gate.description, gate.description
        assert gate.metadata["preference_margin_gain_ci_low"].value < 0, "it learned to favour the rejected answers"
        assert "merged_model" not in {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
