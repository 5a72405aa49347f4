"""The OpenAI-compatible HTTP API: `/v1/models`, `/v1/chat/completions` (streamed or not) and `/health`, with an
optional bearer key, and `/v1/feedback` for corrections of served answers. Every chat request to a served model is
appended to the request log of its task, refused ones too."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import Headers
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from ftpipe.core.evaluation.generation import decoded_answer, encode
from ftpipe.core.server.catalog import Catalog, Route, releases
from ftpipe.core.server.engine import MAX_BATCH, Engine, Job
from ftpipe.core.server.prefixes import STARTS_KEPT
from ftpipe.core.feedback import FEEDBACK_FILE, FeedbackError, add_feedback
from ftpipe.core.records import ROLE_ALIASES
from ftpipe.core.text import text_parts
from ftpipe.core.server.request_log import CLIENT_CLOSED, PURPOSE_HEADER, SEGMENT_RECORDS, RequestLog, find_record
from ftpipe.core.server.stop_strings import MAX_STOP_STRINGS, held_back, stop_position
from ftpipe.core.server.structured import Constraint, grammar

DEFAULT_MAX_TOKENS = 256
REFRESH_SECONDS = 10.0
DISCONNECT_POLL_SECONDS = 0.1  # how often a request that is not streamed checks that its client is still there
GONE = "the client closed the connection before the answer ended"


class Message(BaseModel):
    """A chat message; as the openai client may send it, the `developer` role is the system's and content may be a
    list of text parts (joined by newlines)."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("role", mode="before")
    @classmethod
    def _developer_is_system(cls, role: Any) -> Any:
        if role not in ("system", "developer", "user", "assistant"):
            raise PydanticCustomError("role", "role must be 'system', 'developer' (read as the system's), 'user' or "
                                      "'assistant', got {role}", {"role": repr(role)[:40]})
        return ROLE_ALIASES.get(role, role)

    @field_validator("content", mode="before")
    @classmethod
    def _joined_text_parts(cls, content: Any) -> Any:
        if not isinstance(content, list):
            return content
        if (text := text_parts(content)) is None:
            raise PydanticCustomError("text_only", "only parts of type text: the models read text")
        return text


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)  # 0: the most likely token only, as in the OpenAI API
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(default_factory=list)  # read as a list (`_stop_strings`)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    logprobs: bool | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    seed: int | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_STRINGS or not all(stops):
            raise PydanticCustomError("stop", f"at most {MAX_STOP_STRINGS} strings, none empty")
        return stops

    @field_validator("tools", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias")
    @classmethod
    def _unsupported(cls, value: Any) -> Any:
        """Options that would change the answer are refused rather than ignored (their defaults pass)."""
        if value in (None, False, 0, [], {}):
            return value
        raise PydanticCustomError("unsupported", "not supported by this server; leave it out")

    @field_validator("seed")
    @classmethod
    def _seeded_only_when_greedy(cls, value: int | None, info: ValidationInfo) -> int | None:
        """A seed changes nothing in greedy decoding (temperature 0); a sampled answer cannot be seeded here."""
        if value is not None and info.data.get("temperature", 0.0) > 0:
            raise PydanticCustomError("unsupported", "sampled answers cannot be seeded by this server; leave it out, "
                                                     "or use temperature 0 (the same answer every time)")
        return value

    @property
    def streams_usage(self) -> bool:
        """The stream ends with a chunk of the usage alone (and the others carry `usage: null`), as OpenAI's does."""
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def token_budget(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS


class FeedbackRequest(BaseModel):
    """A correction: the served request's id and the answer it should have given (`model` narrows the search;
    `messages` stand in for a request logged without content; `new_label` accepts a label, or an extraction
    category, no row of the task has)."""

    model_config = ConfigDict(extra="ignore")
    request_id: str
    output: str = Field(min_length=1)
    model: str | None = None
    messages: list[Message] | None = None
    new_label: bool = False


class AddressTaken(OSError):
    """The server's address cannot be listened on; the message says which and what to do."""


class ApiError(Exception):
    """A refused request: HTTP status, OpenAI error type and code, and a one-line message."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _validation_message(error: ValidationError) -> tuple[str, str]:
    """(one line naming the first bad field and why, the field)."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    return f"{where}: {first['msg']}", where


@dataclass
class Server:
    """The catalog of served models, the engine decoding for it, the request log, and the refresh of the catalog
    from the registry (so a moved champion alias is served without a restart)."""

    tracking_uri: str | None = None
    api_key: str | None = None
    log: RequestLog = field(default_factory=RequestLog)
    refresh_seconds: float = REFRESH_SECONDS
    catalog: Catalog = field(default_factory=Catalog)
    engine: Engine = field(default_factory=Engine)
    served: dict[str, int] = field(default_factory=dict)
    _wanted: list = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def refresh(self) -> dict[str, int]:
        """Serve the registry's current champions and candidates (loading on the engine thread, between two steps;
        an adapter no longer served is unloaded at a later refresh, once no request uses it)."""
        wanted = releases(self.tracking_uri)
        self.log.without_content = {r.task for r in wanted if not _logs_content(r.task)}
        if wanted != self._wanted or self.catalog.lingering:
            self.served = self.engine.call(lambda: self.catalog.sync(wanted, self.engine.busy()),
                                           forget_starts=wanted != self._wanted).result()
            self._wanted = wanted
        return self.served

    def start(self) -> None:
        self.refresh()
        threading.Thread(target=self._watch, name="ftpipe-registry-watch", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self.engine.stop()
        self.log.close()

    def _watch(self) -> None:
        while not self._stop.wait(self.refresh_seconds):
            self.log.rotate()
            before = self.served
            try:
                self.refresh()
            except Exception as error:  # noqa: BLE001 - the server keeps serving what it has
                print(f"ftpipe serve: registry refresh failed: {error}", flush=True)
            if self.served != before:
                print(f"ftpipe serve: now serving {self.serving()}", flush=True)

    def serving(self) -> str:
        """The served models and their registry versions, in one line."""
        return ", ".join(f"{name} v{version}" for name, version in self.served.items()) or "no models yet"

    def route(self, name: str) -> Route:
        route = self.catalog.routes.get(name)
        if route is None:
            names = ", ".join(sorted(self.catalog.routes)) or "none"
            raise ApiError(404, f"model {name!r} is not served; served models: {names}", code="model_not_found",
                           param="model")
        return route

    def authorized(self, header: str | None) -> bool:
        if not self.api_key:
            return True
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip(), self.api_key)


def _logs_content(task: str) -> bool:
    """The task's `serving.log_content` (the default, true, without a task.yaml; false when it does not load, so a
    broken file never exposes what a working one keeps private)."""
    from ftpipe.config import TaskConfigError, load_task_config
    from ftpipe.core.storage import task_dir

    try:
        return load_task_config(task_dir(task) / "task.yaml").serving.log_content
    except TaskConfigError:
        return False


@dataclass
class Completion:
    """One chat request on its way through the engine: tokens arrive on the event loop's queue."""

    server: Server
    route: Route
    request: ChatRequest
    prompt: list[int]
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)
    tokens: list[int] = field(default_factory=list)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)  # the engine ends the row at its next token
    stopped: bool = False  # the answer reached one of the request's stop strings
    constraint: Constraint | None = None  # the answer's grammar (`response_format`); None: free text
    purpose: str | None = None  # why ftpipe itself sent it (PURPOSE_HEADER); None: a client's request
    job: Job | None = None  # the engine's side of it, once submitted

    def submit(self) -> None:
        loop = asyncio.get_running_loop()
        put = lambda item: loop.call_soon_threadsafe(self.queue.put_nowait, item)  # noqa: E731
        self.job = Job(self.route.model, self.route.adapter, self.prompt, self.request.token_budget,
                       self.request.temperature, self.request.top_p, self.route.stops, self.route.pad_id, emit=put,
                       fail=put, cancelled=self.cancelled, constraint=self.constraint)
        self.server.engine.submit(self.job)

    async def pieces(self):
        """The answer's text as it is decoded, piece by piece (a piece ends where the text is whole characters and
        cannot be the start of a stop string); decoding ends at a stop string, which the answer leaves out."""
        shown, stops = "", self.request.stop
        while (item := await self.queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            self.tokens.append(item)
            decoded = self.decoded
            if stop_position(decoded, stops) is not None:
                self.stopped = True
                self.cancel()
                break
            text = decoded[:len(decoded) - held_back(decoded, stops)]
            if not text.endswith("\ufffd") and len(text) > len(shown):
                yield text[len(shown):]
                shown = text
        if len(self.text) > len(shown):
            yield self.text[len(shown):]

    def cancel(self) -> None:
        """End this answer's decoding: it reached a stop string, or its client is gone."""
        self.cancelled.set()

    @property
    def decoded(self) -> str:
        return self.route.tokenizer.decode(self.tokens, skip_special_tokens=True)

    @property
    def text(self) -> str:
        """The answer: the decoded text up to the first stop string, else `decoded_answer` (a character the token
        budget cut short left out)."""
        if not self.stopped:
            return decoded_answer(self.route.tokenizer, self.tokens)
        decoded = self.decoded
        return decoded[:stop_position(decoded, self.request.stop)]

    @property
    def finish_reason(self) -> str:
        complete = self.stopped or (self.constraint is not None and self.constraint.complete)
        return "length" if len(self.tokens) >= self.request.token_budget and not complete else "stop"

    @property
    def counts(self) -> dict[str, int]:
        return {"prompt_tokens": len(self.prompt), "completion_tokens": len(self.tokens),
                "total_tokens": len(self.prompt) + len(self.tokens)}

    @property
    def usage(self) -> dict[str, Any]:
        """The token counts, and as OpenAI's usage says, how many of the prompt's were cached (a kept start)."""
        return {**self.counts, "prompt_tokens_details": {"cached_tokens": self.job.cached_tokens if self.job else 0}}

    def response(self) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.request.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self.text},
                             "finish_reason": self.finish_reason}], "usage": self.usage}

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        return self._event([{"index": 0, "delta": delta, "finish_reason": finish_reason}],
                           {"usage": None} if self.request.streams_usage else {})

    def usage_chunk(self) -> str:
        return self._event([], {"usage": self.usage})

    def _event(self, choices: list[dict[str, Any]], extra: dict[str, Any]) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.request.model,
                "choices": choices, **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def record(self, status: int, error: str | None = None) -> None:
        log_request(self.server, self.route, self.id, [m.model_dump() for m in self.request.messages], self.text,
                    round((time.perf_counter() - self.started) * 1000, 1), self.counts, status, error, self.purpose)


