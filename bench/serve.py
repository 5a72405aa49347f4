"""Serving throughput: two tasks' adapters on one base decoded in mixed batches, against the same server decoding one
request at a time, and against a separate merged model per task; at 1/8/32/64 concurrent clients, through the real
server process and the official `openai` client. Prints requests/s and p95 latency, and the ratios at 32 clients.

    python bench/serve.py                                    # the tiny random model: runs anywhere in a few minutes
    python bench/serve.py --model .ftpipe/models/<fingerprint>  # a resolved base model, e.g. the demo's SmolLM2-135M
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ftpipe.core import merging
from ftpipe.core.storage import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))  # the test helpers build the models and run the server
from ftpipe_tests.served import KEY, Served, packaged_lora, register  # noqa: E402
from ftpipe_tests.tiny_model import build_tiny_model  # noqa: E402
from ftpipe_tests.trained_models import noisy_base  # noqa: E402

TASKS = ("apples", "plums")
CLIENTS = (1, 8, 32, 64)
CARD = {"task": "bench", "description": "serving benchmark", "method": "lora"}


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


def measure(server: Served, clients: int, requests: int, max_tokens: int) -> tuple[float, float]:
    """(requests per second, p95 latency in ms) of `requests` chat completions from `clients` threads, the tasks
    taking turns."""
    client = server.client()

    def one(i: int) -> float:
        started = time.perf_counter()
        client.chat.completions.create(model=TASKS[i % len(TASKS)], max_tokens=max_tokens, temperature=0,
                                       messages=[{"role": "user", "content": f"Question {i}: what color is it?"}])
        return time.perf_counter() - started

    one(0)  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(pool.map(one, range(requests)))
    elapsed = time.perf_counter() - started
    return requests / elapsed, latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] * 1000


def run_setup(name: str, models: dict, kind: str, options: tuple[str, ...], root: Path, args) -> dict[int, tuple]:
    home = root / name
    home.mkdir()
    uri = f"sqlite:///{home / 'mlflow.db'}"
    for task in TASKS:
        register(uri, task, models[task][kind], 0.5)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "FTPIPE_HOME": str(home), "FTPIPE_API_KEY": KEY}
    server = Served(home, env, *options)
    try:
        results = {}
        for clients in CLIENTS:
            results[clients] = measure(server, clients, max(args.requests, clients * 2), args.max_tokens)
            print(f"  {name:<26} {clients:>3} clients: {results[clients][0]:7.2f} requests/s, "
                  f"p95 {results[clients][1]:8.0f} ms", flush=True)
        return results
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a base model dir (safetensors + tokenizer); default: tiny model")
    parser.add_argument("--requests", type=int, default=96, help="requests per measurement (at least 2 per client)")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
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
        results = {name: run_setup(name, models, kind, options, root, args)
                   for name, (kind, options) in setups.items()}
    batched = results["batched adapters"][32][0]
    print(f"  at 32 clients: batched adapters / one at a time {batched / results['one request at a time'][32][0]:.1f}x"
          f" (target >= 4x); / merged model per task {batched / results['merged model per task'][32][0]:.2f}x")


if __name__ == "__main__":
    main()
