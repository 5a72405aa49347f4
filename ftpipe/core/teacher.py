"""Teacher-written training data: an OpenAI-compatible teacher answers the prompts in a task's `prompts/` folder
(the official `openai` client, so any compatible endpoint works), and its accepted answers become chat rows that
`raw_examples` reads beside `raw/`, with the teacher and model as their source.

Never paid twice: every answer (accepted or not) is cached under `$FTPIPE_HOME/cache/teacher/<task>.jsonl`, keyed by
the prompt, the teacher, the model (and its version, where the teacher lists one) and the decoding settings, so a
materialization asks only for prompts without a cached answer. Failures lose nothing: the client retries timeouts,
429 and 5xx with backoff; a request that still fails, the budget running out, or the teacher going away stop the run
cleanly with every answer so far cached, and the next run continues. The API key is read from the environment
variable the task names and never written."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftpipe.config import AcceptConfig, BudgetConfig, DistillConfig, TaskConfig
from ftpipe.core.evaluation.outputs import ModelOutputs
from ftpipe.core.raw_files import iter_file_rows
from ftpipe.core.records import write_jsonl
from ftpipe.core.layout import teacher_cache
from ftpipe.core.storage import append_lines, atomic_dir, read_keyed_lines, task_dir
from ftpipe.core.text import label_key
from ftpipe.core.server.request_log import PURPOSE_HEADER

PROMPT_SUFFIXES = (".jsonl", ".csv")
TEACHER_FILE, REJECTED_FILE = "teacher.jsonl", "rejected.jsonl"
MAX_RETRIES = 5
PROGRESS_EVERY_SECONDS = 10.0


class TeacherError(RuntimeError):
    """The teacher cannot be used at all (unreachable, or refusing the key), said in one line."""


def prompts_dir(task: str) -> Path:
    return task_dir(task) / "prompts"


def read_prompts(task: str, column: str) -> list[tuple[str, str]]:
    """(source, prompt) of every row of the task's `prompts/*.jsonl|csv`, in file and row order; a row without a
    usable prompt raises ValueError naming the file, row and column."""
    folder = prompts_dir(task)
    found = []
    for path in sorted(p for p in folder.glob("*") if p.suffix in PROMPT_SUFFIXES) if folder.is_dir() else []:
        for location, row, problem in iter_file_rows(path):
            text = row.get(column) if isinstance(row, dict) else None
            if problem or not isinstance(text, str) or not text.strip():
                columns = ", ".join(sorted(row)) if isinstance(row, dict) else "none"
                raise ValueError(f"{path.name}:{location}: {problem or f'no prompt in column {column!r}'} (the row's "
                                 f"columns: {columns}; distill.prompt_column names the column)")
            found.append((f"{path.name}:{location}", text))
    return found


def messages_of(prompt: str, system: str | None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def answer_key(messages: list[dict[str, str]], distill: DistillConfig, version: str | None) -> str:
    """What decides a teacher's answer: the conversation, the endpoint, the model, the model's `version` where the
    teacher says it (`served_version`) and the decoding settings."""
    parts = [messages, distill.teacher.base_url, distill.teacher.model, distill.temperature, distill.max_tokens]
    if version:  # only then: the keys of answers cached from a teacher that gives none stay as they were
        parts.append(version)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def served_version(distill: DistillConfig) -> str | None:
    """The version of the model the teacher's `/v1/models` lists, where it gives one (`python -m ftpipe serve` does:
    a task's champion that moved is then asked again, not answered from the cache); None where it gives none or
    cannot list its models (asking it for answers then says why, where it has to)."""
    import openai

    try:
        listed = _client(distill).with_options(max_retries=1).models.list().data
    except (openai.APIError, TeacherError):
        return None
    return next((str(m.version) for m in listed if m.id == distill.teacher.model and getattr(m, "version", None)),
                None)


def accepted(answer: str, accept: AcceptConfig) -> tuple[str, str | None]:
    """(the answer to train on, why it is not usable or None): an accepted label is written as the label is."""
    if not answer.strip():
        return answer, "empty answer"
    if accept.labels is not None:
        label = {label_key(name): name for name in accept.labels}.get(label_key(answer))
        return (label, None) if label is not None else (answer, f"not one of the labels {', '.join(accept.labels)}")
    if accept.regex is not None and not re.fullmatch(accept.regex, answer.strip(), flags=re.DOTALL):
        return answer, f"does not match the regex {accept.regex}"
    if accept.json_schema is not None:
        import jsonschema

        try:
            jsonschema.validate(json.loads(answer), accept.json_schema)
        except json.JSONDecodeError as error:
            return answer, f"not JSON: {error.msg}"
        except jsonschema.ValidationError as error:
            return answer, f"JSON not valid against the schema: {error.message}"
    return answer, None


@dataclass
class AnswerCache:
    """Cached teacher answers, one JSON line each (appended as they arrive, so a crash keeps what was paid for)."""

    path: Path
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def of(cls, task: str) -> AnswerCache:
        path = teacher_cache(task)
        return cls(path, read_keyed_lines(path))

    def add(self, entry: dict[str, Any]) -> None:
        with self._lock:
            append_lines(self.path, [entry])
            self.answers[entry["key"]] = entry


@dataclass
class Spending:
    """Requests and tokens of this materialization, against the budget."""

    distill: DistillConfig
    requests: int = 0
    tokens: int = 0
    failed: int = 0
    answered: int = 0

    def exhausted(self) -> str | None:
        budget = self.distill.budget
        if budget.max_requests is not None and self.requests >= budget.max_requests:
            return f"budget of {budget.max_requests} requests spent"
        if budget.max_tokens is not None and self.tokens >= budget.max_tokens:
            return f"budget of {budget.max_tokens} tokens spent"
        return None


def _client(distill: DistillConfig):
    from openai import OpenAI

    variable = distill.teacher.api_key_env
    key = os.environ.get(variable) if variable else None
    if variable and not key:
        raise TeacherError(f"distill.teacher.api_key_env names {variable}, which is not set in the environment")
    return OpenAI(base_url=distill.teacher.base_url, api_key=key or "none", max_retries=MAX_RETRIES,
                  timeout=distill.timeout_seconds, default_headers={PURPOSE_HEADER: "distillation"})


def _ask(client, messages: list[dict[str, str]], distill: DistillConfig) -> dict[str, Any]:
    """The teacher's answer, the tokens it cost (prompt and total) and how long it took."""
    started = time.perf_counter()
    response = client.chat.completions.create(model=distill.teacher.model, messages=messages,
                                              temperature=distill.temperature, max_tokens=distill.max_tokens)
    usage = response.usage
    return {"answer": response.choices[0].message.content or "", "tokens": usage.total_tokens if usage else 0,
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "latency_ms": round((time.perf_counter() - started) * 1000, 1)}


