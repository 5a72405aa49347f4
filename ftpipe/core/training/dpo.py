"""The `dpo` objective: direct preference optimisation on pairs (prompt, chosen, rejected), from the SFT model.

The reference is the SFT model: with LoRA, the policy with its new adapter disabled (TRL does this when a PEFT model
comes without a reference model), so no second copy of the model is held; a full fine-tune keeps a frozen copy.
"""

from __future__ import annotations

from typing import Any

from ftpipe.core.training.preference import paired_examples, preference_trainer
from ftpipe.core.training.setup import TrainerSetup


def build_trainer(setup: TrainerSetup) -> tuple[Any, dict[str, Any]]:
    """A DPOTrainer on the split's preference pairs, and its facts (see `preference_trainer`)."""
    from trl import DPOConfig, DPOTrainer

    return preference_trainer(setup, DPOTrainer, DPOConfig, paired_examples, reference=True)
