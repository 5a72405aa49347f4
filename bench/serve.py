"""Serving throughput: two tasks' adapters on one base decoded in mixed batches, against the same server decoding one
request at a time, and against a separate merged model per task; at 1/8/32/64 concurrent clients, through the real
server process and the official `openai` client. Prints requests/s and p95 latency, and the ratios at 32 clients.
Then the wait behind a long answer: a short request's latency while another request streams a long answer, against
the same request alone. Last, requests that all start with a long system prompt: the server keeping that start's KV
cache, against the same server reading every prompt whole (`--prompt-starts 0`). Then structured answers
(`response_format` json_object): tokens/s at 32 clients against free answers on the same server.

    python bench/serve.py                                    # the tiny random model: runs anywhere in a few minutes
    python bench/serve.py --model .ftpipe/models/<fingerprint>  # a resolved base model, e.g. the demo's SmolLM2-135M
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ftpipe.core import merging
from ftpipe.core.storage import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))  # the test helpers build the models and run the server
from ftpipe_tests.served import KEY, Served, packaged_lora, register  # noqa: E402
from ftpipe_tests.tiny_model import build_tiny_model, long_system_prompt, with_system  # noqa: E402
from ftpipe_tests.trained_models import noisy_base  # noqa: E402

TASKS = ("apples", "plums")
CLIENTS = (1, 8, 32, 64)
CARD = {"task": "bench", "description": "serving benchmark", "method": "lora"}
RULES = 24  # the long system prompt's sentences: about 400 SmolLM2 tokens (6 for the tiny model's 512-token context)


def packaged_models(base: Path, root: Path) -> dict[str, dict[str, Path]]:
    """Per task, its adapter packaged on `base` (`lora`) and the same weights merged as a model of its own
    (`merged`: packaged without a base, so the server loads it whole)."""
    found = {}
    for seed, task in enumerate(TASKS):
        lora = packaged_lora(base, root, f"lora-{task}", seed)
        merged = root / f"merged-{task}"
        merging.package_full_model(model_dir=lora, out_dir=merged, card=CARD, reuse_key=task)
        found[task] = {"lora": lora, "merged": merged}
    return found


def question(i: int, rules: int = 0) -> list[dict]:
    """The i-th question, after a system prompt of `rules` sentences (none: 0)."""
    asked = [{"role": "user", "content": f"Question {i}: what color is it?"}]
    return with_system(asked, long_system_prompt(rules)) if rules else asked


def measure(server: Served, clients: int, requests: int, max_tokens: int, rules: int = 0) -> tuple[float, float]:
    """(requests per second, p95 latency in ms) of `requests` chat completions from `clients` threads, the tasks
    taking turns (`question`s)."""
    client = server.client()

    def one(i: int) -> float:
        started = time.perf_counter()
        client.chat.completions.create(model=TASKS[i % len(TASKS)], max_tokens=max_tokens, temperature=0,
                                       messages=question(i, rules))
        return time.perf_counter() - started

    one(0)  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(pool.map(one, range(requests)))
    elapsed = time.perf_counter() - started
    return requests / elapsed, latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] * 1000


def short_request_seconds(client, max_tokens: int, i: int = 0, rules: int = 0) -> float:
    started = time.perf_counter()
    client.chat.completions.create(model=TASKS[1], max_tokens=max_tokens, temperature=0, messages=question(i, rules))
    return time.perf_counter() - started


def wait_behind_a_long_answer(server: Served, args, tries: int = 3) -> None:
    """Print the median seconds of a short request alone and while another request streams a long answer (sent once
    that answer's first token has come), and their ratio."""
    client = server.client()
    alone = statistics.median(short_request_seconds(client, args.max_tokens) for _ in range(tries))
    behind, long_tokens = [], []
    for _ in range(tries):
        first_token = threading.Event()

        def long_answer() -> None:
            stream = client.chat.completions.create(
                model=TASKS[0], max_tokens=args.long_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True},
                messages=[{"role": "user", "content": "Tell me everything about the colors of fruit."}])
            for chunk in stream:
                first_token.set()
                if chunk.usage:
                    long_tokens.append(chunk.usage.completion_tokens)

        worker = threading.Thread(target=long_answer)
        worker.start()
        first_token.wait()
        behind.append(short_request_seconds(client, args.max_tokens))
        worker.join()
    print(f"  a short request ({args.max_tokens} tokens) alone {alone:.2f} s, behind a long answer "
          f"({statistics.median(long_tokens):.0f} tokens) {statistics.median(behind):.2f} s: "
          f"{statistics.median(behind) / alone:.2f}x its time alone", flush=True)


def started_server(name: str, models: dict, kind: str, options: tuple[str, ...], root: Path) -> Served:
    home = root / name
    home.mkdir()
    uri = f"sqlite:///{home / 'mlflow.db'}"
    for task in TASKS:
        register(uri, task, models[task][kind], 0.5)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "FTPIPE_HOME": str(home), "FTPIPE_API_KEY": KEY}
    return Served(home, env, *options)


