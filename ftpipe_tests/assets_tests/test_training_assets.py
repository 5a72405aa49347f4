"""The training, evaluation and serving assets materialized for real: the tiny model trained through Dagster Pipes,
evaluated, gated and registered; and what the training pods resource is handed."""

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pytest
from mlflow.tracking import MlflowClient

from ftpipe.assets import data, training
from ftpipe.core import registry
from ftpipe.core.evaluation.chart import CHART
from ftpipe.core.layout import MODEL_CARD, REPORT, TaskLayout, mlflow_db
from ftpipe.core.merging import PARITY_ROWS
from ftpipe.core.results import read_result
from ftpipe.core.storage import exclusive, sha256_of_files, task_dir
from ftpipe.definitions import defs
from ftpipe.partitions import task_partitions
from ftpipe.resources import TrainingPods, default_resources
from ftpipe_tests.builders import LENIENT_GATE, check, data_version, materialization

UPSTREAM = [data.raw_examples, data.deduplicated_examples, data.heldout_split, training.base_model]
K8S = ("training: {launcher: k8s, k8s: {image: 'registry.example.com/ftpipe:1.0', namespace: ml, gpus: 1, "
       "env: {HF_HUB_OFFLINE: '1'}, secret_env: {HF_TOKEN: {secret: hf, key: token}}}}")
PODS: list[tuple[str, dict]] = []


def run(instance: dg.DagsterInstance, task: str, assets=(training.lora_adapter,), run_config=None, **resources):
    """Materialize `assets` of `task` (with whatever upstream they need already built)."""
    instance.add_dynamic_partitions(task_partitions.name, [task])
    return dg.materialize(list(dict.fromkeys([*UPSTREAM, *assets])), instance=instance, partition_key=task, selection=list(assets),
                          resources={**default_resources(), **resources}, run_config=run_config,
                          raise_on_error=False)


def build_upstream(instance: dg.DagsterInstance, task: str) -> None:
    assert run(instance, task, UPSTREAM).success


def overrides(asset: str, yaml: str) -> dict:
    return {"ops": {asset: {"config": {"overrides": yaml}}}}


def logged(instance: dg.DagsterInstance, result) -> str:
    return "\n".join(e.message or "" for e in instance.all_logs(result.run_id))


@contextmanager
def held_by_another_run(folder: Path) -> Iterator[list[bool]]:
    """Hold `folder`'s lock, as a run training there does, until a waiter queues behind it (seen in /proc/locks)
    or 60 s pass; yields [whether a waiter came]."""
    waited: list[bool] = []
    holding = threading.Event()

    def hold() -> None:
        with exclusive(folder):
            holding.set()
            inode = (folder / ".lock").stat().st_ino
            deadline = time.monotonic() + 60
            while not waited and time.monotonic() < deadline:
                if any("->" in line and f":{inode} " in line for line in Path("/proc/locks").read_text().splitlines()):
                    waited.append(True)
                time.sleep(0.2)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait()
    yield waited
    holder.join()


class PodsRecorded(TrainingPods):
    """No cluster: records the pod and stops there."""

    def run(self, *, context, namespace, pod_spec, env):
        PODS.append((namespace, pod_spec))
        raise dg.Failure(description="pod recorded; no cluster in this test", allow_retries=False)


class PodsHere(TrainingPods):
    """No cluster: records the pod, then runs its container's command here through Pipes."""

    def run(self, *, context, namespace, pod_spec, env):
        PODS.append((namespace, pod_spec))
        [container] = pod_spec["containers"]
        command = [sys.executable if part == "python" else part for part in container["command"]]
        plain = {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}
        return dg.PipesSubprocessClient().run(command=command, context=context, env={**plain, **env})


@pytest.fixture(autouse=True)
def no_pods():
    PODS.clear()


def test_heavy_steps_share_the_gpu_pool() -> None:
    pools = {key.to_user_string(): defs.resolve_assets_def(key).op.pool for key in defs.resolve_asset_graph().get_all_asset_keys()
             if key.to_user_string() != "task_files"}
    assert {asset for asset, pool in pools.items() if pool == "gpu"} == {
        "lora_adapter", "preference_adapter", "eval_report", "merged_model"}


