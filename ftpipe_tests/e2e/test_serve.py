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

import pytest

from ftpipe.core import merging, registry
from ftpipe.core.evaluation.generation import generate, load_model
from ftpipe.core.server.request_log import read_records, segments
from ftpipe.core.storage import REPO_ROOT
from ftpipe_tests.e2e.helpers import free_port
from ftpipe_tests.tiny_model import toy_rows, write_chat_parquet
from ftpipe_tests.trained_models import full_finetune, lora_adapter, noisy_base

pytestmark = pytest.mark.e2e
KEY = "test-key-123"
MAX_TOKENS = 12
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


def register(uri: str, task: str, folder: Path, score: float) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(task)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(task)
    run_id = client.create_run(experiment_id).info.run_id
    registry.register_model(task=task, model_path=folder, run_id=run_id, eval_score=score, eval_version="split",
                            tracking_uri=uri)


def expected(folder: Path, prompts: list[list[dict]]) -> list[str]:
    """The packaged model's own greedy answers, loaded on its own."""
    model, tokenizer = load_model(folder)
    return generate(model, tokenizer, prompts, max_new_tokens=MAX_TOKENS, batch_size=1)


class Served:
    def __init__(self, home: Path, env: dict):
        self.home, self.env, self.port = home, env, free_port()
        self.log = (home / "serve.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ftpipe", "serve", "--port", str(self.port), "--refresh-seconds", "1"],
            env=env, cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while not self.healthy():
            assert self.process.poll() is None and time.monotonic() < deadline, (home / "serve.log").read_text()
            time.sleep(0.5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> dict | None:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return json.loads(response.read())
        except OSError:
            return None

    def client(self, key: str | None = KEY):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, timeout=120)

    def stop(self, sig=signal.SIGTERM) -> None:
        self.process.send_signal(sig)
        self.process.wait(timeout=60)
        self.log.close()


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
    server = Served(tmp_path, env)
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
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}

    server.stop()
    records = {task: read_records(task) for task in own}
    assert len(records["alpha"]) == len(prompts) + 3 * len(prompts)
    assert len({r["request_id"] for rs in records.values() for r in rs}) == sum(map(len, records.values()))
    first = records["alpha"][0]
    assert first["messages"] == prompts[0] and first["output"].strip() == own["alpha"][0]
    assert first["status"] == 200 and first["version"] == 1 and first["latency_ms"] > 0
    assert first["prompt_tokens"] > 0 and 0 < first["completion_tokens"] <= MAX_TOKENS
    hidden = records["beta"][0]
    assert set(hidden["messages"]) == {"sha256", "chars"} and set(hidden["output"]) == {"sha256", "chars"}
    assert all(p.name.endswith(".jsonl") for task in own for p in segments(task))  # finished at shutdown


def test_key_bad_requests_and_a_hot_swap_of_the_champion(stack, models, tmp_path):
    import openai

    server, uri = stack
    client = server.client()
    prompt = [{"role": "user", "content": "What color is a banana?"}]
    with pytest.raises(openai.AuthenticationError, match="API key"):
        server.client(key="wrong").models.list()
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
    assert refused.value.code == 400 and "not valid JSON" in json.loads(refused.value.read())["error"]["message"]
    before = ask(client, "alpha", prompt)  # still serving after every refusal

    shutil.copytree(models / "model-adapter-b", tmp_path / "alpha-2")
    register(uri, "alpha", tmp_path / "alpha-2", 0.9)  # better: the champion alias moves to version 2
    deadline = time.monotonic() + 60
    while server.healthy()["models"].get("alpha") != 2:
        assert time.monotonic() < deadline, "the new champion was not picked up"
        time.sleep(0.5)
    assert ask(client, "alpha", prompt) == ask(client, "beta", prompt) != before
    shutil.copytree(models / "model-adapter-a", tmp_path / "alpha-3")
    register(uri, "alpha", tmp_path / "alpha-3", 0.1)  # worse: only the candidate alias moves
    while "alpha@candidate" not in server.healthy()["models"]:
        assert time.monotonic() < deadline, "the candidate was not picked up"
        time.sleep(0.5)
    assert ask(client, "alpha@candidate", prompt) == before
    assert [r["status"] for r in read_records("alpha")][:1] == [400]  # the over-long request is logged


def test_a_killed_server_leaves_every_answered_request_readable(stack):
    server, _ = stack
    client = server.client()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: ask(client, "alpha", [{"role": "user", "content": f"question {i}"}]), range(16)))
    server.stop(signal.SIGKILL)
    assert len(read_records("alpha")) == 16
    assert [p.name.endswith(".open") for p in segments("alpha")] == [True]  # never finished, still read
