"""base_model and lora_adapter materialized for real: a tiny local model trained through Dagster Pipes."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from mlflow.tracking import MlflowClient

from ftpipe.assets import data, training
from ftpipe.assets.training import adapter_dir
from ftpipe.core import merging
from ftpipe.core.storage import home_dir, sha256_of_files
from ftpipe.partitions import task_partitions
from ftpipe.resources import default_resources
from ftpipe_tests.conftest import make_task
from ftpipe_tests.tiny_model import build_tiny_model, toy_rows

TRAINING = "training: {method: lora, max_steps: 6, batch_size: 8, eval_steps: 3, logging_steps: 2, learning_rate: 0.01, max_length: 64, warmup_ratio: 0.0}\n"
ASSETS = [data.raw_examples, data.deduplicated_examples, data.heldout_split, training.base_model, training.lora_adapter]


@pytest.fixture
def tiny_task(ftpipe_env: Path, tmp_path: Path) -> str:
    model = build_tiny_model(tmp_path / "tiny")
    rows = [{"messages": r["messages"]} for r in toy_rows(60, seed=3)]
    make_task(ftpipe_env, "toy", {"rows.jsonl": rows}, f"base_model: {model}\nsplit: {{eval_fraction: 0.2}}\n{TRAINING}")
    return "toy"


def run(instance: dg.DagsterInstance, task: str, selection=None, run_config=None):
    instance.add_dynamic_partitions(task_partitions.name, [task])
    return dg.materialize(ASSETS, instance=instance, partition_key=task, resources=default_resources(),
                          selection=selection, run_config=run_config)


def materialization(result, asset: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def test_lora_adapter_trains_through_pipes_and_is_tracked(tiny_task: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with dg.instance_for_test() as instance:
        result = run(instance, tiny_task)
        assert result.success
        base = materialization(result, "base_model")
        assert base["fingerprint"] and base["architecture"] == "LlamaForCausalLM" and base["trust_remote_code"] is False
        adapter = materialization(result, "lora_adapter")
        for key in ("method", "adapter_path", "train_loss", "eval_loss", "trainable_params",
                    "tokens_per_second", "rows_too_long", "mlflow_run_id"):
            assert key in adapter
        assert adapter["method"] == "lora" and adapter["trainable_params"] > 0
        assert "data:image/png;base64" in adapter["loss_curve"]
        logs = [e.message for e in instance.all_logs(result.run_id) if e.message]
        assert any("step 2/6" in m for m in logs), "progress lines from the training program reach the Dagster log"

        run_info = MlflowClient(f"sqlite:///{home_dir() / 'mlflow.db'}").get_run(adapter["mlflow_run_id"])
        assert run_info.info.status == "FINISHED"
        assert run_info.data.tags["dagster_run_id"] == result.run_id
        assert run_info.data.params["lora.r"] == "16"

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base["model_path"]), adapter["adapter_path"])
        assert model.peft_config["default"].r == 16

        again = run(instance, tiny_task, selection=[training.lora_adapter])
        reused = materialization(again, "lora_adapter")
        assert reused["reused"] is True and reused["mlflow_run_id"] == adapter["mlflow_run_id"]
        version = lambda r: next(e.materialization.tags["dagster/data_version"] for e in r.get_asset_materialization_events()
                                 if e.asset_key.to_user_string() == "lora_adapter")
        assert version(again) == version(result)

        trusting = {"ops": {"base_model": {"config": {"overrides": "trust_remote_code: true"}}}}
        opted_in = run(instance, tiny_task, selection=[training.base_model], run_config=trusting)
        assert materialization(opted_in, "base_model")["trust_remote_code"] is True, "the UI shows a task turned it on"
        assert any("trust_remote_code ON" in (e.message or "") for e in instance.all_logs(opted_in.run_id))


def test_qlora_without_cuda_fails_before_training(tiny_task: str) -> None:
    overrides = {"ops": {"lora_adapter": {"config": {"overrides": "training: {method: qlora}"}}}}
    with dg.instance_for_test() as instance:
        run(instance, tiny_task, selection=[a for a in ASSETS if a is not training.lora_adapter])
        with pytest.raises(Exception, match="needs a CUDA GPU.*Use method: lora"):
            run(instance, tiny_task, selection=[training.lora_adapter], run_config=overrides)
    assert not (home_dir() / "tasks" / tiny_task / "checkpoints").exists()


def tree_digest(folder: Path) -> str:
    return sha256_of_files([p for p in folder.rglob("*") if p.is_file()], folder)


def test_gate_blocks_the_merge_reruns_reuse_and_a_failed_training_spares_the_champion(tiny_task: str) -> None:
    from ftpipe.definitions import defs

    strict = {"ops": {"eval_report": {"config": {"overrides": "evaluation: {min_improvement: 0.5}"}}}}
    lenient = {"ops": {"eval_report": {"config": {"overrides": "evaluation: {min_improvement: -1.0}"}}}}
    job = defs.resolve_job_def("finetune_job")
    merge = dg.AssetSelection.assets("merged_model")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(task_partitions.name, [tiny_task])
        start = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=merge)
        blocked = job.execute_in_process(instance=instance, partition_key=tiny_task, run_config=strict, raise_on_error=False)
        assert not blocked.success
        gate = next(c for c in blocked.get_asset_check_evaluations() if c.check_name == "eval_report_gate")
        assert not gate.passed and "delta_ci_low" in gate.description and "min_improvement 0.5" in gate.description
        assert "merged_model" not in {e.asset_key.to_user_string() for e in blocked.get_asset_materialization_events()}
        after_fail = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=merge, cursor=start.cursor)
        assert after_fail.total_requested == 0, "automation never merges past a failed gate"

        job.execute_in_process(instance=instance, partition_key=tiny_task, run_config=lenient, asset_selection=[dg.AssetKey("eval_report")])
        after_pass = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=merge, cursor=after_fail.cursor)
        assert after_pass.get_requested_partitions(dg.AssetKey("merged_model")) == {tiny_task}, "a passing gate is merged"

        passed = job.execute_in_process(instance=instance, partition_key=tiny_task, run_config=lenient)
        merged = materialization(passed, "merged_model")
        assert merged["registered_model"] == f"ftpipe-{tiny_task}" and merged["registered_version"] == 1
        assert (Path(merged["model_path"]) / "README.md").is_file()
        assert materialization(passed, "lora_adapter")["reused"] is True, "the unchanged adapter is not retrained"
        chat = subprocess.run([sys.executable, "-m", "ftpipe", "chat", tiny_task, "What color is the apple?"],
                              capture_output=True, text=True, env=dict(os.environ), timeout=300)
        assert chat.returncode == 0, chat.stderr[-2000:]
        assert f"model: {merged['model_path']}" in chat.stderr, "the chat CLI answers with the champion model"

        again = job.execute_in_process(instance=instance, partition_key=tiny_task, run_config=lenient)
        assert all(materialization(again, a)["reused"] for a in ("lora_adapter", "eval_report", "merged_model"))
        assert materialization(again, "merged_model")["registered_version"] == 1, "an unchanged rerun registers nothing"

        champion, adapter = Path(merged["model_path"]), adapter_dir(tiny_task)
        before = tree_digest(champion), tree_digest(adapter)
        broken = {"ops": {"lora_adapter": {"config": {"overrides": "training: {lora: {target_modules: [no_such_layer]}}"}}}}
        failed = job.execute_in_process(instance=instance, partition_key=tiny_task, run_config=broken, raise_on_error=False)
        assert not failed.success
        assert (tree_digest(champion), tree_digest(adapter)) == before, "a failed training leaves every file as it was"
        assert merging.champion_model_path(tiny_task) == champion


def test_k8s_launcher_hands_the_pod_spec_to_pipes_k8s_client(tiny_task: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No cluster here: the client's `run` is replaced by one that records the pod and runs its container locally."""
    from dagster_k8s import PipesK8sClient

    pods = []

    def run_pod_here(self, *, context, namespace, base_pod_spec, **_):
        pods.append((namespace, base_pod_spec))
        [container] = base_pod_spec["containers"]
        command = [sys.executable if part == "python" else part for part in container["command"]]
        env = {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}
        return dg.PipesSubprocessClient().run(command=command, context=context, env=env)

    monkeypatch.setattr(PipesK8sClient, "run", run_pod_here)
    k8s = ("training: {launcher: k8s, k8s: {image: 'registry.example.com/ftpipe:1.0', namespace: ml, gpus: 1, "
           "env: {HF_HUB_OFFLINE: '1'}, secret_env: {HF_TOKEN: {secret: hf, key: token}}}}")
    with dg.instance_for_test() as instance:
        result = run(instance, tiny_task, run_config={"ops": {"lora_adapter": {"config": {"overrides": k8s}}}})
    [(namespace, spec)] = pods
    [container] = spec["containers"]
    assert namespace == "ml" and container["image"] == "registry.example.com/ftpipe:1.0"
    assert container["command"][:3] == ["python", "-m", "ftpipe.core.training"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in container["env"]
    assert materialization(result, "lora_adapter")["mlflow_run_id"], "the pod's program reported back through Pipes"
