"""Task folders: `<data dir>/tasks/<task>/{task.yaml, raw/}`; each valid folder is one partition. And what a
training of a task would start from now."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from ftpipe.config import (
    DEFAULT_BASE_MODEL, EvaluationConfig, RetrainConfig, TaskConfig, TaskConfigError, TrainingConfig, check_task_name,
    load_task_config, named_source,
)
from ftpipe.core.layout import TaskLayout
from ftpipe.core.modeling import HUB_ID_RE
from ftpipe.core.training.methods import SUPERVISED_OBJECTIVES
from ftpipe.core.results import Result, read_result, reuse_key
from ftpipe.core.training.warm_start import WarmStart, plan_warm_start
from ftpipe.core.storage import REPO_ROOT, data_dir, file_sha256, home_dir, sha256_of_files, task_dir, tasks_dir

@dataclass
class Discovery:
    tasks: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


def discover_tasks(root: Path | None = None) -> Discovery:
    """Task folders with a valid name and task.yaml, and the folders refused with the reason (until it is fixed, a
    task whose task.yaml stopped validating keeps its partition but is not run for its changes)."""
    root = root or tasks_dir()
    found = Discovery()
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        if folder.name.startswith("."):
            continue
        try:
            check_task_name(folder.name)
            folder_config(folder)
            found.tasks.append(folder.name)
        except TaskConfigError as error:
            found.refused[folder.name] = str(error)
    return found


def task_config(task: str, overrides: str = "") -> TaskConfig:
    """The validated configuration of a task, with optional run overrides; the base model is checked too."""
    return folder_config(task_dir(task), overrides)


def folder_config(folder: Path, overrides: str = "") -> TaskConfig:
    """The validated configuration in task folder `folder` (see `task_config`)."""
    path = folder / "task.yaml"
    config = load_task_config(path, overrides)
    models = {"base_model": config.base_model, "training.teacher_model": config.training.teacher_model}
    problems = []
    for field, spec in models.items():
        if spec is None:
            continue
        try:
            base_model_source(spec, folder)
        except ValueError as error:
            problems.append(f"{named_source(str(path), overrides, field)}: {field}: {error} (got {spec!r})")
    if problems:
        raise TaskConfigError("\n".join(problems))
    return config


def model_roots() -> list[Path]:
    """Where local base models may live: the data dir, `$FTPIPE_HOME`, and the folders in `FTPIPE_MODEL_DIRS`."""
    extra = [Path(p) for p in os.environ.get("FTPIPE_MODEL_DIRS", "").split(os.pathsep) if p]
    return [data_dir(), home_dir(), *extra]


def base_model_source(spec: str, folder: Path) -> str:
    """What to resolve for a model setting (`base_model`, `training.teacher_model`): the default alias, a hub id, or a
    local path (relative to the task folder) that exists inside one of `model_roots()`. Raises ValueError saying what
    was expected."""
    if spec == DEFAULT_BASE_MODEL:
        return spec
    path = folder / Path(spec).expanduser()
    if not path.exists() and HUB_ID_RE.match(spec):
        return spec
    if not path.exists():
        raise ValueError(f"expected {DEFAULT_BASE_MODEL!r}, a hub id like 'org/name', or an existing .gguf file "
                         "or model folder (relative to the task folder)")
    resolved = path.resolve()
    if not any(root.resolve() in (resolved, *resolved.parents) for root in model_roots()):
        raise ValueError(f"{path} is outside the data dir and $FTPIPE_HOME; "
                         "list its folder in FTPIPE_MODEL_DIRS to allow local models there")
    return str(resolved)


def task_files(task: str) -> list[Path]:
    """What the pipeline reads from a task folder: `task.yaml` and the files under `raw/` and `prompts/`, sorted."""
    folder = task_dir(task)
    return sorted(_inside(folder, [folder / "task.yaml", *(folder / "raw").rglob("*"), *(folder / "prompts").rglob("*")]))


def task_files_version(task: str) -> str:
    """A hash of the names and contents of `task_files`."""
    return sha256_of_files(task_files(task), task_dir(task))[:16]


def reviews_dir(task: str) -> Path:
    """`<task folder>/reviews/`: where reviewers drop their filled-in review CSV files."""
    return task_dir(task) / "reviews"


def reviews_version(task: str) -> str:
    """A hash of the review CSV files in the task's `reviews/` folder."""
    return _files_version(task_dir(task), list(reviews_dir(task).glob("*.csv")))


