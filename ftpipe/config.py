"""Task configuration: `task.yaml` validated by pydantic, plus per-run overrides from the launchpad."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ftpipe.core.text import label_key
from ftpipe.core.training.methods import (
    Adapter,
    PREFERENCE_OBJECTIVES,
    SUPERVISED_OBJECTIVES,
    Objective,
    Quantization,
    Shorthand,
    check_stages,
    expand_shorthand,
    settle_quantization,
    settings_without_effect,
)

TASK_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
SECRET_NAME_RE = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|CREDENTIAL", re.IGNORECASE)
DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
TOO_LONG_DONE = {"drop": "left out", "truncate": "cut", "trim_turns": "left out"}  # the rows still over max_length
# What other fine-tuning tools call a setting, for "did you mean" (close spellings are found without this table)
OTHER_NAMES = {"lr": "learning_rate", "num_train_epochs": "epochs", "num_epochs": "epochs", "epoch": "epochs",
               "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "gradient_accumulation",
               "max_seq_length": "max_length", "max_seq_len": "max_length", "lr_scheduler_type": "scheduler",
               "warmup": "warmup_ratio", "lora_r": "lora.r", "rank": "r", "lora_alpha": "lora.alpha",
               "lora_dropout": "lora.dropout", "target_modules": "lora.target_modules"}


class TaskConfigError(ValueError):
    """A task folder or `task.yaml` that cannot be used: one line per problem, `<file>: <field path>: <problem>`."""

    @classmethod
    def listing(cls, source: str, problems: list[str]) -> TaskConfigError:
        """The error for `problems` (each `<field path>: <problem>`) found in `source`."""
        return cls("\n".join(f"{source}: {problem}" for problem in problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections_are_defaults(cls, values: Any) -> Any:
        """A section with every setting commented out (`training:` alone reads as null) means its defaults."""
        if not isinstance(values, dict):
            return values
        return {key: value for key, value in values.items() if value is not None or key not in cls._sections()}

    @classmethod
    def _sections(cls) -> set[str]:
        return {name for name, field in cls.model_fields.items()
                if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)}


def _some_steps(count: int) -> int:
    if count == 0:
        raise ValueError("0 steps trains nothing: a number of steps, or -1 for all epochs")
    return count


StepCount = Annotated[int, Field(ge=-1), AfterValidator(_some_steps)]


def _a_reachable_gain(threshold: float) -> float:
    if threshold >= 1:
        raise ValueError("a share, not a percentage: the gain is at most 1 (0.05 is 5 points), so the gate could "
                         "never pass")
    return threshold


def _a_web_address(url: str | None) -> str | None:
    parts = urlsplit(url or "")
    if url is not None and (parts.scheme not in ("http", "https") or not parts.netloc):
        raise ValueError("an http:// or https:// address")
    return url


GainThreshold = Annotated[float, AfterValidator(_a_reachable_gain)]


def _compiled(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"not a regular expression: {exc}") from None


def _a_regular_expression(pattern: str | None) -> str | None:
    if pattern is not None:
        _compiled(pattern)
    return pattern


RegexPattern = Annotated[str | None, AfterValidator(_a_regular_expression)]


Format = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "columns"]
Columns = dict[Literal["system", "prompt", "completion", "chosen", "rejected", "label"], str]
COLUMNS_HELP = ("your column names, e.g. {prompt: ticket_text, completion: triage}; preference rows map chosen and "
                "rejected (paired), or completion and label (unpaired, true = desirable)")


def _readable(fmt: str, columns: dict[str, str], where: str) -> None:
    """ValueError where format `fmt` and `columns` (the settings at `where`) cannot read a row."""
    mapped = columns.keys()
    if fmt == "columns" and not ({"prompt", "completion"} <= mapped or {"chosen", "rejected"} <= mapped):
        raise ValueError(f"format columns reads the columns mapped in {where}columns: map prompt and completion, e.g. "
                         "{prompt: ticket_text, completion: triage} (or chosen and rejected for preference pairs)")
    if "prompt" in mapped and not {"completion", "chosen", "rejected"} & mapped:
        raise ValueError(f"{where}columns maps prompt but no answer column: map completion too (or chosen and rejected "
                         "for preference pairs)")


class FileFormat(_Strict):
    """How the raw files matching one `data.files` pattern are read, in place of the data section's settings."""

    format: Format | None = Field(None, description="how their rows are read (null: as data.format)")
    columns: Columns = Field(default_factory=dict, description=COLUMNS_HELP)


