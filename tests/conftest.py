"""Shared fixtures: tiny params, temp git+DVC projects, a ready-made SQLite MLflow store.

Environment set here, before any test module imports prefect or mlflow, keeps the suite
isolated from the developer's own stores and quiet (no telemetry, no analytics).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
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
os.environ["SRGAN_VGG19_URL"] = ""  # never fetch the real VGG19 (548 MB); tests serve their own
os.environ.pop("MLFLOW_TRACKING_URI", None)
# Subprocesses (dvc, srgan) must come from this interpreter's environment, activated or not.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
os.environ.pop("SRGAN_PARENT_RUN_ID", None)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(
    os.environ.get("SRGAN_SHARED_DATASETS", REPO.parent / "shared" / "datasets")
)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and two cores are shared with other work.
    Restores the thread count and the deterministic-algorithms flag a test may set."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


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
    params["prepare"]["min_hr_side"] = 32  # the tiny hr_crop
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
    """root/prepared/{train/tr,val/va,test/te} with manifests, as `srgan prepare` lays them
    out (train as shards + index, the others as {HR,LR} PNG pairs): smooth random images and
    their MATLAB-bicubic x4 LR."""
    from srcore.data.degrade import bicubic_lr
    from srcore.data.images import load_image, save_png
    from srcore.data.manifest import write_manifest
    from srcore.data.shards import write_set

    # The val image is just large enough for NIQE (two 96x96 blocks after a 4-pixel crop).
    for split, name, count, size, seed in (("train", "tr", 3, (64, 64), 0),
                                           ("val", "va", 1, (200, 104), 2),
                                           ("test", "te", 1, (48, 40), 1)):
        folder = root / "prepared" / split / name
        paths = make_images(root / "raw" / name, count, size=size, seed=seed)
        if split == "train":
            write_set(root / "raw" / name, folder, root / "work", scale=4, sigma=None,
                      min_hr_side=32, shard_mb=0.02, name=name, processes=1,
                      progress=False)
            paths = []
        for path in paths:
            hr = load_image(path)
            save_png(hr, folder / "HR" / path.name)
            save_png(bicubic_lr(hr, 4), folder / "LR" / path.name)
        write_manifest(folder, {"set": name, "split": split, "scale": 4,
                                "gaussian_sigma": None})
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


# ------------------------------------------------------------------ local servers on 127.0.0.1

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def wait_for_http(url: str, proc: subprocess.Popen[Any], log: Path, timeout_s: float) -> None:
    """Block until `url` answers 200; fail with the server's log if it exits or times out,
    so a server that cannot start says why instead of hanging the suite."""
    deadline = time.monotonic() + timeout_s
    while not http_ok(url):
        if proc.poll() is not None:
            pytest.fail(f"{url}: the server exited with {proc.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{url}: no answer after {timeout_s:.0f} s:\n{log.read_text()}")
        time.sleep(0.2)


def stop_process(proc: subprocess.Popen[Any], *, group: bool = False,
                 timeout_s: float = 30) -> None:
    """SIGTERM (a server's clean shutdown), SIGKILL after `timeout_s`. `group`: signal the
    process group of a server started with start_new_session, e.g. an mlflow CLI and the
    uvicorn it started."""
    if proc.poll() is not None:
        return

    def send(sig: int) -> None:
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)

    send(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def local_prefect_server(home: Path, startup_s: float = 90) -> Iterator[str]:
    """`prefect server start` on 127.0.0.1 with its own home and SQLite database; yields the
    API URL once /api/health answers, and stops the server afterwards.

    The scheduler service is off so that runs happen only when a test triggers them (a cron
    falling due mid-test would start a second run); schedules are still stored and checked.
    """
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(home),
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
           "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_URL", None)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = home / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
             str(port), "--no-ui"], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_http(f"{url}/health", proc, log, startup_s)
            yield url
        finally:
            stop_process(proc)


def _drain_prefect_workers() -> None:
    """Flush the run logs and events this process still holds, as prefect_test_harness does.

    `drain_all` touches only workers that exist: creating one here would look for an API in
    the global settings, find none and start an ephemeral server (~15 s).
    """
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        for worker in (APILogWorker, EventsWorker):
            pending = worker.drain_all()
            if inspect.isawaitable(pending):
                await pending

    run_coro_as_sync(drain())


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real Prefect server for the whole session (test_schedule, test_pipeline); in-process
    clients reach it through the settings."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with contextlib.ExitStack() as stack:
        url = stack.enter_context(local_prefect_server(tmp_path_factory.mktemp("prefect-server")))
        # Runs last-in first-out: logs and events reach the server before it stops, or the
        # interpreter's exit would spend a minute retrying to send them.
        stack.callback(_drain_prefect_workers)
        stack.enter_context(temporary_settings({PREFECT_API_URL: url}))
        yield url


Register = Callable[..., str]


@pytest.fixture
def register(mlflow_store: str) -> Register:
    """Register one more tiny SRResNet version the way the training stages do."""
    from srcore import tracking
    from srcore.models.srresnet import SRResNet

    model = SRResNet(blocks=1, channels=4, scale=4, global_skip=True).eval()

    def _register(name: str = "srresnet", data_version: str = "d1.dir",
                  metrics: dict[str, dict[str, float]] | None = None) -> str:
        stage = "pretrain" if name == "srresnet" else "finetune"
        with tracking.stage_run("t", stage) as tracker:
            tracker.log_params({"model.blocks": 1, "scale": 4, f"{stage}.lr": 1e-4,
                                "runtime.device": "cpu"})
            version = tracker.log_generator(model, name, register=True,
                                            tags={"data_version": data_version})
        assert version is not None
        if metrics:
            tracking.tag_metrics(name, version, metrics)
        return version

    return _register


def model_version_tags(name: str, version: str) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    return MlflowClient().get_model_version(name, version).tags
