"""DVC through srcore.versioning: data.dvc, push to a local remote, pull on a fresh clone."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from srcore import versioning
from srcore.config import DatasetSpec
from srcore.data.sources import materialize


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_add_push_and_pull_on_a_fresh_clone(project: Path, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    subprocess.run(["dvc", "remote", "add", "-f", "-d", "local", str(remote)], cwd=project,
                   check=True, capture_output=True)
    materialize(DatasetSpec(name="sample_test"), project / "data", retries=0, timeout=1)
    versioning.add_data(project)
    assert (project / "data.dvc").is_file()
    assert versioning.has_remote(project)
    assert versioning.push(project) == 4  # 3 images + the directory listing
    version = versioning.data_version(project)
    assert version and version.endswith(".dir")

    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "data")
    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(project), str(clone))
    assert not (clone / "data").exists()
    versioning.pull(clone)
    assert _tree(clone / "data") == _tree(project / "data")
    assert versioning.data_version(clone) == version


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(versioning.VersioningError, match="not a DVC repository"):
        versioning.add_data(tmp_path)
    with pytest.raises(versioning.VersioningError, match="unknown stage"):
        versioning.reproduce(tmp_path, "train-everything")
    assert versioning.data_version(tmp_path) is None


def test_pull_without_remote_data_fails_clearly(project: Path, tmp_path: Path) -> None:
    subprocess.run(["dvc", "remote", "add", "-f", "-d", "local", str(tmp_path / "empty")],
                   cwd=project, check=True, capture_output=True)
    materialize(DatasetSpec(name="sample_test"), project / "data", retries=0, timeout=1)
    versioning.add_data(project)
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "data")
    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(project), str(clone))
    with pytest.raises(versioning.VersioningError, match="dvc pull failed"):
        versioning.pull(clone)


def test_dvc_repro_on_a_fresh_clone_says_how_to_get_data(project: Path) -> None:
    result = subprocess.run(["dvc", "repro"], cwd=project, capture_output=True, text=True)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "run `srgan download`" in output and "dvc pull" in output
    assert "Running stage 'prepare'" not in output


# ------------------------------------------------------------------ a failed stage keeps outputs

TOY = """stages:
  pretrain:
    cmd: python -c "{code}"
    params: [seed]
    outs: [models/srresnet.pt, metrics/pretrain.json]
"""
# Writes its outputs, then fails when seed is 13 (a stage that dies half-way).
CODE = ("import os, yaml; s = yaml.safe_load(open('params.yaml'))['seed']; "
        "os.makedirs('models', exist_ok=True); os.makedirs('metrics', exist_ok=True); "
        "open('models/srresnet.pt', 'w').write(str(s)); "
        "open('metrics/pretrain.json', 'w').write(str(s)); exit(2 if s == 13 else 0)")


def _toy(root: Path, seed: int) -> None:
    (root / "params.yaml").write_text(f"seed: {seed}\n")


def test_a_failed_stage_gets_its_previous_outputs_back(project: Path) -> None:
    import time

    (project / "dvc.yaml").write_text(TOY.format(code=CODE))
    _toy(project, 1)
    assert versioning.reproduce(project, "pretrain") == ["pretrain"]
    good = _tree(project / "models") | _tree(project / "metrics")
    _toy(project, 13)
    started = time.perf_counter()
    with pytest.raises(versioning.StageFailed) as err:
        versioning.reproduce(project, "pretrain")
    seconds = time.perf_counter() - started
    assert err.value.stage == "pretrain" and "exited with 2" in err.value.cause
    assert "restored its previous outputs (metrics/pretrain.json, models/srresnet.pt)" in \
        str(err.value)
    # Without persist DVC deleted them (and the stage wrote "13" into them): checked out again.
    assert _tree(project / "models") | _tree(project / "metrics") == good
    print(f"failed stage + restore: {seconds:.1f} s")
    # An identical run is restored from the run cache, without running the command.
    _toy(project, 2)
    versioning.reproduce(project, "pretrain")
    (project / "models" / "srresnet.pt").unlink()
    _toy(project, 1)
    assert versioning.reproduce(project, "pretrain") == ["pretrain"]
    assert (project / "models" / "srresnet.pt").read_text() == "1"


def test_git_add_hint_is_said_once(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "dvc.yaml").write_text(TOY.format(code=CODE))
    _toy(project, 1)
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "toy")
    with versioning.deferred_git_hints():
        versioning.reproduce(project, "pretrain")
    out = capsys.readouterr()
    assert "git add" not in out.out + out.err  # DVC's own hint, silenced
    assert versioning.git_hint(project) == (
        "dvc.lock changed: commit to pin this data and these results "
        "(git add dvc.lock && git commit)")
    _git(project, "add", "dvc.lock")
    _git(project, "commit", "-qm", "lock")
    assert versioning.git_hint(project) is None


def test_a_queued_experiment_logs_to_the_projects_store(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmp123"
    copy.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert versioning.project_root(copy) == copy  # not an experiment: the folder itself
    monkeypatch.setenv(versioning.EXPERIMENT_ENV, "depth-4")
    assert versioning.project_root(copy) == tmp_path
    assert versioning.experiment_name() == "depth-4"


# ------------------------------------------------------- a download with nothing new does nothing


def test_a_download_with_nothing_new_adds_pushes_and_logs_nothing(
        project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import mlflow

    from srcore.cli import run_stage
    from tests.conftest import make_images, tiny_params_dict, write_params

    remote = tmp_path / "remote"
    subprocess.run(["dvc", "remote", "add", "-f", "-d", "local", str(remote)], cwd=project,
                   check=True, capture_output=True)
    source = tmp_path / "photos"
    make_images(source, 2, size=(48, 40), seed=4)
    write_params(project / "params.yaml", tiny_params_dict(data={
        "train": [{"name": "mine", "url": str(source)}], "val": ["sample_val"],
        "test": ["sample_test"]}))

    def runs() -> int:
        return len(mlflow.search_runs(search_all_experiments=True))

    run_stage("download", project / "params.yaml", project)
    pointer = (project / "data.dvc").stat().st_mtime_ns, (project / "data.dvc").read_text()
    pushed, logged = _tree(remote), runs()
    capsys.readouterr()
    run_stage("download", project / "params.yaml", project)
    assert "data/ unchanged" in capsys.readouterr().out
    assert ((project / "data.dvc").stat().st_mtime_ns, (project / "data.dvc").read_text()) \
        == pointer
    assert _tree(remote) == pushed and runs() == logged  # no push, no MLflow run
    # A new photo in the source, or a set edited in data/, is downloaded again.
    make_images(tmp_path / "more", 3, size=(48, 40), seed=5)
    shutil.copy(tmp_path / "more" / "img02.png", source / "new.png")
    run_stage("download", project / "params.yaml", project)
    assert "data/ unchanged" not in capsys.readouterr().out and runs() == logged + 1
    assert (project / "data" / "mine" / "new.png").is_file()
    (project / "data" / "mine" / "new.png").unlink()
    run_stage("download", project / "params.yaml", project)
    assert (project / "data" / "mine" / "new.png").is_file() and runs() == logged + 2
