"""The Prefect flow in this process against the session's real Prefect server (started by
conftest's `prefect_api`): deployment registration, the workspace lock, the
download retry policy and overlays.

The end-to-end run (every stage, MLflow runs, registry gate, run-page artifacts and architecture
rule 1 both ways) is tests/test_schedule.py's scenario, which runs the same flow through its
deployments: a full run costs most of a minute, so it happens once.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from srcore import versioning
from tests.conftest import tiny_params_dict, write_params


def _task_runs(flow_run_id: object) -> dict[str, object]:
    """Task runs of one flow run by name (without Prefect's numeric suffix)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> list[object]:
        async with get_client() as client:
            return await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    return {t.name.rsplit("-", 1)[0]: t for t in asyncio.run(read())}


@pytest.mark.usefixtures("prefect_api")
def test_serve_entry_registers_a_scheduled_deployment(tmp_path: Path) -> None:
    import asyncio

    from prefect.client.orchestration import get_client

    from flows.pipeline import deployment

    # Not "nightly": the session's server also holds test_schedule.py's served deployment.
    deployment_id = deployment("entry-check", "0 3 * * *", "params.yaml", str(tmp_path),
                               ["evaluate"]).apply()

    async def read() -> object:
        async with get_client() as client:
            return await client.read_deployment(deployment_id)

    registered = asyncio.run(read())
    assert registered.name == "entry-check"
    assert [s.schedule.cron for s in registered.schedules] == ["0 3 * * *"]
    assert registered.parameters == {"params_path": "params.yaml", "root": str(tmp_path),
                                     "force": ["evaluate"], "overlay": None}
    # `force` offers exactly the DVC stages, so the UI shows a choice, not free text.
    schema = registered.parameter_openapi_schema["properties"]
    assert schema["force"]["anyOf"][0]["items"]["enum"] == list(versioning.STAGES)
    assert "overlay" in schema


@pytest.mark.usefixtures("prefect_api")
def test_second_run_on_a_busy_workspace_stops_clearly(tmp_path: Path) -> None:
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
        (tmp_path / "paper.yaml").write_text("pretrain: {iterations: 7}\n")
        with pytest.raises(WorkspaceBusy):
            pipeline(params_path="params.yaml", root=str(tmp_path), overlay="paper.yaml")
        # The overlay is applied under the lock: the busy run left params.yaml alone.
        assert params.read_text() == (Path(__file__).parents[1] / "params.yaml").read_text()
    finally:
        holder.kill()
        holder.wait()
    with workspace_lock(tmp_path, timeout_s=0):  # free again once the holder is gone
        pass


def test_only_network_errors_earn_download_retries(tmp_path: Path) -> None:
    from prefect.states import Failed

    from flows.pipeline import StageFailed, download, retry_only_transient
    from srcore.data.download import DownloadError
    from srcore.data.download import download as fetch
    from tests.conftest import free_port
    from tests.test_download import http_servers, send_status

    def raised_by(url: str) -> DownloadError:
        with pytest.raises(DownloadError) as err:
            fetch(url, tmp_path / "x.zip", retries=1, backoff=0.01, progress=False)
        return err.value

    def retried(err: BaseException) -> bool:
        return bool(retry_only_transient(None, None, Failed(data=err)))

    assert download.retries == 2 and download.retry_condition_fn is retry_only_transient
    with http_servers() as start:
        url_404, _ = start(lambda h, i: send_status(h, 404))
        url_503, _ = start(lambda h, i: send_status(h, 503))
        # A 404 (any 4xx but 408/429) cannot succeed later: no 30 s + 2 min of waiting for it.
        assert not retried(raised_by(url_404))
        assert retried(raised_by(url_503))
    assert retried(raised_by(f"http://127.0.0.1:{free_port()}/x.zip"))  # nobody listening
    assert retried(TimeoutError("read timed out"))
    assert not retried(StageFailed("stage 'download' failed: no such folder"))


@pytest.mark.usefixtures("prefect_api")
def test_what_params_can_tell_stops_the_flow_before_its_first_task(
        project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown dataset name, a missing local source, or a VGG loss without VGG weights:
    the run fails before any task (the issue's `data.test: [nosuchset]` was reported only
    after every training set was fetched), naming the params file and the fix."""
    from flows.pipeline import pipeline

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no VGG19 here; fetching off
    (project / "vgg.yaml").write_text(yaml.safe_dump({"finetune": {"content_loss": "vgg22"}}))
    cases = [
        ({"test": ["nosuchset"]}, None,
         "params.yaml: dataset 'nosuchset' in data.test is not in the dataset registry"),
        ({"train": [{"name": "mine", "url": "nowhere"}]}, None,
         f"params.yaml: dataset 'mine' in data.train: {project / 'nowhere'} does not exist"),
        ({}, "vgg.yaml", "finetune.content_loss is vgg22, but the VGG19 ImageNet weights are "
                         "not at"),
    ]
    for data, overlay, needle in cases:
        write_params(project / "params.yaml", tiny_params_dict(data=data))
        before = (project / "params.yaml").read_text()
        state = pipeline(params_path="params.yaml", root=str(project), overlay=overlay,
                         return_state=True)
        assert state.is_failed()
        assert needle in state.message, state.message
        assert _task_runs(state.state_details.flow_run_id) == {}  # not even the download
        assert not (project / "data").exists()
        # a refused overlay leaves params.yaml as it was: nothing ran on the merged one
        assert (project / "params.yaml").read_text() == before


@pytest.mark.usefixtures("prefect_api")
def test_a_bad_data_source_fails_its_task_once_and_names_the_stage(project: Path,
                                                                   tmp_path: Path) -> None:
    import time

    from flows.pipeline import pipeline

    (tmp_path / "notes.txt").write_text("not an archive")  # exists: only fetching finds out
    write_params(project / "params.yaml", tiny_params_dict(
        data={"train": [{"name": "mine", "url": str(tmp_path / "notes.txt")}]}))
    started = time.perf_counter()
    state = pipeline(params_path="params.yaml", root=str(project), return_state=True)
    assert state.is_failed()
    # What the Prefect UI shows for the run: the stage, the dataset and the path.
    assert "stage 'download' failed: dataset 'mine'" in state.message, state.message
    tasks = _task_runs(state.state_details.flow_run_id)
    assert tasks["download datasets"].state.is_failed()
    assert tasks["download datasets"].run_count == 1  # not retried: a retry cannot help
    assert not any(name.startswith("dvc repro") for name in tasks)
    assert time.perf_counter() - started < 25  # a retry would first wait 30 s


def test_run_takes_the_lock_before_prefect_starts(
        project: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Two first runs on a fresh PREFECT_HOME raced while Prefect created its database: the
    lock is held before the flow is called (Prefect's API starts there), and the busy message
    names an option that exists."""
    import sys

    from filelock import FileLock, Timeout

    import flows.pipeline as module

    called: dict[str, object] = {}

    def flow_stand_in(**kwargs: object) -> str:
        with pytest.raises(Timeout):  # held, by this process, for the whole call
            FileLock(project / ".srgan.lock").acquire(timeout=0)
        called.update(kwargs)
        return "table"

    monkeypatch.setattr(module, "pipeline", flow_stand_in)
    assert module.main(["run", "--lock-timeout", "2.5"]) == 0
    assert called["lock_timeout_s"] == 2.5
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import time; from filelock import FileLock; "
         f"lock = FileLock({str(project / '.srgan.lock')!r}); lock.acquire(); "
         "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        called.clear()
        assert module.main(["run"]) == 2
        err = capsys.readouterr().err
        assert "another srgan run is using" in err and "--lock-timeout SECONDS" in err
        assert called == {}
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.usefixtures("prefect_api")
def test_an_overlay_that_makes_params_valid_is_checked_after_it_is_applied(
        project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`run --overlay` checks the merged params, not params.yaml alone: an overlay may repair
    what the base file would be refused for."""
    import flows.pipeline as flow_module

    write_params(project / "params.yaml", tiny_params_dict(data={"test": ["nosuchset"]}))
    (project / "fix.yaml").write_text(yaml.safe_dump({"data": {"test": ["sample_test"]}}))
    called: dict[str, object] = {}
    monkeypatch.setattr(flow_module, "pipeline", lambda **kw: called.update(kw) or "")
    assert flow_module.main(["run", "--overlay", "fix.yaml"]) == 0
    assert called["overlay"] == "fix.yaml"


def test_a_refused_overlay_stops_before_any_work(project: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from flows.pipeline import main

    (project / "typo.yaml").write_text(yaml.safe_dump({"pretrain": {"iterationz": 10}}))
    before = (project / "params.yaml").read_text()
    assert main(["run", "--overlay", "typo.yaml"]) == 2
    err = capsys.readouterr().err
    assert "srgan pipeline: error:" in err and "key 'pretrain.iterationz'" in err
    assert (project / "params.yaml").read_text() == before
    assert not (project / "data").exists()