def ask_teacher(pending: list[tuple[str, list[dict[str, str]]]], distill: DistillConfig, cache: AnswerCache,
                log: Callable[[str], None]) -> tuple[Spending, str | None]:
    """Ask the teacher for every (key, messages) in `pending`, `concurrency` at a time, caching each answer as it
    arrives, until done or the budget is spent; returns the spending and why it stopped early (None: it did not)."""
    import openai

    spent, stopped = Spending(distill), None
    client, started, last_report = _client(distill), time.monotonic(), time.monotonic()
    queue = list(reversed(pending))
    with ThreadPoolExecutor(distill.concurrency) as pool:
        running: dict = {}
        while queue or running:
            while queue and stopped is None and len(running) < distill.concurrency:
                stopped = spent.exhausted()
                if stopped is None:
                    key, messages = queue.pop()
                    spent.requests += 1
                    running[pool.submit(_ask, client, messages, distill)] = key
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                key = running.pop(future)
                try:
                    answered = future.result()
                except openai.APIConnectionError as error:  # timeouts too, after the retries
                    if not cache.answers and not spent.answered:
                        raise TeacherError(f"the teacher at {distill.teacher.base_url} cannot be reached: "
                                           f"{error.__cause__ or error}") from None
                    spent.failed += 1
                    stopped = stopped or f"the teacher at {distill.teacher.base_url} went away"
                    continue
                except openai.AuthenticationError:
                    raise TeacherError(f"the teacher at {distill.teacher.base_url} refused the API key in "
                                       f"{distill.teacher.api_key_env or '(none given)'}") from None
                except (openai.NotFoundError, openai.PermissionDeniedError) as error:  # so would every request
                    raise TeacherError(f"the teacher at {distill.teacher.base_url} refused model "
                                       f"'{distill.teacher.model}' ({error.status_code}): {_said(error)}") from None
                except (openai.APIError, ValueError) as error:  # still failing after retries, or a malformed body
                    spent.failed += 1
                    log(f"teacher request failed{_after_retries(error)}: {type(error).__name__}: {error}")
                    continue
                spent.tokens += answered["tokens"]
                spent.answered += 1
                cache.add({"key": key, **answered, "model": distill.teacher.model})
            if time.monotonic() - last_report >= PROGRESS_EVERY_SECONDS:
                last_report = time.monotonic()
                _progress(spent, len(queue) + len(running), time.monotonic() - started, log)
    return spent, stopped


def _said(error) -> str:
    """The message of an API error's body (the client keeps the `error` object of `{"error": {"message": ...}}`),
    else the error itself."""
    return str(error.body.get("message") or error) if isinstance(error.body, dict) else str(error)