def test_k8s_qlora_is_accepted_on_a_cpu_only_host(tiny_task: str) -> None:
    """Whether 4-bit can run is the training pod's question (it has the GPU), not the orchestrator's."""
    with dg.instance_for_test() as instance:
        build_upstream(instance, tiny_task)
        qlora = K8S.replace("launcher: k8s,", "launcher: k8s, method: qlora,")
        result = run(instance, tiny_task, run_config=overrides("lora_adapter", qlora), training_pods=PodsRecorded())
        assert "LoRA adapter, 4-bit NF4 base (needs a CUDA GPU)" in logged(instance, result)
    assert "pod recorded" in result.get_step_failure_events()[0].step_failure_data.user_failure_data.description
    [(namespace, spec)] = PODS
    [container] = spec["containers"]
    assert namespace == "ml" and container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    spec_file = Path(container["command"][-1])
    assert spec_file == TaskLayout(tiny_task).spec_file()
    assert json.loads(spec_file.read_text())["training"]["quantization"] == "4bit"


def test_a_teacher_model_given_relative_to_the_task_folder_reaches_the_training_program_resolved(
        tiny_task: str, tiny_model_dir: Path) -> None:
    teacher = os.path.relpath(tiny_model_dir, task_dir(tiny_task))
    distill = K8S.replace("launcher: k8s,", f"launcher: k8s, stages: [distill], teacher_model: '{teacher}',")
    with dg.instance_for_test() as instance:
        build_upstream(instance, tiny_task)
        run(instance, tiny_task, run_config=overrides("lora_adapter", distill), training_pods=PodsRecorded())
    [(_, spec)] = PODS
    spec_file = Path(spec["containers"][0]["command"][-1])
    assert json.loads(spec_file.read_text())["training"]["teacher_model"] == str(tiny_model_dir.resolve())


def test_a_preference_stage_without_pairs_is_refused_before_the_sft_training(tiny_task: str) -> None:
    with dg.instance_for_test() as instance:
        build_upstream(instance, tiny_task)
        result = run(instance, tiny_task, run_config=overrides("lora_adapter", "training: {stages: [sft, dpo]}"))
    [failure] = result.get_step_failure_events()
    description = failure.step_failure_data.user_failure_data.description
    assert description.startswith("training.stages ['sft', 'dpo'] cannot run: dpo trains on paired preference rows")
    assert not TaskLayout(tiny_task).path("checkpoints").exists(), "nothing was trained"


