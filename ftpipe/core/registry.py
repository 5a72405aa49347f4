"""The MLflow model registry of merged models: each version is an MLflow `transformers` chat model logged from
the model folder; the `candidate` alias follows the newest version and `champion` the best evaluated one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftpipe.core.layout import MODEL_CARD
from ftpipe.core.storage import write_text
from ftpipe.core.tracking import mlflow_client

CANDIDATE, CHAMPION = "candidate", "champion"
SCORE_TAG, EVAL_VERSION_TAG, FILES_TAG = "eval_score", "eval_version", "files"
EVAL_SCORES = "eval_scores.json"  # in a registered model's folder: its score on each row of its eval split
COMPARISON_SAMPLES = 2000  # bootstrap resamples of the champion comparison's gain
PATH_TAG = "model_path"  # a registered version's model folder (its source is the MLflow model logged from it)
CHAT_EXAMPLE = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}
MLFLOW_MODEL_REQUIREMENTS = ("torch", "transformers")


def registered_name(task: str) -> str:
    return f"ftpipe-{task}"


def model_folder(version) -> str:
    """The model folder a registered version was made from (older versions name it as their source)."""
    return version.tags.get(PATH_TAG, version.source)


def log_chat_model(client, run_id: str, model_path: Path | str):
    """Log the model in `model_path` as an MLflow `transformers` chat model (`llm/v1/chat`: OpenAI-style chat
    signature, an input example) of training run `run_id`; return the MLflow LoggedModel."""
    import tempfile
    from urllib.parse import urlsplit
    from urllib.request import url2pathname

    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    logged = client.create_logged_model(client.get_run(run_id).info.experiment_id, name="model",
                                        source_run_id=run_id)
    location = urlsplit(logged.artifact_location)
    if location.scheme == "file":  # a local store: written in place, not copied there from a temporary folder
        _save_chat_model(Path(model_path), Path(url2pathname(location.path)), logged, run_id)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            _save_chat_model(Path(model_path), Path(tmp) / "model", logged, run_id)
            client.log_model_artifacts(logged.model_id, str(Path(tmp) / "model"))
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return logged


def _save_chat_model(model_path: Path, out: Path, logged, run_id: str) -> None:
    """Write the model in `model_path` (its weights as stored, loaded on the CPU) to `out` as the MLflow model
    `logged`."""
    from importlib.metadata import version

    import mlflow
    from huggingface_hub import ModelCard
    from mlflow.models import Model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto")
    mlflow.transformers.save_model(
        {"model": model, "tokenizer": AutoTokenizer.from_pretrained(model_path)}, out, task="llm/v1/chat",
        input_example=CHAT_EXAMPLE, model_card=ModelCard.load(model_path / MODEL_CARD),
        pip_requirements=[f"{name}=={version(name).split('+')[0]}" for name in MLFLOW_MODEL_REQUIREMENTS],
        mlflow_model=Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id,
                           model_id=logged.model_id),
    )


def _version_by_alias(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def row_scores(version) -> dict[str, Any]:
    """A registered version's scores on the eval split it was judged on, {metric, rows: {row id: score}} ({} for a
    version registered without them)."""
    path = Path(model_folder(version)) / EVAL_SCORES
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def beats(version, eval_score: float, eval_version: str, scores: dict[str, Any]) -> tuple[bool, str]:
    """Whether a new version judged by `scores` ({metric, rows: {row id: score}}; `eval_score` on the eval split
    `eval_version`) beats the champion `version`, and why, in words: by the mean scores of the rows both were scored
    on with the same metric (a grown split keeps its rows), with the paired interval of the gain; for a champion
    registered without its row scores, by its score on the same split. Otherwise they are not comparable and the
    champion stays."""
    from ftpipe.core.evaluation.statistics import paired_bootstrap

    if version is None:
        return True, "no champion before"
    theirs = row_scores(version)
    if not theirs and version.tags.get(EVAL_VERSION_TAG) == eval_version:
        old = float(version.tags.get(SCORE_TAG, "-inf"))
        return eval_score > old, f"{eval_score:.3f} against the champion's {old:.3f} on the same eval split"
    shared = sorted(set(scores["rows"]) & set(theirs.get("rows", {})))
    if theirs.get("metric") != scores["metric"] or not shared:
        return False, (f"{_not_comparable(theirs, scores['metric'], bool(shared))}: not comparable; make it the "
                       f"champion with MlflowClient().set_registered_model_alias({version.name!r}, {CHAMPION!r}, "
                       "<version>)")
    ours, old = ([found["rows"][row] for row in shared] for found in (scores, theirs))
    if ours == old:
        return False, (f"a tie: the champion's score, {sum(old) / len(shared):.3f}, on each of the {len(shared)} eval "
                       "rows both were scored on")
    gain, low, high = paired_bootstrap(old, ours, COMPARISON_SAMPLES, seed=0)
    noise = ", which may be noise" if low <= 0 <= high else ""
    return sum(ours) > sum(old), (f"{sum(ours) / len(shared):.3f} against the champion's {sum(old) / len(shared):.3f} "
                                  f"on the {len(shared)} eval rows both were scored on: gain {gain:+.3f}, 95% CI "
                                  f"{low:+.3f} … {high:+.3f}{noise}")


def _not_comparable(theirs: dict[str, Any], metric: str, shared: bool) -> str:
    """Why a champion's row scores (`theirs`) cannot judge a model scored by `metric` (`shared`: on some same rows)."""
    if not theirs:
        return "the champion was registered without its score on each eval row, and on another eval split"
    if shared:
        return f"the champion was judged by {theirs['metric']}, this model by {metric}"
    return "the champion was scored on another eval split, with no row in common"


