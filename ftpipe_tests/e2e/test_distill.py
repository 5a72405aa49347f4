"""Teacher-written data as users get it: `python -m ftpipe serve` as the teacher of a task's 30 prompts through
the `openai` client, answers cached and checked, a budget that stops a run and a next run that finishes, no second
payment, the key never written, a new champion of the teacher asked anew; and a flaky teacher (429, 500, timeouts,
malformed bodies) that loses nothing."""

from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dagster as dg
import pytest

from ftpipe.assets import data
from ftpipe.core.layout import TaskLayout
from ftpipe.core.records import read_examples
from ftpipe.core.server.request_log import read_records
from ftpipe.core.storage import home_dir
from ftpipe.partitions import task_partitions
from ftpipe.definitions import defs
from ftpipe_tests.builders import LENIENT_GATE, TRAINING, make_task, materialization
from ftpipe_tests.served import KEY, Served, packaged_lora, register
from ftpipe_tests.trained_models import noisy_base

pytestmark = pytest.mark.e2e
KEY_VARIABLE = "FTPIPE_TEST_TEACHER_KEY"


def student_task(data_dir: Path, prompts: int, distill: str) -> str:
    folder = make_task(data_dir, "student", {}, f"distill: {{{distill}}}\n")
    (folder / "prompts").mkdir()
    (folder / "prompts" / "questions.jsonl").write_text("".join(
        json.dumps({"prompt": f"Question {i}: which color is fruit number {i}?"}) + "\n" for i in range(prompts)))
    return "student"


def set_distill(data_dir: Path, distill: str) -> None:
    (data_dir / "tasks" / "student" / "task.yaml").write_text(f"distill: {{{distill}}}\n")


def materialize(instance, *assets) -> dg.ExecuteInProcessResult:
    return dg.materialize(list(assets), instance=instance, partition_key="student", raise_on_error=False)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_model_dir):
    """The tiny model with a LoRA adapter, registered as task `teacher` and served with an API key, for the module;
    the server keeps its request log in its own artifact home."""
    root = tmp_path_factory.mktemp("teacher")
    base = noisy_base(tiny_model_dir, root / "base")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    register(uri, "teacher", packaged_lora(base, root), 0.5)
    (root / "data" / "tasks").mkdir(parents=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "FTPIPE_API_KEY": KEY, "FTPIPE_HOME": str(root / "home"),
           "FTPIPE_DATA_DIR": str(root / "data"), "FTPIPE_MODEL_DIRS": str(tmp_path_factory.getbasetemp())}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_VARIABLE, KEY)
        server = Served(root, env, refresh_seconds=2)
        yield server
        server.stop()


