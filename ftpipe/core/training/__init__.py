"""Fine-tuning as an ordinary program, `python -m ftpipe.core.training SPEC.json` (see `program`).

The shared parts live once: the spec and its fingerprint (`spec`), resuming (`checkpoints`), progress and Dagster
Pipes reporting (`reporting`), the trainer's common settings and extra train rows (`setup`), replay of the base
model's general behaviour (`replay`), the published output and its typed result (`outputs`). Each objective is one
module that builds its datasets and its TRL trainer (`sft`); `methods` maps objective names to those modules and is
the only place that interprets the method vocabulary.

Nothing is imported here, so `ftpipe.config` can read the vocabulary from `methods` without a cycle.
"""
