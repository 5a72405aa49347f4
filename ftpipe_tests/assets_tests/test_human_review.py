"""The blind human review as a reviewer meets it: the sample the pipeline writes, verdict files dropped in the
task's `reviews/` folder, observed by the sensor, and a merge that waits for enough of them."""

from pathlib import Path

import dagster as dg
import pytest

from ftpipe.automation import review_verdicts_sensor
from ftpipe.core.tasks import reviews_dir
from ftpipe.definitions import defs
from ftpipe.partitions import task_partitions
from ftpipe_tests.builders import check, materialization
from ftpipe_tests.reviewer import fill, other, read_csv

WAIT_FOR_THREE = "evaluation: {min_improvement: -2.0, max_forgetting: 1.0, require_human_review: 3, bootstrap_samples: 200}\n"


def prefers_the_new_model(row: dict, new_side: str) -> str:
    return new_side if int(row["id"], 16) % 4 else other(new_side)


@pytest.mark.slow
def test_the_merge_waits_for_human_verdicts_dropped_in_the_reviews_folder(ftpipe_env: Path, tiny_task: str) -> None:
    task_yaml = ftpipe_env / "tasks" / tiny_task / "task.yaml"
    task_yaml.write_text(task_yaml.read_text() + WAIT_FOR_THREE)
    job = defs.resolve_job_def("finetune_job")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(task_partitions.name, [tiny_task])
        first = job.execute_in_process(instance=instance, partition_key=tiny_task, raise_on_error=False)
        review = materialization(first, "human_review")
        assert check(first, "eval_report_gate").passed
        waiting = check(first, "human_review_verdicts")
        assert not waiting.passed and waiting.description == "waiting for 3 human verdicts (have 0)"
        assert "merged_model" not in {e.asset_key.to_user_string() for e in first.get_asset_materialization_events()}
        html = Path(review["review_html"]).read_text()
        assert "<script src" not in html and "review_key" not in html
        rows = review["review_rows"]
        assert rows == materialization(first, "heldout_split")["eval_rows"], "every held-out row"

        with dg.build_sensor_context(instance=instance) as context:
            assert isinstance(review_verdicts_sensor(context), dg.SkipReason)  # no reviews/ folder yet
        fill(Path(review["review_csv"]).parent, reviews_dir(tiny_task) / "ann.csv", prefers_the_new_model, "Ann")
        with dg.build_sensor_context(instance=instance) as context:
            observed = review_verdicts_sensor(context)
        assert [event.partition for event in observed.asset_events] == [tiny_task]

        second = job.execute_in_process(instance=instance, partition_key=tiny_task, asset_selection=[
            dg.AssetKey("human_review"), dg.AssetKey("merged_model")])
        reviewed = materialization(second, "human_review")
        preferred = sum(bool(int(row["id"], 16) % 4) for row in read_csv(Path(review["review_csv"])))
        assert reviewed["human_verdicts"] == rows and reviewed["human_wins"] == preferred
        assert reviewed["human_win_rate_ci_low"] < preferred / rows < reviewed["human_win_rate_ci_high"]
        assert check(second, "human_review_verdicts").passed
        assert materialization(second, "merged_model")["registered_version"] == 1
