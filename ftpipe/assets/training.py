"""Training group: base_model (resolved, cached checkpoint), lora_adapter (the SFT training) and preference_adapter
(the preference stage from the SFT model, when `training.stages` has one): the training program through Dagster
Pipes."""

import json
import os
import re
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import dagster as dg
from dagster._core.errors import DagsterPipesExecutionError
from dagster._core.storage.tags import MAX_RUNTIME_SECONDS_TAG

from ftpipe.assets.common import (
    GPU_POOL,
    TaskRunConfig,
    effective_config,
    load_config,
    rounded_floats,
    run_overrides,
    upstream,
)
from ftpipe.core import readable
from ftpipe.config import TaskConfig, TrainingConfig
from ftpipe.core.evaluation.judge import missing_key
from ftpipe.core.layout import TaskLayout, models_dir, replay_cache_dir
from ftpipe.core.preferences import missing_split_rows
from ftpipe.core.results import Result, read_result, reusable
from ftpipe.core.storage import atomic_dir, exclusive, task_dir, write_text
from ftpipe.core.training.methods import describe_method
from ftpipe.core.training.warm_start import describe, record_train_ids, write_warm_rows
from ftpipe.core.tasks import (
    TrainingInputs, base_model_source, general_replay_prompts, training_asset,
    training_inputs, why_training_runs,
)
from ftpipe.partitions import task_partitions
from ftpipe.pool import unlimited_warning
from ftpipe.resources import MlflowTracking, ModelHub, TrainingPods

GROUP = "training"
def _epochs(value: float) -> dg.MetadataValue:
    return dg.MetadataValue.text(f"{value:.2f} of an epoch" if value < 1 else f"{value:.2f} epochs")


TYPED = {  # the rest shows as plain values, floats rounded
    "loss_curve": dg.MetadataValue.md, "reward_curve": dg.MetadataValue.md, "adapter_path": dg.MetadataValue.path, "epochs": _epochs,
    "trainable_params": lambda value: dg.MetadataValue.text(readable.count(value)),
}


class AdapterRunConfig(TaskRunConfig):
    """Run settings of `lora_adapter`: `force_retrain` trains from step 0 in a new MLflow run, even when an
    adapter of the same training fingerprint exists or an interrupted one could resume. A retry (of the step, or of
    a run whose worker died) continues that training instead of starting it over."""

    force_retrain: bool = False


@dg.asset(partitions_def=task_partitions, group_name=GROUP, kinds={"safetensors"})
def base_model(context: dg.AssetExecutionContext, config: TaskRunConfig, hub: ModelHub) -> dg.MaterializeResult:
    """The task's base model as a local safetensors checkpoint with tokenizer and chat template (content-addressed
    cache)."""
    from ftpipe.core.modeling import resolve_base_model

    cfg = load_config(context, config)
    source = base_model_source(cfg.base_model, task_dir(context.partition_key))
    trusting = " with trust_remote_code ON" if cfg.trust_remote_code else ""
    context.log.info(f"resolving base model {source!r}{trusting}")
    info = resolve_base_model(source, models_dir(), trust_remote_code=cfg.trust_remote_code, token=hub.token)
    metadata = {key: info[key] for key in ("fingerprint", "architecture", "parameters", "dtype", "has_chat_template",
                                           "chat_template_added", "source")}
    result = Result(kind="base_model", reuse_key=info["fingerprint"], produced=info,
                    inputs={"base_model": source, "trust_remote_code": cfg.trust_remote_code}, metadata=metadata)
    with atomic_dir(TaskLayout(context.partition_key).output("base_model")) as tmp:
        result.write(tmp)
    return dg.MaterializeResult(
        metadata={"model_path": dg.MetadataValue.path(info["path"]), **metadata,
                  "parameters": dg.MetadataValue.text(readable.count(info["parameters"])),
                  "trust_remote_code": cfg.trust_remote_code},
        data_version=dg.DataVersion(info["fingerprint"]),
    )


def _code_version() -> str:
    from importlib.metadata import version

    root = Path(__file__).resolve().parents[2]
    git = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return f"ftpipe {version('ftpipe')}" + (f" ({git.stdout.strip()})" if git.returncode == 0 else "")


