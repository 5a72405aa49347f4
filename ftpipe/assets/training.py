"""Training group: base_model (resolved, cached checkpoint) and lora_adapter (TRL SFT through Dagster Pipes)."""

import json
import subprocess
from pathlib import Path

import dagster as dg

from ftpipe.assets.common import GPU_POOL, TaskRunConfig, file_version, load_config
from ftpipe.assets.data import heldout_split
from ftpipe.config import TrainingConfig
from ftpipe.core.storage import artifact_dir, home_dir, task_dir, write_text
from ftpipe.core.tasks import base_model_source
from ftpipe.partitions import task_partitions
from ftpipe.resources import MlflowTracking, ModelHub

GROUP = "training"


class AdapterRunConfig(TaskRunConfig):
    force_retrain: bool = False


def base_model_info(task: str) -> dict:
    return json.loads((artifact_dir(task, "base_model") / "base_model.json").read_text())


def split_files(task: str) -> list[Path]:
    folder = artifact_dir(task, "heldout_split")
    return [folder / "train.parquet", folder / "eval.parquet"]


def adapter_dir(task: str) -> Path:
    return artifact_dir(task, "lora_adapter") / "adapter"


def adapter_version(task: str) -> str:
    """A hash of the current adapter's weights: what evaluation and merge results are keyed by."""
    return file_version(*sorted(adapter_dir(task).glob("*.safetensors"))).value


def training_inputs(task: str, training: TrainingConfig) -> tuple[str, str]:
    """(split data version, training fingerprint) of a training on the task's current split and base model."""
    from ftpipe.core.training import training_fingerprint

    split_version = file_version(*split_files(task)).value
    return split_version, training_fingerprint(split_version, base_model_info(task)["fingerprint"], training.recipe())


def last_training_fingerprint(task: str) -> str | None:
    """The fingerprint of the task's current adapter, if there is one."""
    marker = adapter_dir(task) / "training_fingerprint"
    return marker.read_text().strip() if marker.exists() else None


@dg.asset(partitions_def=task_partitions, group_name=GROUP, kinds={"safetensors"})
def base_model(context: dg.AssetExecutionContext, config: TaskRunConfig, hub: ModelHub) -> dg.MaterializeResult:
    """The task's base model as a local safetensors checkpoint with tokenizer and chat template (content-addressed cache)."""
    from ftpipe.core.modeling import resolve_base_model

    cfg = load_config(context, config)
    source = base_model_source(cfg.base_model, task_dir(context.partition_key))
    context.log.info(f"resolving base model {source!r}" + (" with trust_remote_code ON" if cfg.trust_remote_code else ""))
    info = resolve_base_model(source, home_dir() / "models", trust_remote_code=cfg.trust_remote_code, token=hub.token)
    write_text(artifact_dir(context.partition_key, "base_model") / "base_model.json", json.dumps(info, indent=2))
    return dg.MaterializeResult(
        metadata={
            "model_path": dg.MetadataValue.path(info["path"]),
            "fingerprint": info["fingerprint"],
            "architecture": info["architecture"],
            "parameters": info["parameters"],
            "dtype": info["dtype"],
            "has_chat_template": info["has_chat_template"],
            "chat_template_added": info["chat_template_added"],
            "trust_remote_code": cfg.trust_remote_code,
            "source": info["source"],
        },
        data_version=dg.DataVersion(info["fingerprint"]),
    )


def _code_version() -> str:
    from importlib.metadata import version

    root = Path(__file__).resolve().parents[2]
    git = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return f"ftpipe {version('ftpipe')}" + (f" ({git.stdout.strip()})" if git.returncode == 0 else "")


def _spec(context: dg.AssetExecutionContext, cfg, mlflow: MlflowTracking, split_version: str, fingerprint: str) -> dict:
    task = context.partition_key
    base = base_model_info(task)
    train, evaluation = split_files(task)
    return {
        "task": task,
        "base_model_dir": base["path"],
        "base_fingerprint": base["fingerprint"],
        "train_path": str(train),
        "eval_path": str(evaluation),
        "output_dir": str(adapter_dir(task)),
        "checkpoint_dir": str(home_dir() / "tasks" / task / "checkpoints" / fingerprint),
        "training": cfg.training.model_dump(),
        "trust_remote_code": cfg.trust_remote_code,
        "mlflow": {
            "experiment": mlflow.experiment(task),
            "run_name": f"{task}-{fingerprint[:8]}",
            "tags": {
                "dagster_run_id": context.run.run_id,
                "task": task,
                "split_data_version": split_version,
                "training_fingerprint": fingerprint,
                "code_version": _code_version(),
            },
        },
    }


