"""A registered generator serves images: its pyfunc takes and returns base64 PNGs, in process
and behind a real `mlflow models serve`, while `mlflow.pytorch` still loads the nn.Module."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from srcore import cli, tracking
from srcore.models.srresnet import SRResNet
from srcore.upscale import upscale_alpha, upscale_image
from tests.conftest import free_port, stop_process, wait_for_http
from tests.test_upscale import assert_same_pixels


def _b64_png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _png_array(text: str) -> tuple[str, np.ndarray]:
    with Image.open(io.BytesIO(base64.b64decode(text))) as im:
        assert im.format == "PNG"
        return im.mode, np.asarray(im)


@pytest.fixture
def champion(mlflow_store: str) -> SRResNet:
    """A tiny generator logged, registered as srgan v1 and made @champion."""
    torch.manual_seed(0)
    model = SRResNet(blocks=1, channels=8, scale=4, global_skip=True).eval()
    with tracking.stage_run("t", "finetune") as tracker:
        assert tracker.log_generator(model, "srgan", register=True) == "1"
    tracking.promote("srgan", "1", "test")
    return model


def test_pyfunc_takes_and_returns_base64_pngs(champion: SRResNet, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    grey_alpha = rng.integers(0, 256, (7, 6, 2), dtype=np.uint8)
    served = mlflow.pyfunc.load_model("models:/srgan@champion")
    out = served.predict(pd.DataFrame({"image": [_b64_png(rgb), _b64_png(grey_alpha)]}),
                         params={"tile": 4})
    assert list(out.columns) == ["image"] and len(out) == 2
    mode, sr = _png_array(out["image"][0])
    assert mode == "RGB"
    assert_same_pixels(sr, upscale_image(champion, rgb, 4))
    mode, sr = _png_array(out["image"][1])
    assert mode == "LA" and sr.shape == (28, 24, 2)
    assert_same_pixels(sr[..., 0], upscale_image(champion, grey_alpha[..., 0], 4))
    np.testing.assert_array_equal(sr[..., 1], upscale_alpha(grey_alpha[..., 1], 4))
    with pytest.raises(mlflow.exceptions.MlflowException, match="image"):
        served.predict(pd.DataFrame({"image": [base64.b64encode(b"no png").decode()]}))
    # the CLI reads the same alias and writes the very same pixels
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["upscale", "rgb.png", "-o", "out", "--model",
                     "models:/srgan@champion"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "rgb.png")),
                                  _png_array(out["image"][0])[1])


def _post(url: str, payload: dict[str, object]) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(url, json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_mlflow_models_serve_answers_a_png_with_the_upscaled_png(
        champion: SRResNet, tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    # The store's URI is in MLFLOW_TRACKING_URI (mlflow_store), so models:/ resolves there.
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/srgan@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/ping", server, tmp_path / "serve.log", 60)
        rgb = np.random.default_rng(1).integers(0, 256, (10, 12, 3), dtype=np.uint8)
        status, answer = _post(f"{base}/invocations", {
            "dataframe_split": {"columns": ["image"], "data": [[_b64_png(rgb)]]}})
        assert status == 200, answer
        mode, sr = _png_array(answer["predictions"][0]["image"])
        assert mode == "RGB" and sr.shape == (40, 48, 3)
        assert_same_pixels(sr, upscale_image(champion, rgb, 4))
        status, answer = _post(f"{base}/invocations", {
            "dataframe_records": [{"image": base64.b64encode(b"GIF89a?").decode()}]})
        assert status == 400 and "cannot be decoded" in str(answer["message"])
    finally:
        stop_process(server, group=True, timeout_s=15)  # the server and its uvicorn
        log.close()
