"""Task configuration: `task.yaml` validated by pydantic, plus per-run overrides from the launchpad."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

TASK_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
SECRET_NAME_RE = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|CREDENTIAL", re.IGNORECASE)
DEFAULT_BASE_MODEL = "smollm2-135m-instruct"


class TaskConfigError(ValueError):
    """A task folder or `task.yaml` that cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class DataConfig(_Strict):
    format: Literal["auto", "messages", "alpaca", "prompt_completion", "columns"] = "auto"
    columns: dict[Literal["system", "prompt", "completion"], str] = Field(
        default_factory=dict, description="map canonical fields to your column names (format: columns)"
    )
    system_prompt: str | None = Field(None, description="system message added to rows that have none")


class DedupConfig(_Strict):
    near_threshold: float = Field(0.8, gt=0.0, le=1.0, description="Jaccard similarity for near-duplicates")
    num_perm: int = Field(128, ge=16, le=1024)
    shingle_words: int = Field(3, ge=1, le=10)


class SplitConfig(_Strict):
    eval_fraction: float = Field(0.15, ge=0.05, le=0.5)
    seed: int = 0


class LoraConfig(_Strict):
    r: int = Field(16, ge=1, le=1024)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class SecretRef(_Strict):
    secret: str = Field(description="name of a Kubernetes Secret")
    key: str = Field(description="key inside that Secret")


class K8sConfig(_Strict):
    """The training pod (launcher: k8s). Secrets are passed by reference only (secret_env)."""

    image: str = Field(description="an image with ftpipe installed, e.g. registry.example.com/ftpipe:1.0")
    namespace: str = "default"
    service_account: str | None = None
    gpus: int = Field(1, ge=0, description="nvidia.com/gpu limit")
    cpu: str | None = Field(None, description="CPU request, e.g. '8'")
    memory: str | None = Field(None, description="memory request and limit, e.g. '48Gi'")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    volumes: list[dict[str, Any]] = Field(default_factory=list, description="pod volumes; $FTPIPE_HOME must be on one")
    volume_mounts: list[dict[str, Any]] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict, description="plain values; never secrets")
    secret_env: dict[str, SecretRef] = Field(default_factory=dict)
    image_pull_secrets: list[str] = Field(default_factory=list)

    @field_validator("env")
    @classmethod
    def _no_inline_secrets(cls, env: dict[str, str]) -> dict[str, str]:
        inline = [name for name in env if SECRET_NAME_RE.search(name)]
        if inline:
            raise ValueError(f"{', '.join(inline)} look(s) like secrets: pass them with secret_env "
                             "({NAME: {secret: <Secret name>, key: <key>}}), never inline")
        return env


class TrainingConfig(_Strict):
    method: Literal["auto", "lora", "qlora", "full"] = "auto"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    learning_rate: float = Field(2e-4, gt=0.0, lt=1.0)
    epochs: float = Field(1.0, gt=0.0)
    max_steps: int = Field(-1, ge=-1, description="-1: run all epochs")
    batch_size: int = Field(8, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    max_length: int = Field(512, ge=16)
    too_long: Literal["drop", "truncate"] = "drop"
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(0.0, ge=0.0)
    seed: int = 42
    packing: bool = False
    eval_steps: int = Field(20, ge=1)
    logging_steps: int = Field(5, ge=1)
    early_stopping_patience: int = Field(3, ge=1)
    save_total_limit: int = Field(2, ge=2)
    launcher: Literal["subprocess", "torchrun", "k8s"] = "subprocess"
    num_processes: int = Field(1, ge=1, description="processes per node, one per GPU (torchrun; k8s pods use torchrun when > 1)")
    nnodes: int = Field(1, ge=1, description="nodes taking part (torchrun); more than 1 needs rdzv_endpoint")
    rdzv_endpoint: str | None = Field(None, description="host:port of the torchrun rendezvous for several nodes")
    k8s: K8sConfig | None = None

    @model_validator(mode="after")
    def _launch(self) -> TrainingConfig:
        world = self.num_processes * self.nnodes
        if self.batch_size % world:
            raise ValueError(f"batch_size {self.batch_size} is the global batch: it must divide evenly over {world} processes")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("nnodes > 1 needs rdzv_endpoint (host:port reachable from every node)")
        if self.launcher == "subprocess" and world > 1:
            raise ValueError("several processes need launcher torchrun (or k8s)")
        if self.launcher == "k8s" and self.k8s is None:
            raise ValueError("launcher k8s needs a k8s section with at least an image")
        return self

    def recipe(self) -> dict[str, Any]:
        """What decides the trained weights: everything but where and how the training is launched."""
        return self.model_dump(exclude={"launcher", "num_processes", "nnodes", "rdzv_endpoint", "k8s"})


class EvaluationConfig(_Strict):
    task_type: Literal["classification", "extraction", "generation"] = "generation"
    label_field: str | None = Field(None, description="JSON field holding the label (classification)")
    max_new_tokens: int = Field(48, ge=1, le=4096)
    max_rows: int | None = Field(None, ge=1, description="evaluate at most this many held-out rows")
    batch_size: int = Field(16, ge=1)
    min_improvement: float = 0.0
    max_forgetting: float = Field(0.10, ge=0.0)
    bootstrap_samples: int = Field(2000, ge=100)


class RetrainConfig(_Strict):
    on_data_change: bool = Field(False, description="retrain as soon as the training fingerprint changes")
    schedule: str | None = Field("0 3 * * 1", description="cron (UTC) for scheduled retraining; null for none")

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        from croniter import croniter

        if value is not None and (len(value.split()) != 5 or not croniter.is_valid(value)):
            raise ValueError("a cron expression with 5 fields, e.g. '0 3 * * 1', or null")
        return value


class TaskConfig(_Strict):
    description: str = ""
    data: DataConfig = Field(default_factory=DataConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    base_model: str = DEFAULT_BASE_MODEL
    trust_remote_code: bool = False
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)


def _explain(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid task configuration"]
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {path}: unknown key (allowed keys are listed in the README's task.yaml reference)")
        else:
            lines.append(f"  {path}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _parse_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise TaskConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(values, dict):
        raise TaskConfigError(f"{source}: expected a mapping of keys to values, got {type(values).__name__}")
    return values


def parse_task_config(text: str, source: str, overrides: str = "") -> TaskConfig:
    """Validate task.yaml text, deep-merged with an optional YAML/JSON override snippet."""
    values = _parse_yaml(text, source)
    if overrides.strip():
        values = _deep_merge(values, _parse_yaml(overrides, f"{source} (run overrides)"))
    try:
        return TaskConfig.model_validate(values)
    except ValidationError as exc:
        raise TaskConfigError(_explain(exc, source)) from None


def load_task_config(path: Path, overrides: str = "") -> TaskConfig:
    """Read and validate a task.yaml file (a missing file means all defaults)."""
    text = path.read_text(encoding="utf-8-sig") if path.exists() else ""
    return parse_task_config(text, str(path), overrides)


def check_task_name(name: str) -> str:
    if not TASK_NAME_RE.match(name):
        raise TaskConfigError(
            f"task folder {name!r}: invalid name; use lowercase letters, digits, '_' or '-', "
            "starting with a letter or digit, at most 64 characters"
        )
    return name
