"""The `kto` objective: Kahneman-Tversky optimisation on single answers marked desirable or not (a pair gives one of
each), from the SFT model, which is also its reference (as for dpo)."""

from __future__ import annotations

import random
from typing import Any

from ftpipe.core.training.preference import preference_trainer, unpaired_examples
from ftpipe.core.training.setup import TrainerSetup


def build_trainer(setup: TrainerSetup) -> tuple[Any, dict[str, Any]]:
    """A KTOTrainer on the split's preference rows, and its facts (see `preference_trainer`).

    TRL's KTO reads its rows in order (its KL term pairs the rows of a batch), so they are shuffled here, by the seed.
    """
    from trl import KTOConfig, KTOTrainer

    def shuffled_rows(rows: list[dict]) -> list[dict]:
        examples = unpaired_examples(rows)
        return random.Random(setup.config.seed).sample(examples, len(examples))

    return preference_trainer(setup, KTOTrainer, KTOConfig, shuffled_rows, reference=True)
