"""`srgan study`: what is refused before anything is queued, and the table and plot made from
the experiments' headline numbers. A study run end to end (queue, run cache, table) is in
tests/test_dvc_pipeline.py, on the main job it needs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from srcore import studies, versioning
from srcore.cli import main

ROWS = [{"model.blocks": 2, "experiment": "depth-2", "state": "success",
         "SRResNet PSNR-Y": 26.1, "SRGAN PSNR-Y": 26.0, "SRResNet NIQE": 7.3,
         "SRGAN NIQE": 7.1},
        {"model.blocks": 4, "experiment": "depth-4", "state": "failed",
         "SRResNet PSNR-Y": None, "SRGAN PSNR-Y": None, "SRResNet NIQE": None,
         "SRGAN NIQE": None}]


def _queue(root: Path) -> str:
    return subprocess.run(["dvc", "queue", "status"], cwd=root, capture_output=True,
                          text=True).stdout


def test_content_loss_study_stops_at_once_without_vgg_weights(
        project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run(["git", "commit", "-qm", "project"], cwd=project, check=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no weights cached here
    monkeypatch.setenv("SRGAN_VGG19_URL", "")  # and none fetchable
    assert main(["--root", str(project), "study", "content-loss"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "VGG19 ImageNet weights not found" in err
    assert "finetune.content_loss: mse" in err
    assert "content-loss" not in _queue(project)  # nothing queued, nothing run
    # An MSE-only study needs no weights, so that check lets it through.
    studies.STUDIES["content-loss"].check(["mse"])  # type: ignore[misc]


def test_a_study_needs_the_main_jobs_results_committed(project: Path) -> None:
    (project / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    with pytest.raises(studies.StudyError, match=r"dvc.lock changed: commit.*commit the main"):
        studies.run_study(project, studies.STUDIES["depth"], [2])
    assert versioning.git_hint(project) is not None


def test_table_and_plot_of_a_study(tmp_path: Path) -> None:
    study = studies.STUDIES["depth"]
    text = studies.table(ROWS, study)
    assert text.splitlines()[0] == ("| model.blocks | experiment | SRResNet PSNR-Y | "
                                    "SRGAN PSNR-Y | SRResNet NIQE | SRGAN NIQE |")
    assert "| 2 | depth-2 | 26.10 | 26.00 | 7.30 | 7.10 |" in text
    assert "| 4 | depth-4 | - | - | - | - |" in text
    studies.write_table(ROWS, study, tmp_path / "depth.csv")
    assert (tmp_path / "depth.csv").read_text().splitlines()[0].startswith(
        "model.blocks,experiment,state,SRResNet PSNR-Y")
    studies.plot(ROWS, study, tmp_path / "depth.png")
    assert (tmp_path / "depth.png").read_bytes()[:4] == b"\x89PNG"
    assert study.experiment(8) == "depth-8"
    assert studies.STUDIES["content-loss"].experiment("vgg22") == "content-loss-vgg22"
