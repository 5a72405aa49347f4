"""The `task` dynamic partitions: one partition per task folder."""

import dagster as dg

task_partitions = dg.DynamicPartitionsDefinition(name="task")
