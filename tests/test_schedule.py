"""Scheduled retraining against a real Prefect server, the way an operator leaves it running.

`prefect server start` on 127.0.0.1 (conftest's session fixture); the
deployment is served by `python -m flows.pipeline serve` in a subprocess and also deployed
from prefect.yaml to a `process` work pool polled by `prefect worker start`, exactly the
README's commands. Runs are triggered through the API and timed from their Prefect states.

A full pipeline run costs most of a minute on 2 cores, so one scenario carries every claim
in order, including architecture rule 1 both ways (after a run `dvc repro` has nothing to do;
after `dvc repro` a scheduled run recomputes nothing).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import BIN, REPO, make_images, stop_process, tiny_params_dict, write_params

FLOW = "srgan-pipeline"
SERVED = "nightly"  # what `python -m flows.pipeline serve` registers
POOLED = "nightly-pool"  # what prefect.yaml deploys
POOL = "srgan-process"

def _api(call: Any) -> Any:
    """Run `call(client)` against the session's server (the settings point at it)."""
    import asyncio

    from prefect.client.orchestration import get_client

    async def go() -> Any:
        async with get_client() as client:
            return await call(client)

    return asyncio.run(go())


def _client_env(api_url: str, home: Path) -> dict[str, str]:
    """Environment of the serve and worker processes: this server, quick polling, and a
    TORCH_HOME without VGG weights (the failing-stage step relies on it)."""
    (home / "torch").mkdir(parents=True, exist_ok=True)
    return {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(home / "prefect"),
            "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_LOGGING_LEVEL": "INFO", "TORCH_HOME": str(home / "torch")}


@contextlib.contextmanager
def background(cmd: list[str], cwd: Path, env: dict[str, str],
               log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A long-running operator command (serve, worker), stopped like Ctrl-C at the end."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            stop_process(proc)


def _wait_for_deployment(name: str, procs: list[subprocess.Popen[bytes]], logs: list[Path],
                         timeout_s: float = 120) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc, log in zip(procs, logs, strict=True):
            assert proc.poll() is None, f"{proc.args} exited:\n{log.read_text()[-3000:]}"
        with contextlib.suppress(Exception):
            return _api(lambda c: c.read_deployment_by_name(name))
        time.sleep(0.5)
    raise AssertionError(f"deployment {name} never appeared")


def _trigger(deployment: str, parameters: dict[str, Any] | None = None,
             timeout_s: float = 400) -> Any:
    """Start a run of the deployment now and wait for its final state; returns the flow run."""
    from prefect.deployments import run_deployment

    started = time.monotonic()
    run = run_deployment(f"{FLOW}/{deployment}", parameters=parameters, timeout=timeout_s,
                         poll_interval=1)
    assert run.state is not None and run.state.is_final(), f"run not finished: {run.state}"
    print(f"[{deployment}] {run.state.name}: flow {_seconds(run):.1f} s, trigger to final "
          f"state {time.monotonic() - started:.1f} s")
    return run


def _seconds(run: Any) -> float:
    """How long the flow ran, from its Prefect states (Running -> final)."""
    return float((run.end_time - run.start_time).total_seconds())


def _by_flow_run(run: Any) -> dict[str, Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return {"flow_run_filter": FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))}


def _task_runs(run: Any) -> dict[str, Any]:
    found = _api(lambda c: c.read_task_runs(**_by_flow_run(run)))
    return {t.name.rsplit("-", 1)[0]: t for t in found}


def _artifacts(run: Any) -> dict[str, str]:
    """The run page's artifacts, by key, as the server stores them."""
    found = _api(lambda c: c.read_artifacts(**_by_flow_run(run)))
    return {a.key: str(a.data) for a in found}