class DataConfig(_Strict):
    """How the files under `raw/` are read."""

    format: Format = Field("auto", description="how rows are read; auto recognises each row's format from its keys")
    columns: Columns = Field(default_factory=dict, description=COLUMNS_HELP)
    files: dict[str, FileFormat] = Field(default_factory=dict, description=(
        "files read otherwise, by a pattern of their path under raw/ (`legacy/*.csv`): their own format and columns, "
        "e.g. {'export.csv': {columns: {prompt: text, completion: label}}}; a file's own path applies first, else the "
        "first pattern it matches"))
    system_prompt: str | None = Field(None, description="system message added to rows that have none")
    label_names: list[str] = Field(default_factory=list, description=(
        "class names in the order of their ids, for answers written as class ids (0, 1, …), as Hugging Face datasets "
        "store a ClassLabel column: each id is read as its name; also the spelling each of these labels is trained "
        "in, however the raw files write it (`Order Status`, `order-status`: order_status)"))

    @field_validator("label_names")
    @classmethod
    def _names_distinct(cls, names: list[str]) -> list[str]:
        if blank := [i for i, name in enumerate(names) if not name.strip()]:
            raise ValueError(f"label_names[{blank[0]}] is empty: each class id needs its name")
        keys = [label_key(name) for name in names]
        if repeated := sorted({name for name, key in zip(names, keys) if keys.count(key) > 1}):
            raise ValueError(f"label_names lists {repeated[0]!r} more than once (case, spacing and punctuation aside): "
                             "two ids would read as one label")
        return names

    @model_validator(mode="after")
    def _columns_readable(self) -> DataConfig:
        _readable(self.format, self.columns, "")
        for pattern, own in self.files.items():
            _readable(own.format or self.format, own.columns, f"files[{pattern!r}].")
        return self


class DedupConfig(_Strict):
    """Exact and near-duplicate removal. Rows are compared on what varies between them: text shared by most rows
    (a system prompt, a repeated preamble) is left out, and both the prompt and the answer must be alike."""

    near_threshold: float = Field(0.8, gt=0.0, le=1.0,
                                  description="Jaccard similarity of word shingles that makes a near-duplicate")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (more: exacter and slower)")
    shingle_words: int = Field(2, ge=1, le=10, description="words per shingle (2 suits short messages)")
    max_removed_share: float = Field(0.2, gt=0.0, le=1.0, description=(
        "the cleaning check warns when more than this share of the chat rows, of the preference rows, or of any one "
        "label's rows is removed (of a label's, only when more than chance would remove, or all of them)"))


class SplitConfig(_Strict):
    """The held-out split, stratified by answer in a stable hash order; new rows never move old ones."""

    eval_fraction: float = Field(0.15, ge=0.05, le=0.5, description="share of rows held out (0.05 to 0.5)")
    seed: int = Field(0, description="salt of the hash that assigns rows; change it for another split")


class LoraConfig(_Strict):
    """The LoRA adapter (adapter: lora)."""

    r: int = Field(16, ge=1, le=1024, description="rank of the adapter matrices")
    alpha: int = Field(32, ge=1, description="scaling: updates are multiplied by alpha / r")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt, e.g. [q_proj, v_proj], or all-linear; a name that matches no "
                                  "layer of the model is warned about, and the training refused when none match"
    )


class SecretRef(_Strict):
    secret: str = Field(description="name of a Kubernetes Secret")
    key: str = Field(description="key inside that Secret")


class K8sConfig(_Strict):
    """The training pod (launcher: k8s). Secrets are passed by reference only (secret_env)."""

    image: str = Field(description="required: an image with ftpipe installed",
                       examples=["registry.example.com/ftpipe:1.0"])
    namespace: str = Field("default", description="namespace of the pod")
    service_account: str | None = Field(None, description="service account of the pod")
    gpus: int = Field(1, ge=0, description="nvidia.com/gpu limit")
    cpu: str | None = Field(None, description="CPU request, e.g. '8'")
    memory: str | None = Field(None, description="memory request and limit, e.g. '48Gi'")
    node_selector: dict[str, str] = Field(default_factory=dict, description="node labels the pod must run on")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="taints the pod tolerates")
    volumes: list[dict[str, Any]] = Field(default_factory=list, description="pod volumes; $FTPIPE_HOME must be on one")
    volume_mounts: list[dict[str, Any]] = Field(default_factory=list, description="where the volumes are mounted")
    env: dict[str, str] = Field(default_factory=dict, description="plain environment values; never secrets")
    secret_env: dict[str, SecretRef] = Field(
        default_factory=dict, description="environment from Secrets: {NAME: {secret: <Secret name>, key: <key>}}"
    )
    image_pull_secrets: list[str] = Field(default_factory=list, description="Secrets for pulling the image")

    @field_validator("env")
    @classmethod
    def _no_inline_secrets(cls, env: dict[str, str]) -> dict[str, str]:
        inline = [name for name in env if SECRET_NAME_RE.search(name)]
        if inline:
            raise ValueError(f"{', '.join(inline)} look(s) like secrets: pass them with secret_env "
                             "({NAME: {secret: <Secret name>, key: <key>}}), never inline")
        return env


class PreferenceConfig(_Strict):
    """The preference stage (dpo, orpo or kto in `training.stages`): what differs from the SFT stage's settings."""

    beta: float = Field(0.1, gt=0.0, description="how far the model may move from the reference (orpo: the odds-ratio weight)")
    learning_rate: float = Field(5e-5, gt=0.0, lt=1.0, description="peak learning rate of the preference stage")
    epochs: float = Field(1.0, gt=0.0, description="passes over the preference pairs")
    max_steps: StepCount = Field(-1, description="stop after this many optimizer steps; -1: run all epochs")