def log_request(server: Server, route: Route, request_id: str, messages: Any, output: str, latency_ms: float,
                usage: dict[str, int], status: int, error: str | None, purpose: str | None) -> None:
    """Append one request to the log of the task `route` serves (with the `purpose` ftpipe's own requests give)."""
    release = route.release
    now = time.time()
    server.log.append({
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z",
        "task": release.task, "model": release.name, "version": release.version, "request_id": request_id,
        "messages": messages, "output": output, "latency_ms": latency_ms, **usage, "status": status, "error": error,
        **({"purpose": purpose} if purpose else {})})


def _log_refused(server: Server, body: bytes, error: ApiError, purpose: str | None) -> None:
    """Log a refused chat request under the task of the served model it names, with its messages as sent (a request
    that names none, or is not JSON, belongs to no task's log)."""
    try:
        sent = json.loads(body)
        route = server.catalog.routes.get(sent.get("model")) if isinstance(sent.get("model"), str) else None
    except (ValueError, AttributeError):
        return
    if route is not None:
        log_request(server, route, f"chatcmpl-{uuid.uuid4().hex}", sent.get("messages"), "", 0.0,
                    {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}, error.status, error.message,
                    purpose)


class KeyCheck:
    """Refuse `/v1/` requests without the server's API key (401). A plain ASGI middleware: it leaves the request's
    messages to the app, so a handler can tell that its client has gone (`Request.is_disconnected`)."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and not self.server.authorized(
                Headers(scope=scope).get("authorization")):
            error = ApiError(401, "missing or wrong API key: send it as `Authorization: Bearer <key>`",
                             kind="authentication_error", code="invalid_api_key")
            await JSONResponse(error.body(), status_code=401)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(server: Server):
    """The FastAPI application serving `server` (stopped, its log segments finished, when the app shuts down)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.stop()

    app = FastAPI(title="ftpipe", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def refused(request: Request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception):  # a bug: said as OpenAI's errors are, and in the log
        failure = ApiError(500, f"{type(error).__name__}: {error}", kind="server_error")
        return JSONResponse(failure.body(), status_code=failure.status)

    app.add_middleware(KeyCheck, server=server)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": server.served}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "ftpipe", "version": version}
            for name, version in sorted(server.served.items())]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body, purpose = await request.body(), request.headers.get(PURPOSE_HEADER)
        try:  # in a thread: a first structured answer on a base takes seconds to prepare (`structured`)
            completion = await asyncio.to_thread(_completion, server, body, purpose)
        except ApiError as error:
            _log_refused(server, body, error, purpose)
            raise
        completion.submit()
        if completion.request.stream:
            return StreamingResponse(_stream(completion), media_type="text/event-stream")
        watcher = asyncio.create_task(_cancel_when_gone(request, completion))
        try:
            async for _ in completion.pieces():
                pass
        except Exception as error:
            completion.record(500, str(error))
            raise ApiError(500, f"generation failed: {error}", kind="server_error") from error
        except asyncio.CancelledError:  # the client is gone, and the server ended this handler
            completion.cancel()
            completion.record(CLIENT_CLOSED, GONE)
            raise
        finally:
            watcher.cancel()
        if watcher.done() and not watcher.cancelled():
            completion.record(CLIENT_CLOSED, GONE)
            return JSONResponse({}, status_code=CLIENT_CLOSED)
        completion.record(200)
        return completion.response()

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        correction = _parsed(FeedbackRequest, await request.body())
        return await asyncio.to_thread(_add_feedback, server, correction)

    return app


