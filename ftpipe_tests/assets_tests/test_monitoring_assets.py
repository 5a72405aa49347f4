"""The monitoring group through Dagster: a bank's intent task split by the data job, its request log observed by the
sensor, the production report materialized by the monitoring job, and its checks: health passes, drift warns when
the traffic comes from another task (and posts to the alert webhook), and passes on new customers of the same task."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import dagster as dg

from ftpipe.automation import production_requests_sensor
from ftpipe.definitions import defs
from ftpipe.partitions import task_partitions
from ftpipe_tests.builders import check, make_task, materialization
from ftpipe_tests.traffic import log, new_customers, record
from ftpipe_tests.intents import intent_task
from ftpipe_tests.tiny_model import toy_rows

CONTRACT = ("requests", "error_rate", "latency_p95_ms", "validity", "novel_input_share", "drift_score")


class Receiver(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):  # noqa: N802 - the http.server name
        Receiver.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def bank_task(data_dir: Path, webhook: str) -> str:
    rows = [{"messages": row["messages"]} for row in intent_task(seed=0).rows]
    make_task(data_dir, "bank", {"intents.jsonl": rows},
              f"evaluation: {{task_type: classification}}\nmonitoring: {{alert_webhook: '{webhook}'}}\n")
    return "bank"


def test_drift_from_another_task_warns_and_alerts_while_new_customers_pass(ftpipe_env: Path) -> None:
    receiver = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    task = bank_task(ftpipe_env, f"http://127.0.0.1:{receiver.server_port}/alerts")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(task_partitions.name, [task])
        assert defs.resolve_job_def("data_job").execute_in_process(instance=instance, partition_key=task).success
        with dg.build_sensor_context(instance=instance) as context:
            assert isinstance(production_requests_sensor(context), dg.SkipReason)  # nothing served yet
        monitoring_job = defs.resolve_job_def("monitoring_job")
        empty = materialization(monitoring_job.execute_in_process(instance=instance, partition_key=task),
                                "production_report")
        assert empty["requests"] == 0 and empty["drift_score"] is None, "a report before any traffic"

        now = time.time()
        log([record(m, label, at=now - i) for i, (m, label) in enumerate(new_customers(50))])
        with dg.build_sensor_context(instance=instance) as context:
            observed = production_requests_sensor(context)
        assert [event.partition for event in observed.asset_events] == [task]
        usual = monitoring_job.execute_in_process(instance=instance, partition_key=task, raise_on_error=False)
        figures = materialization(usual, "production_report")
        assert all(key in figures for key in CONTRACT), sorted(figures)
        assert figures["requests"] == 50 and figures["validity"] == 1.0
        assert figures["foreign_system_prompt_share"] == 0.0, "the task's own system prompt, as the training rows have it"
        assert check(usual, "production_health").passed and check(usual, "production_drift").passed
        assert Receiver.received == []

        log([record(row["messages"][0]["content"], "card_arrival", at=now - 60 - i) for i, row in
             enumerate(toy_rows(50, seed=1))])
        drifted = monitoring_job.execute_in_process(instance=instance, partition_key=task, raise_on_error=False)
        warned = check(drifted, "production_drift")
        assert not warned.passed and warned.severity == dg.AssetCheckSeverity.WARN
        assert "drift score" in warned.description and check(drifted, "production_health").passed
        assert [(a["task"], a["check"]) for a in Receiver.received] == [(task, "production_drift")]
        assert Receiver.received[0]["figures"]["requests"] == 100
    receiver.shutdown()
