"""The Prefect flow end to end at tiny size: real Prefect harness, SQLite MLflow, DVC repo.

Architecture rule 1 is checked both ways: after the flow `dvc status` is clean, and after
`dvc repro` the flow recomputes nothing.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from srcore import tracking, versioning


@pytest.fixture(scope="module")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def _latest_artifact(key: str) -> str:
    """The run page's artifact as the Prefect server stores it."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read() -> str:
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
            return str(found[-1].data) if found else ""

    return asyncio.run(read())


def _mtimes(root: Path) -> dict[str, int]:
    outs = ["models/srresnet.pt", "models/srgan.pt", "metrics/evaluate.json",
            "prepared/manifest.json"]
    return {o: (root / o).stat().st_mtime_ns for o in outs}


@pytest.mark.slow
def test_flow_end_to_end_and_both_doors_agree(project: Path, tmp_path: Path,
                                              prefect_harness: None) -> None:
    from flows.pipeline import pipeline

    subprocess.run(["dvc", "remote", "add", "-f", "-d", "local", str(tmp_path / "remote")],
                   cwd=project, check=True, capture_output=True)
    markdown = pipeline(params_path="params.yaml", root=str(project))

    summary = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert set(summary["sample_test"]) == {"bicubic", "srresnet", "srgan"}
    assert set(summary["sample_test"]["srgan"]) == {"psnr_y", "ssim_y", "ssim_daala_y"}
    assert "| sample_test | srresnet |" in markdown
    assert (project / "reports" / "grid_sample_test.png").is_file()
    assert (project / "plots" / "evaluate.csv").read_text().startswith("set,image,method")
    assert (project / "data.dvc").is_file() and (tmp_path / "remote").is_dir()

    client = MlflowClient()
    for name in ("srresnet", "srgan"):
        versions = client.search_model_versions(f"name = '{name}'")
        assert [str(v.version) for v in versions] == ["1"]
        assert versions[0].tags["data_version"] == versioning.data_version(project)
        # The evaluate stage tagged the version with its numbers and ran the gate.
        assert float(versions[0].tags["metric.sample_test.psnr_y"]) == pytest.approx(
            summary["sample_test"][name]["psnr_y"])
        assert versions[0].tags["gate_decision"] == "promoted"
        assert tracking.aliases(name) == {"champion": "1", "challenger": "1"}
    runs = client.search_runs(client.get_experiment_by_name("srgan-pipeline").experiment_id)
    parents = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    assert len(parents) == 1
    children = {r.data.tags["stage"] for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert children == {"download", "prepare", "pretrain", "finetune", "evaluate"}
    assert "sample_test/srgan/psnr_y" in parents[0].data.metrics
    artifact = _latest_artifact("srgan-metrics")
    assert "| sample_test | srgan |" in artifact
    assert f"/runs/{parents[0].info.run_id})" in artifact
    assert "[evaluate run](" in artifact and "registered [srgan](" in artifact
    assert "grid_sample_test" in artifact and "v1 @champion" in artifact

    # Door 1 -> door 2: nothing left for `dvc repro` to do.
    assert versioning.status(project) == {}
    before = _mtimes(project)
    out = subprocess.run(["dvc", "repro"], cwd=project, check=True, capture_output=True,
                         text=True).stdout
    assert "Running stage" not in out
    assert _mtimes(project) == before

    # Door 2 -> door 1: a change made through `dvc repro` is not recomputed by the flow.
    params = (project / "params.yaml").read_text().replace("grid_images: 1", "grid_images: 2")
    (project / "params.yaml").write_text(params)
    out = subprocess.run(["dvc", "repro"], cwd=project, check=True, capture_output=True,
                         text=True).stdout
    assert "Running stage 'evaluate'" in out and "Running stage 'pretrain'" not in out
    after_repro = _mtimes(project)
    pipeline(params_path="params.yaml", root=str(project), skip_download=True)
    assert _mtimes(project) == after_repro
    assert versioning.status(project) == {}
    assert len(client.search_model_versions("name = 'srgan'")) == 1


def test_serve_entry_registers_a_scheduled_deployment(prefect_harness: None,
                                                      tmp_path: Path) -> None:
    import asyncio

    from prefect.client.orchestration import get_client

    from flows.pipeline import deployment

    deployment_id = deployment("nightly", "0 3 * * *", "params.yaml", str(tmp_path),
                               ["evaluate"]).apply()

    async def read() -> object:
        async with get_client() as client:
            return await client.read_deployment(deployment_id)

    registered = asyncio.run(read())
    assert registered.name == "nightly"
    assert [s.schedule.cron for s in registered.schedules] == ["0 3 * * *"]
    assert registered.parameters == {"params_path": "params.yaml", "root": str(tmp_path),
                                     "force": ["evaluate"]}


def test_second_run_on_a_busy_workspace_stops_clearly(tmp_path: Path,
                                                      prefect_harness: None) -> None:
    import sys
    import time

    from flows.pipeline import WorkspaceBusy, pipeline, workspace_lock

    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from filelock import FileLock; "
         f"lock = FileLock({str(tmp_path / '.srgan.lock')!r}); lock.acquire(); "
         "print('held', flush=True); "
         "time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        start = time.perf_counter()
        with pytest.raises(WorkspaceBusy, match=r"\.srgan\.lock"), \
                workspace_lock(tmp_path, timeout_s=0.5):
            pass
        assert 0.4 < time.perf_counter() - start < 5  # it waited, then stopped
        params = tmp_path / "params.yaml"
        params.write_text((Path(__file__).parents[1] / "params.yaml").read_text())
        with pytest.raises(WorkspaceBusy):
            pipeline(params_path="params.yaml", root=str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    with workspace_lock(tmp_path, timeout_s=0):  # free again once the holder is gone
        pass