def run_setup(name: str, models: dict, kind: str, options: tuple[str, ...], root: Path, args,
              waits: bool = False) -> dict[int, tuple]:
    server = started_server(name, models, kind, options, root)
    try:
        results = {}
        for clients in CLIENTS:
            results[clients] = measure(server, clients, max(args.requests, clients * 2), args.max_tokens)
            print(f"  {name:<26} {clients:>3} clients: {results[clients][0]:7.2f} requests/s, "
                  f"p95 {results[clients][1]:8.0f} ms", flush=True)
        if waits:
            wait_behind_a_long_answer(server, args)
        return results
    finally:
        server.stop()


def measure_long_system_prompt(name: str, models: dict, options: tuple[str, ...], root: Path, args,
                               tries: int = 3) -> tuple[float, float]:
    """(median seconds of one request alone, requests/s at 32 clients) when every request starts with the same system
    prompt (each alone request a new question, after two that prime the server)."""
    server = started_server(name, models, "lora", options, root)
    try:
        client = server.client()
        for i in (-2, -1):  # the second reads the shared start
            short_request_seconds(client, args.max_tokens, i, args.rules)
        alone = statistics.median(short_request_seconds(client, args.max_tokens, i, args.rules)
                                  for i in range(tries))
        rate, p95 = measure(server, 32, max(args.requests, 64), args.max_tokens, args.rules)
        print(f"  {name:<26} a request alone {alone:.2f} s; 32 clients: {rate:7.2f} requests/s, p95 {p95:8.0f} ms",
              flush=True)
        return alone, rate
    finally:
        server.stop()


def tokens_per_second(server: Served, clients: int, requests: int, max_tokens: int, **options) -> float:
    """Completion tokens per second of `requests` chat completions from `clients` threads (`question`s)."""
    client = server.client()

    def one(i: int) -> int:
        return client.chat.completions.create(model=TASKS[i % len(TASKS)], max_tokens=max_tokens, temperature=0,
                                              messages=question(i), **options).usage.completion_tokens

    one(0)  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(one, range(requests)))
    return tokens / (time.perf_counter() - started)


def measure_structured(models: dict, root: Path, args) -> None:
    """Print decoding's tokens/s at 32 clients with every answer a JSON object, against free answers."""
    server = started_server("structured", models, "lora", (), root)
    try:
        requests = max(args.requests, 64)
        free = tokens_per_second(server, 32, requests, args.max_tokens)
        structured = tokens_per_second(server, 32, requests, args.max_tokens,
                                       response_format={"type": "json_object"})
    finally:
        server.stop()
    print(f"structured answers (json_object) at 32 clients: {structured:.0f} tokens/s against {free:.0f} free: "
          f"{structured / free:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a base model dir (safetensors + tokenizer); default: tiny model")
    parser.add_argument("--requests", type=int, default=96, help="requests per measurement (at least 2 per client)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--long-tokens", type=int, default=256, help="the long answer's token budget")
    parser.add_argument("--rules", type=int, help=f"sentences of the long system prompt (default {RULES}; 6 for the "
                                                  "tiny model)")
    parser.add_argument("--system-prompt-only", action="store_true", help="only the long system prompt's measurement")
    parser.add_argument("--structured-only", action="store_true", help="only the structured answers' measurement")
    args = parser.parse_args()
    args.rules = args.rules or (RULES if args.model else 6)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = args.model or noisy_base(build_tiny_model(root / "tiny"), root / "base")
        models = packaged_models(base, root)
        print(f"serving benchmark: {len(TASKS)} tasks, base {args.model or 'tiny random model'}, "
              f"{args.max_tokens} new tokens per request")
        setups = {
            "batched adapters": ("lora", ()),
            "one request at a time": ("lora", ("--max-batch", "1")),
            "merged model per task": ("merged", ()),
        }
        results = {name: run_setup(name, models, kind, options, root, args, waits=name == "batched adapters")
                   for name, (kind, options) in setups.items() if not (args.system_prompt_only or args.structured_only)}
        if not args.structured_only:
            words = len(long_system_prompt(args.rules).split())
            print(f"requests that start with one system prompt of {words} words:")
            kept = measure_long_system_prompt("its start kept", models, (), root, args)
            whole = measure_long_system_prompt("every prompt read whole", models, ("--prompt-starts", "0"), root,
                                               args)
        if not args.system_prompt_only:
            measure_structured(models, root, args)
    if results:
        batched = results["batched adapters"][32][0]
        print(f"  at 32 clients: batched adapters / one at a time "
              f"{batched / results['one request at a time'][32][0]:.1f}x (target >= 4x); / merged model per task "
              f"{batched / results['merged model per task'][32][0]:.2f}x")
    if not args.structured_only:
        print(f"  a long system prompt: a request alone {whole[0] / kept[0]:.2f}x faster with its start kept, "
              f"{kept[1] / whole[1]:.2f}x the requests/s at 32 clients")


if __name__ == "__main__":
    main()
