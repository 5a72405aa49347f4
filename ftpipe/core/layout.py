"""Where artifacts live: every folder and file name under `$FTPIPE_HOME`, and the housekeeping that keeps it bounded.

    $FTPIPE_HOME/
      models/<fingerprint>/              resolved base models, shared by every task
      downloads/                         the default base model's GGUF file
      mlflow.db, mlartifacts/            the local MLflow store
      cache/replay/                      the base models' answers to the replay prompts (training.replay)
      cache/teacher/<task>.jsonl         every answer a distillation teacher gave for the task (never asked twice)
      tasks/<task>/
        teacher_examples/                teacher.jsonl (the teacher's accepted answers as chat rows), rejected.jsonl
        raw_examples/                    examples.parquet, preferences.parquet, quarantine.jsonl
        deduplicated_examples/           examples.parquet, preferences.parquet, removed.jsonl, result.json
        review_sample/                   review_sample.csv
        heldout_split/                   train.parquet, eval.parquet, train_preferences.parquet,
                                         eval_preferences.parquet, split.json
        base_model/                      result.json: the resolved model's folder and fingerprint
        lora_adapter/<fingerprint>/      a finished training (weights, result.json); `adapter` links to the current
                                         one, and the ADAPTERS_KEPT most recently current others are kept
        lora_adapter/spec.json           the training program's input
        preference_adapter/<fingerprint>/, preference_adapter/spec.json
                                         the preference stage, laid out as lora_adapter (its adapter applies to the
                                         base model: the SFT and preference updates together)
        checkpoints/<fingerprint>/       the checkpoints of the training with that fingerprint
        eval_report/                     report.md, predictions.parquet, metrics.json, result.json
        merged_model/<base>-<adapter>/   one servable model per adapter (result.json inside); `latest` links to the newest
        cache/eval_base/                 each model's outputs on the held-out rows, and rows-<weights>.jsonl, its
                                         results per row (answers, label and answer log-probabilities)
        cache/warm_start/                train-ids-<split version>.txt of each SFT training's split, and
                                         rows-<fingerprint>.parquet, the rows of each warm start (retrain.warm_start)
        requests/                        the request log of `ftpipe serve` (see server.request_log)
        production_report/               report.md, metrics.json, over_time.png

Every task path is checked to stay inside the task's folder (`storage.contained`), so neither a task name nor a
fingerprint nor a symlink can point a write elsewhere.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from ftpipe.config import check_task_name
from ftpipe.core.storage import (
    SUPERSEDED_GRACE_S, contained, discard, home_dir, point, remove_leftovers_in, remove_tree,
)

EXAMPLES = "examples.parquet"
PREFERENCES = "preferences.parquet"  # preference rows (see `preferences`), beside the chat examples
TRAIN_PREFERENCES, EVAL_PREFERENCES = "train_preferences.parquet", "eval_preferences.parquet"
QUARANTINE = "quarantine.jsonl"
REMOVED = "removed.jsonl"
REVIEW_CSV = "review_sample.csv"
TRAIN, EVAL, SPLIT_RECORD = "train.parquet", "eval.parquet", "split.json"
SPEC = "spec.json"
REPORT, PREDICTIONS, METRICS = "report.md", "predictions.parquet", "metrics.json"
MODEL_CARD = "README.md"
LATEST, ADAPTER = "latest", "adapter"
TRAININGS = ("lora_adapter", "preference_adapter")  # the assets that run the training program, one per stage
OUTPUTS = {**{asset: (asset, ADAPTER) for asset in TRAININGS}, "merged_model": ("merged_model", LATEST)}
ADAPTERS_KEPT = 3  # finished trainings kept besides the current one, so a recipe tried again is reused, not retrained


def models_dir() -> Path:
    return home_dir() / "models"


def downloads_dir() -> Path:
    return home_dir() / "downloads"


def mlflow_db() -> Path:
    return home_dir() / "mlflow.db"


def mlartifacts_dir() -> Path:
    return home_dir() / "mlartifacts"


def replay_cache_dir() -> Path:
    return home_dir() / "cache" / "replay"


def teacher_cache(task: str) -> Path:
    """The answers a distillation teacher gave for `task` (checked like a task name)."""
    return contained(home_dir() / "cache" / "teacher", f"{check_task_name(task)}.jsonl")


@dataclass(frozen=True)
class TaskLayout:
    """The artifact paths of one task (a valid task name: the partition key)."""

    task: str

    def __post_init__(self) -> None:
        check_task_name(self.task)

    @property
    def root(self) -> Path:
        return contained(home_dir(), "tasks", self.task)

    def path(self, *parts: str) -> Path:
        """`root/parts...`, refused when it resolves outside the task's folder."""
        return contained(self.root, *parts)

    def asset(self, name: str) -> Path:
        """The folder of an asset's files (named after the asset)."""
        return self.path(name)

    def output(self, asset: str) -> Path:
        """The folder an asset publishes whole, with its `Result` inside (its asset folder unless OUTPUTS says)."""
        return self.path(*OUTPUTS.get(asset, (asset,)))

    def examples(self, asset: str) -> Path:
        """The canonical examples an asset wrote (`raw_examples` or `deduplicated_examples`)."""
        return self.path(asset, EXAMPLES)

    def preferences(self, asset: str) -> Path:
        """The preference rows an asset wrote (`raw_examples` or `deduplicated_examples`)."""
        return self.path(asset, PREFERENCES)

    @property
    def split_files(self) -> tuple[Path, Path]:
        """(train, eval) rows of the held-out split."""
        return self.path("heldout_split", TRAIN), self.path("heldout_split", EVAL)

    @property
    def preference_split_files(self) -> tuple[Path, Path]:
        """(train, eval) preference rows of the held-out split."""
        return self.path("heldout_split", TRAIN_PREFERENCES), self.path("heldout_split", EVAL_PREFERENCES)

    @property
    def requests_dir(self) -> Path:
        """The request log of `ftpipe serve` for this task."""
        return self.path("requests")

    def spec_file(self, asset: str = "lora_adapter") -> Path:
        """The training program's input, for a training asset (`TRAININGS`)."""
        return self.path(asset, SPEC)

    def checkpoints(self, fingerprint: str) -> Path:
        return self.path("checkpoints", fingerprint)

    def adapter(self, fingerprint: str, asset: str = "lora_adapter") -> Path:
        """The published output of the training with this fingerprint."""
        return self.path(asset, fingerprint)

    def mark_current_adapter(self, folder: Path, asset: str = "lora_adapter") -> None:
        """Point `<asset>/adapter` (the training asset's output) at the finished training in `folder`."""
        point(self.output(asset), folder)

    def merged(self, base_fingerprint: str, adapter_version: str) -> Path:
        """The merged model of one adapter on one base (a new adapter never touches an older model's folder)."""
        return self.path("merged_model", f"{base_fingerprint[:8]}-{adapter_version}")

    def mark_latest_merged(self, folder: Path) -> None:
        """Point `merged_model/latest` (the asset's output) at the merged model in `folder`."""
        point(self.output("merged_model"), folder)

    @property
    def eval_base_cache(self) -> Path:
        return self.path("cache", "eval_base")

    @property
    def warm_start_cache(self) -> Path:
        """The train rows' ids of each split version an SFT training ran on, and the rows of each warm start."""
        return self.path("cache", "warm_start")

    def prune_checkpoints(self, keep: str) -> list[str]:
        """Delete the checkpoint folders of fingerprints other than `keep` that no training touched for a grace
        period (a training still writing one is spared); return their names."""
        folder = self.path("checkpoints")
        stale = [child for child in _children(folder) if child.name != keep and _idle(child)]
        for child in stale:
            remove_tree(self.path("checkpoints", child.name))
        return [child.name for child in stale]

    def prune_adapters(self, asset: str = "lora_adapter") -> list[str]:
        """Delete the finished trainings beyond the current one and the `ADAPTERS_KEPT` most recently current (a
        version is touched when it stops being current), sparing any published within the grace period, and
        replaced versions; return the fingerprints deleted."""
        folder = self.path(asset)
        current = self.output(asset)
        live = os.readlink(current) if current.is_symlink() else None
        others = [child for child in _children(folder) if child.is_symlink() and child.exists()
                  and child.name not in {ADAPTER, live}]
        others.sort(key=lambda child: child.stat().st_mtime, reverse=True)
        doomed = [child.name for child in others[ADAPTERS_KEPT:] if _idle(child)]
        for name in doomed:
            discard(self.path(asset, name))
        if folder.is_dir():
            remove_leftovers_in(folder)
        return doomed

    def prune_merged(self, keep: set[str]) -> list[str]:
        """Delete the merged models whose folder name is not in `keep` (nor `latest`'s target), and the versions of
        any merged model that were replaced over the grace period ago; return the names of the deleted models."""
        folder = self.path("merged_model")
        latest = os.readlink(self.output("merged_model")) if self.output("merged_model").is_symlink() else None
        doomed = [child.name for child in _children(folder)
                  if child.is_symlink() and child.name not in keep | {LATEST, latest}]
        for name in doomed:
            discard(self.path("merged_model", name))
        if folder.is_dir():
            remove_leftovers_in(folder)
        return doomed


def _children(folder: Path) -> list[Path]:
    """The visible entries of `folder` (none when it does not exist); hidden ones are `atomic_dir`'s own."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def _idle(folder: Path) -> bool:
    return time.time() - folder.stat().st_mtime > SUPERSEDED_GRACE_S