class TrainingConfig(_Strict):
    """How the model is trained, and where. The method is objective + adapter + quantization (see methods.py)."""

    method: Shorthand | None = Field(
        None, exclude=True,
        description="shorthand for adapter + quantization; auto is LoRA, 4-bit where the training has a CUDA GPU",
    )
    stages: list[Objective] = Field(["sft"], description=(
        "the trainings, one after the other: [sft] (or [distill], from teacher_model's logits), then optionally "
        "dpo|orpo|kto for preference tuning from that model on the task's preference rows"))
    objective: Objective = Field("sft", description="the objective of one training (set per stage from stages)")
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig, description="the preference stage")
    teacher_model: str | None = Field(
        None, description="distill: the teacher, given like base_model, sharing the base model's tokenizer"
    )
    distill_on_policy: float | None = Field(None, ge=0.0, le=1.0, description=(
        "distill: the share of batches the student answers itself (GKD's lambda); null: 0 (supervised) on a CPU, "
        "0.5 on a GPU"))
    adapter: Adapter = Field("lora", description="what is trained: a LoRA adapter, or (none) every weight")
    quantization: Quantization = Field(
        "auto", description="the base weights while training; 4bit needs CUDA and adapter lora; auto is 4bit on CUDA"
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="the adapter, when adapter is lora")
    learning_rate: float = Field(2e-4, gt=0.0, lt=1.0, description="peak learning rate")
    epochs: float = Field(1.0, gt=0.0, description="passes over the training rows")
    max_steps: StepCount = Field(-1, description="stop after this many optimizer steps; -1: run all epochs")
    batch_size: int = Field(8, ge=1, description="the global batch, split evenly over torchrun processes")
    gradient_accumulation: int = Field(1, ge=1, description="batches per optimizer step")
    micro_batch_size: int | None = Field(None, ge=1, description=(
        "rows per forward pass, the batch reached by accumulating gradients (the same update): fewer rows pad less "
        "and hold less memory; null: on a CPU, passes of whole rows up to 512 tokens (a longer row alone), else the "
        "whole batch"))
    max_length: int = Field(512, ge=16, description="tokens; longer rows are dropped or truncated (too_long)")
    too_long: Literal["drop", "truncate", "trim_turns"] = Field(
        "drop", description="what happens to rows over max_length: drop them, truncate them (cutting off their "
                            "answers), or trim_turns: drop a multi-turn row's earliest exchanges (its system message "
                            "kept) until it fits, and the row when its last exchange alone does not; a training that "
                            "would drop more than half of its train rows is refused, naming the max_length that keeps "
                            "them")
    every_turn: bool = Field(False, description=(
        "sft: learn every assistant message of a multi-turn row, each after the conversation before it (one train row "
        "per turn), not only the final one; the eval rows and the evaluation keep the final one"))
    replay: float = Field(0.0, ge=0.0, le=0.5, description=(
        "against forgetting: general rows added to the train rows as a share of them (0.2: 20 per 100), the base "
        "model's own answers to general prompts that are not probe questions; 0: none"))
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="share of the steps that warm up the learning rate")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="learning-rate schedule"
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    seed: int = Field(42, description="the same data, config and seed give the same weights")
    packing: bool = Field(False, description="pack several rows into one sequence")
    eval_steps: int = Field(20, ge=1, description="eval loss (and a checkpoint) every N steps; early stopping uses it")
    logging_steps: int = Field(5, ge=1, description="a progress line and train metrics every N steps and at the last")
    early_stopping_patience: int = Field(3, ge=1, description="stop after N evaluations without a better eval loss")
    save_total_limit: int = Field(2, ge=2, description="checkpoints kept (the best one is always kept)")
    launcher: Literal["subprocess", "torchrun", "k8s"] = Field(
        "subprocess", description="how the training is started (see docs/deploy.md)"
    )
    num_processes: int = Field(
        1, ge=1, description="processes per node, one per GPU (torchrun; k8s pods use torchrun when > 1)"
    )
    nnodes: int = Field(1, ge=1, description="nodes taking part (torchrun); more than 1 needs rdzv_endpoint")
    rdzv_endpoint: str | None = Field(None, description="host:port of the torchrun rendezvous for several nodes")
    k8s: K8sConfig | None = Field(None, description="the training pod, for launcher: k8s")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, values: Any) -> Any:
        return expand_shorthand(values) if isinstance(values, dict) else values

    @model_validator(mode="after")
    def _consistent(self) -> TrainingConfig:
        self.quantization = settle_quantization(self.adapter, self.quantization)
        world = self.num_processes * self.nnodes
        if self.batch_size % world:
            raise ValueError(f"batch_size {self.batch_size} is the global batch: it must divide evenly over {world} processes")
        if self.micro_batch_size and (self.batch_size // world) % self.micro_batch_size:
            raise ValueError(f"micro_batch_size {self.micro_batch_size} must divide each process's batch of "
                             f"{self.batch_size // world} rows")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("nnodes > 1 needs rdzv_endpoint (host:port reachable from every node)")
        if self.launcher == "subprocess" and world > 1:
            raise ValueError("several processes need launcher torchrun (or k8s)")
        if self.launcher == "k8s" and self.k8s is None:
            raise ValueError("launcher k8s needs a k8s section with at least an image")
        check_stages(self.stages)
        if self.stages[0] == "distill" and not self.teacher_model:
            raise ValueError("stages starting with distill need teacher_model (the model to distil from)")
        if self.teacher_model and "distill" not in (self.stages[0], self.objective):  # objective: one stage's settings
            raise ValueError(f"teacher_model is used by a distill stage only, and stages is {self.stages}: start "
                             "stages with distill, or leave teacher_model out")
        if self.every_turn and self.stages[0] != "sft":
            raise ValueError(f"every_turn applies to an sft stage only, and stages is {self.stages}: start stages "
                             "with sft, or leave every_turn out")
        return self

    @property
    def preference_objective(self) -> str | None:
        """The preference stage's objective (dpo, orpo or kto), None without one."""
        return next((stage for stage in self.stages if stage in PREFERENCE_OBJECTIVES), None)

    def for_stage(self, objective: str) -> TrainingConfig:
        """The settings of one stage's training: the preference stage trains with its own rate, length and schedule."""
        if objective in SUPERVISED_OBJECTIVES:
            return self.model_copy(update={"objective": objective})
        found = self.preference
        return self.model_copy(update={"objective": objective, "learning_rate": found.learning_rate,
                                       "epochs": found.epochs, "max_steps": found.max_steps, "replay": 0.0})

    def recipe(self) -> dict[str, Any]:
        """What decides the trained weights: neither where and how the training is launched, nor settings
        without effect for this method. Equal recipes (with equal data and base model) give equal weights."""
        launch = {"launcher", "num_processes", "nnodes", "rdzv_endpoint", "k8s", "micro_batch_size"}
        off = set() if self.replay else {"replay"}  # no replay: the recipe (and fingerprint) of a training without it
        off |= set() if self.every_turn and self.objective == "sft" else {"every_turn"}
        off |= {"stages"} | (set() if self.objective in PREFERENCE_OBJECTIVES else {"preference"})  # per stage
        off |= set() if self.objective == "distill" else {"teacher_model", "distill_on_policy"}
        return self.model_dump(exclude=launch | off | settings_without_effect(self.adapter))


ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _a_variable_name(name: str | None) -> str | None:
    if name is not None and not ENV_NAME_RE.match(name):
        raise ValueError("the name of an environment variable (e.g. OPENAI_API_KEY), never the key itself")
    return name


EnvVariableName = Annotated[str | None, AfterValidator(_a_variable_name)]
TASK_TYPE_SETTINGS = {"label_field": "classification", "constrain_to_labels": "classification",
                      "extraction_metric": "extraction", "answer_pattern": "generation", "answer_field": "generation",
                      "require_human_review": "generation"}


class JudgeConfig(_Strict):
    """An OpenAI-compatible chat endpoint that compares two answers to the same request (LLM-as-judge)."""

    base_url: str = Field(description="required: the endpoint's base URL", examples=["http://127.0.0.1:8000/v1"])
    model: str = Field(description="required: the judge model's name", examples=["gpt-4o-mini"])
    api_key_env: EnvVariableName = Field(
        "OPENAI_API_KEY", description="environment variable holding the API key (never the key); null: none needed"
    )
    max_pairs: int = Field(50, ge=1, description="held-out rows judged, each in both orders (two requests)")


class EvaluationConfig(_Strict):
    """The evaluation on the held-out rows, and the gate before a model is merged."""

    task_type: Literal["classification", "extraction", "generation"] = Field(
        "generation", description="decides the metric"
    )
    label_field: str | None = Field(
        None, description="classification: the JSON field holding the label (else the whole answer)"
    )
    constrain_to_labels: bool = Field(
        False, description="classification: every answer is the likeliest of the task's labels, never a made-up one"
    )
    extraction_metric: Literal["exact_match", "field_accuracy"] | None = Field(None, description=(
        "extraction: the metric the deltas and the gate judge: exact_match of the whole object, or field_accuracy "
        "(the share of its fields right: finer on few rows or many fields); null: exact_match"))
    answer_pattern: str | None = Field(
        None, description="generation: regex whose one group is the final answer, e.g. '#### (\\S+)'; "
                          "exact match on it becomes the primary metric"
    )
    answer_field: str | None = Field(
        None, description="generation: JSON field holding the final answer (instead of answer_pattern)"
    )
    max_new_tokens: int | None = Field(None, ge=1, le=4096, description=(
        "longest generated answer in tokens; null: 48, or the longest held-out reference answer and a quarter more "
        "(16 tokens at least) when that is longer, so no answer is cut off before it could be right"))
    max_rows: int | None = Field(None, ge=1, description=(
        "evaluate at most this many held-out rows (and held-out preference pairs)"))
    batch_size: int = Field(16, ge=1, description="rows scored at once (reference answers, preference pairs)")
    batch_tokens: int = Field(8192, ge=1, description=(
        "tokens generated at once: a batch holds as many rows as fit, each counted as the batch's longest prompt plus "
        "max_new_tokens (at least one row), so short prompts run in large batches and long ones in small"))
    fewshot_k: int = Field(
        5, ge=0, description="train examples in the few-shot baseline's prompt; 0: no few-shot baseline"
    )
    min_improvement: GainThreshold = Field(
        0.0, description="gate: lower end of the 95% interval of the gain must be above this (a share: 0.05 is 5 "
                         "points)")
    min_preference_gain: GainThreshold = Field(0.0, description=(
        "gate, with a preference stage: lower end of the 95% interval of the margin gain over the SFT model (the "
        "share of held-out pairs whose chosen answer the final model favours more, less the share it favours less) "
        "must be above this (0.05 is 5 points)"))
    require_beats_fewshot: bool = Field(
        False, description="gate: the gain over the few-shot baseline must be above min_improvement too"
    )
    require_beats_majority: bool = Field(
        False, description="gate (classification): the gain over answering every row with the train rows' most "
                           "common label must be above min_improvement too"
    )
    max_forgetting: float = Field(
        0.10, ge=0.0, description="gate: fails when the lower end of the 95% interval of forgetting (relative "
                                  "worsening on the general-skills probe, or on any one of its skills) is above this "
                                  "(a share: 0.10 is 10 %)"
    )
    require_human_review: int = Field(
        0, ge=0, description="gate (generation): wait for this many human verdicts in the task's reviews/ folder"
    )
    judge: JudgeConfig | None = Field(
        None, description="LLM-as-judge of fine-tuned vs base answers, blind and in both orders"
    )
    bootstrap_samples: int = Field(2000, ge=100, description="resamples for the confidence intervals")

    @field_validator("answer_pattern")
    @classmethod
    def _one_group(cls, pattern: str | None) -> str | None:
        if pattern is None:
            return None
        groups = _compiled(pattern).groups
        if groups != 1:
            raise ValueError(f"needs exactly one capture group (...) around the answer, has {groups}")
        return pattern

    @model_validator(mode="after")
    def _consistent(self) -> EvaluationConfig:
        if self.answer_pattern and self.answer_field:
            raise ValueError("set answer_pattern or answer_field, not both")
        misplaced = [f"{name} applies to task_type {kind} only" for name, kind in TASK_TYPE_SETTINGS.items()
                     if getattr(self, name) and self.task_type != kind]
        if misplaced:
            raise ValueError(f"{'; '.join(misplaced)} (task_type is {self.task_type})")
        return self


class RetrainConfig(_Strict):
    """When the task is trained again."""

    on_data_change: bool = Field(
        False, description="retrain as soon as the training fingerprint (split, base model, recipe) changes"
    )
    schedule: str | None = Field("0 3 * * 1", description="cron (UTC) for scheduled retraining; null for none")
    warm_start: bool = Field(False, description=(
        "when the train split only grew a little, train the SFT adapter further on the new rows (README: Warm start)"))
    warm_start_max_growth: float = Field(0.1, gt=0.0, le=1.0, description=(
        "train from step 0 once the rows added since the last training from step 0 exceed this share of its rows"))

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        from croniter import croniter

        if value is not None and len(value.split()) != 5:
            raise ValueError("a cron expression with 5 fields (minute hour day month weekday), e.g. '0 3 * * 1', "
                             "or null")
        if value is not None and not croniter.is_valid(value):
            raise ValueError("not a valid cron expression: a field is out of its range (minute 0-59, hour 0-23, day "
                             "1-31, month 1-12, weekday 0-6) or not a number, list, range or step")
        return value


class TeacherConfig(_Strict):
    """An OpenAI-compatible endpoint that answers the task's prompts (OpenAI, vLLM, Ollama, `ftpipe serve`...)."""

    base_url: str = Field(description="the API's base URL", examples=["https://api.openai.com/v1"])
    model: str = Field(description="the teacher model's name at that endpoint", examples=["gpt-4o-mini"])
    api_key_env: EnvVariableName = Field(
        None, description="the name of the environment variable holding the API key (never the key itself)"
    )


class BudgetConfig(_Strict):
    """What one materialization of teacher_examples may spend; the next one continues where it stopped."""

    max_requests: int | None = Field(None, ge=1, description="teacher requests per materialization; null: no limit")
    max_tokens: int | None = Field(None, ge=1, description="teacher tokens (prompt + answer) per materialization")


class AcceptConfig(_Strict):
    """What a teacher answer must be to become a row (at most one rule; none: any non-empty answer)."""

    labels: list[str] | None = Field(None, description="the answer is one of these labels")
    json_schema: dict[str, Any] | None = Field(None, description="the answer is JSON valid against this schema")
    regex: RegexPattern = Field(None, description="the whole answer matches this regular expression")

    @field_validator("json_schema")
    @classmethod
    def _a_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        import jsonschema

        if schema is not None:
            try:
                jsonschema.validators.validator_for(schema).check_schema(schema)
            except jsonschema.SchemaError as exc:
                raise ValueError(f"not a JSON schema: {exc.message} (at {exc.json_path})") from None
        return schema

    @model_validator(mode="after")
    def _one_rule(self) -> AcceptConfig:
        if sum(rule is not None for rule in (self.labels, self.json_schema, self.regex)) > 1:
            raise ValueError("set one of labels, json_schema and regex")
        return self


class DistillConfig(_Strict):
    """Distillation: a teacher model answers the prompts in the task's `prompts/` folder, and its answers become
    training rows (the asset teacher_examples)."""

    teacher: TeacherConfig = Field(description="the teacher endpoint")
    prompt_column: str = Field("prompt", description="the column of prompts/*.jsonl|csv holding the prompt")
    examples: int | None = Field(None, ge=1, description="how many prompts to answer (the first ones); null: all")
    temperature: float = Field(0.0, ge=0, le=2, description="the teacher's sampling temperature")
    max_tokens: int = Field(256, ge=1, description="the longest teacher answer, in tokens")
    concurrency: int = Field(4, ge=1, le=256, description="teacher requests in flight at once")
    timeout_seconds: float = Field(60.0, gt=0, description="how long one teacher request may take")
    budget: BudgetConfig = Field(default_factory=BudgetConfig, description="spending per materialization")
    accept: AcceptConfig = Field(default_factory=AcceptConfig, description="what makes a teacher answer usable")


class ServingConfig(_Strict):
    """What `python -m ftpipe serve` keeps of this task's traffic."""

    log_content: bool = Field(
        True, description="keep requests' messages and outputs in the request log; false keeps only hashes and sizes"
    )


class MonitoringConfig(_Strict):
    """The production report on the request log of `ftpipe serve`, and its checks."""

    window_hours: float = Field(24.0, gt=0, description="the report covers the requests of this many last hours")
    max_error_rate: float = Field(0.05, ge=0, le=1, description="production_health fails above this share of requests "
                                                                "the server failed (5xx; refusals, 4xx, are not errors)")
    max_latency_p95_ms: float = Field(10_000.0, gt=0, description="production_health fails above this p95 latency")
    min_validity: float = Field(
        0.8, ge=0, le=1, description="production_health fails when a smaller share of the answers has the task's form "
                                     "(a training label; a JSON object with the training answers' fields), judged "
                                     "over 20 answers at least"
    )
    max_drift: float = Field(
        0.3, ge=0, le=1, description="production_drift warns above this drift score (the larger of the length and "
                                     "vocabulary shifts against the training prompts)"
    )
    max_novel_share: float = Field(
        0.25, ge=0, le=1, description="production_drift warns when the share of prompts with no near neighbour among "
                                      "the training prompts exceeds the held-out prompts' share by more than this"
    )
    neighbour_threshold: float = Field(
        0.5, gt=0, le=1, description="word Jaccard similarity that makes a training prompt a near neighbour"
    )
    alert_webhook: Annotated[str | None, AfterValidator(_a_web_address)] = Field(
        None, description="URL that gets a JSON POST when a production check fails")


class TaskConfig(_Strict):
    """A task's `task.yaml`."""

    description: str = Field("", description="what the task is for; shown on the model card")
    data: DataConfig = Field(default_factory=DataConfig, description="reading the raw files")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="duplicate removal")
    split: SplitConfig = Field(default_factory=SplitConfig, description="the held-out split")
    base_model: str = Field(
        DEFAULT_BASE_MODEL, description="the embedded default, a hub id, or a .gguf file / HF model dir (see below)"
    )
    trust_remote_code: bool = Field(
        False, description="true runs the model's own Python code; the base_model asset's metadata shows it"
    )
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="the fine-tune")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="evaluation and gate")
    retrain: RetrainConfig = Field(default_factory=RetrainConfig, description="automatic retraining")
    distill: DistillConfig | None = Field(None, description="teacher-written training data (see Distillation)")
    serving: ServingConfig = Field(default_factory=ServingConfig, description="the request log of `ftpipe serve`")
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig, description="production monitoring")

    @field_validator("training")
    @classmethod
    def _objective_from_stages(cls, training: TrainingConfig) -> TrainingConfig:
        """A task's trainings run the objectives of `stages`; an `objective` written in task.yaml would not."""
        objective = training.objective
        if "objective" in training.model_fields_set and objective not in training.stages:
            example = f"[{objective}]" if objective in ("sft", "distill") else f"[sft, {objective}]"
            raise ValueError(f"objective {objective} would not train: the trainings run the objectives of stages "
                             f"({training.stages}); put {objective} in stages (e.g. {example}) and leave objective out")
        return training

    def idle_settings(self) -> list[str]:
        """The settings given a value of their own that the rest of the config leaves without effect, each as
        `training.lora (training.adapter is none: every weight is trained)`."""
        training, retrain = self.training, self.retrain
        rules = [
            (training.adapter == "none" and training.lora != LoraConfig(), "training.lora",
             "training.adapter is none: every weight is trained"),
            (training.preference_objective is None and training.preference != PreferenceConfig(),
             "training.preference", f"training.stages {training.stages} has no preference stage"),
            ("distill" not in training.stages and training.distill_on_policy is not None,
             "training.distill_on_policy", f"training.stages {training.stages} has no distill stage"),
            (training.launcher != "k8s" and training.k8s is not None, "training.k8s",
             f"training.launcher is {training.launcher}"),
            (not retrain.warm_start and retrain.warm_start_max_growth != RetrainConfig().warm_start_max_growth,
             "retrain.warm_start_max_growth", "retrain.warm_start is false"),
        ]
        return [f"{name} ({why})" for idle, name, why in rules if idle]