def test_a_preference_stage_whose_pairs_a_misspelt_mapping_quarantined_is_refused_naming_why(
        tiny_task: str, ftpipe_env: Path) -> None:
    pairs = [{"prompt": f"What color is fruit {i}?", "better": "Red.", "worse": f"Blue {i}."} for i in range(8)]
    (ftpipe_env / "tasks" / tiny_task / "raw" / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    mapping = "data: {columns: {chosen: better, rejected: wrose}}\ntraining: {stages: [sft, dpo]}"
    with dg.instance_for_test() as instance:
        result = run(instance, tiny_task, [*UPSTREAM, training.lora_adapter], run_config={"ops": {
            asset: {"config": {"overrides": mapping}} for asset in ("raw_examples", "lora_adapter")}})
    [failure] = result.get_step_failure_events()
    description = failure.step_failure_data.user_failure_data.description
    assert description.endswith(
        "; 8 rows quarantined, 8 for: mapped column 'wrose' (data.columns.rejected; did you mean 'worse'?) is not in "
        "the file; its columns are: better, prompt, worse"), description


def test_a_judge_without_its_key_is_refused_before_the_training_it_would_follow(tiny_task: str, monkeypatch) -> None:
    """The key is read by eval_report, after the training: a run that evaluates says so before training; a run of
    the training alone does not need the key."""
    from ftpipe.assets import evaluation

    monkeypatch.delenv("FTPIPE_TEST_JUDGE_KEY", raising=False)
    judge = "evaluation: {judge: {base_url: 'http://127.0.0.1:9/v1', model: j, api_key_env: FTPIPE_TEST_JUDGE_KEY}}"
    settings = {"ops": {"lora_adapter": {"config": {"overrides": K8S}},
                        "eval_report": {"config": {"overrides": judge}}}}
    with dg.instance_for_test() as instance:  # no upstream built: the judge is checked before the split is read
        both = run(instance, tiny_task, [training.lora_adapter, evaluation.eval_report], run_config=settings)
        alone = run(instance, tiny_task, run_config={"ops": {"lora_adapter": settings["ops"]["lora_adapter"]}})
    [refused] = both.get_step_failure_events()
    assert refused.step_key == "lora_adapter" and refused.step_failure_data.user_failure_data.description == (
        "evaluation.judge.api_key_env: environment variable FTPIPE_TEST_JUDGE_KEY is not set, so eval_report would "
        "fail after this training: set it (or api_key_env: null for a judge that needs no key)")
    assert "held-out split" in alone.get_step_failure_events()[0].step_failure_data.user_failure_data.description, (
        "the training alone went past the judge, to its missing split")


def test_qlora_without_cuda_is_refused_where_it_would_train_in_the_step_failure_once(tiny_task: str, capfd) -> None:
    with dg.instance_for_test() as instance:
        build_upstream(instance, tiny_task)
        result = run(instance, tiny_task, run_config=overrides("lora_adapter", "training: {method: qlora}"))
        assert not result.success
        [failure] = result.get_step_failure_events()
        refusal = "training refused: quantization 4bit (method qlora) needs a CUDA GPU"
        assert failure.step_failure_data.user_failure_data.description.startswith(refusal), "the program's own words"
        assert refusal not in logged(instance, result), "said once, in the failure, not in a log line too"
        assert not [line for line in capfd.readouterr().err.splitlines() if line.startswith(refusal)], "nor on stderr"
        assert not instance.all_logs(result.run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY), "refused for good"
    assert not TaskLayout(tiny_task).path("checkpoints").exists(), "nothing was trained"
    assert not list(TaskLayout(tiny_task).path("lora_adapter").glob("*.refused")), "the note is gone once said"


def test_the_card_states_the_stages_and_preference_settings_that_trained_the_weights_after_a_reused_sft() -> None:
    from ftpipe.assets.serving import trained_settings
    from ftpipe.core.merging import FULL_MODEL_PARITY, model_card
    from ftpipe.core.results import Result

    def result(**training) -> Result:
        return Result("training", "key", {"training": training}, {})

    sft = result(objective="sft", learning_rate=2e-4, stages=["sft", "dpo"], preference={"beta": 0.1})  # trained then
    orpo = result(objective="orpo", learning_rate=5e-6, stages=["sft", "orpo"], preference={"beta": 0.3})
    assert trained_settings(sft, orpo) == {"objective": "sft", "learning_rate": 2e-4, "stages": ["sft", "orpo"],
                                           "preference": {"beta": 0.3}}, "the SFT rate, the preference stage's own"
    assert trained_settings(sft, sft)["stages"] == ["sft"], "no preference stage now: the SFT model is published"
    card = model_card({"task": "t", "hyperparameters": trained_settings(sft, orpo)}, FULL_MODEL_PARITY, "",
                      merged=True, weights="float32")
    assert 'tags: ["ftpipe", "t", "lora", "orpo", "merged"]' in card and "| preference.beta | 0.3 |" in card


def test_the_card_counts_rows_left_out_for_their_length_and_chats_shortened_by_their_earliest_turns() -> None:
    from ftpipe.assets.serving import length_counts

    trimmed = length_counts({"max_length": 512, "too_long": "trim_turns"}, {"rows_too_long": 2, "rows_trimmed": 5})
    assert trimmed == {"train and eval rows over max_length 512, left out by the training (the evaluation scores "
                       "every held-out row)": 2, "multi-turn rows trained without their earliest turns": 5}
    assert list(length_counts({"max_length": 64, "too_long": "drop"}, {"rows_too_long": 0}).values()) == [0]


@pytest.mark.slow
def test_lora_adapter_trains_through_pipes_is_tracked_reused_and_retrained_on_demand(tiny_task: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with dg.instance_for_test() as instance:
        build_upstream(instance, tiny_task)
        with held_by_another_run(TaskLayout(tiny_task).path("lora_adapter")) as waited:
            result = run(instance, tiny_task, [*UPSTREAM, training.lora_adapter])
        assert result.success and waited == [True]
        lines = logged(instance, result).splitlines()
        waiting = lines.index(f"another run is training {tiny_task} (lora_adapter): waiting for it to finish, to reuse "
                              "its training if this run's is the same")
        assert waiting < lines.index(f"training {tiny_task} (lora_adapter): the task has no adapter yet")
        base = materialization(result, "base_model")
        assert base["fingerprint"] and base["architecture"] == "LlamaForCausalLM" and base["trust_remote_code"] is False
        adapter = materialization(result, "lora_adapter")
        for key in ("method", "adapter_path", "train_loss", "eval_loss", "trainable_params",
                    "tokens_per_second", "rows_too_long", "mlflow_run_id"):
            assert key in adapter
        assert adapter["method"] == "lora" and adapter["reused"] is False
        assert re.fullmatch(r"\d+(\.\d)?[kMB]?", adapter["trainable_params"]), "counts read as 1.8M, not 1843200"
        assert re.fullmatch(r"\d\.\d\d (of an epoch|epochs)", adapter["epochs"])
        assert adapter["train_loss"] == float(f"{adapter['train_loss']:.4g}"), "floats are rounded for reading"
        assert "data:image/png;base64" in adapter["loss_curve"]
        assert any("step 2/6" in m for m in logged(instance, result).splitlines()), "progress reaches the Dagster log"
        assert f"training {tiny_task} (lora_adapter): the task has no adapter yet" in logged(instance, result)
        published = read_result(TaskLayout(tiny_task).output("lora_adapter"), "lora_adapter")
        assert published.reuse_key == adapter["training_fingerprint"]

        run_info = MlflowClient(f"sqlite:///{mlflow_db()}").get_run(adapter["mlflow_run_id"])
        assert run_info.info.status == "FINISHED"
        assert run_info.data.tags["dagster_run_id"] == result.run_id
        assert run_info.data.params["lora.r"] == "16"
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base["model_path"]), adapter["adapter_path"])
        assert model.peft_config["default"].r == 16

        again = run(instance, tiny_task)
        assert materialization(again, "lora_adapter")["reused"] is True
        assert materialization(again, "lora_adapter")["mlflow_run_id"] == adapter["mlflow_run_id"]
        assert data_version(again, "lora_adapter") == data_version(result, "lora_adapter")

        forced = run(instance, tiny_task, run_config={"ops": {"lora_adapter": {"config": {"force_retrain": True}}}})
        assert materialization(forced, "lora_adapter")["reused"] is False
        assert materialization(forced, "lora_adapter")["mlflow_run_id"] != adapter["mlflow_run_id"]
        assert "(lora_adapter): force_retrain is set" in logged(instance, forced)
        previous = MlflowClient(f"sqlite:///{mlflow_db()}").get_run(adapter["mlflow_run_id"])
        assert previous.info.status == "FINISHED" and previous.data.tags["dagster_run_id"] == result.run_id, "as it was"
        changed = run(instance, tiny_task, run_config=overrides("lora_adapter", "training: {learning_rate: 0.02}"))
        assert "(lora_adapter): the training settings changed since the current adapter" in logged(instance, changed)

        opted_in = run(instance, tiny_task, [training.base_model], overrides("base_model", "trust_remote_code: true"))
        assert materialization(opted_in, "base_model")["trust_remote_code"] is True, "the UI shows a task turned it on"
        assert "trust_remote_code ON" in logged(instance, opted_in)


