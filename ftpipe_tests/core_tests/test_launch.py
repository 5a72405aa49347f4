"""Launching the training program: torchrun on CPU (gloo) for real, and the Kubernetes pod spec."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from ftpipe.config import parse_task_config
from ftpipe.core.launch import PodSpecError, heeded_stop_signals, pod_spec, stop_signal, training_command
from ftpipe_tests.training_program import output_result, program_env, toy_workspace, write_spec

K8S = """
training:
  launcher: k8s
  num_processes: 2
  k8s:
    image: registry.example.com/ftpipe:1.0
    namespace: ml
    service_account: trainer
    gpus: 2
    cpu: "8"
    memory: 48Gi
    node_selector: {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}
    tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
    volumes: [{name: home, persistentVolumeClaim: {claimName: ftpipe-home}}]
    volume_mounts: [{name: home, mountPath: /mnt/ftpipe}]
    env: {HF_HUB_OFFLINE: "1"}
    secret_env: {HF_TOKEN: {secret: ftpipe-secrets, key: hf-token}}
    image_pull_secrets: [registry]
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir):
    return toy_workspace(tmp_path_factory.mktemp("launch"), tiny_model_dir)


def train(spec, env, launcher: str) -> dict:
    """The metadata of a training of `spec` launched as `launcher` would launch it."""
    from ftpipe.config import TrainingConfig

    config = TrainingConfig.model_validate({**json.loads(spec.read_text())["training"], "launcher": launcher,
                                            "num_processes": 2 if launcher == "torchrun" else 1})
    done = subprocess.run(training_command(config, str(spec), "test"), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return output_result(spec).metadata


@pytest.mark.slow
def test_two_torchrun_processes_train_like_one_with_the_same_global_batch(workspace) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    env = program_env(workspace)
    settings = {"max_steps": 8, "eval_steps": 4, "batch_size": 8, "lora": {"dropout": 0.0}}
    single = train(write_spec(workspace, "single", **settings), env, "subprocess")
    pair = train(write_spec(workspace, "pair", **settings), env, "torchrun")

    assert pair["steps"] == single["steps"] == 8
    assert pair["eval_loss"] == pytest.approx(single["eval_loss"], rel=0.05)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workspace / "base"), pair["adapter_path"])
    assert model.peft_config["default"].r == 16
    client = MlflowClient(f"sqlite:///{workspace / 'home' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("toy-pair").experiment_id])
    assert [run.info.status for run in runs] == ["FINISHED"], "only rank 0 tracks the training"


def test_torchrun_command_for_one_and_several_nodes() -> None:
    one = parse_task_config("training: {launcher: torchrun, num_processes: 4}", "task.yaml").training
    assert training_command(one, "spec.json", "fp", python="python") == [
        "python", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
        "-m", "ftpipe.core.training", "spec.json"]
    several = parse_task_config("training: {launcher: torchrun, num_processes: 8, batch_size: 16, nnodes: 2, "
                                "rdzv_endpoint: 'node0:29400'}", "task.yaml").training
    command = training_command(several, "spec.json", "fp", python="python")
    assert command[command.index("--rdzv-endpoint") + 1] == "node0:29400" and "--nnodes" in command
    assert command[command.index("--rdzv-id") + 1] == "fp"
    plain = parse_task_config("", "task.yaml").training
    assert training_command(plain, "spec.json", "fp", python="python") == ["python", "-m", "ftpipe.core.training", "spec.json"]


def test_pod_spec_from_task_yaml_is_a_valid_kubernetes_pod_spec() -> None:
    from kubernetes.client import ApiClient

    training = parse_task_config(K8S, "task.yaml").training
    spec = pod_spec(training.k8s, training_command(training, "/mnt/ftpipe/spec.json", "fp", python="python"))

    class Response:
        data = json.dumps(spec)

    model = ApiClient().deserialize(Response(), "V1PodSpec")
    [container] = model.containers
    assert container.image == "registry.example.com/ftpipe:1.0"
    assert container.command[:3] == ["python", "-m", "torch.distributed.run"] and container.command[-1] == "/mnt/ftpipe/spec.json"
    assert container.resources.limits == {"nvidia.com/gpu": "2", "memory": "48Gi"}
    assert container.resources.requests == {"cpu": "8", "memory": "48Gi"}
    secret = next(e for e in container.env if e.name == "HF_TOKEN")
    assert secret.value is None and secret.value_from.secret_key_ref.name == "ftpipe-secrets"
    assert container.volume_mounts[0].mount_path == "/mnt/ftpipe"
    assert model.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert model.tolerations[0].effect == "NoSchedule" and model.service_account_name == "trainer"
    assert model.restart_policy == "Never" and model.image_pull_secrets[0].name == "registry"


@pytest.mark.parametrize(("change", "message"), [
    ("volume_mounts: [{name: home, mountpath: /mnt}]", "volumeMounts.0.mountpath"),
    ("tolerations: [{key: a, operater: Exists}]", "tolerations.0.operater"),
    ("volumes: [{persistentVolumeClaim: {claimName: x}}]", "`name`, must not be `None`"),
])
def test_pod_spec_typos_fail_before_any_pod(change: str, message: str) -> None:
    training = parse_task_config(K8S, "task.yaml", f"training: {{k8s: {{{change}}}}}").training
    with pytest.raises(PodSpecError, match=message):
        pod_spec(training.k8s, ["python", "-m", "ftpipe.core.training", "spec.json"])


def test_inline_secrets_are_refused_in_task_yaml() -> None:
    from ftpipe.config import TaskConfigError

    with pytest.raises(TaskConfigError, match="training.k8s.env.*HF_TOKEN.*secret_env"):
        parse_task_config(K8S, "task.yaml", "training: {k8s: {env: {HF_TOKEN: hf_abc}}}")


def test_a_qlora_pod_is_specified_without_any_gpu_here(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("launching must not look for a GPU"))
    training = parse_task_config(K8S, "task.yaml", "training: {method: qlora}").training
    spec = pod_spec(training.k8s, training_command(training, "/mnt/ftpipe/spec.json", "fp", python="python"))
    assert spec["containers"][0]["command"][-3:] == ["-m", "ftpipe.core.training", "/mnt/ftpipe/spec.json"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_a_stop_request_is_told_from_a_crash_by_the_exit_status():
    assert [stop_signal(status) for status in (130, 143, -2, -15)] == ["SIGINT", "SIGTERM", "SIGINT", "SIGTERM"]
    assert [stop_signal(status) for status in (-9, 137, 1, 2, 0)] == [None] * 5, "killed or failed: a crash"
    assert [stop_signal(status) for status in (129, -1)] == ["SIGHUP", "SIGHUP"], "a closed terminal"


def test_a_hangup_stops_a_training_unless_the_command_was_started_to_ignore_it() -> None:
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as a terminal starts a command (the suite may be nohup'd)
    try:
        assert heeded_stop_signals() == [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as `nohup` starts a command
        assert heeded_stop_signals() == [signal.SIGINT, signal.SIGTERM]
    finally:
        signal.signal(signal.SIGHUP, previous)