# ---------------------------------------------------------------- errors


def nested_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside a field's type (`K8sConfig | None`, `dict[str, SecretRef]`), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(nested_model, get_args(annotation))), None)


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The model whose fields are valid at `loc` (a path of keys from the top of task.yaml)."""
    model, parts = TaskConfig, list(loc)
    while parts and model is not None:
        field = model.model_fields.get(str(parts.pop(0)))
        if field is None:
            return None
        if get_origin(field.annotation) in (dict, list):
            parts = parts[1:]  # the key or index inside the container
        model = nested_model(field.annotation)
    return model


def _settings_named(key: str, model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """The dotted paths of the task.yaml settings named `key`, in every section, the shortest first."""
    found = []
    for name, field in (model or TaskConfig).model_fields.items():
        found += [f"{prefix}{name}"] if name == key else []
        inner = nested_model(field.annotation)
        found += _settings_named(key, inner, f"{prefix}{name}.") if inner else []
    return sorted(found, key=lambda path: path.count("."))


def _unknown_key(loc: tuple) -> str:
    model = _model_at(loc[:-1])
    valid = list(model.model_fields) if model else []
    other = OTHER_NAMES.get(str(loc[-1]).lower(), "")
    close = ([other] if other.split(".")[0] in valid else _settings_named(str(loc[-1]))
             or difflib.get_close_matches(str(loc[-1]), valid, n=1))
    if close:
        return f"unknown key; did you mean {close[0]}?"
    return f"unknown key; valid keys: {', '.join(valid)}" if valid else "unknown key"


def _problems(error: ValidationError) -> list[str]:
    """One line per field: `<field path>: <what is wrong> (got <value>)`; the alternatives of a union are merged."""
    found: dict[str, tuple[list[str], str]] = {}
    for item in error.errors():
        loc = tuple(part for part in item["loc"] if "[" not in str(part))  # drop union member tags like list[str]
        path = ".".join(str(part) for part in loc) or "<root>"
        if item["type"] == "extra_forbidden":
            message = _unknown_key(loc)
        else:
            message = _one_line(item["msg"].removeprefix("Value error, "))
        given = item.get("input")
        hidden = (item["type"] in ("missing", "extra_forbidden") or isinstance(given, dict)
                  or loc[-1:] == ("api_key_env",))  # an API key given where its variable's name goes is not shown
        shown = "" if hidden else f" (got {given!r})"
        if item["type"] == "list_type" and isinstance(given, str):
            shown = f" (got {given!r}; a list is written [{', '.join(part.strip() for part in given.split(','))}])"
        if item["type"] == "string_type" and isinstance(given, dict):
            shown = f" (got the mapping {given!r}: a text holding ': ' is written in quotes)"
        found.setdefault(path, ([], shown))[0].append(message)
    return [f"{path}: {' or '.join(messages)}{shown}" for path, (messages, shown) in found.items()]


def _one_line(text: str) -> str:
    return " ".join(text.split())


YAML_HINTS = {  # the start of a YAML parser's problem -> what to check, in plain words
    "expected <block end>": "this line is indented differently from the keys beside it",
    "mapping values are not allowed here": "a value holding ': ' needs quotes, or a key is indented under a value",
    "found character '\\t'": "indent with spaces, not tabs",
}


def _yaml_problem(error: yaml.YAMLError) -> str:
    """Where and what a YAML error is, in one line, with a plain hint for the common ones: ` at line 6, column 1:
    found unexpected end of stream (while scanning a quoted scalar that starts at line 4, column 14)`."""
    if not isinstance(error, yaml.MarkedYAMLError) or error.problem_mark is None:
        return f": {_one_line(str(error))}"
    at = error.problem_mark
    context = error.context_mark
    started = (f" ({error.context} that starts at line {context.line + 1}, column {context.column + 1})"
               if error.context and context is not None else "")
    hint = next((f": {hint}" for start, hint in YAML_HINTS.items() if (error.problem or "").startswith(start)), "")
    return f" at line {at.line + 1}, column {at.column + 1}: {error.problem}{started}{hint}"


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping (plain YAML keeps the last one without a word)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice (first at line {seen[key]}): keep one",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        values = yaml.load(text, Loader=_UniqueKeyLoader) or {}  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        raise TaskConfigError(f"{source}: not valid YAML{_yaml_problem(exc)}") from None
    if not isinstance(values, dict):
        raise TaskConfigError(f"{source}: expected a mapping of keys to values, got {type(values).__name__}")
    return values


# `key: #...` with no space after the '#': a value that YAML reads as a comment (`answer_pattern: #### (\S+)`)
_VALUE_AS_COMMENT = re.compile(r"^(\s*)([^\s#:'\"-][^:#]*):[ \t]+(#\S.*?)\s*$")


def _empty_keys(node: Any) -> set[str]:
    """The keys of `node` (a parsed YAML mapping, at any depth) whose value is empty (null)."""
    if not isinstance(node, dict):
        return set()
    return {str(key) for key, value in node.items() if value is None}.union(*map(_empty_keys, node.values()))


def _value_read_as_comment(text: str, values: dict[str, Any], source: str) -> None:
    """TaskConfigError for a key whose unquoted value begins with '#', which YAML reads as a comment, leaving the key
    empty (`values`: the text parsed); a section header followed by a comment, with its keys below it, is fine, and
    so is such a line inside a text value."""
    lines, empty = text.splitlines(), _empty_keys(values)
    for number, line in enumerate(lines, start=1):
        if not (found := _VALUE_AS_COMMENT.match(line)) or found.group(2).strip() not in empty:
            continue
        below = next((later for later in lines[number:] if later.strip() and not later.lstrip().startswith("#")), "")
        if len(below) - len(below.lstrip()) > len(found.group(1)):
            continue
        key, value = found.group(2).strip(), found.group(3)
        raise TaskConfigError(f"{source}: line {number}: {key}: the value {value} begins with '#', which YAML reads "
                              f"as a comment, so {key} is empty: quote it: {key}: '{value}'")


def parse_task_config(text: str, source: str, overrides: str = "") -> TaskConfig:
    """Validate task.yaml text, deep-merged with an optional YAML/JSON override snippet; a problem with a value the
    snippet sets (an unknown key, a wrong value) is named as the run overrides', not as the file's."""
    values = _parse_yaml(text, source)
    _value_read_as_comment(text, values, source)
    extra = _parse_yaml(overrides, f"{source} (run overrides)") if overrides.strip() else {}
    try:
        return TaskConfig.model_validate(_deep_merge(values, extra))
    except ValidationError as exc:
        problems = sorted(_problems(exc), key=_in_file_order(values))
    raise TaskConfigError("\n".join(f"{named_source(source, extra, problem.split(': ', 1)[0], values)}: {problem}"
                                    for problem in problems))


def named_source(source: str, extra: dict[str, Any] | str, field: str, file_values: dict | None = None) -> str:
    """`source`, marked `(run overrides)` when the run overrides `extra` (parsed, or their text) set the dotted
    `field`, or brought the section it is missing from where the file's `file_values` have none."""
    if isinstance(extra, str):
        extra = _parse_yaml(extra, f"{source} (run overrides)") if extra.strip() else {}
    return f"{source} (run overrides)" if _set_by(extra, field, file_values) else source


