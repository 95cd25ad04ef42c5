"""DVC through srcore.versioning: data.dvc, push to a local remote, pull on a fresh clone."""

from __future__ import annotations

import hashlib
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