def _after_retries(error: Exception) -> str:
    """" after N retries" for what the client retries (timeouts, 408, 409, 429, 5xx), else nothing."""
    import openai

    status = getattr(error, "status_code", None)
    retried = isinstance(error, openai.APIConnectionError) or status in (408, 409, 429) or (status or 0) >= 500
    return f" after {MAX_RETRIES} retries" if retried else ""


def _progress(spent: Spending, left: int, seconds: float, log: Callable[[str], None]) -> None:
    rate = spent.answered / seconds if seconds else 0.0
    eta = f", about {left / rate / 60:.1f} min left" if rate else ""
    log(f"teacher: {spent.answered} answers so far ({rate:.1f}/s, {spent.tokens} tokens){eta}")


def teacher_outputs(task: str, distill: DistillConfig, ids: list[str], prompts: list[list[dict[str, str]]],
                    version: str | None, log: Callable[[str], None] = print) -> ModelOutputs:
    """The teacher's answers to held-out `prompts` (conversations up to the answer), asked through the task's answer
    cache (without a budget: an evaluation needs every row), as one side of the evaluation; a row the teacher could
    not answer counts as an empty answer."""
    unbounded = distill.model_copy(update={"budget": BudgetConfig()})
    keys = [answer_key(messages, unbounded, version) for messages in prompts]
    cache = AnswerCache.of(task)
    pending = [(key, messages) for key, messages in zip(keys, prompts) if key not in cache.answers]
    if pending:
        log(f"teacher {distill.teacher.model}: answering {len(pending)} held-out rows ({len(prompts) - len(pending)} "
            "cached)")
        ask_teacher(pending, unbounded, cache, log)
    found = [cache.answers.get(key) for key in keys]
    answered = [entry for entry in found if entry]
    return ModelOutputs(ids=ids, answers=[entry["answer"] if entry else "" for entry in found],
                        prompt_tokens=sum(e.get("prompt_tokens", 0) for e in answered) / max(len(answered), 1),
                        seconds_per_row=sum(e.get("latency_ms", 0.0) for e in answered) / 1000 / max(len(answered), 1))


def teacher_version(distill: DistillConfig, version: str | None) -> str:
    """What decides the teacher's answers (its model at `version`, as `served_version` gives it), for the
    evaluation's reuse key."""
    return answer_key([], distill, version)


def build_teacher_examples(task: str, config: TaskConfig, out_dir: Path,
                           log: Callable[[str], None] = print) -> dict[str, Any]:
    """Ask the teacher for the task's prompts without a cached answer and write every prompt's accepted answer as
    a chat row to `out_dir/teacher.jsonl` (the rejected ones, with the reason, to `rejected.jsonl`); return the
    figures. A task without a `distill` section writes no rows."""
    distill = config.distill
    rows, rejected = [], []
    figures = {"prompts": 0, "teacher_requests": 0, "cache_hits": 0, "teacher_tokens": 0, "answers_rejected": 0,
               "failed_requests": 0, "unanswered": 0, "stopped": None}
    if distill is not None:
        prompts = read_prompts(task, distill.prompt_column)[: distill.examples]
        asked = [(source, messages_of(text, config.data.system_prompt)) for source, text in prompts]
        version = served_version(distill)
        keyed = [(source, messages, answer_key(messages, distill, version)) for source, messages in asked]
        cache = AnswerCache.of(task)
        pending = [(key, messages) for _, messages, key in keyed if key not in cache.answers]
        log(f"teacher {distill.teacher.model} at {distill.teacher.base_url}: {len(prompts)} prompts, "
            f"{len(prompts) - len(pending)} answered before, {len(pending)} to ask")
        spent, stopped = ask_teacher(pending, distill, cache, log) if pending else (Spending(distill), None)
        teacher = f"teacher {distill.teacher.model} ({distill.teacher.base_url})"
        for source, messages, key in keyed:
            entry = cache.answers.get(key)
            if entry is None:
                continue
            answer, problem = accepted(entry["answer"], distill.accept)
            row = {"messages": [*messages, {"role": "assistant", "content": answer}],
                   "teacher": teacher, "prompt_source": source}
            (rejected.append({**row, "reason": problem}) if problem else rows.append(row))
        figures.update(prompts=len(prompts), teacher_requests=spent.requests, teacher_tokens=spent.tokens,
                       cache_hits=len(prompts) - len(pending), answers_rejected=len(rejected),
                       failed_requests=spent.failed, unanswered=len(prompts) - len(rows) - len(rejected),
                       stopped=stopped)
        if stopped:
            log(f"teacher: stopped early ({stopped}); every answer so far is cached, the next run continues")
    with atomic_dir(out_dir) as tmp:
        write_jsonl(rows, tmp / TEACHER_FILE)
        write_jsonl(rejected, tmp / REJECTED_FILE)
    return {**figures, "rows": len(rows)}
