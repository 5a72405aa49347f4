"""What every objective's trainer shares: the model and tokenizer, the TrainingArguments common to all TRL
trainers, the LoRA adapter, the callbacks, the extra (replay) train rows; and the registry lookup of an objective's
module."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ftpipe.config import TOO_LONG_DONE, TrainingConfig
from ftpipe.core.evaluation.generation import is_adapter
from ftpipe.core.launch import Refused
from ftpipe.core.modeling import load_model_and_tokenizer  # at import: it quiets what loading a model prints
from ftpipe.core.training.methods import OBJECTIVES, Method
from ftpipe.core.training.spec import TrainingSpec


CPU_PASS_TOKENS = 512  # tokens of one forward pass on a CPU (see micro_batching)
MOST_LEFT_OUT = 0.5  # a training that would drop more than this share of its train rows as too long is refused


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class TrainerSetup:
    """Everything an objective needs to build its trainer; `arguments` go into its TRL config class."""

    spec: TrainingSpec
    config: TrainingConfig
    method: Method
    model: Any
    tokenizer: Any
    peft_config: Any  # a peft LoraConfig; None for a full fine-tune, or when `model` carries the adapter to train
    arguments: dict[str, Any]
    callbacks: list[Any] = field(default_factory=list)
    info: Any = print  # one progress line for people
    warning: Any = print  # one line about something people should act on
    replay_rows: int = 0  # general rows handed out by extra_train_rows
    replay_seconds: float = 0.0  # spent generating replay answers not cached yet

    def extra_train_rows(self, train_rows: int) -> list[list[dict[str, str]]]:
        """Chat rows (ending with the assistant) for an objective to add to its `train_rows` task rows, never to its
        eval rows: replay of the base model's general behaviour (`training.replay`), none when it is off. Call it
        before the trainer wraps `model`."""
        from ftpipe.core.training.replay import replay_rows

        rows = replay_rows(self, train_rows)
        self.replay_rows = len(rows)
        return rows


def within_max_length(items: list, length_of, max_length: int, too_long: str) -> tuple[list, list[int]]:
    """The items, those over `max_length` tokens (`length_of(item)`) dropped (too_long drop or trim_turns) or kept for
    TRL to truncate; and the lengths of those over."""
    kept, over = [], []
    for item in items:
        length = length_of(item)
        if length > max_length:
            over.append(length)
        if length <= max_length or too_long == "truncate":
            kept.append(item)
    return kept, over


def without_earliest_turns(messages: list[dict[str, str]], length_of, max_length: int) -> tuple[list, int] | None:
    """A multi-turn chat row without as few of its earliest exchanges as it takes to fit `max_length` tokens
    (`length_of(messages)`), its system message kept: (messages, length); None when its last user turn with what
    follows does not fit either, or it has one user turn."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    rest = messages[len(system):]
    for start in [i for i, message in enumerate(rest) if message["role"] == "user"][1:]:
        if (length := length_of(system + rest[start:])) <= max_length:
            return system + rest[start:], length
    return None


def trim_turns_hint(trimmable: int) -> str:
    """Where `too_long: trim_turns` would keep some of the rows left out: how many."""
    return (f"; too_long: trim_turns would keep {trimmable} of them (multi-turn rows) without their earliest turns"
            if trimmable else "")