def _inside(folder: Path, candidates: list[Path]) -> list[Path]:
    """The candidates that are files inside `folder` (links out of it left out)."""
    return [p for p in candidates if p.is_file() and folder in p.resolve().parents]


def _files_version(folder: Path, candidates: list[Path]) -> str:
    return sha256_of_files(_inside(folder, candidates), folder)[:16]


def general_probe() -> Path | None:
    """The general-skills probe every task's forgetting check uses (`general/probe.jsonl`, see `_general`)."""
    return _general("probe.jsonl")


def general_replay_prompts() -> Path | None:
    """The general prompts whose base-model answers `training.replay` mixes into training (disjoint from the probe)."""
    return _general("replay_prompts.jsonl")


def _general(name: str) -> Path | None:
    """`general/<name>` of the data dir, if present; a data dir without a `general/` folder (your own
    `FTPIPE_DATA_DIR`, holding only tasks) uses the project's, so forgetting is measured and replay runs as with the
    demo's."""
    folder = data_dir() / "general"
    path = (folder if folder.is_dir() else REPO_ROOT / "data" / "general") / name
    return path if path.is_file() else None


@dataclass(frozen=True)
class TrainingInputs:
    """What one stage's training of a task starts from: its train and eval files and their data version, the base
    model's result, the training fingerprint (the reuse key of the adapter it makes), the version of its recipe, the
    finished SFT training a preference stage starts from (None for sft), and an SFT training's warm start (None for a
    training from step 0)."""

    train_path: Path
    eval_path: Path
    split_version: str
    base: Result
    fingerprint: str
    recipe_version: str
    start: Result | None = None
    warm: WarmStart | None = None


def training_asset(objective: str) -> str:
    """The asset that runs a stage's training: lora_adapter for sft and distill, preference_adapter for dpo, orpo
    and kto."""
    return "lora_adapter" if objective in SUPERVISED_OBJECTIVES else "preference_adapter"


def training_inputs(task: str, training: TrainingConfig, retrain: RetrainConfig | None = None) -> TrainingInputs:
    """The inputs the training of `training.objective` (a `TrainingConfig.for_stage`) would have now, warm-started
    when `retrain` allows it (`warm_start.plan_warm_start`); FileNotFoundError while the split, the base model or (for
    a preference stage) the SFT adapter is missing."""
    from ftpipe.core.training.spec import training_fingerprint

    paths = TaskLayout(task)
    sft = training.objective in SUPERVISED_OBJECTIVES
    files = paths.split_files if sft else paths.preference_split_files
    base = read_result(paths.output("base_model"), "base_model")
    start = None if sft else read_result(paths.output("lora_adapter"), "lora_adapter")
    if base is None or not all(path.is_file() for path in files) or not (sft or start):
        raise FileNotFoundError(f"{task}: the held-out split, the base model or the SFT adapter is not built yet")
    split_version = file_sha256(*files)[:16]
    recipe = training.recipe()
    if training.replay:  # the replayed prompts shape the weights too
        prompts = general_replay_prompts()
        recipe["replay_prompts"] = file_sha256(prompts)[:16] if prompts else None
    recipe_version = reuse_key(json.dumps(recipe, sort_keys=True, default=str))
    found = TrainingInputs(*files, split_version, base, training_fingerprint(
        split_version, base.reuse_key, recipe, start and start.produced["data_version"]), recipe_version, start)
    if training.objective != "sft" or retrain is None or not retrain.warm_start:
        return found
    return _warm_started(found, read_result(paths.output("lora_adapter"), "lora_adapter"), paths, recipe,
                         retrain.warm_start_max_growth)


