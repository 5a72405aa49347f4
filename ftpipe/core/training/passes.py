"""Forward passes of a token budget. A padding-free batch (its rows as one sequence, `position_ids` starting at 0 at
each row) goes through the model in passes of whole rows of at most `budget` tokens each, a longer row alone: short
rows share a pass (fast on a CPU), long ones do not (the memory of a pass stays bounded), whatever the mix of lengths
in a batch. The passes' gradients add up to the batch's: each pass's loss is its tokens' sum over the batch's count.
"""

from __future__ import annotations

from typing import Any

FLAT_KEYS = ("input_ids", "labels", "position_ids", "seq_idx")  # one value per token of the sequence


def pass_bounds(row_starts: list[int], total: int, budget: int) -> list[tuple[int, int]]:
    """(start, end) of each pass over a sequence of `total` tokens whose rows start at `row_starts`: as many whole
    rows as fit in `budget` tokens, in order; a row longer than that alone."""
    cuts = [0]
    for start, end in zip(row_starts, [*row_starts[1:], total]):
        if end - cuts[-1] > budget and start > cuts[-1]:
            cuts.append(start)
    return list(zip(cuts, [*cuts[1:], total]))


def split(inputs: dict[str, Any], budget: int) -> list[dict[str, Any]]:
    """The passes of a padding-free batch, each as TRL's collator would have made it of its rows."""
    positions = inputs["position_ids"][0]
    if positions.numel() <= budget:
        return [inputs]
    starts = (positions == 0).nonzero().flatten().tolist()
    return [_part(inputs, start, end) for start, end in pass_bounds(starts, positions.numel(), budget)]


def _part(inputs: dict[str, Any], start: int, end: int) -> dict[str, Any]:
    """Tokens `start` to `end` of a padding-free batch, with their own row boundaries."""
    import torch

    part = {key: value[:, start:end] if key in FLAT_KEYS else value
            for key, value in inputs.items() if not key.startswith(("cu_seq_lens", "max_length"))}
    if "seq_idx" in part:
        part["seq_idx"] = part["seq_idx"] - part["seq_idx"][0, 0]
    if "cu_seq_lens_q" in inputs:
        row_starts = (part["position_ids"][0] == 0).nonzero().flatten()
        bounds = torch.cat([row_starts, torch.tensor([end - start], device=row_starts.device)]).to(torch.int32)
        longest = int(bounds.diff().max())
        part.update(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=longest, max_length_k=longest)
    return part


def tokens(inputs: dict[str, Any]) -> int:
    """The real tokens of a pass: all of a padding-free one, the unpadded ones of a padded one."""
    mask = inputs.get("attention_mask")
    return int(mask.sum()) if mask is not None else inputs["input_ids"].numel()


class TokenBudgetPasses:
    """A TRL trainer whose training steps run each (padding-free) batch in passes of `pass_tokens` tokens at most;
    None: the batch in one pass. Mix it in before the trainer class."""

    pass_tokens: int | None = None

    def forward_passes(self, inputs: dict[str, Any]) -> list[dict[str, Any]]:
        return split(inputs, self.pass_tokens) if self.pass_tokens else [inputs]

    def training_step(self, model, inputs: dict[str, Any], num_items_in_batch=None):
        passes = self.forward_passes(inputs)
        if len(passes) == 1:
            return super().training_step(model, inputs, num_items_in_batch)
        if num_items_in_batch is None:  # each pass's loss must be over the whole batch's labelled tokens
            num_items_in_batch = int((inputs["labels"][..., 1:] != -100).sum())
        return sum(super(TokenBudgetPasses, self).training_step(model, part, num_items_in_batch) for part in passes)


def with_passes(trainer_class: type, budget: int | None) -> type:
    """`trainer_class` running its training steps in passes of `budget` tokens (None: a batch in one pass)."""
    return type(trainer_class.__name__, (TokenBudgetPasses, trainer_class), {"pass_tokens": budget})