def register_model(*, task: str, model_path: Path | str, run_id: str, eval_score: float, eval_version: str,
                   scores: dict[str, Any], tracking_uri: str | None = None) -> dict[str, Any]:
    """Register the merged dir as a new version of `ftpipe-<task>` (once per dir): its eval `scores` ({metric,
    rows: {row id: score}}) written in it (EVAL_SCORES), an MLflow `transformers` model logged from it to the training
    run, its folder in the `model_path` tag. Alias it `candidate`, and `champion` when there is no champion yet or it
    beats the champion (`beats`); `compared` says why or why not."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(tracking_uri)
    name = registered_name(task)
    try:
        client.create_registered_model(name, description=f"ftpipe fine-tuned model for task {task}")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    folder = str(Path(model_path).absolute())
    previous = _version_by_alias(client, name, CHAMPION)
    version = next((v for v in client.search_model_versions(f"name = '{name}'") if model_folder(v) == folder), None)
    if version is None:
        write_text(Path(folder) / EVAL_SCORES, json.dumps(scores))
        logged = log_chat_model(client, run_id, folder)
        tags = {SCORE_TAG: repr(float(eval_score)), EVAL_VERSION_TAG: eval_version, PATH_TAG: folder}
        version = client.create_model_version(name, source=logged.artifact_location, run_id=run_id, tags=tags,
                                              model_id=logged.model_id)
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    is_champion = previous is not None and previous.version == version.version
    if is_champion:
        promote, compared = False, "as before"
    else:
        promote, compared = beats(previous, eval_score, eval_version, scores)
    if promote:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return {
        "registered_model": name,
        "registered_version": int(version.version),
        "champion": is_champion or promote,
        "compared": compared,
        "previous_champion_version": int(previous.version) if previous else None,
    }


def aliased_model_names(task: str, tracking_uri: str | None = None) -> set[str]:
    """The folder names of the `champion` and `candidate` models: the merged models to keep when pruning."""
    client = mlflow_client(tracking_uri)
    versions = [_version_by_alias(client, registered_name(task), alias) for alias in (CHAMPION, CANDIDATE)]
    return {Path(model_folder(version)).name for version in versions if version is not None}


def mark_removed_versions(task: str, tracking_uri: str | None = None) -> list[int]:
    """Tag `files: removed` the registered versions of `task` whose model folder no longer exists (pruning removed
    it), and delete the MLflow model logged from that folder, so the registry never offers them as loadable and keeps
    no copy of the weights pruning removed; return the versions tagged now."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    client = mlflow_client(tracking_uri)
    name = registered_name(task)
    gone = [v for v in client.search_model_versions(f"name = '{name}'")
            if FILES_TAG not in v.tags and not Path(model_folder(v)).exists()]
    for version in gone:
        if PATH_TAG in version.tags:  # its source is an MLflow model logged from the folder
            get_artifact_repository(version.source, tracking_uri=client.tracking_uri).delete_artifacts()
        client.set_model_version_tag(name, version.version, FILES_TAG, "removed")
    return [int(version.version) for version in gone]


def champion_model_path(task: str, tracking_uri: str | None = None) -> Path | None:
    """The champion's model dir (else the latest version's); None when nothing is registered."""
    client = mlflow_client(tracking_uri)
    name = registered_name(task)
    version = _version_by_alias(client, name, CHAMPION)
    if version is None:
        versions = client.search_model_versions(f"name = '{name}'")
        version = max(versions, key=lambda v: int(v.version), default=None)
    return Path(model_folder(version)) if version else None
