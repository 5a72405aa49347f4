"""What the preference objectives (`dpo`, `orpo`, `kto`) share: their rows, their refusal, their trainer, and the one
adapter they publish.

- Rows: the split's canonical preference rows (`ftpipe.core.preferences`) in TRL's conversational form, paired
  (prompt, chosen, rejected) for dpo and orpo, unpaired (prompt, completion, label) for kto, where each pair gives a
  desirable and an undesirable row. Rows over `max_length` tokens are dropped or left for TRL to truncate (too_long).
- The policy starts as the SFT model (`setup.load_start_model`); `beta` is `training.preference.beta`.
- The published adapter applies to the base model: LoRA updates add up, so the SFT adapter and the adapter trained on
  the merged SFT model are one adapter, A = [A_sft; A_pref] along the rank axis and B = [s_sft B_sft, s_pref B_pref],
  rank r_sft + r_pref and lora_alpha = rank (scaling 1), with zero blocks where one of them lacks a module.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftpipe.config import TOO_LONG_DONE, TrainingConfig
from ftpipe.core.evaluation.generation import ADAPTER_CONFIG, is_adapter
from ftpipe.core.modeling import chat_length
from ftpipe.core.preferences import is_paired, missing_preference_rows, read_preferences
from ftpipe.core.training.methods import PREFERENCE_OBJECTIVES, UNPAIRED_OBJECTIVES, Method
from ftpipe.core.training.setup import (
    TrainerSetup, micro_batching, require_rows, within_max_length, world_size,
)
from ftpipe.core.training.spec import TrainingSpec

ADAPTER_WEIGHTS = "adapter_model.safetensors"
REFERENCE_ADAPTER = "ref"  # the frozen copy of a continued adapter that TRL's DPO and KTO trainers add and save

Messages = list[dict[str, str]]
ToExamples = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]  # canonical rows -> TRL rows


def check(spec: TrainingSpec, config: TrainingConfig) -> None:
    """ValueError when a preference training cannot run as specified: its train or eval file has no row it trains on,
    its start folder does not fit `training.adapter`, or (kto) a process would get batches of one row."""
    objective = config.objective
    if objective not in PREFERENCE_OBJECTIVES:
        return
    start = Path(spec.start_adapter) if spec.start_adapter else None
    if start and is_adapter(start) != (config.adapter == "lora"):
        kind = "a LoRA adapter" if is_adapter(start) else "a whole model"
        raise ValueError(f"start_adapter {start} is {kind} but training.adapter is {config.adapter}: the preference "
                         "stage trains with the adapter setting of the SFT stage")
    for path in (spec.train_path, spec.eval_path):
        if problem := missing_preference_rows(objective, Path(path)):
            raise ValueError(problem)
    if objective in UNPAIRED_OBJECTIVES and config.batch_size // world_size() < 2:
        raise ValueError(f"{objective} needs training.batch_size of at least 2 per process: its KL term pairs the rows "
                         f"of a batch, and {config.batch_size} over {world_size()} processes leaves fewer")


def prompt_messages(row: dict[str, Any]) -> Messages:
    return [{"role": message["role"], "content": message["content"]} for message in row["prompt"]]


def assistant(text: str) -> Messages:
    return [{"role": "assistant", "content": text}]


def paired_examples(rows: list[dict[str, Any]]) -> list[dict[str, Messages]]:
    """TRL's conversational pairs (prompt, chosen, rejected) of the paired rows; unpaired rows are left out."""
    return [{"prompt": prompt_messages(row), "chosen": assistant(row["chosen"]), "rejected": assistant(row["rejected"])}
            for row in rows if is_paired(row)]


def labelled_answers(row: dict[str, Any]) -> list[tuple[str, bool]]:
    """(answer, desirable) of a row: chosen and rejected of a pair, or the completion and label of an unpaired row."""
    if is_paired(row):
        return [(row["chosen"], True), (row["rejected"], False)]
    return [(row["completion"], row["label"])]


