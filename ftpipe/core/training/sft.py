"""The `sft` objective: supervised fine-tuning on chat rows, the loss on the final assistant turn only."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftpipe.config import TOO_LONG_DONE, TrainingConfig
from ftpipe.core.modeling import chat_length
from ftpipe.core.readable import plural
from ftpipe.core.training.eval_loss import TokenWeightedEvalLoss
from ftpipe.core.training.passes import with_passes
from ftpipe.core.training.shared_start import SharedStartEvaluation, evaluated_lengths
from ftpipe.core.training.setup import (
    CPU_PASS_TOKENS,
    TrainerSetup,
    max_length_advice,
    micro_batching,
    require_rows,
    trim_turns_hint,
    without_earliest_turns,
)


def read_chat_rows(path: Path) -> list[list[dict[str, str]]]:
    """The `messages` of every row of a canonical parquet file."""
    import pandas as pd

    frame = pd.read_parquet(path, columns=["messages"])
    return [[{"role": m["role"], "content": m["content"]} for m in messages] for messages in frame["messages"]]


def train_conversations(path: Path, config: TrainingConfig) -> list[list[dict[str, str]]]:
    """The conversations an SFT training learns from the chat rows of `path`: each row, or with `every_turn` each of
    its assistant messages after the conversation before it."""
    rows = read_chat_rows(path)
    if not config.every_turn:
        return rows
    return [messages[:end + 1] for messages in rows
            for end in range(1, len(messages)) if messages[end]["role"] == "assistant"]


def to_prompt_completion(messages: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    """Conversational prompt/completion: TRL then puts the loss on the final assistant turn only."""
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"a training row must end with an assistant message, got {messages[-1]['role']!r}")
    return {"prompt": messages[:-1], "completion": messages[-1:]}


@dataclass
class FittedRows:
    """The chat rows a training keeps of those given, as `fit_rows` fitted them to max_length."""

    rows: list = field(default_factory=list)  # `as_row` of each kept conversation
    over: list[int] = field(default_factory=list)  # lengths in tokens of the rows still over max_length
    lengths: list[int] = field(default_factory=list)  # the kept rows' lengths (at most max_length)
    trimmed: int = 0  # multi-turn rows kept without their earliest turns (too_long: trim_turns)
    trimmable: int = 0  # rows dropped (too_long: drop) that trim_turns would keep


def fit_rows(conversations, tokenizer, max_length: int, too_long: str, as_row=to_prompt_completion) -> FittedRows:
    """The rows (`as_row` of each conversation: prompt/completion by default), over-long ones dropped (too_long:
    drop), kept for TRL to truncate (truncate), or as multi-turn rows without their earliest turns where that fits,
    else dropped (trim_turns: `without_earliest_turns`)."""
    fitted = FittedRows()
    for messages in conversations:
        length = chat_length(tokenizer, messages)
        if length > max_length and too_long != "truncate":
            shorter = without_earliest_turns(messages, lambda turns: chat_length(tokenizer, turns), max_length)
            if shorter and too_long == "trim_turns":
                (messages, length), fitted.trimmed = shorter, fitted.trimmed + 1
            fitted.trimmable += shorter is not None and too_long == "drop"
        if length > max_length:
            fitted.over.append(length)
            if too_long != "truncate":
                continue
        fitted.rows.append(as_row(messages))
        fitted.lengths.append(min(length, max_length))
    return fitted


def left_out_warning(train_over: list[int], train_rows: int, eval_over: list[int], eval_rows: int,
                     max_length: int, trimmable: int = 0) -> str:
    """The line about task rows `too_long: drop` left out of a training (their lengths `train_over`, `eval_over`),
    naming only the sides that had such rows, and the max_length that keeps them (and how many of them, multi-turn
    rows, trim_turns would keep)."""
    parts = [f"{len(train_over)} of {train_rows} train rows ({len(train_over) / max(train_rows, 1):.0%}) left out of "
             "training: the model does not learn from them"] if train_over else []
    if eval_over:
        parts.append(f"{len(eval_over)} of {eval_rows} eval rows left out of the training's eval loss (eval_report "
                     "still scores them, on inputs longer than any the model trained on)")
    return (f"rows longer than training.max_length={max_length} tokens: {'; '.join(parts)}. Raise "
            f"training.max_length to {max_length_advice(train_over + eval_over)} (a pass's memory "
            f"grows with it){trim_turns_hint(trimmable)}")


def build_datasets(setup: TrainerSetup):
    """(train, eval) datasets, the train rows with the setup's extra (replay) rows mixed in; the facts `rows_too_long`
    (task rows over max_length) and, with too_long trim_turns, `rows_trimmed` (multi-turn rows kept without their
    earliest turns); and the task train rows' lengths in tokens."""
    from datasets import Dataset

    config = setup.config
    conversations = train_conversations(Path(setup.spec.train_path), config), read_chat_rows(Path(setup.spec.eval_path))
    train, evals = (fit_rows(rows, setup.tokenizer, config.max_length, config.too_long) for rows in conversations)
    require_rows(train.rows, evals.rows, train.over, config, trimmable=train.trimmable)
    extra = [to_prompt_completion(messages) for messages in setup.extra_train_rows(len(train.rows))]
    rows_too_long = len(train.over) + len(evals.over)
    facts = {"rows_too_long": rows_too_long,
             **({"rows_trimmed": train.trimmed + evals.trimmed} if config.too_long == "trim_turns" else {})}
    setup.info(f"data: {len(train.rows)} train rows{' (every assistant turn a row)' if config.every_turn else ''} + "
               f"{len(extra)} general (replay) / {len(evals.rows)} eval rows; "
               f"{rows_too_long} over {config.max_length} tokens {TOO_LONG_DONE[config.too_long]}"
               + (f"; {facts['rows_trimmed']} multi-turn rows kept without their earliest turns"
                  if "rows_trimmed" in facts else ""))
    if rows_too_long and config.too_long != "truncate":
        setup.warning(left_out_warning(train.over, len(train.rows) + len(train.over), evals.over,
                                       len(evals.rows) + len(evals.over), config.max_length,
                                       train.trimmable + evals.trimmable))
    return Dataset.from_list(train.rows + extra), Dataset.from_list(evals.rows), facts, train.lengths


