"""A real `python -m ftpipe serve` process for tests and benchmarks, and models registered for it to serve."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ftpipe.core import registry
from ftpipe.core.storage import REPO_ROOT
from ftpipe_tests.e2e.helpers import as_a_terminal_starts_it, free_port

KEY = "test-key-123"


def register(uri: str, task: str, folder: Path, score: float) -> None:
    """Register the packaged model in `folder` as a new version of `task`'s model in the MLflow store at `uri`."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(task)
    artifacts = folder.parent / "mlartifacts"  # beside the model, never the working directory's ./mlruns
    experiment_id = (experiment.experiment_id if experiment
                     else client.create_experiment(task, artifact_location=artifacts.as_uri()))
    run_id = client.create_run(experiment_id).info.run_id
    registry.register_model(task=task, model_path=folder, run_id=run_id, eval_score=score, eval_version="split",
                            scores={"metric": "accuracy", "rows": {"row": score}}, tracking_uri=uri)


class Served:
    """The server on a free port of 127.0.0.1 with `env` (its output in `home/serve.log`), started and healthy."""

    def __init__(self, home: Path, env: dict, *options: str, refresh_seconds: float = 10):
        self.home, self.env, self.port = home, env, free_port()
        self.log = (home / "serve.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ftpipe", "serve", "--port", str(self.port), "--refresh-seconds",
             str(refresh_seconds), *options], env=env, cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT,
            preexec_fn=as_a_terminal_starts_it)
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


def packaged_lora(base: Path, root: Path, name: str = "lora", seed: int = 0) -> Path:
    """A random LoRA adapter on `base`, packaged for serving in `root/<name>` (merged, with the adapter's copy)."""
    from ftpipe.core import merging
    from ftpipe_tests.tiny_model import toy_rows, write_chat_parquet
    from ftpipe_tests.trained_models import lora_adapter

    write_chat_parquet(root / "parity.parquet", toy_rows(4, seed=2))
    adapter = lora_adapter(base, root / f"adapter-{name}", random_weights=True, seed=seed)
    merging.package_model(base_model_dir=base, finetuned_dir=adapter, out_dir=root / name,
                          eval_path=root / "parity.parquet", card={"task": name, "method": "lora"}, reuse_key=name)
    return root / name
