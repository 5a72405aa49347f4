"""The `orpo` objective: odds-ratio preference optimisation on pairs (prompt, chosen, rejected), from the SFT model.

ORPO needs no reference model: its loss is the chosen answer's NLL plus beta times the odds-ratio term. Its trainer
lives in `trl.experimental.orpo` in the pinned TRL.
"""

from __future__ import annotations

import os
from typing import Any

from ftpipe.core.training.preference import paired_examples, preference_trainer
from ftpipe.core.training.setup import TrainerSetup


def token_counting_trainer():
    """ORPOTrainer counting the chosen and rejected tokens it trains on (its batches have no `input_ids`, which the
    Trainer counts), so tokens_per_second and the next training's sizing see them."""
    from trl.experimental.orpo import ORPOTrainer

    class TokenCountingORPOTrainer(ORPOTrainer):
        def _track_num_input_tokens(self, inputs):
            tokens = inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum()
            self.state.num_input_tokens_seen += int(self.accelerator.gather(tokens.to(self.args.device)).sum().item())

    return TokenCountingORPOTrainer


def build_trainer(setup: TrainerSetup) -> tuple[Any, dict[str, Any]]:
    """An ORPOTrainer on the split's preference pairs, and its facts (see `preference_trainer`)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # the experimental API of the pinned TRL, tested here
    from trl.experimental.orpo import ORPOConfig

    # its collator needs the tokenized columns kept (it would switch this off itself, with a warning)
    return preference_trainer(setup, token_counting_trainer(), ORPOConfig, paired_examples, remove_unused_columns=False)