def _add_feedback(server: Server, correction: FeedbackRequest) -> dict[str, Any]:
    """Add the correction to the raw data of the task that served its request."""
    tasks = ([server.route(correction.model).release.task] if correction.model
             else sorted({route.release.task for route in server.catalog.routes.values()}))
    messages = [m.model_dump() for m in correction.messages] if correction.messages else None
    for task in tasks:
        if found := find_record(task, correction.request_id):
            try:
                row, outcome = add_feedback(task, correction.request_id, correction.output, messages,
                                            {correction.request_id: found}, correction.new_label)
            except FeedbackError as error:
                raise ApiError(400, str(error), param=str(error).split(":")[0]) from None
            return {"object": "feedback", "task": task, "request_id": correction.request_id, "outcome": outcome,
                    "row": row["messages"], "file": f"raw/{FEEDBACK_FILE}"}
    raise ApiError(404, f"request_id: {correction.request_id!r} is not in the request log of "
                        f"{', '.join(tasks) or 'any served task'}", code="request_not_found", param="request_id")


def _parsed(model: type[BaseModel], body: bytes):
    """The request body as `model`, or the ApiError naming the first bad field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            raise ApiError(400, f"the request body is not valid JSON: {first['ctx']['error']}") from None
        message, param = _validation_message(error)
        raise ApiError(400, message, param=param) from None


def _completion(server: Server, body: bytes, purpose: str | None) -> Completion:
    """The completion a request body asks for, or the ApiError that says why not."""
    request = _parsed(ChatRequest, body)
    route = server.route(request.model)
    messages = [m.model_dump() for m in request.messages]
    if messages[-1]["role"] == "assistant":
        raise ApiError(400, "messages: the last message must be the user's (or the system's), not the assistant's",
                       param="messages")
    prompt = encode(route.tokenizer, route.tokenizer.apply_chat_template(messages, tokenize=False,
                                                                         add_generation_prompt=True))
    if len(prompt) + request.token_budget > route.context_length:
        raise ApiError(400, f"this request needs {len(prompt)} prompt tokens + {request.token_budget} completion "
                            f"tokens, more than the model's context length of {route.context_length}",
                       code="context_length_exceeded", param="messages")
    return Completion(server, route, request, prompt, constraint=_constraint(route, request.response_format),
                      purpose=purpose)


def _constraint(route: Route, response_format: dict[str, Any] | None) -> Constraint | None:
    """The grammar `response_format` asks the answer to keep, or the ApiError that says what is wrong with it."""
    try:
        found = grammar(response_format)
    except ValueError as error:
        raise ApiError(400, f"response_format: {error}", param="response_format") from None
    return Constraint(found, route.tokenizer, route.model.config.vocab_size, route.stops) if found else None


async def _cancel_when_gone(request: Request, completion: Completion) -> None:
    """End `completion`'s decoding once its client has closed the connection (a request that is not streamed)."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)
    completion.cancel()