def _spec(context: dg.AssetExecutionContext, cfg: TrainingConfig, inputs: TrainingInputs, mlflow: MlflowTracking,
          force_retrain: bool, trust_remote_code: bool):
    from ftpipe.core.tracking import LAUNCHED_BY_TAG
    from ftpipe.core.training.spec import TrainingSpec

    task, paths, asset = context.partition_key, TaskLayout(context.partition_key), training_asset(cfg.objective)
    if cfg.teacher_model:  # where the program finds it (a local path is relative to the task folder)
        cfg = cfg.model_copy(update={"teacher_model": base_model_source(cfg.teacher_model, task_dir(task))})
    stage = "" if cfg.objective == "sft" else f"-{cfg.objective}"
    start, train_path, warm_start = inputs.start, inputs.train_path, None
    if inputs.warm:
        start, warm_start = inputs.warm.start, inputs.warm.spec_entry(cfg.batch_size)
        cfg = cfg.model_copy(update={"max_steps": -1})  # `epochs` over the few warm rows, not the recipe's steps
        train_path = write_warm_rows(inputs.warm, inputs.train_path, cfg.batch_size, cfg.seed,
                                     paths.warm_start_cache / f"rows-{inputs.fingerprint}.parquet")
        context.log.info(describe(warm_start))
    return TrainingSpec(
        task=task, base_model_dir=inputs.base.produced["path"], base_fingerprint=inputs.base.reuse_key,
        split_version=inputs.split_version, train_path=str(train_path), eval_path=str(inputs.eval_path),
        output_dir=str(paths.adapter(inputs.fingerprint, asset)), checkpoint_dir=str(paths.checkpoints(inputs.fingerprint)),
        training=cfg.model_dump(), fingerprint=inputs.fingerprint, force_retrain=force_retrain,
        trust_remote_code=trust_remote_code, replay_prompts=_optional_path(general_replay_prompts()),
        replay_cache_dir=str(replay_cache_dir()),
        start_adapter=str(paths.adapter(start.reuse_key)) if start else None, warm_start=warm_start,
        recipe_version=inputs.recipe_version,
        mlflow={
            "experiment": mlflow.experiment(task),
            "run_name": f"{task}{stage}-{inputs.fingerprint[:8]}",
            "tags": {LAUNCHED_BY_TAG: context.run.run_id, "task": task, "split_data_version": inputs.split_version,
                     "training_fingerprint": inputs.fingerprint, "code_version": _code_version(),
                     "stage": cfg.objective},
        },
    )


