"""Resources: MLflow tracking, the model hub token, and the Pipes launcher for training."""

from typing import Optional

import dagster as dg


class MlflowTracking(dg.ConfigurableResource):
    """Where training runs are tracked: `MLFLOW_TRACKING_URI`, else SQLite under `$FTPIPE_HOME`."""

    tracking_uri: Optional[str] = None

    def uri(self) -> str:
        from ftpipe.core.tracking import tracking_uri

        return self.tracking_uri or tracking_uri()

    @staticmethod
    def experiment(task: str) -> str:
        return f"ftpipe-{task}"

    def run_url(self, run_id: str) -> str:
        """A link to the run, when the store is an MLflow server; else the `make mlflow-ui` hint."""
        from ftpipe.core.tracking import redact_uri

        uri = self.uri()
        if uri.startswith("http"):
            return f"{redact_uri(uri).rstrip('/')}/#/experiments/runs/{run_id}"
        return f"run {run_id} (open with: make mlflow-ui, http://127.0.0.1:5000)"


class ModelHub(dg.ConfigurableResource):
    """Access to a model hub for base models given as hub ids; the token comes from `HF_TOKEN`."""

    token: Optional[str] = None


def default_resources() -> dict:
    return {
        "mlflow": MlflowTracking(),
        "hub": ModelHub(token=dg.EnvVar("HF_TOKEN") if _has_env("HF_TOKEN") else None),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    }


def _has_env(name: str) -> bool:
    import os

    return bool(os.environ.get(name))