def _reuse(task: str, fingerprint: str, context: dg.AssetExecutionContext) -> dg.MaterializeResult | None:
    """The previous adapter's result when it was trained with this exact fingerprint."""
    if last_training_fingerprint(task) != fingerprint:
        return None
    from ftpipe.core.training import RESULT_FILE, pipes_metadata

    folder = adapter_dir(task)
    context.log.info(f"training fingerprint {fingerprint} unchanged: reusing the adapter in {folder}")
    metadata = json.loads((folder / RESULT_FILE).read_text())
    return dg.MaterializeResult(
        metadata={**_typed(pipes_metadata(metadata)), "reused": True},
        data_version=file_version(folder / "adapter_model.safetensors"),
    )


def _launch(context: dg.AssetExecutionContext, training: TrainingConfig, spec_path: str, fingerprint: str,
            tracking_uri: str, pipes_subprocess_client: dg.PipesSubprocessClient) -> dg.PipesClientCompletedInvocation:
    """Run the training program here (one process or torchrun) or in a Kubernetes pod, through Dagster Pipes.

    The tracking URI goes to the program in its environment, never into the spec file (it may hold a password);
    a pod gets it only when it holds none, else from the pod's own `secret_env`.
    """
    from ftpipe.core.launch import PodSpecError, pod_spec, training_command
    from ftpipe.core.tracking import redact_uri

    env = {"MLFLOW_TRACKING_URI": tracking_uri}
    if training.launcher != "k8s":
        if training.nnodes > 1:
            joining = " ".join(training_command(training, spec_path, fingerprint, python="python"))
            context.log.info(f"waiting for {training.nnodes - 1} more node(s); on each, with the same FTPIPE_HOME, run: {joining}")
        return pipes_subprocess_client.run(command=training_command(training, spec_path, fingerprint), context=context, env=env)
    from dagster_k8s import PipesK8sClient

    try:
        spec = pod_spec(training.k8s, training_command(training, spec_path, fingerprint, python="python"))
    except PodSpecError as error:
        raise dg.Failure(description=str(error), allow_retries=False) from None
    context.log.info(f"starting the training pod in namespace {training.k8s.namespace!r} with image {training.k8s.image}")
    env = env if redact_uri(tracking_uri) == tracking_uri and "MLFLOW_TRACKING_URI" not in training.k8s.secret_env else {}
    return PipesK8sClient().run(context=context, namespace=training.k8s.namespace, base_pod_spec=spec, env=env)


def _typed(metadata: dict) -> dict:
    kinds = {"md": dg.MetadataValue.md, "path": dg.MetadataValue.path, "text": dg.MetadataValue.text}
    return {k: kinds[v["type"]](v["raw_value"]) if isinstance(v, dict) and "type" in v else v for k, v in metadata.items()}


@dg.asset(
    partitions_def=task_partitions, group_name=GROUP, kinds={"pytorch", "mlflow"}, deps=[heldout_split, base_model],
    pool=GPU_POOL, retry_policy=dg.RetryPolicy(max_retries=1, delay=5),
)
def lora_adapter(
    context: dg.AssetExecutionContext,
    config: AdapterRunConfig,
    mlflow: MlflowTracking,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    """A LoRA / QLoRA / full fine-tune of the base model on the train split (TRL SFTTrainer), tracked in MLflow."""
    from ftpipe.core.modeling import check_method

    task = context.partition_key
    cfg = load_config(context, config)
    try:
        check_method(cfg.training.method)
    except ValueError as error:
        raise dg.Failure(description=str(error), allow_retries=False) from None
    split_version, fingerprint = training_inputs(task, cfg.training)
    reused = None if config.force_retrain else _reuse(task, fingerprint, context)
    if reused:
        return reused
    spec_path = artifact_dir(task, "lora_adapter") / "spec.json"
    write_text(spec_path, json.dumps(_spec(context, cfg, mlflow, split_version, fingerprint), indent=2))
    result = _launch(context, cfg.training, str(spec_path), fingerprint, mlflow.uri(), pipes_subprocess_client).get_materialize_result()
    write_text(adapter_dir(task) / "training_fingerprint", fingerprint)
    run_id = result.metadata["mlflow_run_id"]
    run_id = getattr(run_id, "value", run_id)
    return dg.MaterializeResult(
        metadata={**result.metadata, "training_fingerprint": fingerprint, "mlflow_run": mlflow.run_url(run_id)},
        data_version=result.data_version,
    )
