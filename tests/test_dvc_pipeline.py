"""The DVC door as a DVC user walks through it, on a temp git project with the tiny config:
the main job (README command 1) through the real Prefect server, commit, a quiet second run,
a fresh clone's download, what `dvc status` calls stale, plots and metrics, an experiment and
its repeat from the run cache, and a study.

One main job (most of two minutes on 2 cores) carries the tests of this module, in order.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, tiny_params_dict, write_params

pytestmark = pytest.mark.slow


@dataclass
class MainJob:
    root: Path
    output: str
    seconds: float


def _run(cmd: list[str], root: Path, timeout: float = 600,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout,
                            env=env)
    assert result.returncode == 0, f"{cmd}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _git(root: Path, *args: str) -> str:
    return _run(["git", *args], root).stdout


def _store_runs(root: Path, stage: str) -> int:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return sum(1 for r in runs if r.data.tags.get("stage") == stage)


def _versions(root: Path, name: str) -> list[object]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return list(client.search_model_versions(f"name = '{name}'"))


def _champion(root: Path, name: str) -> str:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return str(client.get_registered_model(name).aliases["champion"])


def _main_job_env(api_url: str) -> dict[str, str]:
    """A user's terminal: INFO logs (the suite's default is WARNING), the project's store."""
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_LOGGING_LEVEL": "INFO"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.fixture(scope="module")
def main_job(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path,
             prefect_api: str) -> MainJob:
    base = tmp_path_factory.mktemp("dvc-door")
    root = base / "proj"
    root.mkdir()
    _git(root, "init", "-q")
    _git(root, "config", "user.email", "tests@example.com")
    _git(root, "config", "user.name", "tests")
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copyfile(REPO / name, root / name)
    shutil.copytree(REPO / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    shutil.copytree(REPO / "srcore", root / "srcore",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "configs", root / "configs")
    write_params(root / "params.yaml", tiny_params_dict())
    _run(["dvc", "remote", "add", "-f", "-d", "local", str(base / "remote")], root)
    shutil.copyfile(mlflow_template, root / "mlflow.db")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "project")
    env = _main_job_env(prefect_api)
    started = time.perf_counter()
    result = _run([sys.executable, "-m", "flows.pipeline", "run"], root, env=env)
    return MainJob(root, result.stdout + result.stderr, time.perf_counter() - started)


def test_main_job_then_commit_leaves_git_clean(main_job: MainJob, prefect_api: str) -> None:
    root, out = main_job.root, main_job.output
    print(f"main job (tiny config): {main_job.seconds:.1f} s")
    # Every DVC line once in the terminal (not again through Prefect's root handler), and
    # the "git add" advice once for the run, not once per stage.
    assert out.count("Running stage 'pretrain'") == 1
    assert out.count("git add") == 1
    assert "data.dvc and dvc.lock changed: commit" in out
    assert sorted(_git(root, "status", "--porcelain").splitlines()) == [
        "?? data.dvc", "?? dvc.lock"]
    _git(root, "add", "data.dvc", "dvc.lock")
    _git(root, "commit", "-qm", "main job: data and results")
    assert _git(root, "status", "--porcelain") == ""

    # A nightly run with nothing new: no download run, no stage, nothing to commit.
    env = _main_job_env(prefect_api)
    downloads = _store_runs(root, "download")
    started = time.perf_counter()
    again = _run([sys.executable, "-m", "flows.pipeline", "run"], root, env=env)
    print(f"no-change run: {time.perf_counter() - started:.1f} s")
    text = again.stdout + again.stderr
    assert "data/ unchanged" in text and "Running stage" not in text and "git add" not in text
    assert _store_runs(root, "download") == downloads
    assert _git(root, "status", "--porcelain") == ""


def test_a_fresh_clone_downloads_the_same_data_dvc(main_job: MainJob, tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(main_job.root), str(clone)], tmp_path)
    assert not (clone / "data").exists()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    _run([str(Path(sys.executable).parent / "srgan"), "download"], clone, env=env)
    assert _git(clone, "status", "--porcelain") == ""  # the same data.dvc, byte for byte


def test_only_what_a_change_touches_is_stale(main_job: MainJob) -> None:
    from srcore import versioning

    root = main_job.root
    params = root / "params.yaml"
    saved = params.read_text()
    try:
        raw = yaml.safe_load(saved)
        raw["pretrain"]["log_every"] += 1
        raw["finetune"]["checkpoint_every"] += 1
        raw["runtime"]["num_workers"] = 2
        raw["tracking"]["ui_url"] = "http://mlflow.internal:5000"
        write_params(params, raw)
        assert versioning.status(root) == {}
        write_params(params, yaml.safe_load(saved))
        _run([str(Path(sys.executable).parent / "srgan"), "params", "apply",
              "configs/shared-benchmarks.yaml"], root)
        assert sorted(versioning.status(root)) == ["check-data", "evaluate", "hash-data"]
    finally:
        params.write_text(saved)
    assert versioning.status(root) == {}