def teacher_requests(teacher: Served) -> int:
    """The requests the teacher has logged so far, each marked as ftpipe's own (the teacher task's production report
    leaves them out)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FTPIPE_HOME", teacher.env["FTPIPE_HOME"])
        records = read_records("teacher")
    assert {record.get("purpose") for record in records} <= {"distillation"}, "no request looks like production"
    return len(records)


def test_served_teacher_answers_30_prompts_within_budgets_and_never_twice(teacher, ftpipe_env):
    before = teacher_requests(teacher)
    settings = (f"teacher: {{base_url: '{teacher.url}/v1', model: teacher, api_key_env: {KEY_VARIABLE}}}, "
                "max_tokens: 8, concurrency: 4, accept: {regex: '.+'}")
    student_task(ftpipe_env, 30, settings + ", budget: {max_requests: 10}")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(task_partitions.name, ["student"])
        first = materialization(materialize(instance, data.teacher_examples), "teacher_examples")
        assert first["teacher_requests"] == 10 and first["cache_hits"] == 0 and first["stopped"].startswith("budget")
        assert first["rows"] + first["answers_rejected"] == 10 and first["unanswered"] == 20

        set_distill(ftpipe_env, settings)
        second = materialization(materialize(instance, data.teacher_examples), "teacher_examples")
        assert second["teacher_requests"] == 20 and second["cache_hits"] == 10 and second["unanswered"] == 0
        assert second["teacher_tokens"] > 0 and second["stopped"] == "no"

        third = materialize(instance, data.teacher_examples, data.raw_examples)
        again, raw = materialization(third, "teacher_examples"), materialization(third, "raw_examples")
        assert again["teacher_requests"] == 0 and again["cache_hits"] == 30
        assert raw["rows_valid"] == again["rows"] == 30 - again["answers_rejected"]
        rows = read_examples(TaskLayout("student").examples("raw_examples"))
        assert all(row["source"].startswith("teacher teacher:") for row in rows)
        assert rows[0]["messages"][0]["content"].startswith("Question ")
        # Dagster's events, artifacts and MLflow, tasks, the teacher's request log
        stores = [Path(instance.root_directory), home_dir(), ftpipe_env, Path(teacher.env["FTPIPE_HOME"])]
        for folder in stores:
            leaked = [p for p in folder.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
            assert leaked == [], leaked
    assert teacher_requests(teacher) - before == 30  # the teacher was paid once per prompt

    root = teacher.home  # a better version of the teacher task: its champion moves, and the server swaps it in
    register(teacher.env["MLFLOW_TRACKING_URI"], "teacher", packaged_lora(root / "base", root, "lora-2", seed=1), 0.9)
    deadline = time.monotonic() + 60
    while teacher.healthy()["models"]["teacher"] != 2:
        assert time.monotonic() < deadline, "the new champion was not served"
        time.sleep(0.5)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(task_partitions.name, ["student"])
        moved = materialization(materialize(instance, data.teacher_examples), "teacher_examples")
    assert moved["teacher_requests"] == 30 and moved["cache_hits"] == 0, "the new version answers every prompt anew"


def test_the_whole_graph_distils_the_served_teacher_into_a_student(teacher, ftpipe_env, tiny_model_dir):
    before = teacher_requests(teacher)
    distill = (f"teacher: {{base_url: '{teacher.url}/v1', model: teacher, api_key_env: {KEY_VARIABLE}}}, "
               "max_tokens: 6, accept: {regex: '.+'}")
    student_task(ftpipe_env, 40, distill)
    (ftpipe_env / "tasks" / "student" / "task.yaml").write_text(
        f"base_model: {tiny_model_dir}\nsplit: {{eval_fraction: 0.25}}\n{TRAINING}{LENIENT_GATE}distill: {{{distill}}}\n")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(task_partitions.name, ["student"])
        result = defs.resolve_job_def("finetune_job").execute_in_process(
            instance=instance, partition_key="student", raise_on_error=False)
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        taught = materialization(result, "teacher_examples")
        report = materialization(result, "eval_report")
    assert taught["teacher_requests"] == 40 and materialization(result, "merged_model")["registered_version"] == 1
    assert report["teacher_score"] == 1.0  # the held-out references are the teacher's own (cached) answers
    assert report["student_to_teacher_ratio"] == pytest.approx(report["finetuned_score"], abs=1e-3)
    assert report["student_to_teacher_ratio_ci_low"] <= report["student_to_teacher_ratio"]
    assert report["teacher_latency_ms"] > 0 and report["student_latency_ms"] > 0
    assert teacher_requests(teacher) - before == 40  # evaluating the teacher asked it nothing new
    records = read_examples(TaskLayout("student").split_files[1])
    assert records and all(row["source"].startswith("teacher teacher:") for row in records)


class Flaky(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint failing on a schedule: 429, 500, a timeout, a malformed body, then answers."""

    SCHEDULE = ("429", "ok", "500", "ok", "timeout", "ok", "malformed", "ok", "ok")
    calls = 0
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802 - the http.server name
        with Flaky.lock:
            kind = Flaky.SCHEDULE[Flaky.calls % len(Flaky.SCHEDULE)]
            Flaky.calls += 1
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if kind == "timeout":
            time.sleep(2.5)
        if kind in ("429", "500"):
            return self._send(int(kind), b'{"error": {"message": "try again"}}', {"retry-after-ms": "10"})
        if kind == "malformed":
            return self._send(200, b'{"id": "x", "choices": [')
        prompt = request["messages"][-1]["content"]
        body = {"id": "c", "object": "chat.completion", "created": 0, "model": request["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": f"answer to {prompt}"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}
        self._send(200, json.dumps(body).encode())

    def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
        try:
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting
            pass

    def log_message(self, *args):
        pass


def test_a_flaky_teacher_loses_nothing(ftpipe_env):
    endpoint = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=endpoint.serve_forever, daemon=True).start()
    student_task(ftpipe_env, 20, f"teacher: {{base_url: 'http://127.0.0.1:{endpoint.server_port}/v1', model: big}}, "
                                 "timeout_seconds: 1, concurrency: 3")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(task_partitions.name, ["student"])
        runs = []
        for _ in range(3):
            runs.append(materialization(materialize(instance, data.teacher_examples), "teacher_examples"))
            counted = runs[-1]["rows"] + runs[-1]["answers_rejected"] + runs[-1]["unanswered"]
            assert counted == 20, runs[-1]  # every prompt answered or accounted for
            if runs[-1]["unanswered"] == 0:
                break
        assert runs[-1]["unanswered"] == 0 and sum(r["teacher_requests"] for r in runs) >= 20, runs
    endpoint.shutdown()
    rows = [json.loads(line) for line in (TaskLayout("student").asset("teacher_examples") / "teacher.jsonl").open()]
    assert sorted(row["messages"][-1]["content"] for row in rows) == sorted(
        f"answer to Question {i}: which color is fruit number {i}?" for i in range(20))
