"""Shared fixtures: tiny params, temp git+DVC projects, a ready-made SQLite MLflow store.

Environment set here, before any test module imports prefect or mlflow, keeps the suite
isolated from the developer's own stores and quiet (no telemetry, no analytics).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="srgan-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_TMP / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["SRGAN_DOWNLOAD_CACHE"] = str(_SESSION_TMP / "downloads")
os.environ.pop("MLFLOW_TRACKING_URI", None)
# Subprocesses (dvc, srgan) must come from this interpreter's environment, activated or not.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
os.environ.pop("SRGAN_PARENT_RUN_ID", None)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(
    os.environ.get("SRGAN_SHARED_DATASETS", REPO.parent / "shared" / "datasets")
)


def tiny_params_dict(**sections: dict[str, Any]) -> dict[str, Any]:
    """The checked-in params.yaml shrunk to seconds: same keys, tiny model and loops."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"].update(blocks=1, channels=8)
    for stage in ("pretrain", "finetune"):
        params[stage].update(iterations=4, batch_size=2, hr_crop=32, log_every=2, val_every=4,
                             checkpoint_every=2)
    params["finetune"]["d_channels"] = 8
    params["runtime"].update(device="cpu", num_workers=0)
    params["evaluate"]["grid_images"] = 1
    for key, value in sections.items():
        if isinstance(value, dict):
            params[key].update(value)
        else:
            params[key] = value
    return params


def write_params(path: Path, params: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def make_images(folder: Path, count: int, size: tuple[int, int] = (64, 48), seed: int = 0,
                grey: int = 0) -> list[Path]:
    """Smooth random images (gradients plus noise) so SR has something learnable."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(count):
        base = np.stack([np.sin(xx / (5 + 3 * c + i) + yy / (7 + i)) for c in range(3)], -1)
        img = ((base + 1) * 100 + rng.normal(0, 8, base.shape)).clip(0, 255).astype(np.uint8)
        path = folder / f"img{i:02d}.png"
        Image.fromarray(img[..., 0] if i < grey else img).save(path)
        paths.append(path)
    return paths


def make_prepared_sets(root: Path) -> Path:
    """root/prepared/{tr,te}/{HR,LR}: smooth random images and their MATLAB-bicubic x4 LR."""
    from srcore.data.degrade import bicubic_lr
    from srcore.data.images import load_image, save_png

    for name, count, size, seed in (("tr", 3, (64, 64), 0), ("te", 1, (48, 40), 1)):
        for path in make_images(root / "raw" / name, count, size=size, seed=seed):
            hr = load_image(path)
            save_png(hr, root / "prepared" / name / "HR" / path.name)
            save_png(bicubic_lr(hr, 4), root / "prepared" / name / "LR" / path.name)
    return root / "prepared"


@pytest.fixture(scope="session")
def mlflow_template() -> Path:
    """Creating a SQLite store costs ~1 s of migrations: do it once, copy it per test."""
    path = _SESSION_TMP / "template-mlflow.db"
    subprocess.run(
        [sys.executable, "-c",
         "import mlflow; mlflow.set_tracking_uri('sqlite:///" + str(path) + "');"
         "mlflow.MlflowClient().search_experiments()"],
        check=True, capture_output=True,
    )
    return path


@pytest.fixture
def mlflow_store(tmp_path: Path, mlflow_template: Path,
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    db = tmp_path / "mlflow.db"
    shutil.copyfile(mlflow_template, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("SRGAN_PARENT_RUN_ID", raising=False)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


def _run(cmd: list[str], cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)


@pytest.fixture
def project(tmp_path: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temp git + DVC project with the repo's dvc.yaml, tiny params and a local remote."""
    root = tmp_path / "proj"
    root.mkdir()
    _run(["git", "init", "-q"], root)
    _run(["git", "config", "user.email", "tests@example.com"], root)
    _run(["git", "config", "user.name", "tests"], root)
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copyfile(REPO / name, root / name)
    shutil.copytree(REPO / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    # dvc.yaml's code deps are paths inside the project: give the temp project the same files.
    shutil.copytree(REPO / "srcore", root / "srcore",
                    ignore=shutil.ignore_patterns("__pycache__"))
    write_params(root / "params.yaml", tiny_params_dict())
    monkeypatch.chdir(root)
    return root