async def _stream(completion: Completion):
    yield completion.chunk({"role": "assistant", "content": ""})
    try:
        async for piece in completion.pieces():
            yield completion.chunk({"content": piece})
    except Exception as error:  # noqa: BLE001 - the client gets it as the stream's last event
        completion.record(500, str(error))
        yield f"data: {json.dumps(ApiError(500, f'generation failed: {error}', kind='server_error').body())}\n\n"
        return
    except (asyncio.CancelledError, GeneratorExit):
        completion.cancel()
        completion.record(CLIENT_CLOSED, "the client closed the stream before the answer ended")
        raise
    yield completion.chunk({}, completion.finish_reason)
    if completion.request.streams_usage:
        yield completion.usage_chunk()
    yield "data: [DONE]\n\n"
    completion.record(200)


def serve(host: str = "127.0.0.1", port: int = 8000, tracking_uri: str | None = None,
          refresh_seconds: float = REFRESH_SECONDS, max_batch: int = MAX_BATCH,
          segment_records: int = SEGMENT_RECORDS, prompt_starts: int = STARTS_KEPT) -> None:
    """Run the server until interrupted (the API key from `FTPIPE_API_KEY`, when set). Raises AddressTaken, before
    loading a model, when the address cannot be listened on (another server on the port)."""
    import os

    import uvicorn

    listening = bound_socket(host, port)
    server = Server(tracking_uri, os.environ.get("FTPIPE_API_KEY") or None, RequestLog(segment_records=segment_records),
                    refresh_seconds=refresh_seconds, engine=Engine(max_batch, prompt_starts))
    server.start()
    print(f"ftpipe serve: http://{host}:{port}/v1 serving {server.serving()}", flush=True)
    uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning")).run(sockets=[listening])


def bound_socket(host: str, port: int) -> socket.socket:
    """A socket listening on (host, port), or AddressTaken saying which address and what to do. It listens at once,
    so a second server started while this one loads its models is refused too (two sockets may bind a port with
    SO_REUSEADDR until one listens); requests wait in the backlog until the app serves."""
    listening = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind((host, port))
        listening.listen(2048)
    except OSError as error:
        listening.close()
        raise AddressTaken(f"cannot listen on {host}:{port}: {error.strerror} (another server on it? stop it, or "
                      "choose another with --port)") from None
    return listening
