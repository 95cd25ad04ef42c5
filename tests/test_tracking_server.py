"""Remote tracking: the same `srgan pretrain` logs, registers and serves its model through a
real `mlflow server` over HTTP (SQLite backend, artifacts proxied by the server)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from srcore import cli, tracking
from srcore.training import checkpoints
from tests.conftest import (
    free_port,
    make_prepared_sets,
    stop_process,
    tiny_params_dict,
    wait_for_http,
    write_params,
)


@pytest.fixture
def server(tmp_path: Path, mlflow_template: Path) -> Iterator[tuple[str, Path]]:
    """`mlflow server` on a free port; a copy of the ready-made SQLite store skips migrations.

    Yields (http URI, artifact folder). Stopped (its whole process group) at the end.
    """
    store = tmp_path / "server"
    store.mkdir()
    shutil.copyfile(mlflow_template, store / "mlflow.db")
    port = free_port()
    log = (store / "server.log").open("w")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--serve-artifacts", "--artifacts-destination", str(store / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{uri}/health", proc, store / "server.log", 120)
        yield uri, store / "artifacts"
    finally:
        stop_process(proc, group=True, timeout_s=20)  # the CLI and its uvicorn worker
        log.close()


def _project(root: Path) -> Path:
    make_prepared_sets(root)
    return write_params(root / "params.yaml",
                        tiny_params_dict(data={"train": ["tr"], "val": ["va"], "test": ["te"]}))


def test_pretrain_logs_registers_and_serves_through_an_http_tracking_server(
        tmp_path: Path, server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    uri, artifacts = server
    root = tmp_path / "proj"
    params_path = _project(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("SRGAN_PARENT_RUN_ID", raising=False)
    monkeypatch.chdir(root)
    timings: dict[str, float] = {}
    real_log = tracking.Tracker.log_generator

    def timed(self: tracking.Tracker, *args: Any, **kwargs: Any) -> str | None:
        t0 = time.perf_counter()
        try:
            return real_log(self, *args, **kwargs)
        finally:
            timings["log_and_register"] = time.perf_counter() - t0

    monkeypatch.setattr(tracking.Tracker, "log_generator", timed)
    t0 = time.perf_counter()
    assert cli.main(["--params", str(params_path), "--root", str(root), "pretrain"]) == 0
    timings["stage"] = time.perf_counter() - t0
    assert "registered srresnet version 1" in capsys.readouterr().out

    t0 = time.perf_counter()
    mlflow.set_tracking_uri(uri)
    served = mlflow.pytorch.load_model("models:/srresnet/1", map_location="cpu")
    timings["load"] = time.perf_counter() - t0
    local = checkpoints.load_generator_file(root / "models" / "srresnet.pt")
    with torch.no_grad():
        for h, w in ((10, 12), (7, 9)):
            x = torch.rand(2, 3, h, w)
            out = served(x)
            assert out.shape == (2, 3, 4 * h, 4 * w)
            torch.testing.assert_close(out, local(x))  # the weights the stage wrote

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(client.get_model_version("srresnet", "1").run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "pretrain"
    assert "pretrain/loss_mse" in run.data.metrics and "pretrain/val_psnr_y" in run.data.metrics
    assert run.data.params["distributed.world_size"] == "1"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # uploaded over HTTP
    assert any(artifacts.rglob("MLmodel")) and any(artifacts.rglob("*_img00.png"))
    assert not (root / "mlruns").exists() and not (root / "mlflow.db").exists()
    print("tracking server round trip (s): " + ", ".join(f"{k} {v:.2f}"
                                                       for k, v in timings.items()))