@pytest.mark.slow
def test_k8s_launcher_hands_the_pod_spec_to_the_training_pods_resource(tiny_task: str) -> None:
    with dg.instance_for_test() as instance:
        build_upstream(instance, tiny_task)
        result = run(instance, tiny_task, run_config=overrides("lora_adapter", K8S), training_pods=PodsHere())
    [(namespace, spec)] = PODS
    [container] = spec["containers"]
    assert namespace == "ml" and container["image"] == "registry.example.com/ftpipe:1.0"
    assert container["command"][:3] == ["python", "-m", "ftpipe.core.training"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in container["env"]
    assert materialization(result, "lora_adapter")["mlflow_run_id"], "the pod's program published its result"


def chat_cli(task: str, task_yaml_extra: str = "", message: str | None = "What color is the apple?",
             piped: str = "") -> subprocess.CompletedProcess:
    """`python -m ftpipe chat TASK "What color is the apple?"` (or `message`, or without one and `piped` as its
    input), with `task_yaml_extra` appended to task.yaml for it."""
    config = task_dir(task) / "task.yaml"
    before = config.read_text()
    config.write_text(before + task_yaml_extra)
    try:
        return subprocess.run([sys.executable, "-m", "ftpipe", "chat", task, *([message] if message else [])],
                              input=piped, capture_output=True, text=True, env=dict(os.environ), timeout=300)
    finally:
        config.write_text(before)


def tree_digest(folder: Path) -> str:
    return sha256_of_files([p for p in folder.rglob("*") if p.is_file()], folder)


@pytest.mark.slow
def test_gate_blocks_the_merge_reruns_reuse_and_a_failed_training_spares_the_champion(tiny_task: str) -> None:
    strict = overrides("eval_report", "evaluation: {min_improvement: 0.5}")
    lenient = overrides("eval_report", "evaluation: {min_improvement: -2.0, max_forgetting: 1.0}")
    job = defs.resolve_job_def("finetune_job")
    merge = dg.AssetSelection.assets("merged_model")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(task_partitions.name, [tiny_task])
        start = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=merge)
        blocked = job.execute_in_process(instance=instance, partition_key=tiny_task, run_config=strict, raise_on_error=False)
        assert not blocked.success
        gate = check(blocked, "eval_report_gate")
        run_id = materialization(blocked, "lora_adapter")["mlflow_run_id"]

        def verdict_in_mlflow() -> str:
            return MlflowClient(f"sqlite:///{mlflow_db()}").get_run(run_id).data.tags["eval_passed"]

        assert verdict_in_mlflow() == "false"
        assert not gate.passed and "delta_ci_low" in gate.description and "min_improvement 0.5" in gate.description
        assert gate.metadata["most_forgotten_skill"].value == materialization(blocked, "eval_report")[
            "most_forgotten_skill"], "the skill the gate reads beside the whole probe's forgetting"
        assert "merged_model" not in {e.asset_key.to_user_string() for e in blocked.get_asset_materialization_events()}
        shown = materialization(blocked, "eval_report")["report"]
        assert "](data:image/png;base64," in shown and f"]({CHART})" not in shown, "the UI's report embeds its chart"
        after_fail = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=merge, cursor=start.cursor)
        assert after_fail.total_requested == 0, "automation never merges past a failed gate"
        told = chat_cli(tiny_task, task_yaml_extra="evaluation: {min_improvement: 0.5}\n")
        assert told.returncode == 2 and "eval gate failed: delta_ci_low" in told.stderr, told.stderr[-2000:]
        assert str(TaskLayout(tiny_task).output("eval_report") / REPORT) in told.stderr, "chat names the report"

        regated = job.execute_in_process(instance=instance, partition_key=tiny_task, run_config=lenient,
                                         asset_selection=[dg.AssetKey("eval_report"), dg.AssetKey("human_review")])
        assert materialization(regated, "eval_report")["reused"] is True, "a new threshold generates nothing"
        assert check(regated, "eval_report_gate").passed, "the gate is decided with the run's thresholds"
        report = (TaskLayout(tiny_task).output("eval_report") / REPORT).read_text()
        assert "Eval gate: PASSED" in report and "FAILED" not in report, "the report says the new verdict"
        assert verdict_in_mlflow() == "true", "MLflow says the new verdict too"
        after_pass = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=merge, cursor=after_fail.cursor)
        assert after_pass.get_requested_partitions(dg.AssetKey("merged_model")) == {tiny_task}, "a passing gate is merged"

        card_config = {"ops": {**lenient["ops"], **overrides("merged_model", "training: {learning_rate: 0.5}")["ops"]}}
        passed = job.execute_in_process(instance=instance, partition_key=tiny_task, run_config=card_config)
        merged = materialization(passed, "merged_model")
        assert merged["registered_model"] == f"ftpipe-{tiny_task}" and merged["registered_version"] == 1
        held_out = materialization(passed, "heldout_split")["eval_rows"]
        assert f"checking parity on the {min(held_out, PARITY_ROWS)} shortest held-out prompts" in logged(
            instance, passed), "as many as there are, 16 at most"
        assert materialization(passed, "lora_adapter")["reused"] is True, "the unchanged adapter is not retrained"
        card = merged["model_card"]
        assert not card.startswith("---") and card.startswith("# ftpipe-"), "the UI shows the card without front matter"
        assert "| learning_rate | 0.01 |" in card and "| quantization | none |" in card, "the card has what was trained"
        assert "**Eval gate: PASSED** (min_improvement -2, max_forgetting 1)" in card, "the thresholds it passed"
        assert "max_forgetting: 1.0" in card and "learning_rate: 0.5" not in card, "the gate's settings, as changed"
        assert "> Answer with one word." in card, "the system prompt the train rows carry is the served default"
        rows_read = materialization(passed, "raw_examples")["rows_read"]
        assert f"| rows read | {rows_read} |" in card and "| held-out loss |" in card, "the data behind it, every metric"
        too_long = materialization(passed, "lora_adapter")["rows_too_long"]
        assert (f"| train and eval rows over max_length 64, left out by the training (the evaluation scores every "
                f"held-out row) | {too_long} |") in card, "the tiny task's 64, and what the evaluation still reads"
        assert "preference.beta" not in card and "nnodes" not in card, "only settings that shaped these weights"
        assert "Reading free-text scores:\n\nROUGE-L and token F1" in card, "the task type's own section"
        folder = Path(merged["model_path"])
        assert f"]({CHART})" in (folder / MODEL_CARD).read_text() and (folder / CHART).is_file(), "the chart beside it"
        assert "](data:image/png;base64," in card, "the UI's copy of the card embeds the chart"
        chat = chat_cli(tiny_task)
        assert chat.returncode == 0, chat.stderr[-2000:]
        assert f"model: {merged['model_path']}" in chat.stderr, "the chat CLI answers with the champion model"
        pasted = "What color is the apple?\nAnd what color is the lemon?\n"
        as_one = chat_cli(tiny_task, message=pasted.strip()).stdout
        assert chat_cli(tiny_task, message=None, piped=pasted).stdout == as_one, "a text piped in is one message"

        again = job.execute_in_process(instance=instance, partition_key=tiny_task, run_config=lenient)
        assert all(materialization(again, a)["reused"] for a in ("lora_adapter", "eval_report", "merged_model"))
        assert materialization(again, "merged_model")["registered_version"] == 1, "an unchanged rerun registers nothing"

        champion, adapter = Path(merged["model_path"]), TaskLayout(tiny_task).output("lora_adapter")
        before = tree_digest(champion), tree_digest(adapter)
        broken = overrides("lora_adapter", "training: {lora: {target_modules: [no_such_layer]}}")
        failed = job.execute_in_process(instance=instance, partition_key=tiny_task, run_config=broken, raise_on_error=False)
        assert not failed.success
        assert not [e for e in failed.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY], (
            "target modules that match no layer are refused, not retried")
        assert (tree_digest(champion), tree_digest(adapter)) == before, "a failed training leaves every file as it was"
        assert registry.champion_model_path(tiny_task) == champion


