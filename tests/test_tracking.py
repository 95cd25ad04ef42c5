"""MLflow through srcore.tracking, against a real SQLite store."""

from __future__ import annotations

import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from srcore import tracking
from srcore.models.srresnet import SRResNet


def test_registered_generator_upscales_two_sizes(mlflow_store: str) -> None:
    model = SRResNet(blocks=1, channels=8, scale=4, global_skip=True).eval()
    with tracking.stage_run("t", "pretrain") as tracker:
        version = tracker.log_generator(model, "srgan", register=True,
                                        tags={"data_version": "abc.dir"})
    assert version == "1"
    loaded = tracking.load_generator("models:/srgan/1")
    for h, w in ((10, 12), (17, 9)):
        x = torch.rand(2, 3, h, w)
        out = loaded(x)
        assert out.shape == (2, 3, 4 * h, 4 * w)
        torch.testing.assert_close(out, model(x))
    mv = MlflowClient().get_model_version("srgan", "1")
    assert mv.tags["data_version"] == "abc.dir"
    assert tracking.latest_version("srgan") == "1"


def test_stage_runs_nest_under_the_pipeline_run(mlflow_store: str) -> None:
    with tracking.pipeline_run("t") as parent, tracking.stage_run("t", "prepare") as tracker:
        tracker.log_metrics({"x": 1.0}, step=3)  # a NaN is refused: test_registry
        tracker.log_params({"a": 1})
        tracker.log_params({"a": 2})  # already logged: kept, not an MLflow error
        tracker.log_image(np.zeros((8, 8, 3), np.uint8), "img/zero.png")
    run = MlflowClient().get_run(tracker.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.metrics == {"x": 1.0}
    assert run.data.params == {"a": "1"}
    assert run.info.status == "FINISHED"
    names = [a.path for a in MlflowClient().list_artifacts(tracker.run_id, "img")]
    assert names == ["img/zero.png"]


def test_failed_stage_is_marked_failed_and_resume_continues_the_run(mlflow_store: str) -> None:
    with pytest.raises(RuntimeError), tracking.stage_run("t", "pretrain") as tracker:
        tracker.log_metrics({"loss": 1.0}, step=1)
        raise RuntimeError("boom")
    assert MlflowClient().get_run(tracker.run_id).info.status == "FAILED"
    with tracking.stage_run("t", "pretrain", resume_run_id=tracker.run_id) as again:
        again.log_metrics({"loss": 0.5}, step=2)
    assert again.run_id == tracker.run_id
    history = MlflowClient().get_metric_history(tracker.run_id, "loss")
    assert [m.step for m in history] == [1, 2]
    assert mlflow.active_run() is None


def test_a_repository_without_commits_has_no_git_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.chdir(tmp_path)
    assert tracking._git_commit() is None  # not the literal "HEAD" git prints there


def test_artifacts_live_beside_the_store_whatever_the_cwd(
        mlflow_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's default puts a new experiment's artifacts in ./mlruns of whoever creates it:
    tests run from the repo wrote model folders into the project's own mlruns/."""
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    before = sorted(p.name for p in (repo / "mlruns").glob("*")) \
        if (repo / "mlruns").is_dir() else []
    with tracking.stage_run("t", "prepare") as tracker:
        tracker.log_image(np.zeros((8, 8, 3), np.uint8), "img/zero.png")
    exp = MlflowClient().get_experiment_by_name("t")
    assert Path(exp.artifact_location).is_relative_to(tmp_path)  # the store's folder
    run = MlflowClient().get_run(tracker.run_id)
    assert Path(run.info.artifact_uri).is_relative_to(tmp_path / "mlruns")
    after = sorted(p.name for p in (repo / "mlruns").glob("*")) \
        if (repo / "mlruns").is_dir() else []
    assert after == before


def test_a_store_copied_from_another_workspace_is_refused(
        mlflow_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copied workspace's mlflow.db records the original's absolute artifact paths: logging
    through it would write into the original's mlruns/. Said, with the way out."""
    import shutil

    with tracking.stage_run("t", "prepare"):
        pass
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copyfile(tmp_path / "mlflow.db", copy / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{copy / 'mlflow.db'}")
    with pytest.raises(tracking.ForeignArtifactStore) as err:
        tracking.configure("t")
    message = str(err.value)
    assert str(tmp_path / "mlruns") in message and f"outside {copy}" in message
    assert "Move mlflow.db (and mlruns/) aside" in message
