"""How a batch is split into forward passes on a CPU: short rows share a pass, long rows go one at a time (the
memory of a pass stays bounded), always the same rows per optimizer step; a configured size wins."""

from ftpipe.config import TrainingConfig
from ftpipe.core.training.setup import CPU_PASS_TOKENS, micro_batching


def rows_per_step(settings: dict) -> int:
    return settings["per_device_train_batch_size"] * settings["gradient_accumulation_steps"]


def test_long_rows_one_at_a_time_short_rows_together_and_the_step_unchanged():
    config = TrainingConfig(batch_size=8, gradient_accumulation=2)
    long_rows = micro_batching(config, [384] * 20)
    assert long_rows["per_device_train_batch_size"] == 1 and rows_per_step(long_rows) == 16
    short = micro_batching(config, [60] * 19 + [900])  # one outlier does not decide
    assert short["per_device_train_batch_size"] * 60 <= CPU_PASS_TOKENS and rows_per_step(short) == 16
    assert short["per_device_train_batch_size"] == 8
    assert micro_batching(TrainingConfig(batch_size=6), [100] * 10)["per_device_train_batch_size"] == 3  # divides 6
    assert micro_batching(TrainingConfig(batch_size=8, micro_batch_size=2), [384] * 10) == {}  # as configured
