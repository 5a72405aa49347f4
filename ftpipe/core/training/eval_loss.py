"""The eval loss as the mean over every scored token of the eval rows. The Trainer averages the batches' mean losses
(each weighted by its rows), so the same model on the same rows had another eval loss at another eval batch size,
and rows in short batches weighed more; this keeps each batch's summed loss and scored tokens and divides the sums."""

from __future__ import annotations

from ftpipe.core.evaluation.generation import IGNORE


def scored_tokens(labels) -> int:
    """The tokens a batch's loss is the mean over: those with a label after the shift to next-token targets (a
    padding-free batch's rows each start with an unlabelled token, so no row is scored from the one before)."""
    return int((labels[..., 1:] != IGNORE).sum())


class TokenWeightedEvalLoss:
    """A trainer whose eval loss is the mean over all scored tokens, whatever the eval batch size. Mix it in before
    the trainer class and before any step that returns a batch's mean loss."""

    _sums: list[float] | None = None  # [summed loss, scored tokens] of the evaluation running

    def evaluation_loop(self, *args, **kwargs):
        self._sums = [0.0, 0.0]
        try:
            output = super().evaluation_loop(*args, **kwargs)
            loss, tokens = self._reduced()
        finally:
            self._sums = None
        prefix = kwargs.get("metric_key_prefix", "eval")
        if tokens and f"{prefix}_loss" in output.metrics:
            output.metrics[f"{prefix}_loss"] = loss / tokens
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if self._sums is not None and loss is not None and "labels" in inputs:
            tokens = scored_tokens(inputs["labels"])
            self._sums[0] += float(loss) * tokens
            self._sums[1] += tokens
        return loss, logits, labels

    def _reduced(self) -> tuple[float, float]:
        """The summed loss and scored tokens over every process."""
        import torch

        sums = self.accelerator.reduce(torch.tensor(self._sums, dtype=torch.float64, device=self.accelerator.device),
                                       "sum")
        return float(sums[0]), float(sums[1])
