"""How a batch is split into forward passes on a CPU: short rows share a pass, long rows go one at a time (the
memory of a pass stays bounded), always the same rows per optimizer step; a configured size wins."""

from ftpipe.config import TrainingConfig
from ftpipe.core.training.passes import pass_bounds
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


def test_a_padding_free_batch_of_skewed_lengths_goes_in_passes_of_whole_rows_within_the_budget():
    lengths = [100, 600, 50, 50, 300, 200, 40]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    bounds = pass_bounds(starts, sum(lengths), 512)
    rows_of = [[length for start, length in zip(starts, lengths) if begin <= start < end] for begin, end in bounds]
    assert rows_of == [[100], [600], [50, 50, 300], [200, 40]]  # in order; the long row alone
    assert bounds[0][0] == 0 and bounds[-1][1] == sum(lengths)
    assert all(end == begin for (_, end), (begin, _) in zip(bounds, bounds[1:]))
    assert pass_bounds([0, 30, 60], 90, 512) == [(0, 90)]