def pass_settings(setup: TrainerSetup, lengths: list[int], rows_too_long: int) -> tuple[bool, int | None]:
    """How batches go through the model: whether padding-free (`padding_free`), and the token budget of a training
    pass (`passes`), set in the setup's arguments. On a CPU, padding-free without a configured `micro_batch_size`: the
    whole batch a step, in passes of CPU_PASS_TOKENS (evaluation in micro-batches sized from the rows, as it keeps
    no gradients). Otherwise micro-batches sized from the rows (`micro_batching`), none."""
    flat = padding_free(setup.config, setup.arguments, rows_too_long, setup.model)
    sizes = micro_batching(setup.config, lengths)
    if flat and sizes:
        setup.arguments["per_device_eval_batch_size"] = sizes["per_device_eval_batch_size"]
        return True, CPU_PASS_TOKENS
    setup.arguments.update(sizes)
    return flat and setup.arguments["per_device_train_batch_size"] > 1, None


def padding_free(config: TrainingConfig, arguments: dict[str, Any], rows_too_long: int, model) -> bool:
    """Whether the rows of a forward pass go through it as one sequence, no padding computed: on a CPU, several rows
    a pass, no packing, no row left over max_length (dropped, or none of the `rows_too_long`: TRL truncates no row
    then), and a `model` that keeps the rows apart by their positions."""
    rows_fit = config.too_long != "truncate" or rows_too_long == 0
    return (arguments["use_cpu"] and arguments["per_device_train_batch_size"] > 1 and not config.packing and rows_fit
            and packed_rows_stay_apart(model))


def packed_rows_stay_apart(model) -> bool:
    """Whether each row of a sequence of packed rows attends only to itself, told apart by its positions
    (transformers' own attention masks do so; a model's own code may not): the second of two packed rows gets the
    logits it gets alone."""
    import torch

    ids = torch.arange(1, 9, device=model.device)[None]  # two rows of four tokens
    positions = torch.arange(4, device=model.device).repeat(2)[None]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[:, 4:]
            alone = model(input_ids=ids[:, 4:], use_cache=False).logits
    except TypeError:  # a forward without position_ids
        return False
    finally:
        model.train(training)
    return torch.allclose(packed, alone, rtol=1e-3, atol=1e-3)


def sft_config(config: TrainingConfig, arguments: dict[str, Any], flat: bool):
    """The SFTConfig of a training: the shared trainer `arguments` plus sequence length, packing, completion loss,
    and padding-free passes when `flat` (see `padding_free`)."""
    from trl import SFTConfig

    if flat:  # every token of a padding-free pass is real: count them all (many tokenizers pad with their end token)
        arguments = {**arguments, "include_num_input_tokens_seen": "all"}
    return SFTConfig(**arguments, max_length=None if flat else config.max_length, padding_free=flat,
                     packing=config.packing, completion_only_loss=True)


def build_trainer(setup: TrainerSetup) -> tuple[Any, dict[str, Any]]:
    """An SFTTrainer on the task's chat rows, and the facts of `build_datasets` and `eval_tokens_per_evaluation` (what
    an evaluation reads of the eval rows: `evaluated_lengths`, as the sizing counts it)."""
    from trl import SFTTrainer

    train, evals, facts, lengths = build_datasets(setup)
    flat, budget = pass_settings(setup, lengths, facts["rows_too_long"])
    rows = setup.arguments["per_device_train_batch_size"]
    if budget:
        setup.info(f"forward passes of whole rows up to {budget} tokens (a longer row alone), "
                   "each row attending only to itself, no padding")
    elif rows == 1:
        setup.info("forward passes of one row, no padding")
    else:
        setup.info(f"forward passes of {rows} rows, "
                   f"{'each row attending only to itself, no padding' if flat else 'padded to their longest row'}")
    trainer_class = type("SFTTrainer", (TokenWeightedEvalLoss, SharedStartEvaluation, SFTTrainer), {})
    trainer = with_passes(trainer_class, budget)(
        model=setup.model,
        args=sft_config(setup.config, setup.arguments, flat),
        train_dataset=train,
        eval_dataset=evals,
        processing_class=setup.tokenizer,
        peft_config=setup.peft_config,
        callbacks=setup.callbacks,
    )
    read = evaluated_lengths(trainer.eval_dataset["input_ids"])
    shared_start_evaluations(setup, trainer, read)
    return trainer, {**facts, "eval_tokens_per_evaluation": sum(read)}


def shared_start_evaluations(setup: TrainerSetup, trainer, read: list[int]) -> None:
    """When the eval rows share a long start (`read`: their `evaluated_lengths`), say so; and where the evaluations'
    batches were sized from whole rows (`micro_batching`), size them from the rows' rests, as the start is read
    once."""
    if len(read) == len(trainer.eval_dataset):
        return
    sized = micro_batching(setup.config, read[1:]).get("per_device_eval_batch_size")
    if sized:
        trainer.args.per_device_eval_batch_size = sized
    per_pass = trainer.args.per_device_eval_batch_size
    setup.info(f"evaluations: the {read[0]}-token start every eval row shares read once, each row's rest after it "
               f"({plural(per_pass, 'row')} a pass)")