def unpaired_examples(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """TRL's conversational unpaired rows (prompt, completion, label): a pair gives a desirable and an undesirable
    row, an unpaired row itself."""
    return [{"prompt": prompt_messages(row), "completion": assistant(text), "label": label}
            for row in rows for text, label in labelled_answers(row)]


def example_length(tokenizer, example: dict[str, Any]) -> int:
    """Tokens of the example's longest conversation (its prompt with each of its answers)."""
    answers = [example[key] for key in ("chosen", "rejected", "completion") if key in example]
    return max(chat_length(tokenizer, example["prompt"] + answer) for answer in answers)


def fit_examples(examples: list[dict], tokenizer, max_length: int, too_long: str) -> tuple[list[dict], list[int]]:
    """The examples, over-long ones dropped (too_long=drop) or kept for TRL to truncate; and their lengths."""
    return within_max_length(examples, lambda example: example_length(tokenizer, example), max_length, too_long)


def build_datasets(setup: TrainerSetup, to_examples: ToExamples):
    """(train, eval) datasets of the split's preference rows as `to_examples` makes them, and the count of rows over
    max_length."""
    from datasets import Dataset

    config = setup.config

    def fitted(path: str) -> tuple[list[dict], list[int]]:
        examples = to_examples(read_preferences(Path(path)))
        return fit_examples(examples, setup.tokenizer, config.max_length, config.too_long)

    (train, train_over), (evals, eval_over) = fitted(setup.spec.train_path), fitted(setup.spec.eval_path)
    require_rows(train, evals, train_over, config, "preference ")
    rows_too_long = len(train_over) + len(eval_over)
    setup.info(f"data: {len(train)} train / {len(evals)} eval preference rows for {config.objective}; "
               f"{rows_too_long} over {config.max_length} tokens {TOO_LONG_DONE[config.too_long]}")
    return Dataset.from_list(train), Dataset.from_list(evals), rows_too_long


def preference_config(config_class, config: TrainingConfig, arguments: dict[str, Any], **settings):
    """A TRL preference config (`config_class`): the shared trainer `arguments` plus beta, max_length and `settings`."""
    return config_class(**arguments, beta=config.preference.beta, max_length=config.max_length, **settings)


def frozen_reference(setup: TrainerSetup) -> dict[str, Any]:
    """The trainer's `ref_model` for a full fine-tune: a copy of the start model. TRL would load it again from the
    start's folder itself, without ftpipe's loading settings. With an adapter TRL disables the adapter instead."""
    from peft import PeftModel

    if setup.peft_config is not None or isinstance(setup.model, PeftModel):
        return {}
    return {"ref_model": copy.deepcopy(setup.model).eval().requires_grad_(False)}


def preference_trainer(setup: TrainerSetup, trainer_class, config_class, to_examples: ToExamples,
                       reference: bool = False, **settings) -> tuple[Any, dict[str, Any]]:
    """A TRL preference trainer (`trainer_class`, configured as `preference_config` says) on the split's rows as
    `to_examples` makes them, with a reference model when `reference` (see `frozen_reference`); and its facts
    `rows_too_long`, `pairs_train` and `pairs_eval` (the rows it trains and evaluates on: pairs, or single rows for
    kto)."""
    train, evals, rows_too_long = build_datasets(setup, to_examples)
    if setup.config.objective not in UNPAIRED_OBJECTIVES:  # kto's KL term pairs the rows of a whole batch
        # on a CPU, passes sized as SFT's are, a pair's chosen and rejected answers going through together
        setup.arguments.update(micro_batching(setup.config, [2 * example_length(setup.tokenizer, e) for e in train]))
    args = preference_config(config_class, setup.config, setup.arguments, **settings)
    trainer = trainer_class(model=setup.model, args=args, train_dataset=train, eval_dataset=evals,
                            processing_class=setup.tokenizer, peft_config=setup.peft_config, callbacks=setup.callbacks,
                            **(frozen_reference(setup) if reference else {}))
    return trainer, {"rows_too_long": rows_too_long, "pairs_train": len(trainer.train_dataset),
                     "pairs_eval": len(trainer.eval_dataset)}


def lora_scaling(config: dict[str, Any]) -> float:
    """The factor PEFT multiplies a LoRA update B·A by."""
    rank, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def lora_factors(folder: Path) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]]]:
    """(adapter config, {module: (A, B)}) of a saved LoRA adapter; ValueError for anything but plain LoRA."""
    from safetensors.torch import load_file

    config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    weights = load_file(folder / ADAPTER_WEIGHTS)
    modules = {key.removesuffix(".lora_A.weight") for key in weights if key.endswith(".lora_A.weight")}
    plain = config.get("peft_type") == "LORA" and not (config.get("use_dora") or config.get("rank_pattern")
                                                       or config.get("alpha_pattern"))
    if not plain or weights.keys() != {f"{module}.lora_{side}.weight" for module in modules for side in "AB"}:
        raise ValueError(f"{folder}: only plain LoRA adapters (lora_A and lora_B weights, one rank and alpha, no DoRA) "
                         "can be combined")
    return config, {module: (weights[f"{module}.lora_A.weight"], weights[f"{module}.lora_B.weight"])
                    for module in modules}


def combine_adapters(first: Path, second: Path, target: Path) -> None:
    """Write into `target` one LoRA adapter that equals `first` merged into the base, then `second` applied on it:
    factors stacked along the rank axis, each B scaled by its own adapter's scaling, so the new scaling is 1."""
    import torch
    from safetensors.torch import save_file

    (config_1, factors_1), (config_2, factors_2) = lora_factors(first), lora_factors(second)
    rank_1, rank_2 = config_1["r"], config_2["r"]

    def zeros(factors: tuple, rank: int) -> tuple:
        a, b = factors
        return a.new_zeros(rank, a.shape[1]), b.new_zeros(b.shape[0], rank)

    modules, combined = sorted(factors_1.keys() | factors_2.keys()), {}
    for module in modules:
        a_1, b_1 = factors_1.get(module) or zeros(factors_2[module], rank_1)
        a_2, b_2 = factors_2.get(module) or zeros(factors_1[module], rank_2)
        combined[f"{module}.lora_A.weight"] = torch.cat([a_1.float(), a_2.float()]).contiguous()
        combined[f"{module}.lora_B.weight"] = torch.cat(
            [lora_scaling(config_1) * b_1.float(), lora_scaling(config_2) * b_2.float()], dim=1).contiguous()
    rank = rank_1 + rank_2
    targets = sorted({module.rsplit(".", 1)[-1] for module in modules})
    config = {**config_2, "r": rank, "lora_alpha": rank, "use_rslora": False, "target_modules": targets}
    save_file(combined, str(target / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (target / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def publishable_adapter(folder: Path, spec: TrainingSpec, method: Method) -> None:
    """Make the adapter a training saved in `folder` apply to the base model as its start (SFT) and this training
    together: on 16/32-bit weights the start adapter is combined with the new one; on 4-bit weights the continued
    start adapter already does, and the frozen reference copy saved beside it goes. Nothing to do for a whole model
    or a training from the base model, and for a warm start, which trained the start adapter further."""
    if not (spec.start_adapter and method.peft_adapter) or spec.warm_start:
        return
    if method.load_in_4bit:
        shutil.rmtree(folder / REFERENCE_ADAPTER, ignore_errors=True)
    else:
        combine_adapters(Path(spec.start_adapter), folder, folder)
