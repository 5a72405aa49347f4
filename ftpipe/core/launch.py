"""How the training program is started: a plain process, `torchrun`, or a Kubernetes pod.

All three run the same program, `python -m ftpipe.core.training SPEC.json`.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

from ftpipe.config import K8sConfig, TrainingConfig

TRAINING_PROGRAM = ["-m", "ftpipe.core.training"]
CONTAINER_NAME = "training"
EXIT_REFUSED = 2  # the program refused its spec before training: retrying cannot help
LAUNCHER_PID_ENV = "FTPIPE_LAUNCHER_PID"  # the process that started the training; the training stops when it is gone
REFUSAL_NOTE_ENV = "FTPIPE_REFUSAL_NOTE"  # the file the program writes why it refused its spec to, not the log
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C, Terminate and a closed terminal alike


def heeded_stop_signals() -> list[signal.Signals]:
    """The `STOP_SIGNALS` this process acts on: all but a SIGHUP it was started to ignore (`nohup`)."""
    return [sig for sig in STOP_SIGNALS if sig != signal.SIGHUP or signal.getsignal(sig) != signal.SIG_IGN]


def unblock_stop_signals() -> None:
    """Take back the stop signals a parent process blocked: `python -m ftpipe run` keeps Ctrl-C and a closed
    terminal's SIGHUP from the processes it starts (Dagster's log mirrors would print tracebacks), and those that
    must stop on them (a training, a download) call this."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class Refused(ValueError):
    """A spec the training program cannot train on, found once it read its data: it exits `EXIT_REFUSED` too."""


def refusal_note(spec_path: Path | str) -> Path:
    """Where a training program started on this machine leaves why it refused `spec_path` (`REFUSAL_NOTE_ENV`),
    for the launching step's failure to say."""
    return Path(spec_path).with_suffix(".refused")


def taken_refusal(note: Path) -> str | None:
    """The refusal a training program left in `note`, which is removed once read; None when it left none."""
    if not note.is_file():
        return None
    reason = note.read_text(encoding="utf-8")
    note.unlink()
    return reason


class PodSpecError(ValueError):
    """A pod spec the Kubernetes API would refuse, found before any pod is created."""


def torchrun_arguments(training: TrainingConfig, rdzv_id: str) -> list[str]:
    """torchrun's options: one node standalone, or several nodes meeting at `rdzv_endpoint` under `rdzv_id`."""
    if training.nnodes == 1:
        return ["--standalone", "--nproc-per-node", str(training.num_processes)]
    return ["--nnodes", str(training.nnodes), "--nproc-per-node", str(training.num_processes),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", training.rdzv_endpoint, "--rdzv-id", rdzv_id]


def training_command(training: TrainingConfig, spec_path: str, rdzv_id: str, python: str = sys.executable) -> list[str]:
    """The command line that runs one training: torchrun when asked for or when there are several processes.

    `rdzv_id` names the torchrun rendezvous that every node of one training joins (the training fingerprint).
    """
    if training.launcher == "torchrun" or training.num_processes > 1:
        return [python, "-m", "torch.distributed.run", *torchrun_arguments(training, rdzv_id), *TRAINING_PROGRAM, spec_path]
    return [python, *TRAINING_PROGRAM, spec_path]


def stop_signal(exit_status: int) -> str | None:
    """The name of the stop request (`STOP_SIGNALS`) that ended the training program with `exit_status` (128 + the
    signal when it stopped itself, minus the signal when the signal killed it); None for any other end."""
    number = exit_status - 128 if exit_status > 128 else -exit_status
    return next((sig.name for sig in STOP_SIGNALS if sig == number), None)


def _env(k8s: K8sConfig) -> list[dict[str, Any]]:
    plain = [{"name": name, "value": value} for name, value in k8s.env.items()]
    secret = [{"name": name, "valueFrom": {"secretKeyRef": {"name": ref.secret, "key": ref.key}}}
              for name, ref in k8s.secret_env.items()]
    return plain + secret


def _resources(k8s: K8sConfig) -> dict[str, dict[str, str]]:
    requests = {key: value for key, value in (("cpu", k8s.cpu), ("memory", k8s.memory)) if value}
    limits = {"memory": k8s.memory} if k8s.memory else {}
    if k8s.gpus:
        limits["nvidia.com/gpu"] = str(k8s.gpus)
    return {key: value for key, value in (("requests", requests), ("limits", limits)) if value}


def pod_spec(k8s: K8sConfig, command: list[str]) -> dict[str, Any]:
    """The training pod's spec (Kubernetes API field names), checked against the API's models."""
    container = {
        "name": CONTAINER_NAME,
        "image": k8s.image,
        "command": command,
        "env": _env(k8s),
        "resources": _resources(k8s),
        "volumeMounts": k8s.volume_mounts,
    }
    spec = {
        "containers": [{key: value for key, value in container.items() if value}],
        "restartPolicy": "Never",
        "serviceAccountName": k8s.service_account,
        "nodeSelector": k8s.node_selector,
        "tolerations": k8s.tolerations,
        "volumes": k8s.volumes,
        "imagePullSecrets": [{"name": name} for name in k8s.image_pull_secrets],
    }
    spec = {key: value for key, value in spec.items() if value}
    check_pod_spec(spec)
    return spec


def check_pod_spec(spec: dict[str, Any]) -> None:
    """Raise PodSpecError for a field the Kubernetes V1PodSpec model does not know, or a missing required one."""
    from kubernetes.client import ApiClient, Configuration

    class Response:
        data = json.dumps(spec)

    lenient = Configuration()
    lenient.client_side_validation = False
    client = ApiClient(lenient)
    unknown = _unknown_fields(spec, client.sanitize_for_serialization(client.deserialize(Response(), "V1PodSpec")))
    if unknown:
        raise PodSpecError(f"training pod spec: unknown field(s) {', '.join(unknown)} (check training.k8s in task.yaml)")
    try:
        ApiClient().deserialize(Response(), "V1PodSpec")
    except (ValueError, TypeError) as error:
        raise PodSpecError(f"training pod spec: {error} (check training.k8s in task.yaml)") from None


def _unknown_fields(given: Any, understood: Any, path: str = "") -> list[str]:
    """Fields of `given` that did not survive a round trip through the Kubernetes models."""
    if isinstance(given, dict):
        items, kept = given.items(), understood if isinstance(understood, dict) else {}
    elif isinstance(given, list):
        items, kept = enumerate(given), dict(enumerate(understood)) if isinstance(understood, list) else {}
    else:
        return []
    unknown = []
    for key, value in items:
        if key in kept:
            unknown += _unknown_fields(value, kept[key], f"{path}{key}.")
        else:
            unknown.append(f"{path}{key}")
    return unknown
