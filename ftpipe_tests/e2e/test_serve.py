"""`python -m ftpipe serve` as users run it, called with the official `openai` client: every task's champion on one
base model, streaming, the candidate selector, the API key, bad requests, a hot swap of the champion, a full
fine-tune served as its own model, the request log (with content and without), and a crash of the server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import pytest
from openai import APITimeoutError, OpenAI
from pydantic import BaseModel

from ftpipe.config import EvaluationConfig
from ftpipe.core import merging
from ftpipe.core.dedup import build_deduplicated
from ftpipe.core.evaluation.metrics import task_metrics
from ftpipe.core.evaluation.generation import generate, load_model
from ftpipe.core.layout import TaskLayout
from ftpipe.core.records import write_examples
from ftpipe.core.server.request_log import read_records, segments
from ftpipe_tests.served import KEY, Served, register
from ftpipe_tests.tiny_model import toy_rows, write_chat_parquet
from ftpipe_tests.trained_models import full_finetune, lora_adapter, noisy_base

pytestmark = pytest.mark.e2e
MAX_TOKENS = 12
FRUITS = ("plum", "lime", "kiwi", "plum")
CARD = {"task": "toy", "description": "toy", "method": "lora"}


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir) -> Path:
    """A base with varied outputs, two different LoRA adapters merged for serving, and a full fine-tune."""
    root = tmp_path_factory.mktemp("serve")
    noisy_base(tiny_model_dir, root / "base")
    write_chat_parquet(root / "eval.parquet", toy_rows(8, seed=2))
    lora_adapter(root / "base", root / "adapter-a", random_weights=True)
    lora_adapter(root / "base", root / "adapter-b", random_weights=False, train_rows=toy_rows(16, seed=3))
    full_finetune(root / "base", root / "full", toy_rows(16, seed=4), steps=10)
    for name in ("adapter-a", "adapter-b", "full"):
        merging.package_model(base_model_dir=root / "base", finetuned_dir=root / name, out_dir=root / f"model-{name}",
                              eval_path=root / "eval.parquet", card=CARD, reuse_key=name)
    return root


def expected(folder: Path, prompts: list[list[dict]]) -> list[str]:
    """The packaged model's own greedy answers, loaded on its own."""
    model, tokenizer = load_model(folder)
    return generate(model, tokenizer, prompts, max_new_tokens=MAX_TOKENS, batch_tokens=1)


