"""What makes a teacher's answer a row (labels written as configured, a JSON schema, a regex) and a prompts file
row that cannot be used, named by file, row and column."""

import pytest

from ftpipe.config import AcceptConfig, TaskConfigError, parse_task_config
from ftpipe.core.teacher import accepted, read_prompts
from ftpipe.core.storage import task_dir


def test_answers_are_accepted_by_label_schema_or_regex():
    labels = AcceptConfig(labels=["card_arrival", "pin_blocked"])
    assert accepted(" Card_Arrival. ", labels) == ("card_arrival", None)
    assert accepted("it is about a card", labels)[1] == "not one of the labels card_arrival, pin_blocked"
    schema = AcceptConfig(json_schema={"type": "object", "required": ["city"]})
    assert accepted('{"city": "Paris"}', schema) == ('{"city": "Paris"}', None)
    assert accepted('{"town": "Paris"}', schema)[1].startswith("JSON not valid against the schema: 'city'")
    assert accepted("Paris", schema)[1].startswith("not JSON")
    assert accepted("42", AcceptConfig(regex=r"\d+")) == ("42", None)
    assert accepted("forty-two", AcceptConfig(regex=r"\d+"))[1] == r"does not match the regex \d+"
    assert accepted("  ", AcceptConfig())[1] == "empty answer"
    with pytest.raises(TaskConfigError, match="set one of labels, json_schema and regex"):
        parse_task_config("distill: {teacher: {base_url: x, model: m}, accept: {labels: [a], regex: a}}", "task.yaml")


@pytest.mark.parametrize(("setting", "problem"), [
    ("teacher: {base_url: x, model: m, api_key_env: sk-abc123}",
     "distill.teacher.api_key_env: the name of an environment variable (e.g. OPENAI_API_KEY), never the key itself"),
    ("teacher: {base_url: x, model: m}, accept: {regex: '[unclosed'}",
     "distill.accept.regex: not a regular expression: unterminated character set at position 0 (got '[unclosed')"),
    ("teacher: {base_url: x, model: m}, accept: {json_schema: {type: objekt}}",
     "distill.accept.json_schema: not a JSON schema: 'objekt' is not valid under any of the given schemas (at $.type)"),
])
def test_distill_settings_that_cannot_work_are_refused_before_the_teacher_is_asked(setting: str, problem: str):
    with pytest.raises(TaskConfigError) as error:
        parse_task_config(f"distill: {{{setting}}}", "t/task.yaml")
    assert str(error.value) == f"t/task.yaml: {problem}", "one line, naming the field, without the key's value"


def test_a_prompts_row_without_its_column_is_named(ftpipe_env):
    folder = task_dir("student") / "prompts"
    folder.mkdir(parents=True)
    (folder / "a.csv").write_text("prompt,topic\nwhat is a card?,cards\n")
    (folder / "b.jsonl").write_text('{"prompt": "hello"}\n{"question": "no prompt here"}\n')
    with pytest.raises(ValueError, match=r"b.jsonl:line 2: no prompt in column 'prompt' \(the row's columns: question"):
        read_prompts("student", "prompt")
    (folder / "b.jsonl").write_text('{"prompt": "hello"}\n')
    assert [text for _, text in read_prompts("student", "prompt")] == ["what is a card?", "hello"]


def test_an_unreachable_teacher_fails_naming_its_url_and_a_missing_key_names_its_variable(ftpipe_env, monkeypatch):
    import socket

    from ftpipe.core import teacher

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    folder = task_dir("student") / "prompts"
    folder.mkdir(parents=True)
    (folder / "a.jsonl").write_text('{"prompt": "hello"}\n')
    monkeypatch.setattr(teacher, "MAX_RETRIES", 0)
    url = f"http://127.0.0.1:{port}/v1"
    config = parse_task_config(f"distill: {{teacher: {{base_url: '{url}', model: m}}}}", "task.yaml")
    with pytest.raises(teacher.TeacherError, match=f"the teacher at {url} cannot be reached"):
        teacher.build_teacher_examples("student", config, ftpipe_env / "out")
    keyed = parse_task_config(f"distill: {{teacher: {{base_url: '{url}', model: m, api_key_env: NO_SUCH_KEY}}}}", "t")
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(teacher.TeacherError, match="api_key_env names NO_SUCH_KEY, which is not set"):
        teacher.build_teacher_examples("student", keyed, ftpipe_env / "out")


def test_a_teacher_that_does_not_serve_the_model_fails_the_step_at_once_naming_it(ftpipe_env):
    from ftpipe.core import teacher
    from ftpipe_tests.judge_endpoint import serving

    folder = task_dir("student") / "prompts"
    folder.mkdir(parents=True)
    (folder / "a.jsonl").write_text("".join(f'{{"prompt": "question {i}"}}\n' for i in range(6)))
    with serving(lambda user: "fine") as endpoint:
        config = parse_task_config(f"distill: {{teacher: {{base_url: '{endpoint.base_url}', model: judge-l}}, "
                                   "concurrency: 1}", "task.yaml")
        with pytest.raises(teacher.TeacherError) as error:
            teacher.build_teacher_examples("student", config, ftpipe_env / "out")
    assert str(error.value) == f"the teacher at {endpoint.base_url} refused model 'judge-l' (404): model judge-l not found"
    assert len(endpoint.requests) == 1, "one answer says it for every prompt"