def _in_file_order(values: dict[str, Any]):
    """A sort key putting problems (`<field path>: <problem>`) in the order their keys come in the file (a value
    the file does not set, after them)."""
    order: dict[str, int] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items() if isinstance(node, dict) else ():
            order.setdefault(f"{prefix}{key}", len(order))
            walk(value, f"{prefix}{key}.")

    walk(values, "")

    def position(problem: str) -> int:
        path = problem.split(": ", 1)[0].split(".")
        return next((order[".".join(path[:n])] for n in range(len(path), 0, -1) if ".".join(path[:n]) in order),
                    len(order))

    return position


def _set_by(snippet: dict[str, Any], path: str, file_values: dict | None = None) -> bool:
    """Whether the dotted field `path` is a value `snippet` sets, or a section whose settings it changes (a problem
    of the whole section, such as `training: stages must be ...`, comes from those), or lies in a section the snippet
    brings and the `file_values` lack (a required field missing from `distill`, which only the snippet sets)."""
    node, in_file = snippet, file_values
    for key in path.split("."):
        if not isinstance(node, dict):
            return True  # inside a list the snippet sets
        if key not in node:
            return False
        if file_values is not None and not (isinstance(in_file, dict) and key in in_file):
            return True
        node, in_file = node[key], in_file[key] if file_values is not None else None
    return True


def load_task_config(path: Path, overrides: str = "") -> TaskConfig:
    """Read and validate a task.yaml file (a missing file means all defaults)."""
    text = path.read_text(encoding="utf-8-sig") if path.exists() else ""
    return parse_task_config(text, str(path), overrides)


def check_task_name(name: str) -> str:
    """`name` when it is a valid task folder name, else TaskConfigError."""
    if not TASK_NAME_RE.match(name):
        raise TaskConfigError(
            f"task folder {name!r}: invalid name; use lowercase letters, digits, '_' or '-', "
            "starting with a letter or digit, at most 64 characters"
        )
    return name