def _new_pipeline_run(known: set[str]) -> tuple[Any, set[str]]:
    """The one MLflow pipeline run not in `known` (added to it), and its stage runs' names."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    runs = client.search_runs(
        [client.get_experiment_by_name("srgan-pipeline").experiment_id])
    parents = [r for r in runs if r.data.tags.get("stage") == "pipeline"
               and r.info.run_id not in known]
    assert len(parents) == 1, f"expected one new pipeline run, got {len(parents)}"
    known.add(parents[0].info.run_id)
    stages = {r.data.tags["stage"] for r in runs
              if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    return parents[0], stages


ALL_STAGES = {"download", "prepare", "pretrain", "finetune", "evaluate"}
OUTPUTS = ("models/srresnet.pt", "models/srgan.pt", "metrics/pretrain.json",
           "metrics/finetune.json", "metrics/evaluate.json", "prepared/train/mine/manifest.json",
           "reports/grid_heldout.png", "dvc.lock")


def _fingerprint(root: Path) -> dict[str, tuple[int, str]]:
    """mtime and content of every stage output: unchanged means not even rewritten."""
    return {o: ((root / o).stat().st_mtime_ns,
                hashlib.sha256((root / o).read_bytes()).hexdigest()) for o in OUTPUTS}


def _champions() -> dict[str, dict[str, str]]:
    from srcore import tracking

    return {name: tracking.aliases(name) for name in ("srresnet", "srgan")}


@pytest.mark.slow
def test_scheduled_runs_operators_can_leave_alone(project: Path, tmp_path: Path,
                                                  prefect_api: str) -> None:
    from mlflow.tracking import MlflowClient

    from srcore import tracking, versioning

    # A local-folder data source the operator drops new photos into, small test images.
    source, heldout = tmp_path / "incoming", tmp_path / "heldout"
    make_images(source, 4, size=(64, 48), seed=1)
    make_images(heldout, 2, size=(64, 48), seed=2)
    write_params(project / "params.yaml", tiny_params_dict(data={
        "train": [{"name": "mine", "url": str(source)}],
        "test": [{"name": "heldout", "url": str(heldout)}]}))
    subprocess.run(["dvc", "remote", "add", "-f", "-d", "local", str(tmp_path / "remote")],
                   cwd=project, check=True, capture_output=True)
    env = _client_env(prefect_api, tmp_path / "clients")
    timings: dict[str, float] = {}
    known: set[str] = set()
    prefect = str(BIN / "prefect")
    logs = [tmp_path / "serve.log", tmp_path / "worker.log"]

    shutil.copyfile(REPO / "prefect.yaml", project / "prefect.yaml")

    # The README's commands, from the project root: serve the deployment; create the work
    # pool, deploy prefect.yaml and start a worker. Both start while nothing else runs.
    with background([sys.executable, "-m", "flows.pipeline", "serve", "--cron", "0 3 * * *"],
                    project, env, logs[0]) as serve, \
            background(["sh", "-c", f"{prefect} work-pool create {POOL} --type process && "
                        f"{prefect} --no-prompt deploy --all && "
                        f"exec {prefect} worker start --pool {POOL} --limit 1"],
                       project, env, logs[1]) as worker:
        started = time.monotonic()
        served = _wait_for_deployment(f"{FLOW}/{SERVED}", [serve, worker], logs)
        pooled = _wait_for_deployment(f"{FLOW}/{POOLED}", [serve, worker], logs)
        timings["serve + deploy start-up"] = time.monotonic() - started
        for dep in (served, pooled):
            assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]
            assert dep.parameters["overlay"] is None and dep.parameters["force"] == []
            assert not dep.paused
        assert served.parameters["root"] == str(project)
        assert pooled.work_pool_name == POOL and pooled.entrypoint == "flows.pipeline:pipeline"
        assert pooled.pull_steps == [{"prefect.deployments.steps.set_working_directory": {
            "directory": str(project)}}]  # the worker runs the flow in this project

        # 1. First run: every stage computes; both models are registered and promoted.
        first = _trigger(SERVED)
        assert first.state.is_completed(), first.state.message
        timings["first run (everything computed)"] = _seconds(first)
        parent, stages = _new_pipeline_run(known)
        assert stages == ALL_STAGES
        assert "heldout/srgan/psnr_y" in parent.data.metrics
        summary = json.loads((project / "metrics" / "evaluate.json").read_text())
        # 64x48 images: NIQE is undefined (under two 96x96 blocks), so no "hr" row.
        assert set(summary["heldout"]) == {"bicubic", "srresnet", "srgan", "alpha_0.25",
                                           "alpha_0.5", "alpha_0.75"}
        assert set(summary["heldout"]["srgan"]) == {"psnr_y", "ssim_y", "ssim_daala_y"}
        assert (project / "plots" / "evaluate.csv").read_text().startswith("set,image,method")
        assert (project / "data.dvc").is_file() and (tmp_path / "remote").is_dir()
        client = MlflowClient()
        for name in ("srresnet", "srgan"):
            versions = client.search_model_versions(f"name = '{name}'")
            assert [str(v.version) for v in versions] == ["1"]
            assert versions[0].tags["data_version"] == versioning.data_version(project)
            # The evaluate stage tagged the version with its numbers and ran the gate.
            assert float(versions[0].tags["metric.heldout.psnr_y"]) == pytest.approx(
                summary["heldout"][name]["psnr_y"])
            assert versions[0].tags["gate_decision"] == "promoted"
        assert _champions() == {m: {"champion": "1", "challenger": "1"}
                                for m in ("srresnet", "srgan")}
        page = _artifacts(first)
        print("\n--- run page, artifact 'srgan-metrics' ---\n" + page["srgan-metrics"]
              + "\n--- artifact 'mlflow-run' ---\n" + page["mlflow-run"])
        markdown = page["srgan-metrics"]
        assert "| heldout | srresnet |" in markdown and "| heldout | srgan |" in markdown
        assert f"/runs/{parent.info.run_id})" in markdown
        assert "[evaluate run](" in markdown and "registered [srgan](" in markdown
        assert "[comparison grid grid_heldout](" in markdown and "v1 @champion" in markdown
        assert "[perception-distortion plane sample_val](" in markdown  # val images: NIQE
        assert "models/srgan.pt is [v1](http://127.0.0.1:5000/#/models/srgan/versions/1)" \
            ", gate: promoted" in markdown
        assert f"/runs/{parent.info.run_id}" in page["mlflow-run"]

        # 2. Door 2 -> door 1: nothing left for `dvc repro` to do.
        assert versioning.status(project) == {}
        before = _fingerprint(project)
        out = subprocess.run(["dvc", "repro"], cwd=project, check=True, capture_output=True,
                             text=True).stdout
        assert "Running stage" not in out
        assert _fingerprint(project) == before

        # 3. Door 1 -> door 2: a change made through `dvc repro` is not recomputed by the
        #    next scheduled run, which recomputes nothing and takes seconds.
        params = (project / "params.yaml").read_text()
        (project / "params.yaml").write_text(params.replace("grid_images: 1", "grid_images: 2"))
        out = subprocess.run(["dvc", "repro"], cwd=project, check=True, capture_output=True,
                             text=True).stdout
        assert "Running stage 'evaluate'" in out and "Running stage 'pretrain'" not in out
        before = _fingerprint(project)
        same = _trigger(SERVED)
        assert same.state.is_completed(), same.state.message
        timings["no-change run (served)"] = _seconds(same)
        # no stage run: nothing recomputed (an unchanged download may open none either)
        assert _new_pipeline_run(known)[1] <= {"download"}
        assert _fingerprint(project) == before
        assert versioning.status(project) == {}
        assert timings["no-change run (served)"] < 60
        assert "prepare, pretrain, finetune, evaluate: up to date, skipped by DVC" in \
            _artifacts(same)["srgan-metrics"]

        # 4. The same through the work pool: the worker runs prefect.yaml's deployment in
        #    the project it was deployed from, with the same result.
        pool_run = _trigger(POOLED)
        assert pool_run.state.is_completed(), pool_run.state.message
        timings["no-change run (work pool)"] = _seconds(pool_run)
        assert _new_pipeline_run(known)[1] <= {"download"}
        assert _fingerprint(project) == before
        assert len(client.search_model_versions("name = 'srgan'")) == 1

        # 5. New photos appear in the data source: prepare and everything downstream re-run,
        #    then the registry gate decides (and records) whether the new versions promote.
        make_images(tmp_path / "more", 2, size=(64, 48), seed=3)
        for i, img in enumerate(sorted((tmp_path / "more").iterdir())):
            shutil.copy(img, source / f"new{i}.png")
        fresh = _trigger(SERVED)
        assert fresh.state.is_completed(), fresh.state.message
        timings["new-data run"] = _seconds(fresh)
        assert _new_pipeline_run(known)[1] == ALL_STAGES
        assert len(list((project / "data" / "mine").iterdir())) == 6
        held = _champions()
        for name in ("srresnet", "srgan"):
            assert held[name]["challenger"] == "2"
            decision = tracking.compare([name]).set_index("version").loc[2, "gate_decision"]
            assert decision in ("promoted", "champion_kept")
            assert held[name]["champion"] == ("2" if decision == "promoted" else "1")
            assert f"models/{name}.pt is [v2](" in _artifacts(fresh)["srgan-metrics"]
        print("--- new-data run page, models ---\n" + "\n".join(
            line for line in _artifacts(fresh)["srgan-metrics"].splitlines()
            if "registered" in line))
        before = _fingerprint(project)

        # 6. What params can tell stops the run before its first task: an overlay asks
        #    finetune for a VGG loss and there are no VGG weights (fetching is off here). No
        #    task, no MLflow run, params.yaml as it was.
        (project / "vgg.yaml").write_text(yaml.safe_dump({"finetune": {"content_loss": "vgg22"}}))
        params_before = (project / "params.yaml").read_text()
        refused = _trigger(SERVED, {"overlay": "vgg.yaml"})
        timings["run refused by the params check"] = _seconds(refused)
        assert refused.state.is_failed()
        print(f"--- refused run's state message ---\n{refused.state.message}")
        assert "finetune.content_loss is vgg22, but the VGG19 ImageNet weights are not at" in \
            refused.state.message
        assert _task_runs(refused) == {}
        assert (project / "params.yaml").read_text() == params_before
        assert _fingerprint(project) == before

        # 7. A stage fails (pretraining diverges at lr 1000, the reproduction): the
        #    run says which stage, which step and why; nothing is retried, and outputs,
        #    metrics, the registry and the champions stay as they were.
        (project / "diverge.yaml").write_text(yaml.safe_dump({"pretrain": {"lr": 1000.0}}))
        failed = _trigger(SERVED, {"overlay": "diverge.yaml"})
        timings["failing run"] = _seconds(failed)
        assert failed.state.is_failed()
        print(f"--- failed run's state message ---\n{failed.state.message}")
        assert "stage 'pretrain' failed: pretrain diverged at step" in failed.state.message
        assert "lower pretrain.lr (now 1000)" in failed.state.message
        stages = _new_pipeline_run(known)[1]
        assert "pretrain" in stages and not stages & {"finetune", "evaluate"}
        tasks = _task_runs(failed)
        assert tasks["dvc repro pretrain"].state.is_failed()
        assert tasks["dvc repro pretrain"].run_count == 1
        assert "dvc repro finetune" not in tasks and "dvc repro evaluate" not in tasks
        # DVC deleted pretrain's outputs before running it; the flow checked them out again
        # from the cache: the same content (rewritten, so not the same mtime).
        assert "restored its previous outputs" in failed.state.message
        assert {o: sha for o, (_, sha) in _fingerprint(project).items()} == {
            o: sha for o, (_, sha) in before.items()}
        assert _champions() == held
        for name in ("srresnet", "srgan"):
            assert len(client.search_model_versions(f"name = '{name}'")) == 2
        # The overlay was merged into params.yaml, which is how DVC saw the change.
        assert yaml.safe_load((project / "params.yaml").read_text())["pretrain"]["lr"] == 1000

    # Stopping `serve` (SIGTERM, as Ctrl-C or a service manager does) leaves the schedule on.
    assert serve.returncode is not None
    assert not _api(lambda c: c.read_deployment_by_name(f"{FLOW}/{SERVED}")).paused
    print("\n--- timings (s) ---\n" + json.dumps(
        {k: round(v, 1) for k, v in timings.items()}, indent=1))
