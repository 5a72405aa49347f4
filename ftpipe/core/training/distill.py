"""The `distill` objective: the student (the base model) learns the teacher's token distributions on the chat rows
(TRL's GKD trainer, generalised Jensen-Shannon divergence), not only its answers. The teacher is a local model that
shares the base model's tokenizer (`training.teacher_model`, given like `base_model`). On a CPU it is supervised by
default (the student never generates during training); on a GPU half the batches are the student's own answers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ftpipe.core.modeling import load_model_and_tokenizer, resolve_base_model
from ftpipe.core.layout import models_dir
from ftpipe.core.training.methods import TrainingRefused
from ftpipe.core.training.setup import TrainerSetup, micro_batching, require_rows
from ftpipe.core.training.sft import fit_rows, read_chat_rows

BETA = 0.5  # the generalised JSD's interpolation: 0.5 is the symmetric Jensen-Shannon divergence
GPU_ON_POLICY = 0.5


def on_policy_share(configured: float | None) -> float:
    """GKD's lambda: as configured, else 0 on a CPU (generating answers there costs more than it teaches) and
    GPU_ON_POLICY on a GPU."""
    import torch

    return configured if configured is not None else (GPU_ON_POLICY if torch.cuda.is_available() else 0.0)


def load_teacher(setup: TrainerSetup):
    """The teacher model, resolved like the base model; refused when its vocabulary is not the student's."""
    info = resolve_base_model(setup.config.teacher_model, models_dir(), trust_remote_code=setup.spec.trust_remote_code)
    teacher, tokenizer = load_model_and_tokenizer(Path(info["path"]), trust_remote_code=setup.spec.trust_remote_code)
    if tokenizer.get_vocab() != setup.tokenizer.get_vocab():
        raise TrainingRefused(f"teacher_model {setup.config.teacher_model!r} does not share the base model's "
                              "tokenizer: distillation compares their token distributions, so they must")
    setup.info(f"teacher: {setup.config.teacher_model} ({info['parameters'] / 1e6:.1f}M parameters)")
    return teacher.eval()


def build_datasets(setup: TrainerSetup):
    """(train, eval) datasets of whole conversations, the train rows with the setup's replay rows, and the count of
    rows over max_length (fitted as configured: `fit_rows`)."""
    from datasets import Dataset

    config = setup.config
    train, evals = (fit_rows(read_chat_rows(Path(path)), setup.tokenizer, config.max_length, config.too_long,
                             as_row=lambda messages: messages)
                    for path in (setup.spec.train_path, setup.spec.eval_path))
    require_rows(train.rows, evals.rows, train.over, config, trimmable=train.trimmable)
    setup.arguments.update(micro_batching(config, train.lengths))
    extra = setup.extra_train_rows(len(train.rows))
    setup.info(f"data: {len(train.rows)} train rows + {len(extra)} general (replay) / {len(evals.rows)} eval rows")
    as_rows = lambda conversations: Dataset.from_list([{"messages": m} for m in conversations])  # noqa: E731
    return as_rows(train.rows + extra), as_rows(evals.rows), len(train.over) + len(evals.over)


def build_trainer(setup: TrainerSetup) -> tuple[Any, dict[str, Any]]:
    """A GKDTrainer from the teacher on the task's chat rows, and its facts (`rows_too_long`, `on_policy_share`)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # the experimental API of the pinned TRL, tested here
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    train, evals, rows_too_long = build_datasets(setup)
    share = on_policy_share(setup.config.distill_on_policy)
    args = GKDConfig(**setup.arguments, max_length=setup.config.max_length, lmbda=share, beta=BETA,
                     max_new_tokens=min(128, setup.config.max_length))
    trainer = GKDTrainer(model=setup.model, teacher_model=load_teacher(setup), args=args, train_dataset=train,
                         eval_dataset=evals, processing_class=setup.tokenizer, peft_config=setup.peft_config,
                         callbacks=setup.callbacks)
    return trainer, {"rows_too_long": rows_too_long, "on_policy_share": share}