def test_plots_and_metrics_a_person_reads(main_job: MainJob) -> None:
    root = main_job.root
    shown = _run(["dvc", "metrics", "show"], root).stdout
    assert max(len(line) for line in shown.splitlines()) <= 100
    assert "psnr.srresnet" in shown and "niqe.srgan" in shown
    plots = json.loads(_run(["dvc", "plots", "show", "--json"], root).stdout)["data"]
    for name, y in (("plots/evaluate.csv", "ssim_y"), ("plots/perception_distortion.csv",
                                                        "niqe")):
        spec = plots[name][0]["content"]
        assert spec["encoding"]["color"]["field"] == "method"
        assert spec["encoding"]["x"]["scale"] == {"zero": False}
        assert spec["encoding"]["y"]["field"] == y and spec["encoding"]["y"]["scale"] == {
            "zero": False}
        methods = {row["method"] for row in spec["data"]["values"]}
        assert {"bicubic", "srresnet", "srgan"} <= methods
    assert not (root / "dvc_plots").exists() or "dvc_plots" not in _git(
        root, "status", "--porcelain")


def test_an_experiment_and_its_repeat_from_the_run_cache(main_job: MainJob) -> None:
    root = main_job.root
    started = time.perf_counter()
    first = _run(["dvc", "exp", "run", "-S", "model.blocks=2", "-n", "deeper"], root)
    trained = time.perf_counter() - started
    assert "Running stage 'pretrain'" in first.stdout
    changed = _run(["dvc", "exp", "show", "--only-changed"], root).stdout
    assert "deeper" in changed and "model.blocks" in changed
    table = list(csv.DictReader(io.StringIO(_run(["dvc", "exp", "show", "--csv"], root).stdout)))
    rows = {row["Experiment"] or row["rev"]: row for row in table}
    for row in table:  # baseline and experiment both carry numbers (no "!")
        assert float(row["psnr.srresnet"]) > 0 and float(row["niqe.srgan"]) > 0
    baseline = next(r for r in table if r["typ"] == "baseline" and r["rev"] != "workspace")
    assert rows["deeper"]["model.blocks"] == "2" and baseline["model.blocks"] == "1"
    # Its registered versions carry its name; @champion moved only where the gate said so.
    for name in ("srresnet", "srgan"):
        tagged = [v for v in _versions(root, name)
                  if v.tags.get("dvc_experiment") == "deeper"]  # type: ignore[attr-defined]
        assert len(tagged) == 1
        promoted = tagged[0].tags["gate_decision"] == "promoted"  # type: ignore[attr-defined]
        version = str(tagged[0].version)  # type: ignore[attr-defined]
        assert (_champion(root, name) == version) == promoted
    versions = len(_versions(root, "srresnet"))
    _git(root, "checkout", "--", "params.yaml", "dvc.lock")
    _run(["dvc", "checkout", "-q"], root)

    started = time.perf_counter()
    repeat = _run(["dvc", "exp", "run", "-S", "model.blocks=2", "-n", "deeper-again"], root)
    cached = time.perf_counter() - started
    print(f"experiment: {trained:.1f} s; identical repeat from the run cache: {cached:.1f} s")
    assert "Running stage" not in repeat.stdout
    assert repeat.stdout.count("is cached - skipping run") == 3  # pretrain, finetune, evaluate
    assert cached < 30
    assert len(_versions(root, "srresnet")) == versions  # nothing trained, nothing registered
    _git(root, "checkout", "--", "params.yaml", "dvc.lock")
    _run(["dvc", "checkout", "-q"], root)
    assert _git(root, "status", "--porcelain") == ""


def test_depth_study_queues_runs_and_tabulates(main_job: MainJob) -> None:
    # B=1 is the baseline and B=2 the experiment above: both come from the run cache.
    root = main_job.root
    started = time.perf_counter()
    out = _run([str(Path(sys.executable).parent / "srgan"), "study", "depth", "1", "2"],
               root).stdout
    print(f"depth study, two cached variants: {time.perf_counter() - started:.1f} s")
    assert "| model.blocks | experiment | SRResNet PSNR-Y |" in out
    rows = list(csv.DictReader((root / "studies" / "depth.csv").open()))
    assert [(r["model.blocks"], r["experiment"], r["state"]) for r in rows] == [
        ("1", "depth-1", "success"), ("2", "depth-2", "success")]
    assert all(float(r["SRResNet PSNR-Y"]) > 0 for r in rows)
    assert (root / "studies" / "depth.png").stat().st_size > 0
    assert _git(root, "status", "--porcelain") == ""  # studies/ is git-ignored