def _optional_path(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _launch(context: dg.AssetExecutionContext, training: TrainingConfig, spec_path: Path, fingerprint: str,
            tracking_uri: str, subprocesses: dg.PipesSubprocessClient, pods: TrainingPods) -> None:
    """Run the training program here (one process or torchrun) or in a Kubernetes pod, through Dagster Pipes.

    The tracking URI goes to the program in its environment, never into the spec file (it may hold a password);
    a pod gets it only when it holds none, else from the pod's own `secret_env`.
    """
    from ftpipe.core.launch import PodSpecError, pod_spec, training_command
    from ftpipe.core.tracking import redact_uri

    env = {"MLFLOW_TRACKING_URI": tracking_uri}
    if training.launcher != "k8s":
        if training.nnodes > 1:
            joining = " ".join(training_command(training, str(spec_path), fingerprint, python="python"))
            context.log.info(f"waiting for {training.nnodes - 1} more node(s); on each, with the same FTPIPE_HOME, "
                             f"run: {joining}")
        _run_here(context, subprocesses, training_command(training, str(spec_path), fingerprint), env, spec_path)
        return
    try:
        spec = pod_spec(training.k8s, training_command(training, str(spec_path), fingerprint, python="python"))
    except PodSpecError as error:
        raise dg.Failure(description=str(error), allow_retries=False) from None
    context.log.info(f"starting the training pod in namespace {training.k8s.namespace!r} with image {training.k8s.image}")
    env = env if redact_uri(tracking_uri) == tracking_uri and "MLFLOW_TRACKING_URI" not in training.k8s.secret_env else {}
    pods.run(context=context, namespace=training.k8s.namespace, pod_spec=spec, env=env)


def _run_here(context: dg.AssetExecutionContext, subprocesses: dg.PipesSubprocessClient, command: list[str],
              env: dict[str, str], spec_path: Path) -> None:
    """Run the training program on this machine through Pipes; it stops by itself when this process is gone.

    A stop (Terminate, `dagster run terminate`, Ctrl-C or SIGTERM) or a refused spec fails the step for good, so the
    run ends CANCELED or FAILED; any other failure (a crash, an OOM kill) is left to the RetryPolicy, which resumes.
    """
    from ftpipe.core.launch import LAUNCHER_PID_ENV, REFUSAL_NOTE_ENV, refusal_note

    note = refusal_note(spec_path)
    note.unlink(missing_ok=True)
    try:
        subprocesses.run(command=command, context=context,
                         env={**env, LAUNCHER_PID_ENV: str(os.getpid()), REFUSAL_NOTE_ENV: str(note)})
    except (dg.DagsterExecutionInterruptedError, subprocess.TimeoutExpired):
        raise dg.Failure(description="training stopped: the run was interrupted", allow_retries=False) from None
    except DagsterPipesExecutionError as error:
        reason = _not_retryable(context, _exit_status(error), note)
        if reason:
            raise dg.Failure(description=reason, allow_retries=False) from error
        raise


def _exit_status(error: DagsterPipesExecutionError) -> int | None:
    """The exit status in Dagster's "External execution process failed with code N"."""
    found = re.search(r"failed with code (-?\d+)", str(error))
    return int(found.group(1)) if found else None


def _not_retryable(context: dg.AssetExecutionContext, exit_status: int | None, note: Path) -> str | None:
    """Why a training that failed with `exit_status` must not be retried (a refused spec, in the program's words from
    its `note`; a stop request); None when a retry may help (a crash)."""
    from ftpipe.core.launch import EXIT_REFUSED, stop_signal, taken_refusal

    if exit_status == EXIT_REFUSED:
        return taken_refusal(note) or "the training program refused its spec (see its error above)"
    stopped = stop_signal(exit_status) if exit_status is not None else None
    if stopped:
        return f"training stopped by {stopped}"
    if context.instance.get_run_by_id(context.run.run_id).status == dg.DagsterRunStatus.CANCELING:
        return "training stopped: the run is being canceled"
    return None


def _materialization(result: Result, mlflow: MlflowTracking, reused: bool) -> dg.MaterializeResult:
    """The metadata the training reported (typed for the UI), a link to its MLflow run, and its weights' version."""
    typed = {key: TYPED[key](value) if key in TYPED else value for key, value in rounded_floats(result.metadata).items()}
    return dg.MaterializeResult(
        metadata={**typed, "mlflow_run": dg.MetadataValue.url(mlflow.run_url(result.metadata["mlflow_run_id"])),
                  "reused": reused},
        data_version=dg.DataVersion(result.produced["data_version"]),
    )


TRAINING = dict(partitions_def=task_partitions, group_name=GROUP, kinds={"pytorch", "mlflow"}, pool=GPU_POOL,
                retry_policy=dg.RetryPolicy(max_retries=1, delay=5))


@dg.asset(deps=["heldout_split", "base_model"], **TRAINING)
def lora_adapter(
    context: dg.AssetExecutionContext,
    config: AdapterRunConfig,
    mlflow: MlflowTracking,
    pipes_subprocess_client: dg.PipesSubprocessClient,
    training_pods: TrainingPods,
) -> dg.MaterializeResult:
    """A LoRA / QLoRA / full fine-tune of the base model on the train split (TRL: SFT, or GKD distillation from
    `training.teacher_model`), tracked in MLflow.

    Each finished training is kept in `lora_adapter/<fingerprint>/` (`lora_adapter/adapter` links to the current one),
    so a training fingerprint met again, even after others, is reused as it is. Whether the method can run (e.g.
    4-bit needs CUDA) is decided by the training program where it runs.
    """
    cfg = load_config(context, config)
    if idle := cfg.idle_settings():
        context.log.warning(f"{context.partition_key}: settings without effect: {'; '.join(idle)}")
    stages, preference = cfg.training.stages, cfg.training.preference_objective
    split = TaskLayout(context.partition_key).preference_split_files
    if preference and (problem := missing_split_rows(preference, *split, cfg.split.eval_fraction)):
        raise dg.Failure(description=f"training.stages {stages} cannot run: {problem}"  # before the first stage trains
                                     f"{_quarantine_hint(context.partition_key)}", allow_retries=False)
    if problem := _judge_unusable(context):
        raise dg.Failure(description=f"{problem}, so eval_report would fail after this training: set it (or "
                                     "api_key_env: null for a judge that needs no key)", allow_retries=False)
    return _stage(context, config, cfg, cfg.training.for_stage(stages[0]), mlflow, pipes_subprocess_client,
                  training_pods)


@dg.asset(deps=["lora_adapter", "heldout_split", "base_model"],
          automation_condition=dg.AutomationCondition.eager().allow(dg.AssetSelection.assets("lora_adapter")),
          **TRAINING)
def preference_adapter(
    context: dg.AssetExecutionContext,
    config: AdapterRunConfig,
    mlflow: MlflowTracking,
    pipes_subprocess_client: dg.PipesSubprocessClient,
    training_pods: TrainingPods,
) -> dg.MaterializeResult:
    """The preference stage (`training.stages: [sft, dpo | orpo | kto]`): preference tuning from the SFT model on the
    train split's preference pairs, tracked in MLflow; its adapter applies to the base model (SFT and preference
    updates together). Without a preference stage, the SFT adapter is the fine-tuned model and nothing is trained.
    """
    cfg = load_config(context, config)
    objective = cfg.training.preference_objective
    if objective is None:
        sft = upstream(context.partition_key, "lora_adapter")
        context.log.info("no preference stage in training.stages: the SFT adapter is the fine-tuned model")
        return dg.MaterializeResult(metadata={"objective": "none", "adapter_path": dg.MetadataValue.path(
            str(TaskLayout(context.partition_key).output("lora_adapter")))},
            data_version=dg.DataVersion(sft.produced["data_version"]))
    return _stage(context, config, cfg, cfg.training.for_stage(objective), mlflow, pipes_subprocess_client,
                  training_pods)


def _quarantine_hint(task: str) -> str:
    """`; N rows quarantined, M for: <reason>` (the commonest) where raw_examples quarantined rows: the rows a check
    found missing may be there, as a misspelt column mapping sends them; else ''."""
    raw = read_result(TaskLayout(task).output("raw_examples"), "raw_examples")
    reasons = raw.metadata.get("quarantine_reasons") if raw else None
    if not reasons:
        return ""
    reason, count = max(reasons.items(), key=lambda item: item[1])
    quarantined = raw.metadata["rows_quarantined"]
    return f"; {readable.plural(quarantined, 'row')} quarantined, {count} for: {reason}"


def _judge_unusable(context: dg.AssetExecutionContext) -> str | None:
    """Why the LLM judge of this run's eval_report cannot be asked (its key's variable not set here), found before
    the training it would follow; None when it can, or when the run does not evaluate."""
    if dg.AssetKey("eval_report") not in context.job_def.asset_layer.selected_asset_keys:
        return None
    return missing_key(effective_config(context.partition_key, run_overrides(context, "eval_report")).evaluation.judge)


def _stage(context: dg.AssetExecutionContext, config: AdapterRunConfig, cfg: TaskConfig, stage: TrainingConfig,
           mlflow: MlflowTracking, subprocesses: dg.PipesSubprocessClient, pods: TrainingPods) -> dg.MaterializeResult:
    """Train one stage (or reuse its finished training), keep its output current and the folder bounded. One run at
    a time trains a task's stage: another waits, then reuses what it trained (two GPUs in the pool, or none)."""
    asset = training_asset(stage.objective)
    with exclusive(TaskLayout(context.partition_key).path(asset), waiting=lambda: context.log.info(
            f"another run is training {context.partition_key} ({asset}): waiting for it to finish, to reuse its "
            "training if this run's is the same")):
        return _trained_or_reused(context, config, cfg, stage, mlflow, subprocesses, pods)


def _trained_or_reused(context: dg.AssetExecutionContext, config: AdapterRunConfig, cfg: TaskConfig,
                       stage: TrainingConfig, mlflow: MlflowTracking, subprocesses: dg.PipesSubprocessClient,
                       pods: TrainingPods) -> dg.MaterializeResult:
    asset, paths = training_asset(stage.objective), TaskLayout(context.partition_key)
    try:
        inputs = training_inputs(context.partition_key, stage, None if config.force_retrain else cfg.retrain)
    except FileNotFoundError as missing:
        raise dg.Failure(description=str(missing)) from None
    if stage.objective == "sft":  # the next training's warm start needs to know which rows this one learnt
        record_train_ids(paths.warm_start_cache, inputs.split_version, inputs.train_path)
    version = paths.adapter(inputs.fingerprint, asset)
    reused = None if config.force_retrain else reusable(version, asset, inputs.fingerprint)
    if reused:
        context.log.info(f"training fingerprint {inputs.fingerprint} finished before: reusing {version}")
    else:
        why = "force_retrain is set" if config.force_retrain else why_training_runs(
            inputs, read_result(paths.output(asset), asset))
        context.log.info(f"training {context.partition_key} ({asset}): {why}")
    result, sizing = (reused, {}) if reused else _train(context, config, cfg, stage, inputs, mlflow, subprocesses, pods)
    paths.mark_current_adapter(version, asset)
    removed = paths.prune_adapters(asset)
    if removed:
        context.log.info(f"removed the adapters of earlier trainings: {', '.join(removed)}")
    materialization = _materialization(result, mlflow, reused=reused is not None)
    return dg.MaterializeResult(metadata={**materialization.metadata, **sizing},
                                data_version=materialization.data_version)


def _train(context: dg.AssetExecutionContext, config: AdapterRunConfig, cfg: TaskConfig, stage: TrainingConfig,
           inputs: TrainingInputs, mlflow: MlflowTracking, subprocesses: dg.PipesSubprocessClient,
           pods: TrainingPods) -> tuple[Result, dict]:
    """Size and launch the training of `inputs.fingerprint`; the result it published and the sizing metadata."""
    asset, paths = training_asset(stage.objective), TaskLayout(context.partition_key)
    starts_over = config.force_retrain and context.retry_number == 0 and context.run.parent_run_id is None
    spec = _spec(context, stage, inputs, mlflow, starts_over, cfg.trust_remote_code)
    context.log.info(f"training {context.partition_key} as configured: {describe_method(stage)}")
    unlimited = unlimited_warning(context.instance, GPU_POOL)
    if unlimited:
        context.log.warning(unlimited)
    if stage.objective == "sft":
        estimate = _size(context, spec, stage)
    else:  # a preference stage's rows are not sized before it starts: its program estimates it from its first step
        from ftpipe.core.training.sizing import after_first_step

        estimate, spec.sizing = None, after_first_step(_runtime_left(context))
    spec_file = paths.spec_file(asset)
    write_text(spec_file, json.dumps(asdict(spec), indent=2))
    started = time.monotonic()
    _launch(context, stage, spec_file, inputs.fingerprint, mlflow.uri(), subprocesses, pods)
    trained = reusable(paths.adapter(inputs.fingerprint, asset), asset, inputs.fingerprint)
    if trained is None:
        raise dg.Failure(description=f"the training program published no result for fingerprint {inputs.fingerprint}")
    stale = paths.prune_checkpoints(keep=inputs.fingerprint)
    if stale:
        context.log.info(f"removed the checkpoints of earlier trainings: {', '.join(stale)}")
    return trained, _sizing_metadata(estimate, trained, time.monotonic() - started)


def _size(context: dg.AssetExecutionContext, spec, training: TrainingConfig):
    """Log what the training will cost here (`sizing`), warn when it would outlast the run's max runtime, and hand the
    earlier training's eval rate to the program (its time left); with no earlier training's rate, a training on this
    machine calibrates and logs it itself (the spec's `sizing`)."""
    from ftpipe.core.training.sizing import deferred, estimate, over_runtime

    found, left = estimate(spec), _runtime_left(context)
    if found.cost is None and training.launcher == "subprocess":
        spec.sizing = deferred(found, left)
        return found
    context.log.info(found.line())
    spec.eval_tokens_per_second = found.cost.eval_tokens_per_second if found.cost else None
    warning = over_runtime(found.seconds, left)
    if warning:
        context.log.warning(warning)
    return found


def _runtime_left(context: dg.AssetExecutionContext) -> float | None:
    """Seconds the run may still take under its `dagster/max_runtime` tag; None without the tag."""
    limit = context.run.tags.get(MAX_RUNTIME_SECONDS_TAG)
    if limit is None:
        return None
    started = context.instance.get_run_stats(context.run.run_id).start_time
    return float(limit) - (time.time() - started if started else 0.0)


def _sizing_metadata(estimate, result: Result, seconds: float) -> dict:
    """The estimate's entries and `estimate_ratio`: the training's actual time over the estimate."""
    from ftpipe.core.training.sizing import Cost, Estimate

    if estimate is None:
        return {}
    if estimate.cost is None and "calibration" in result.produced:
        estimate = Estimate(estimate.plan, Cost(**result.produced["calibration"]))
    found = estimate.metadata()
    if estimate.seconds:
        found["estimate_ratio"] = readable.rounded(seconds / estimate.seconds)
    return found
