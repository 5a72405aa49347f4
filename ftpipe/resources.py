"""Resources: what differs between a laptop, a cluster and a test (MLflow tracking, training pods, the model hub).

Tests swap them (e.g. a pod client that runs the pod's command here) instead of patching code.
"""

from pathlib import Path
from typing import Any, Optional

import dagster as dg


class MlflowTracking(dg.ConfigurableResource):
    """Where training runs are tracked and models registered: `MLFLOW_TRACKING_URI`, else SQLite under `$FTPIPE_HOME`.

    Run links open the tracking server's own UI, or `ui_url` (`make mlflow-ui`) for a store that is not a server.
    """

    tracking_uri: Optional[str] = None
    ui_url: str = "http://127.0.0.1:5000"

    def uri(self) -> str:
        from ftpipe.core.tracking import tracking_uri

        return self.tracking_uri or tracking_uri()

    @staticmethod
    def experiment(task: str) -> str:
        return f"ftpipe-{task}"

    def run_url(self, run_id: str) -> str:
        """The run's page in the MLflow UI that shows this store."""
        from ftpipe.core.tracking import run_page, without_credentials

        uri = self.uri()
        ui = without_credentials(uri) if uri.startswith(("http://", "https://")) else self.ui_url
        return run_page(ui, run_id, uri)

    def log_evaluation(self, run_id: str, report: dict[str, Any], gate: dict[str, Any]) -> None:
        """Log an evaluation, and the gate thresholds it was decided with, to the training run it judged."""
        from ftpipe.core.tracking import log_evaluation

        log_evaluation(run_id, report, self.uri(), gate)

    def register_model(self, *, task: str, model_path: Path, run_id: str, eval_score: float, eval_version: str,
                       scores: dict[str, Any]) -> dict[str, Any]:
        """Register a servable model of `task` (once per folder); `champion` follows the best (`registry.beats`)."""
        from ftpipe.core.registry import register_model

        return register_model(task=task, model_path=model_path, run_id=run_id, eval_score=eval_score,
                              eval_version=eval_version, scores=scores, tracking_uri=self.uri())

    def registered_folders(self, task: str) -> set[str]:
        """The folder names of the task's `champion` and `candidate` models: what pruning must keep."""
        from ftpipe.core.registry import aliased_model_names

        return aliased_model_names(task, self.uri())

    def mark_removed_versions(self, task: str) -> list[int]:
        """Tag `files: removed` the registered versions of `task` whose folder pruning removed; return them."""
        from ftpipe.core.registry import mark_removed_versions

        return mark_removed_versions(task, self.uri())


class TrainingPods(dg.ConfigurableResource):
    """Runs a training pod on Kubernetes through Dagster Pipes (`dagster-k8s`'s PipesK8sClient).

    Without settings it uses the in-cluster configuration inside a cluster, else the default kubeconfig.
    """

    load_incluster_config: Optional[bool] = None
    kubeconfig_file: Optional[str] = None
    kube_context: Optional[str] = None

    def run(self, *, context: dg.AssetExecutionContext, namespace: str, pod_spec: dict[str, Any],
            env: dict[str, str]) -> dg.PipesClientCompletedInvocation:
        from dagster_k8s import PipesK8sClient

        client = PipesK8sClient(load_incluster_config=self.load_incluster_config,
                                kubeconfig_file=self.kubeconfig_file, kube_context=self.kube_context)
        return client.run(context=context, namespace=namespace, base_pod_spec=pod_spec, env=env)


class ModelHub(dg.ConfigurableResource):
    """Access to a model hub for base models given as hub ids; the token comes from `HF_TOKEN`."""

    token: Optional[str] = None


def default_resources() -> dict:
    return {
        "mlflow": MlflowTracking(),
        "hub": ModelHub(token=dg.EnvVar("HF_TOKEN") if _has_env("HF_TOKEN") else None),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
        "training_pods": TrainingPods(),
    }


def _has_env(name: str) -> bool:
    import os

    return bool(os.environ.get(name))