def _warm_started(found: TrainingInputs, previous: Result | None, paths: TaskLayout, recipe: dict,
                  max_growth: float) -> TrainingInputs:
    """`found` as a warm start of the `previous` SFT training when one is due; the previous training itself when it
    is a warm start onto this very split (so it is reused)."""
    from ftpipe.core.training.spec import training_fingerprint

    unchanged = previous is not None and previous.inputs.get("recipe_version") == found.recipe_version and (
        previous.inputs["split_version"], previous.inputs["base_fingerprint"]) == (found.split_version, found.base.reuse_key)
    if unchanged:
        return replace(found, fingerprint=previous.reuse_key)
    warm = plan_warm_start(paths.warm_start_cache, previous, split_version=found.split_version,
                           train_path=found.train_path, base_fingerprint=found.base.reuse_key,
                           recipe_version=found.recipe_version, max_growth=max_growth)
    if warm is None:
        return found
    start = {"warm_start_from": previous.produced["data_version"]}
    return replace(found, warm=warm, fingerprint=training_fingerprint(found.split_version, found.base.reuse_key,
                                                                      {**recipe, **start}))


def why_training_runs(found: TrainingInputs, current: Result | None) -> str:
    """Why the training of `found` runs rather than being reused, against the task's `current` adapter: the first
    training, or what changed since that one."""
    if current is None:
        return "the task has no adapter yet"
    if current.reuse_key == found.fingerprint:
        return "the training of these inputs did not finish"
    changed = [what for what, key, now in (("the held-out split", "split_version", found.split_version),
                                           ("the base model", "base_fingerprint", found.base.reuse_key),
                                           ("the training settings", "recipe_version", found.recipe_version))
               if current.inputs.get(key) != now]
    named = " and ".join([", ".join(changed[:-1]), changed[-1]] if len(changed) > 1 else changed)
    return f"{named or 'the adapter it starts from'} changed since the current adapter"


def final_training(training: TrainingConfig) -> str:
    """The training asset whose adapter is the task's fine-tuned model: the preference stage's when there is one."""
    return training_asset(training.preference_objective or training.stages[0])


def task_system_prompt(task: str, config: TaskConfig) -> str | None:
    """The system prompt a conversation without one gets when the task's model answers it: `data.system_prompt`, or
    else the one most train rows of the split start with (data that carries its own)."""
    return config.data.system_prompt or split_system_prompt(task)[0]


def split_system_prompt(task: str) -> tuple[str | None, int, int]:
    """(the system message more than half the train rows of the task's split start with, or None; how many rows
    start with it; how many rows there are)."""
    import pyarrow.parquet as pq

    from ftpipe.core.records import common_system_prompt

    train = TaskLayout(task).split_files[0]
    if not train.is_file():
        return None, 0, 0
    conversations = pq.read_table(train, columns=["messages"]).column("messages").to_pylist()
    return *common_system_prompt(conversations), len(conversations)


def system_prompt_source(task: str, config: TaskConfig) -> str:
    """Where the task's default system prompt comes from, and how many train rows start without it, for the log."""
    if config.data.system_prompt:
        return "the default system prompt is data.system_prompt"
    prompt, holding, rows = split_system_prompt(task)
    if prompt is None:
        return "no default system prompt: no system message starts more than half the train rows"
    others = f"; {rows - holding} start without it or with another" if holding < rows else ""
    return f"the default system prompt is the one {holding} of {rows} train rows start with{others}"


def label_answers(task: str, evaluation: EvaluationConfig) -> list[str] | None:
    """The complete answers a task's evaluation constrains answers to (from its split's references), or None when
    it does not constrain them."""
    from ftpipe.core.evaluation.metrics import task_metrics
    from ftpipe.core.records import read_examples

    if not evaluation.constrain_to_labels:
        return None
    rows = [row for path in TaskLayout(task).split_files if path.is_file() for row in read_examples(path)]
    return task_metrics(evaluation).label_answers([row["messages"][-1]["content"] for row in rows]) or None