@pytest.fixture
def stack(models, ftpipe_env, tmp_path):
    """Tasks `alpha` and `beta` (adapters on one base; beta keeps no content in its log) and `gamma` (a full
    fine-tune) registered, and the server started on them."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for task, name in (("alpha", "adapter-a"), ("beta", "adapter-b"), ("gamma", "full")):
        shutil.copytree(models / f"model-{name}", tmp_path / task)
        register(uri, task, tmp_path / task, 0.5)
    (ftpipe_env / "tasks" / "beta").mkdir()
    (ftpipe_env / "tasks" / "beta" / "task.yaml").write_text("serving:\n  log_content: false\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "FTPIPE_API_KEY": KEY, "OMP_NUM_THREADS": "2"}
    server = Served(tmp_path, env, refresh_seconds=1)
    yield server, uri
    if server.process.poll() is None:
        server.stop()


def ask(client, model: str, prompt: list[dict], **kwargs) -> str:
    response = client.chat.completions.create(model=model, messages=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                              **kwargs)
    return response.choices[0].message.content


def test_every_task_answers_as_its_own_model_alone_and_in_concurrent_mixed_batches(stack, models):
    server, _ = stack
    client = server.client()
    prompts = [row["messages"][:-1] for row in toy_rows(6, seed=5)]
    assert [m.id for m in client.models.list().data] == ["alpha", "beta", "gamma"]
    own = {task: expected(models / f"model-{name}", prompts)
           for task, name in (("alpha", "adapter-a"), ("beta", "adapter-b"), ("gamma", "full"))}
    assert own["alpha"] != own["beta"]  # the adapters differ, so routing is visible

    for task in own:
        assert [ask(client, task, p).strip() for p in prompts] == own[task]
    jobs = [(task, i) for _ in range(3) for task in own for i in range(len(prompts))]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda job: ask(client, job[0], prompts[job[1]]).strip(), jobs))
    assert answers == [own[task][i] for task, i in jobs]

    stream = client.chat.completions.create(model="beta", messages=prompts[0], max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip() == own["beta"][0]
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"} and chunks[-1].usage is None
    counted = list(client.chat.completions.create(model="beta", messages=prompts[0], max_tokens=MAX_TOKENS,
                                                  temperature=0, stream=True, stream_options={"include_usage": True}))
    *answer, usage = counted
    assert "".join(c.choices[0].delta.content or "" for c in answer).strip() == own["beta"][0]
    assert usage.choices == [] and all(c.usage is None for c in answer), "the usage comes last, alone"
    assert 0 < usage.usage.completion_tokens <= MAX_TOKENS and usage.usage.total_tokens == (
        usage.usage.prompt_tokens + usage.usage.completion_tokens)

    server.stop(signal.SIGINT)  # Ctrl-C
    assert server.process.returncode == 130
    assert (server.home / "serve.log").read_text().splitlines()[-1] == "ftpipe serve: stopped by Ctrl-C", "no traceback"
    records = {task: read_records(task) for task in own}
    assert len(records["alpha"]) == len(prompts) + 3 * len(prompts)
    assert records["beta"][-1]["completion_tokens"] == usage.usage.completion_tokens
    assert len({r["request_id"] for rs in records.values() for r in rs}) == sum(map(len, records.values()))
    first = records["alpha"][0]
    assert first["messages"] == prompts[0] and first["output"].strip() == own["alpha"][0]
    assert first["status"] == 200 and first["version"] == 1 and first["latency_ms"] > 0
    assert first["prompt_tokens"] > 0 and 0 < first["completion_tokens"] <= MAX_TOKENS
    hidden = records["beta"][0]
    assert set(hidden["messages"]) == {"sha256", "chars"} and set(hidden["output"]) == {"sha256", "chars"}
    assert all(p.name.endswith(".jsonl") for task in own for p in segments(task))  # finished at shutdown


class Fruit(BaseModel):
    fruit: Literal["plum", "lime", "kiwi"]
    ripe: bool


def test_structured_answers_keep_their_schema_beside_free_answers_in_one_batch(stack, models):
    server, _ = stack
    client = server.client()
    prompts = [row["messages"][:-1] for row in toy_rows(6, seed=5)]
    free = expected(models / "model-adapter-a", prompts)

    def structured(prompt):
        return client.chat.completions.parse(model="alpha", messages=prompt, max_tokens=40, temperature=0,
                                             response_format=Fruit).choices[0]

    with ThreadPoolExecutor(12) as pool:
        parsed = list(pool.map(structured, prompts))
        alongside = list(pool.map(lambda p: ask(client, "alpha", p).strip(), prompts))
    assert alongside == free, "a free answer decoded beside structured ones is unchanged"
    assert all(c.finish_reason == "stop" and isinstance(c.message.parsed, Fruit) for c in parsed)
    assert all(c.message.content != answer for c, answer in zip(parsed, free)), "the schema changed the answers"
    for prompt in prompts:  # the tiny model's strings run on: a JSON object begun, or a whole one
        choice = client.chat.completions.create(model="beta", messages=prompt, max_tokens=12, temperature=0,
                                                response_format={"type": "json_object"}).choices[0]
        assert choice.message.content.startswith("{"), choice
        assert choice.finish_reason == "length" or isinstance(json.loads(choice.message.content), dict), choice
    with client.chat.completions.stream(model="alpha", messages=prompts[0], max_tokens=40, temperature=0,
                                        response_format=Fruit) as stream:
        pieces = [event.delta for event in stream if event.type == "content.delta"]
        final = stream.get_final_completion().choices[0]
    assert "".join(pieces) == parsed[0].message.content and final.message.parsed == parsed[0].message.parsed


def test_a_request_whose_client_leaves_stops_decoding_and_is_logged_as_closed(stack):
    server, _ = stack
    budget = 480  # far more tokens than decoding makes before the server sees the client gone
    quick = OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=0.1)
    with pytest.raises(APITimeoutError):
        quick.chat.completions.create(model="alpha", max_tokens=budget, temperature=0, stop=["never said"],
                                      messages=[{"role": "user", "content": "Tell me all the colors you know."}])
    deadline = time.monotonic() + 30
    while not (records := read_records("alpha")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [(r["status"], r["error"]) for r in records] == [
        (499, "the client closed the connection before the answer ended")]
    assert records[0]["completion_tokens"] < budget
    prompt = [{"role": "user", "content": "And now?"}]
    nucleus = server.client().chat.completions.create(model="alpha", messages=prompt, max_tokens=MAX_TOKENS,
                                                      temperature=1, top_p=0)
    assert nucleus.choices[0].message.content == ask(server.client(), "alpha", prompt), (
        "the server goes on; top_p 0, which OpenAI's API takes, keeps the most likely token only")


def test_a_long_system_prompt_is_read_once_and_the_usage_says_its_tokens_were_cached(stack):
    server, _ = stack
    client = server.client()
    system = {"role": "system", "content": " ".join(f"Rule {i}: answer with the color." for i in range(20))}
    responses = [client.chat.completions.create(
        model="alpha", max_tokens=MAX_TOKENS, temperature=0,
        messages=[system, {"role": "user", "content": f"What color is the {fruit}?"}]) for fruit in FRUITS]
    cached = [response.usage.prompt_tokens_details.cached_tokens for response in responses]
    assert cached[:2] == [0, 0], "nothing to share with yet, then the shared start read with the second request"
    assert cached[2] == cached[3] >= 64 and cached[2] % 16 == 0 and cached[2] < responses[2].usage.prompt_tokens
    assert responses[3].choices[0].message.content == responses[0].choices[0].message.content, "the same question"
    assert [r["prompt_tokens"] for r in read_records("alpha")] == [r.usage.prompt_tokens for r in responses]


def test_a_second_server_is_refused_the_port_even_before_the_first_serves():
    from ftpipe.core.server.app import AddressTaken, bound_socket

    first = bound_socket("127.0.0.1", 0)  # what a server holds while it loads its models
    port = first.getsockname()[1]
    with pytest.raises(AddressTaken, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
        bound_socket("127.0.0.1", port)
    first.close()
    bound_socket("127.0.0.1", port).close()  # free again once the first is gone


def test_key_bad_requests_and_a_hot_swap_of_the_champion(stack, models, tmp_path):
    import openai

    server, uri = stack
    client = server.client()
    prompt = [{"role": "user", "content": "What color is a banana?"}]
    with pytest.raises(openai.AuthenticationError, match="API key"):
        server.client(key="wrong").models.list()
    second = subprocess.run([sys.executable, "-m", "ftpipe", "serve", "--port", str(server.port)], env=server.env,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 1 and second.stdout == "", "a second server on the port says so and serves nothing"
    assert second.stderr.strip().splitlines() == [
        f"ftpipe serve: cannot listen on 127.0.0.1:{server.port}: Address already in use (another server on it? stop "
        "it, or choose another with --port)"]
    with pytest.raises(openai.NotFoundError, match="'delta' is not served; served models: alpha, beta, gamma"):
        ask(client, "delta", prompt)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="alpha", messages=prompt, temperature=5)
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "word " * 600}])
    with pytest.raises(openai.BadRequestError, match="last message"):
        ask(client, "alpha", [*prompt, {"role": "assistant", "content": "yellow"}])
    request = urllib.request.Request(f"{server.url}/v1/chat/completions", data=b"{not json", method="POST",
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 400 and json.loads(refused.value.read())["error"]["message"] == (
        "the request body is not valid JSON: key must be a string at line 1 column 2")
    with pytest.raises(openai.BadRequestError, match="stop: at most 4 strings, none empty"):
        ask(client, "alpha", prompt, stop=["a", "b", "c", "d", "e"])
    whole = ask(client, "alpha", prompt)
    stop = whole[len(whole) // 2:len(whole) // 2 + 2]  # two characters from the middle of the whole answer
    cut = client.chat.completions.create(model="alpha", messages=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                         stop=["never in it", stop])
    assert cut.choices[0].message.content == whole[:whole.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = list(client.chat.completions.create(model="alpha", messages=prompt, max_tokens=MAX_TOKENS,
                                                   temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == whole[:whole.index(stop)]
    assert streamed[-1].choices[0].finish_reason == "stop" and stop not in "".join(
        c.choices[0].delta.content or "" for c in streamed), "no part of the stop string is sent"
    with pytest.raises(openai.BadRequestError, match="response_format: type 'xml': one of text, json_object, json_"):
        ask(client, "alpha", prompt, response_format={"type": "xml"})
    with pytest.raises(openai.BadRequestError, match="response_format: json_schema.schema: Invalid type: strin"):
        ask(client, "alpha", prompt, response_format={"type": "json_schema", "json_schema": {
            "name": "typo", "schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}})
    for option, value in (("presence_penalty", 1.5), ("frequency_penalty", -0.5), ("logit_bias", {"42": 5})):
        with pytest.raises(openai.BadRequestError, match=f"{option}: not supported by this server"):
            ask(client, "alpha", prompt, **{option: value})
    assert ask(client, "alpha", prompt, seed=7, presence_penalty=0, logit_bias={}) == whole, "defaults, and greedy"
    with pytest.raises(openai.BadRequestError, match="seed: sampled answers cannot be seeded by this server"):
        client.chat.completions.create(model="alpha", messages=prompt, temperature=0.7, seed=7)
    before = ask(client, "alpha", prompt)  # still serving after every refusal
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Answer briefly."}]},
             {"role": "user", "content": [{"type": "text", "text": prompt[0]["content"]}]}]
    assert ask(client, "alpha", parts) == ask(client, "alpha", [{"role": "system", "content": "Answer briefly."}, *prompt])

    shutil.copytree(models / "model-adapter-b", tmp_path / "alpha-2")
    register(uri, "alpha", tmp_path / "alpha-2", 0.9)  # better: the champion alias moves to version 2
    deadline = time.monotonic() + 60
    while server.healthy()["models"].get("alpha") != 2:
        assert time.monotonic() < deadline, "the new champion was not picked up"
        time.sleep(0.5)
    assert ask(client, "alpha", prompt) == ask(client, "beta", prompt) != before
    told = (server.home / "serve.log").read_text()
    assert "serving alpha v1, " in told and "now serving alpha v2, " in told, "the swap is said in the server's output"
    shutil.copytree(models / "model-adapter-a", tmp_path / "alpha-3")
    register(uri, "alpha", tmp_path / "alpha-3", 0.1)  # worse: only the candidate alias moves
    while "alpha@candidate" not in server.healthy()["models"]:
        assert time.monotonic() < deadline, "the candidate was not picked up"
        time.sleep(0.5)
    assert ask(client, "alpha@candidate", prompt) == before
    logged = read_records("alpha")
    assert [r["status"] for r in logged][:5] == [400, 400, 400, 400, 200], "refused requests are logged; not JSON: not"
    assert "temperature" in logged[0]["error"] and "context length" in logged[1]["error"], logged[:2]
    assert logged[2]["messages"][-1] == {"role": "assistant", "content": "yellow"}, "as sent"
    assert [r["output"] for r in logged[5:7]] == [whole[:whole.index(stop)]] * 2, "the answers as sent"


def post(server: Served, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{server.url}{path}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_a_correction_of_a_served_answer_becomes_a_raw_row_of_its_task(stack, ftpipe_env):
    server, _ = stack
    prompt = [{"role": "user", "content": "What color is a plum?"}]
    answer = server.client().chat.completions.create(model="alpha", messages=prompt, max_tokens=MAX_TOKENS)
    status, added = post(server, "/v1/feedback", {"request_id": answer.id, "output": "purple"})
    assert status == 200 and added["task"] == "alpha" and added["outcome"] == "added", added
    assert post(server, "/v1/feedback", {"request_id": answer.id, "output": "purple"})[1]["outcome"] == "unchanged"
    [row] = [json.loads(line) for line in (ftpipe_env / "tasks" / "alpha" / "raw" / "feedback.jsonl").open()]
    assert row["messages"] == [*prompt, {"role": "assistant", "content": "purple"}]
    assert row["feedback_for"] == answer.id and row["served_by"] == "alpha v1"
    assert row["served_output"] == answer.choices[0].message.content
    status, refused = post(server, "/v1/feedback", {"request_id": "chatcmpl-unknown", "output": "purple"})
    assert status == 404 and "not in the request log of alpha, beta, gamma" in refused["error"]["message"]
    status, refused = post(server, "/v1/feedback", {"request_id": answer.id, "output": ""})
    assert status == 400 and refused["error"]["param"] == "output"
    lemon = server.client().chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "What color is a lemon?"}], max_tokens=MAX_TOKENS)
    served = lemon.choices[0].message.content
    status, confirmed = post(server, "/v1/feedback", {"request_id": lemon.id, "output": served})
    assert status == 200 and confirmed["outcome"] == "confirmed", "the answer that was served: a confirmation"

    (ftpipe_env / "tasks" / "alpha" / "task.yaml").write_text("evaluation: {task_type: classification}\n")
    write_examples(toy_rows(30), ftpipe_env / "cleaned.parquet")
    build_deduplicated(ftpipe_env / "cleaned.parquet", TaskLayout("alpha").asset("deduplicated_examples"),
                       labels=task_metrics(EvaluationConfig(task_type="classification")))
    status, refused = post(server, "/v1/feedback", {"request_id": answer.id, "output": "purpel"})
    assert status == 400 and "(did you mean 'purple'?)" in refused["error"]["message"], refused
    status, added = post(server, "/v1/feedback", {"request_id": answer.id, "output": "plum", "new_label": True})
    assert status == 200 and added["outcome"] == "replaced" and added["row"][-1]["content"] == "plum"


def test_64_clients_send_500_requests_over_two_adapters_without_an_error_or_a_lost_record(stack):
    import statistics

    server, _ = stack
    client = server.client()

    def one(i: int) -> float:
        started = time.perf_counter()
        ask(client, "alpha" if i % 2 else "beta", [{"role": "user", "content": f"question {i}: what color?"}])
        return time.perf_counter() - started

    with ThreadPoolExecutor(64) as pool:
        latencies = sorted(pool.map(one, range(500)))
    server.stop()
    records = read_records("alpha") + read_records("beta")
    assert len(records) == 500 and len({r["request_id"] for r in records}) == 500
    assert {r["status"] for r in records} == {200}
    p95 = latencies[int(0.95 * len(latencies))]
    print(f"500 requests from 64 clients: p50 {statistics.median(latencies) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms")


def test_a_server_killed_while_it_writes_leaves_every_segment_readable(models, ftpipe_env, tmp_path):
    from ftpipe.config import parse_task_config
    from ftpipe.core import monitoring

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    shutil.copytree(models / "model-adapter-a", tmp_path / "alpha")
    register(uri, "alpha", tmp_path / "alpha", 0.5)
    server = Served(tmp_path, {**os.environ, "MLFLOW_TRACKING_URI": uri, "FTPIPE_API_KEY": KEY}, "--segment-records", "4")
    client = server.client()
    answered = []

    def one(i: int) -> None:
        ask(client, "alpha", [{"role": "user", "content": f"question {i}"}])
        answered.append(i)
        if len(answered) == 20:
            server.process.kill()  # kill -9 with requests in flight

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: _ignore_disconnects(one, i), range(40)))
    server.process.wait(timeout=30)
    finished = [p for p in segments("alpha") if p.name.endswith(".jsonl")]
    assert len(finished) >= 4 and all(json.loads(line) for p in finished for line in p.read_text().splitlines())
    records = read_records("alpha")
    assert len(records) >= len(answered) >= 20 and len({r["request_id"] for r in records}) == len(records)
    write_chat_parquet(tmp_path / "train.parquet", toy_rows(20, seed=1))
    report = monitoring.production_report("alpha", tmp_path / "train.parquet", parse_task_config("", "task.yaml"),
                                          tmp_path / "report")
    assert report["requests"] == len(records) and report["error_rate"] == 0.0


def _ignore_disconnects(fn, *args) -> None:
    import openai

    try:
        fn(*args)
    except openai.APIConnectionError:  # the requests the kill cut off
        pass