def fitting_max_length(lengths: list[int]) -> int:
    """A `max_length` every one of `lengths` fits: the longest, rounded up to a multiple of 64."""
    return -(-max(lengths) // 64) * 64


def max_length_advice(over: list[int]) -> str:
    """The `max_length` that keeps every row of lengths `over`, and where a few long ones set it, half that or less,
    the one that keeps nine in ten of them: `7552 to keep them all, or 1024 to keep 57 of 62`."""
    every = fitting_max_length(over)
    most = fitting_max_length(sorted(over)[:max(1, len(over) * 9 // 10)])
    kept = sum(length <= most for length in over)
    return f"{every} to keep them all" + (f", or {most} to keep {kept} of {len(over)}" if most * 2 <= every else "")


def require_rows(train: list, evals: list, train_over: list[int], config: TrainingConfig, kind: str = "",
                 trimmable: int = 0) -> None:
    """Refuse a training left with at most MOST_LEFT_OUT of its train rows, or no eval rows, once the rows over
    max_length (`train_over`: those train rows' lengths; `trimmable` of them multi-turn rows that trim_turns would
    keep) are dropped: it would learn from too few rows to be the task's."""
    left_out = train_over if config.too_long != "truncate" else []
    if len(left_out) > MOST_LEFT_OUT * (len(train) + len(left_out)):
        total = len(train) + len(left_out)
        lengths = sorted(left_out)
        raise Refused(f"{len(left_out)} of {total} train {kind}rows ({len(left_out) / total:.0%}) are longer than "
                      f"training.max_length={config.max_length} tokens (those rows: median {lengths[len(lengths) // 2]}"
                      f", longest {lengths[-1]}), so the training would learn from {len(train)} rows; raise "
                      f"training.max_length to {max_length_advice(left_out)} (too_long: truncate "
                      f"would cut off the answers, which end each row){trim_turns_hint(trimmable)}")
    if not train and not train_over:
        raise Refused(f"no training {kind}rows: the task's held-out split has none (its raw files give no "
                      f"{kind or 'chat '}rows that cleaning kept)")
    if not train:
        raise Refused(f"no training {kind}rows left: every row is longer than max_length={config.max_length} tokens; "
                      "raise training.max_length")
    if not evals:
        raise Refused(f"no eval {kind}rows: the held-out split has none (a larger split.eval_fraction holds some out) "
                      f"or every one is longer than training.max_length={config.max_length} tokens")


def objective_module(objective: str) -> ModuleType:
    """The module of an objective: `build_trainer(setup) -> (trainer, facts)` (facts: extra result metadata)."""
    return importlib.import_module(OBJECTIVES[objective].module)


def trainer_arguments(config: TrainingConfig, checkpoint_dir: Path) -> dict[str, Any]:
    """TrainingArguments shared by every objective: schedule, batch, evaluation and checkpoint cadence, device. A batch
    is `micro_batch_size` rows per forward pass (the whole batch by default) with gradients accumulated to the
    batch."""
    import torch

    on_gpu = torch.cuda.is_available()
    per_process = config.batch_size // world_size()  # batch_size is the global batch
    micro = config.micro_batch_size or per_process  # an objective may size it from its rows (micro_batching)
    return dict(
        output_dir=str(checkpoint_dir),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=micro,
        gradient_accumulation_steps=config.gradient_accumulation * per_process // micro,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.scheduler,
        warmup_steps=config.warmup_ratio,  # a value below 1 is a fraction of all steps
        weight_decay=config.weight_decay,
        seed=config.seed,
        eval_strategy="steps",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.eval_steps,
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        restore_callback_states_from_checkpoint=True,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not on_gpu,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        activation_checkpointing=on_gpu,
        dataloader_num_workers=0,
        ddp_backend="gloo" if world_size() > 1 and not on_gpu else None,
    )


def micro_batching(config: TrainingConfig, lengths: list[int]) -> dict[str, int]:
    """The micro-batch settings for rows of these token `lengths`, unless `micro_batch_size` is set or the training
    runs on a GPU: on a CPU as many rows per forward pass as keep a pass of rows as long as the 95th percentile
    within CPU_PASS_TOKENS (short rows share a pass, which is faster; long ones go one at a time, which bounds the
    memory of activations and logits)."""
    import torch

    if config.micro_batch_size or torch.cuda.is_available() or not lengths:
        return {}
    per_process = config.batch_size // world_size()
    long_row = sorted(lengths)[int(0.95 * (len(lengths) - 1))]
    micro = max((d for d in range(1, per_process + 1) if per_process % d == 0 and d * long_row <= CPU_PASS_TOKENS),
                default=1)
    return {"per_device_train_batch_size": micro, "per_device_eval_batch_size": micro,
            "gradient_accumulation_steps": config.gradient_accumulation * per_process // micro}


def checked_lora_config(config: TrainingConfig, model, warning):
    """`lora_config(config)` for `model`; Refused when `lora.target_modules` names no layer of it (PEFT would stop the
    same way on every retry), and a warning names the modules that match no layer when others do (PEFT leaves them
    out)."""
    import torch

    targets = config.lora.target_modules
    modules = dict(model.named_modules())
    missing = [] if targets == "all-linear" else [
        target for target in targets if not any(name == target or name.endswith(f".{target}") for name in modules)]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in modules.items()
                         if isinstance(module, torch.nn.Linear)})
        found = (f"training.lora.target_modules: {', '.join(missing)} {'matches' if len(missing) == 1 else 'match'} "
                 f"no layer of the model (its linear layers: {', '.join(linear)})")
        if len(missing) == len(targets):
            raise Refused(found)
        warning(f"{found}; the adapter trains the others only")
    return lora_config(config)


def lora_config(config: TrainingConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules,
        task_type="CAUSAL_LM",
    )


def load_start_model(spec: TrainingSpec, method: Method):
    """(model, tokenizer) the training starts from: the base model, or the model of `spec.start_adapter`.

    A whole model folder (a full fine-tune) is loaded as it is. A LoRA adapter is merged into the base weights, so a
    new adapter trains on the SFT model and disabling it gives the SFT model back (the DPO/KTO reference, without a
    second copy). On 4-bit weights, where merging is not exact, the adapter is loaded trainable instead and training
    continues it (TRL then keeps a frozen copy of it for the reference); a warm start continues it too."""
    from peft import PeftModel

    start = Path(spec.start_adapter) if spec.start_adapter else None
    if start and not is_adapter(start):
        return load_model_and_tokenizer(start, trust_remote_code=spec.trust_remote_code)
    model, tokenizer = load_model_and_tokenizer(spec.base_model_dir, load_in_4bit=method.load_in_4bit,
                                                trust_remote_code=spec.trust_remote_code)
    if start is None:
        return model, tokenizer
    continued = method.load_in_4bit or spec.warm_start is not None
    model = PeftModel.from_pretrained(model, str(start), is_trainable=continued)
    return (model if continued else model.merge_and_unload()), tokenizer


def score_labelled_positions_only() -> None:
    """Make TRL's fused LM head score only the positions that have a label on a CPU too.

    TRL projects hidden states through the LM head (the whole vocabulary) only at labelled positions on Triton devices;
    elsewhere it projects every position so that tile shapes stay fixed for graph compilers. A CPU runs eagerly, and
    with the loss on the completion only, most of a chat row is prompt: there the head's work on prompt positions is
    waste (a fifth of a step's time on the demo). The losses and gradients are the same. TRL 1.16 (pinned) makes the
    choice in `trl.trainer.utils._use_triton`, which this wraps."""
    import trl.trainer.utils as fused_head

    on_triton = fused_head._use_triton
    if not getattr(on_triton, "scores_on_cpu", False):
        fused_head._use_triton = lambda device: device.type == "cpu" or on_triton(device)
        fused_head._use_triton.scores_on_cpu = True


def trainer_setup(spec: TrainingSpec, config: TrainingConfig, method: Method, callbacks: list, info,
                  warning=print) -> TrainerSetup:
    """Load the model training starts from and gather the shared trainer settings."""
    from peft import PeftModel
    from transformers import EarlyStoppingCallback

    score_labelled_positions_only()
    model, tokenizer = load_start_model(spec, method)
    return TrainerSetup(
        spec=spec,
        config=config,
        method=method,
        model=model,
        tokenizer=tokenizer,
        peft_config=(checked_lora_config(config, model, warning) if method.peft_adapter
                     and not isinstance(model, PeftModel) else None),
        arguments=trainer_arguments(config, Path(spec.checkpoint_dir)),
        callbacks=[EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience), *callbacks],
        info=info,
        warning=warning,
    )
