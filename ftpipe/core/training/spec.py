"""The training program's input: one JSON file, and the fingerprint that identifies a training."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftpipe.config import TrainingConfig
from ftpipe.core.storage import sha256_of_files


def training_fingerprint(split_version: str, base_fingerprint: str, recipe: dict[str, Any],
                         start: str | None = None) -> str:
    """Identity of a training (data split, base model, `TrainingConfig.recipe()`, and the identity of the training it
    starts from, if any): its reuse key, and the name of its checkpoint dir, so an interrupted training resumes."""
    inputs = {"split": split_version, "base": base_fingerprint, "training": recipe}
    if start is not None:
        inputs["start"] = start
    canonical = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def start_identity(folder: Path) -> str:
    """Identity of the training a spec starts from: a hash of its folder's weights and configs; ValueError when the
    folder holds no weights."""
    files = [*folder.glob("*.safetensors"), *folder.glob("*config.json")]
    if not any(path.suffix == ".safetensors" for path in files):
        raise ValueError(f"start_adapter {folder}: no weights (*.safetensors) there")
    return sha256_of_files(files, folder)[:16]


@dataclass
class MlflowSpec:
    experiment: str
    run_name: str | None = None
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite under $FTPIPE_HOME
    tags: dict[str, str] = field(default_factory=dict)  # e.g. dagster run id, data versions, code version


@dataclass
class TrainingSpec:
    """The JSON file given to `python -m ftpipe.core.training` (all paths absolute or relative to the cwd)."""

    task: str
    base_model_dir: str  # resolved base model (modeling.resolve_base_model()["path"])
    base_fingerprint: str
    split_version: str  # data version of the train + eval split
    train_path: str  # parquet: id, messages (list of {role, content}, last one assistant), source; or, for a
    #                  preference objective, preference rows (ftpipe.core.preferences)
    eval_path: str
    output_dir: str  # published atomically with the weights and result.json
    checkpoint_dir: str  # this training's own dir (keyed by fingerprint): checkpoint-N/ and the MLflow run id
    training: dict[str, Any]  # ftpipe.config.TrainingConfig
    fingerprint: str | None = None  # the reuse key; None: training_fingerprint() of the inputs and recipe
    force_retrain: bool = False  # start from step 0 in a new MLflow run, whatever checkpoints exist
    trust_remote_code: bool = False
    mlflow: MlflowSpec | dict[str, Any] | None = None  # a dict is read as MlflowSpec; experiment defaults to task
    data_version: str | None = None  # reported to Dagster; None: a hash of the weight files
    replay_prompts: str | None = None  # training.replay: JSONL of general prompts ({"id", "messages": [user turn]})
    replay_cache_dir: str | None = None  # training.replay: the base model's answers to them, shared by trainings
    start_adapter: str | None = None  # the finished training this one starts from (a PEFT adapter or model folder)
    warm_start: dict[str, Any] | None = None  # warm_start.WarmStart.spec_entry: start_adapter is trained further
    recipe_version: str | None = None  # a hash of the recipe (TrainingInputs.recipe_version), for later warm starts
    sizing: dict[str, Any] | None = None  # sizing.deferred: the plan the program calibrates and logs before training
    eval_tokens_per_second: float | None = None  # the previous training's: its evaluations' time, until one is timed

    def __post_init__(self):
        if not isinstance(self.mlflow, MlflowSpec):
            self.mlflow = MlflowSpec(**{"experiment": self.task, **(self.mlflow or {})})
        if self.fingerprint is None:
            start = start_identity(Path(self.start_adapter)) if self.start_adapter else None
            self.fingerprint = training_fingerprint(self.split_version, self.base_fingerprint, self.config().recipe(),
                                                    start)

    def config(self) -> TrainingConfig:
        return TrainingConfig.model_validate(self.training)

    @classmethod
    def from_json(cls, path: Path) -> TrainingSpec:
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))
