"""Sizing a training before it starts: the optimizer steps it will run, the tokens it will process, and the time and
peak memory it will take on this machine.

Steps and tokens follow the training program: the train rows that fit `max_length` (or are truncated to it) plus the
replay rows, `batch_size` rows a batch, `gradient_accumulation` batches a step, for `max_steps` or `epochs` (the
Trainer's schedule). Tokens are counted as `tokens_per_second` counts them: the rows' tokens in the chat template,
padding left out. Time is overhead + tokens / rate, taken from the most recent finished training of the task on the
same base model (its `tokens_per_second`, its evaluations' eval tokens a second, and as overhead the rest of its
program's time but its calibration and the replay answers it generated, which are cached), or, without one, from a
calibration in
the training program itself (`deferred`, then `calibrated`): once its trainer is set up, it times a few forward and
backward passes of its first batch of train rows, as the training will run them, and the same passes forward only,
as the evaluations every `eval_steps` run the eval rows, and logs the estimate before the first step (the
optimizer's update is left out, so it runs a little low).
Peak memory is measured the same way: the previous training's, or the program's own up to the calibration's end,
whose warm-up pass is the largest the training will run (the first batch's largest, or the longest train row).
"""

from __future__ import annotations

import itertools
import math
import random
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ftpipe.config import TrainingConfig
from ftpipe.core import readable
from ftpipe.core.layout import TaskLayout
from ftpipe.core.results import RESULT_FILE, read_result
from ftpipe.core.training import passes
from ftpipe.core.training.checkpoints import checkpoint_step, resumable
from ftpipe.core.training.shared_start import evaluated_lengths
from ftpipe.core.training.spec import TrainingSpec

CALIBRATION_TOKENS = 1024  # real tokens the calibration times (in two passes at least), after a warm-up pass
REPLAY_ANSWER_TOKENS = 43  # a replay answer, taken as half of the longest kept (replay.COMPLETE_BELOW)


@dataclass(frozen=True)
class Plan:
    """What a training will go through: optimizer steps, train rows (repeats counted) and their tokens, and the eval
    rows' tokens of all its evaluations."""

    steps: int
    rows: int
    tokens: int
    eval_tokens: int = 0
    done_steps: int = 0  # steps a checkpoint already holds: the plan is what is left of the training

    def resumed(self, done_steps: int) -> Plan:
        """What is left of this plan after `done_steps` steps (a resumed training), its work shared evenly."""
        left = max(self.steps - done_steps, 0) / self.steps if self.steps else 0.0
        return Plan(steps=self.steps, rows=round(self.rows * left), tokens=round(self.tokens * left),
                    eval_tokens=round(self.eval_tokens * left), done_steps=done_steps)


@dataclass(frozen=True)
class Cost:
    """How fast this machine trains: tokens a second, the program's other seconds, its peak memory (GiB), and eval
    tokens a second (None: the other seconds hold the evaluations, as a training's published before it timed them)."""

    tokens_per_second: float
    overhead_seconds: float
    peak_memory_gib: float
    source: str = "calibration"
    eval_tokens_per_second: float | None = None


@dataclass(frozen=True)
class Estimate:
    """A plan and, when known, what it costs here (`no_cost` says why not)."""

    plan: Plan
    cost: Cost | None
    no_cost: str = ""

    @property
    def seconds(self) -> float | None:
        if self.cost is None:
            return None
        rate = self.cost.eval_tokens_per_second
        evaluations = self.plan.eval_tokens / rate if rate else 0.0
        return self.cost.overhead_seconds + self.plan.tokens / self.cost.tokens_per_second + evaluations

    def line(self) -> str:
        """`sizing: 36 steps, ~25.8k tokens at 177 tokens/s (calibration), evaluations ~12.3k tokens at 323 tokens/s:
        ~3.9 min in all, peak ~2.4 GiB` (the minutes count the program's start too)."""
        steps = self.plan.steps - self.plan.done_steps
        left = f" of {self.plan.steps} left, resuming at step {self.plan.done_steps}" if self.plan.done_steps else ""
        text = f"sizing: {steps} steps{left}, ~{readable.count(self.plan.tokens)} tokens"
        if self.cost is None:
            return f"{text}; no time estimate: {self.no_cost}"
        rate = self.cost.eval_tokens_per_second
        evaluations = (f", evaluations ~{readable.count(self.plan.eval_tokens)} tokens at {rate:.0f} tokens/s"
                       if rate and self.plan.eval_tokens else "")
        return (f"{text} at {self.cost.tokens_per_second:.0f} tokens/s ({self.cost.source}){evaluations}: "
                f"~{self.minutes:g} min in all, peak ~{_gib(self.cost.peak_memory_gib)}")

    @property
    def minutes(self) -> float:
        """The estimated minutes, to two digits: an estimate."""
        return float(f"{self.seconds / 60:.2g}")

    def metadata(self) -> dict[str, Any]:
        """The `estimated_*` materialization entries."""
        found = {"estimated_steps": self.plan.steps - self.plan.done_steps, "estimated_tokens": self.plan.tokens,
                 "estimate_source": self.cost.source if self.cost else f"none: {self.no_cost}"}
        if self.cost:
            found.update(estimated_minutes=self.minutes,
                         estimated_peak_memory=f"{_gib(self.cost.peak_memory_gib)} ({self.cost.source})")
        return found