@pytest.mark.slow
def test_a_full_fine_tune_is_evaluated_gated_and_registered(ftpipe_env: Path, tiny_task: str) -> None:
    task_yaml = ftpipe_env / "tasks" / tiny_task / "task.yaml"
    task_yaml.write_text(task_yaml.read_text().replace("method: lora", "method: full, lora: {r: 4}") + LENIENT_GATE)
    job = defs.resolve_job_def("finetune_job")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(task_partitions.name, [tiny_task])
        first = job.execute_in_process(instance=instance, partition_key=tiny_task)
        warnings = [log.user_message for log in instance.all_logs(first.run_id) if log.level == 30]
        assert f"{tiny_task}: settings without effect: training.lora (training.adapter is none: every weight is " \
               "trained)" in warnings
        adapter, merged = materialization(first, "lora_adapter"), materialization(first, "merged_model")
        assert adapter["method"] == "full" and check(first, "eval_report_gate").passed
        assert merged["registered_model"] == f"ftpipe-{tiny_task}" and merged["registered_version"] == 1
        model = Path(merged["model_path"])
        assert (model / "model.safetensors").is_file() and not (model / "adapter").exists()
        assert "as a full fine-tune" in merged["model_card"]

        again = job.execute_in_process(instance=instance, partition_key=tiny_task)
        assert all(materialization(again, a)["reused"] for a in ("lora_adapter", "eval_report", "merged_model"))
