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

from srcore import cli, precision, tracking
from srcore.models.interpolate import blend
from srcore.models.srresnet import SRResNet
from srcore.training.checkpoints import load_generator_file
from srcore.upscale import for_inference, upscale_alpha, upscale_image
from tests.conftest import (
    free_port,
    make_prepared_sets,
    stop_process,
    tiny_params_dict,
    wait_for_http,
    write_params,
)
from tests.test_upscale import assert_same_pixels

pytestmark = pytest.mark.usefixtures("one_thread")


def _b64_png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _png_array(text: str) -> tuple[str, np.ndarray]:
    with Image.open(io.BytesIO(base64.b64decode(text))) as im:
        assert im.format == "PNG"
        return im.mode, np.asarray(im)


@pytest.fixture
def champion(mlflow_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SRResNet:
    """A tiny generator logged (without its SRResNet), registered as srgan v1, @champion."""
    monkeypatch.chdir(tmp_path)  # any ./mlruns the store makes stays in the test's folder
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
    served = mlflow.pyfunc.load_model("models:/srgan@champion",
                                      model_config={"precision": "fp32"})
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
                     "models:/srgan@champion", "--precision", "fp32"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "rgb.png")),
                                  _png_array(out["image"][0])[1])


@pytest.fixture
def pair(mlflow_store: str, tmp_path: Path,
         monkeypatch: pytest.MonkeyPatch) -> tuple[SRResNet, SRResNet]:
    """(SRResNet, SRGAN): the SRGAN registered as srgan v1 carrying the SRResNet, default
    alpha 0.25, as the finetune stage logs it."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    srresnet = SRResNet(blocks=1, channels=8, scale=4, global_skip=True).eval()
    srgan = SRResNet(blocks=1, channels=8, scale=4, global_skip=True).eval()
    with tracking.stage_run("t", "finetune") as tracker:
        assert tracker.log_generator(srgan, "srgan", register=True, blend_base=srresnet,
                                     serve_alpha=0.25) == "1"
    return srresnet, srgan


def test_a_registered_srgan_carries_its_srresnet_and_serves_any_alpha(
        pair: tuple[SRResNet, SRResNet], tmp_path: Path) -> None:
    srresnet, srgan = pair
    x = torch.rand(2, 3, 9, 7)
    with torch.no_grad():  # mlflow.pytorch still gives the SRGAN network alone
        assert torch.equal(mlflow.pytorch.load_model("models:/srgan/1")(x), srgan(x))
    served = tracking.load_served_generators("models:/srgan/1")
    assert served.default_alpha == 0.25
    for key, value in srresnet.state_dict().items():
        assert torch.equal(served.srresnet.state_dict()[key], value), key
    assert mlflow.MlflowClient().get_model_version("srgan", "1").tags["serve_alpha"] == "0.25"
    spec = {p.name: p.default for p in
            mlflow.models.get_model_info("models:/srgan/1").signature.params.params}
    assert spec == {"tile": 256, "alpha": 0.25}

    rgb = np.random.default_rng(2).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    model = mlflow.pyfunc.load_model("models:/srgan/1", model_config={"precision": "fp32"})
    frame = pd.DataFrame({"image": [_b64_png(rgb)]})

    def predict(**params: object) -> np.ndarray:
        return _png_array(model.predict(frame, params=params or None)["image"][0])[1]

    assert_same_pixels(predict(), upscale_image(blend(srresnet, srgan, 0.25), rgb, 4))
    assert_same_pixels(predict(alpha=0.0), upscale_image(srresnet, rgb, 4))
    assert_same_pixels(predict(alpha=1.0), upscale_image(srgan, rgb, 4))
    half = predict(alpha=0.5)
    assert_same_pixels(half, upscale_image(blend(srresnet, srgan, 0.5), rgb, 4))
    np.testing.assert_array_equal(predict(alpha=0.5), half)
    impl = model._model_impl  # the ImageModel our loader returned
    assert impl.generators.blends_made == 2  # 0.25 and 0.5, each blended once
    with pytest.raises(mlflow.exceptions.MlflowException, match="alpha"):
        predict(alpha=1.5)

    # the CLI reads the same registered version and its SRResNet
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert cli.main(["upscale", "rgb.png", "-o", "out", "--model", "models:/srgan/1",
                     "--alpha", "0.5", "--precision", "fp32"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "rgb.png")), half)


def test_the_finetune_stage_registers_srgan_with_the_srresnet_it_started_from(
        mlflow_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "proj"
    make_prepared_sets(root)
    raw = tiny_params_dict(data={"train": ["tr"], "val": ["va"], "test": ["te"]})
    raw["tracking"]["serve_alpha"] = 0.75
    params = write_params(root / "params.yaml", raw)
    monkeypatch.chdir(root)
    for stage in ("pretrain", "finetune"):
        assert cli.main(["--params", str(params), "--root", str(root), stage]) == 0, stage
    served = tracking.load_served_generators("models:/srgan/1")
    assert served.default_alpha == 0.75
    started = load_generator_file(root / "models" / "srresnet.pt").state_dict()
    for key, value in served.srresnet.state_dict().items():
        assert torch.equal(value, started[key]), key
    finished = load_generator_file(root / "models" / "srgan.pt").state_dict()
    assert all(torch.equal(v, finished[k]) for k, v in served.generator.state_dict().items())


def test_alpha_from_a_version_without_its_srresnet_is_one_clear_line(
        champion: SRResNet, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(tmp_path / "z.png")
    assert cli.main(["upscale", "z.png", "-o", "out", "--model", "models:/srgan@champion",
                     "--alpha", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "models:/srgan@champion: carries no SRResNet to blend with" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_non_finite_weights_never_enter_or_leave_the_registry(
        mlflow_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    diverged = SRResNet(blocks=1, channels=8, scale=4, global_skip=True).eval()
    with torch.no_grad():
        diverged.tail.bias.fill_(float("nan"))
    with tracking.stage_run("t", "finetune") as tracker, \
            pytest.raises(tracking.NonFiniteWeights, match="diverged"):
        tracker.log_generator(diverged, "srgan", register=True)
    assert tracking.latest_version("srgan") is None
    # one logged some other way (an older release, by hand) is refused when loaded
    with mlflow.start_run():
        mlflow.pytorch.log_model(diverged, name="g", registered_model_name="srgan",
                                 serialization_format="pickle", pip_requirements=["torch"])
    with pytest.raises(tracking.NonFiniteWeights, match="models:/srgan/1: 1 weight tensor"):
        tracking.load_generator("models:/srgan/1")
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(tmp_path / "z.png")
    assert cli.main(["upscale", "z.png", "-o", "out", "--model", "models:/srgan/1"]) == 2
    err = capsys.readouterr().err
    assert "models:/srgan/1: 1 weight tensor(s) hold NaN" in err and "diverged" in err
    assert not (tmp_path / "out").exists()


def _post(url: str, payload: dict[str, object]) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(url, json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_mlflow_models_serve_answers_a_png_with_the_upscaled_png(
        pair: tuple[SRResNet, SRResNet], tmp_path: Path) -> None:
    srresnet, srgan = pair
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    # The store's URI is in MLFLOW_TRACKING_URI (mlflow_store), so models:/ resolves there.
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/srgan/1",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/ping", server, tmp_path / "serve.log", 60)
        rgb = np.random.default_rng(1).integers(0, 256, (10, 12, 3), dtype=np.uint8)
        status, answer = _post(f"{base}/invocations", {
            "dataframe_split": {"columns": ["image"], "data": [[_b64_png(rgb)]]},
            "params": {"alpha": 0.5}})
        assert status == 200, answer
        mode, sr = _png_array(answer["predictions"][0]["image"])
        assert mode == "RGB" and sr.shape == (40, 48, 3)
        # the served model runs at the precision `auto` resolves to, and says so
        chosen = precision.resolve("auto", torch.device("cpu"))
        want = for_inference(blend(srresnet, srgan, 0.5), chosen, torch.channels_last)
        assert_same_pixels(sr, upscale_image(want, rgb, 4, memory_format=torch.channels_last,
                                             precision=chosen))
        status, answer = _post(f"{base}/invocations", {
            "dataframe_records": [{"image": base64.b64encode(b"GIF89a?").decode()}]})
        assert status == 400 and "cannot be decoded" in str(answer["message"])
        assert f"srgan served model: {chosen.describe()}" in (tmp_path / "serve.log").read_text()
    finally:
        stop_process(server, group=True, timeout_s=15)  # the server and its uvicorn
        log.close()