def _gib(value: float) -> str:
    return readable.size(int(value * 2**30))


def steps_per_epoch(rows: int, config: TrainingConfig) -> int:
    """Optimizer steps in one pass over `rows` train rows (a step on the epoch's last, shorter group of batches)."""
    world = config.num_processes * config.nnodes
    batches = math.ceil(math.ceil(rows / world) / (config.batch_size // world))
    return max(math.ceil(batches / config.gradient_accumulation), 1)


def optimizer_steps(rows: int, config: TrainingConfig) -> int:
    """The steps the Trainer runs: `max_steps` when set, else `epochs` passes rounded up to a whole step."""
    return config.max_steps if config.max_steps > 0 else math.ceil(config.epochs * steps_per_epoch(rows, config))


def plan(lengths: list[int], config: TrainingConfig, eval_lengths: list[int] = ()) -> Plan:
    """The plan over train rows of these token lengths: whole passes, then `batch_size x gradient_accumulation` rows a
    step (at their mean length, the order being shuffled); and an evaluation of the eval rows of `eval_lengths` every
    `eval_steps` steps and at the last."""
    steps = optimizer_steps(len(lengths), config)
    passes, rest = divmod(steps, steps_per_epoch(len(lengths), config))
    partial = min(len(lengths), rest * config.batch_size * config.gradient_accumulation)
    mean = sum(lengths) / max(len(lengths), 1)  # no rows at all: the program refuses the training
    tokens = passes * sum(lengths) + round(partial * mean)
    return Plan(steps=steps, rows=passes * len(lengths) + partial, tokens=tokens,
                eval_tokens=math.ceil(steps / config.eval_steps) * sum(eval_lengths))


def fitted_rows(spec: TrainingSpec, config: TrainingConfig, tokenizer, evals: bool = False):
    """The train rows (`evals`: the eval rows) as the program fits them to max_length (`train_conversations`,
    `fit_rows`), in file order."""
    from ftpipe.core.training.sft import fit_rows, read_chat_rows, train_conversations

    conversations = (read_chat_rows(Path(spec.eval_path)) if evals
                     else train_conversations(Path(spec.train_path), config))
    return fit_rows(conversations, tokenizer, config.max_length, config.too_long, as_row=lambda messages: messages)


def task_rows(spec: TrainingSpec, config: TrainingConfig, tokenizer,
              evals: bool = False) -> list[tuple[list[dict[str, str]], list[int]]]:
    """(messages, token ids) of `fitted_rows`."""
    return [(messages, _encode(tokenizer, messages)[: config.max_length])
            for messages in fitted_rows(spec, config, tokenizer, evals).rows]


def _encode(tokenizer, messages: list[dict[str, str]], **options) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **options)["input_ids"]


def replay_lengths(spec: TrainingSpec, config: TrainingConfig, tokenizer, train_rows: int) -> list[int]:
    """Lengths of the replay rows: the prompts taken in the training's seeded order, each with an answer of
    `REPLAY_ANSWER_TOKENS` tokens."""
    from ftpipe.core.training.replay import read_prompts

    wanted = round(config.replay * train_rows)
    if not wanted or not spec.replay_prompts:
        return []
    prompts = read_prompts(Path(spec.replay_prompts))
    order = random.Random(config.seed).sample(prompts, len(prompts))
    prompt_tokens = [len(_encode(tokenizer, order[i % len(order)]["messages"], add_generation_prompt=True))
                     for i in range(wanted)]
    return [min(tokens + REPLAY_ANSWER_TOKENS, config.max_length) for tokens in prompt_tokens]


def row_lengths(spec: TrainingSpec, config: TrainingConfig) -> tuple[list[int], list[int]]:
    """Token lengths of every row the training of `spec` goes through in one pass (task rows, then replay rows), and
    what an evaluation reads of the eval rows it keeps (`evaluated_lengths`)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_dir, trust_remote_code=spec.trust_remote_code)
    kept = fitted_rows(spec, config, tokenizer).lengths  # counted once: their ids are not needed
    evals = evaluated_lengths([ids for _, ids in task_rows(spec, config, tokenizer, evals=True)])
    return kept + replay_lengths(spec, config, tokenizer, len(kept)), evals


def previous_cost(kept: Path, base_fingerprint: str) -> Cost | None:
    """The cost the most recent finished training in `kept` (a task's `lora_adapter/` folder) measured on this base
    model, from step 0; None when there is none. Its overhead leaves out the replay answers it generated (cached for
    the next) and its calibration (the next has a previous training), and its evaluations, priced at the eval tokens a
    second they read when it timed them (the next may run more of them, or on more rows)."""
    found = [((folder / RESULT_FILE).stat().st_mtime, result) for folder in sorted(kept.glob("*"))
             if not folder.name.startswith(".") and (result := read_result(folder, "lora_adapter"))
             and _measured(result, base_fingerprint)]
    if not found:
        return None
    result = max(found, key=lambda pair: pair[0])[1]
    facts = result.metadata
    eval_tokens = facts.get("evaluations", 0) * facts.get("eval_tokens_per_evaluation", 0)
    timed = eval_tokens > 0 and facts["eval_seconds"] > 0
    explained = (facts["tokens_trained"] / facts["tokens_per_second"] + (facts["eval_seconds"] if timed else 0.0)
                 + facts.get("replay_answer_seconds", 0.0) + facts.get("calibration_seconds", 0.0))
    return Cost(tokens_per_second=facts["tokens_per_second"],
                overhead_seconds=max(facts["program_seconds"] - explained, 0.0),
                peak_memory_gib=facts["peak_memory_mb"] / 1024, source=f"previous training {result.reuse_key[:8]}",
                eval_tokens_per_second=eval_tokens / facts["eval_seconds"] if timed else None)


def _measured(result, base_fingerprint: str) -> bool:
    facts = result.metadata
    return (result.inputs.get("base_fingerprint") == base_fingerprint and facts.get("tokens_per_second", 0) > 0
            and {"program_seconds", "peak_memory_mb"} <= facts.keys() and not facts.get("resumed_from_step"))


def estimate(spec: TrainingSpec) -> Estimate:
    """The estimate for the training of `spec` (what is left of it, where it will resume from a checkpoint) at the
    previous training's rate; without one, no cost yet (`deferred` hands the plan to the training program, which
    calibrates)."""
    config = spec.config()
    lengths, eval_lengths = row_lengths(spec, config)
    found = plan(lengths, config, eval_lengths)
    if (checkpoint := resumable(Path(spec.checkpoint_dir), spec.force_retrain)) is not None:
        found = found.resumed(checkpoint_step(checkpoint))
    cost = previous_cost(TaskLayout(spec.task).path("lora_adapter"), spec.base_fingerprint)
    return Estimate(found, cost, "" if cost else "no earlier training of this task on this base model here")


def deferred(found: Estimate, seconds_left: float | None) -> dict[str, Any]:
    """The spec's `sizing` entry: the plan the training program prices with its calibration before its first step,
    and the seconds the run has left (None: no limit)."""
    return {"plan": asdict(found.plan), "seconds_left": seconds_left}


def calibrated(spec: TrainingSpec, trainer) -> Estimate:
    """The estimate for the plan of `spec.sizing`, at the rate `trainer` (set up, not yet trained) shows here."""
    return Estimate(Plan(**spec.sizing["plan"]), measure(spec, trainer))


def after_first_step(seconds_left: float | None) -> dict[str, Any]:
    """The spec's `sizing` entry of a training whose rows are not sized before it starts (a preference stage): the
    program estimates it from its first step, against the seconds the run has left (None: no limit)."""
    return {"plan": None, "seconds_left": seconds_left}


def over_runtime(seconds: float | None, seconds_left: float | None, what: str = "the training needs") -> str | None:
    """The warning for `seconds` of work that outlast the seconds a run has left under `dagster/max_runtime`, else
    None."""
    if seconds is None or seconds_left is None or seconds <= seconds_left:
        return None
    return (f"sizing: {what} ~{seconds / 60:.1f} min but this run's dagster/max_runtime leaves "
            f"{max(seconds_left, 0) / 60:.1f} min: it will be stopped first; lower training.max_steps or raise the "
            "limit")


def over_memory(peak_gib: float) -> str | None:
    """The warning for a peak beyond the memory the training has here (a GPU's whole memory; on a CPU what is
    available now plus what this process holds), else None."""
    import psutil
    import torch

    if torch.cuda.is_available():
        have, where = torch.cuda.mem_get_info()[1] / 2**30, "this GPU has"
    else:
        have = (psutil.virtual_memory().available + psutil.Process().memory_info().rss) / 2**30
        where = "this machine has free"
    if peak_gib <= have:
        return None
    return (f"sizing: the training needs ~{_gib(peak_gib)} at its peak but {where} {_gib(have)}: it may be killed for "
            "memory; lower training.max_length or training.batch_size, or set training.micro_batch_size: 1")


def process_seconds() -> float:
    """Seconds since this process started."""
    import psutil

    return time.time() - psutil.Process().create_time()


def peak_memory_gib() -> float:
    """This process's peak memory: allocated CUDA memory on a GPU, else resident memory (GiB)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure(spec: TrainingSpec, trainer) -> Cost:
    """Time forward and backward passes of the trainer's first batch (`_first_step`), after a warm-up pass of the
    largest pass the training will run (its peak memory: the first batch's largest, or the longest row's), until
    `CALIBRATION_TOKENS` real tokens went through (`_timed`), on the training's own model with the activation
    checkpointing the training will use; then the same passes forward only, as an evaluation runs them. Its weights,
    gradients and random state stay as they were."""
    import torch

    overhead = process_seconds()
    passes = _first_step(spec, trainer)
    timed = _timed(passes)
    largest = max(passes + _longest_row(trainer), key=lambda one: one[1])
    model = trainer.model
    if trainer.args.activation_checkpointing:  # set on a GPU; the Trainer turns it on only once `train()` starts
        model.activation_checkpointing_enable(trainer.args.activation_checkpointing_kwargs)
    model.train()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        _backward(model, [largest])
        started = time.monotonic()
        _backward(model, timed)
        seconds = time.monotonic() - started
        model.eval()
        started = time.monotonic()
        with torch.no_grad():
            for inputs, _ in timed:
                model(**inputs)
        eval_seconds = time.monotonic() - started
        model.train()
    model.zero_grad(set_to_none=True)
    tokens = sum(tokens for _, tokens in timed)
    return Cost(tokens_per_second=tokens / seconds, overhead_seconds=overhead, peak_memory_gib=peak_memory_gib(),
                eval_tokens_per_second=tokens / eval_seconds)


def _first_step(spec: TrainingSpec, trainer) -> list[tuple[dict[str, Any], int]]:
    """The forward passes of one process's first optimizer step as `trainer` runs them: the first batch of its train
    rows (as it tokenized, labelled and cut them) in micro-batches of its per-device size (`_passes`)."""
    config = spec.config()
    size = min(config.batch_size // (config.num_processes * config.nnodes), len(trainer.train_dataset))
    rows = [trainer.train_dataset[index] for index in range(size)]
    micro = trainer.args.per_device_train_batch_size
    return [one for start in range(0, size, micro) for one in _passes(trainer, rows[start:start + micro])]


def _longest_row(trainer) -> list[tuple[dict[str, Any], int]]:
    """The passes of the train row with the most tokens, alone (one pass unless cut)."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(trainer.train_dataset.with_format("arrow")["input_ids"])
    return _passes(trainer, [trainer.train_dataset[int(pc.index(lengths, pc.max(lengths)).as_py())]])


def _passes(trainer, rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], int]]:
    """`rows` as `trainer` runs them together: through its own collator, cut into its passes
    (`passes.TokenBudgetPasses`), on its device; each with its real tokens."""
    import torch

    cut = getattr(trainer, "forward_passes", lambda inputs: [inputs])
    device = trainer.model.device
    return [({key: value.to(device) if torch.is_tensor(value) else value for key, value in part.items()},
             passes.tokens(part)) for part in cut(trainer.data_collator(rows))]


def _timed(passes: list[tuple[Any, int]]) -> list[tuple[Any, int]]:
    """The passes to time: the first batch's in turn (from its first again when they run out) until
    `CALIBRATION_TOKENS` real tokens, and two passes at least. A batch of long rows costs a few rows, not steps."""
    timed = []
    for one in itertools.cycle(passes):
        timed.append(one)
        if len(timed) >= 2 and sum(tokens for _, tokens in timed) >= CALIBRATION_TOKENS:
            return timed


def _backward(model, passes: list[tuple[dict[str, Any], int]]) -> None:
    for inputs, _ in passes:
        model(**inputs, fused_lm_head=True).loss.backward()
