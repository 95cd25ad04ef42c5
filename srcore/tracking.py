"""The only module that talks to MLflow: runs, metrics, images, models and the registry.

Stages run in separate processes (dvc repro spawns `srgan <stage>`), so a pipeline execution is
grouped by a parent run whose id travels in the SRGAN_PARENT_RUN_ID environment variable.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

PARENT_ENV = "SRGAN_PARENT_RUN_ID"
DEFAULT_URI = "sqlite:///mlflow.db"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set (a server, another store), else the local SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


def configure(experiment: str) -> str:
    """Point MLflow at the store and experiment; returns the experiment id."""
    mlflow.set_tracking_uri(tracking_uri())
    exp = mlflow.set_experiment(experiment)
    return exp.experiment_id


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except OSError:
        return None
    return out.stdout.strip() or None


class Tracker:
    """What a stage may log; a thin facade so training code never imports mlflow."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._client = MlflowClient()

    def log_params(self, params: Mapping[str, Any]) -> None:
        existing = self._client.get_run(self.run_id).data.params
        fresh = {k: v for k, v in params.items() if k not in existing}
        if fresh:
            mlflow.log_params({k: str(v) for k, v in fresh.items()}, run_id=self.run_id)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if np.isfinite(v)}
        if clean:
            mlflow.log_metrics(clean, step=step, run_id=self.run_id)

    def log_image(self, image: np.ndarray, name: str) -> None:
        self._client.log_image(self.run_id, image, artifact_file=name)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), folder)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self._client.set_tag(self.run_id, k, str(v))

    def log_generator(self, model: Any, name: str, register: bool,
                      tags: Mapping[str, Any] | None = None) -> str | None:
        """Log G as a pickled PyTorch model (any input size) and optionally register it.

        The default pt2 format would fix batch, height and width to the example's; the pickle
        format keeps the network fully convolutional. Returns the registered version, if any.
        """
        import torch
        from mlflow.models.signature import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]),
        )
        model = model.to("cpu", memory_format=torch.contiguous_format).eval()
        with _active(self.run_id):
            info = mlflow.pytorch.log_model(
                model,
                name=name,
                signature=signature,
                serialization_format="pickle",
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "srgan-pipeline"],
                registered_model_name=name if register else None,
            )
        version = getattr(info, "registered_model_version", None)
        if register and version is not None and tags:
            for k, v in tags.items():
                self._client.set_model_version_tag(name, str(version), k, str(v))
        return None if version is None else str(version)


@contextlib.contextmanager
def _active(run_id: str) -> Iterator[None]:
    """Make run_id the active run for APIs without a run_id argument (log_model)."""
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    with mlflow.start_run(run_id=run_id, nested=active is not None):
        yield


@contextlib.contextmanager
def stage_run(experiment: str, stage: str, resume_run_id: str | None = None) -> Iterator[Tracker]:
    """One MLflow run per stage, nested under the pipeline's parent run when there is one.

    `resume_run_id` continues a killed stage's run, so a resumed training has one history.
    """
    configure(experiment)
    parent = os.environ.get(PARENT_ENV)
    tags = {"stage": stage}
    commit = _git_commit()
    if commit:
        tags["git_commit"] = commit
    nested = mlflow.active_run() is not None  # in-process under the pipeline run
    if resume_run_id:
        run = mlflow.start_run(run_id=resume_run_id, nested=nested)
    else:
        run = mlflow.start_run(run_name=stage, parent_run_id=parent, tags=tags, nested=nested)
    status = "FAILED"
    try:
        yield Tracker(run.info.run_id)
        status = "FINISHED"
    finally:
        # A killed process never gets here, which leaves the run RUNNING for resume to reuse.
        mlflow.end_run(status=status)


@contextlib.contextmanager
def pipeline_run(experiment: str, name: str = "pipeline") -> Iterator[str]:
    """Parent run for one pipeline execution; exports its id for the stage processes."""
    configure(experiment)
    previous = os.environ.get(PARENT_ENV)
    tags = {"stage": "pipeline"}
    commit = _git_commit()
    if commit:
        tags["git_commit"] = commit
    with mlflow.start_run(run_name=name, tags=tags) as run:
        os.environ[PARENT_ENV] = run.info.run_id
        try:
            yield run.info.run_id
        finally:
            if previous is None:
                os.environ.pop(PARENT_ENV, None)
            else:
                os.environ[PARENT_ENV] = previous


def log_to_run(run_id: str, metrics: Mapping[str, float]) -> None:
    """Log final metrics onto an existing run (the pipeline parent run)."""
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, run_id=run_id)


def load_generator(uri: str) -> Any:
    """Load a logged generator (e.g. models:/srgan/1 or models:/srgan@champion)."""
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.pytorch.load_model(uri, map_location="cpu")


def latest_version(name: str) -> str | None:
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException:
        return None
    newest = max((int(v.version) for v in versions), default=None)
    return None if newest is None else str(newest)
