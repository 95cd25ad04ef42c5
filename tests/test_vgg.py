"""VGG19 weights fetched as torchvision does (hash prefix in the file name, into the torch cache),
from a server on 127.0.0.1, and the paper's VGG content loss run end to end through the CLI."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from srcore.models import vgg
from srcore.models.vgg import VGGFeatures, VGGWeightsMissing, load_vgg19_state_dict, weights_path
from tests.conftest import free_port, make_prepared_sets, tiny_params_dict, write_params
from tests.test_download import Behaviour, Seen, http_servers, send_body

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def random_vgg(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """torchvision's VGG19 `features.*` (every conv up to relu5_4) with random values, saved
    once (~80 MB) under torch.hub's naming rule: vgg19-<first 8 hex of its sha256>.pth."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    features = make_layers(cfgs["E"])  # torchvision's own layer list for VGG19, no classifier
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    saved = tmp_path_factory.mktemp("vgg") / "weights.pth"
    torch.save(state, saved)
    named = saved.with_name(f"vgg19-{hashlib.sha256(saved.read_bytes()).hexdigest()[:8]}.pth")
    saved.rename(named)
    return named, state


@pytest.fixture
def serve() -> Iterator[Callable[[Behaviour], tuple[str, Seen]]]:
    with http_servers() as start:
        yield start


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def _url(served: str, name: str) -> str:
    return served.rsplit("/", 1)[0] + "/" + name


def test_missing_weights_are_fetched_verified_into_the_torch_cache(
        serve, torch_home: Path, random_vgg, monkeypatch: pytest.MonkeyPatch) -> None:
    file, state = random_vgg
    body = file.read_bytes()
    served, seen = serve(lambda h, i: send_body(h, body))
    url = _url(served, file.name)
    # Resumes a fetch cut short earlier (the .part torch's cache holds), as the CLI would.
    torch_home.mkdir(parents=True)
    (torch_home / f"{file.name}.part").write_bytes(body[: len(body) // 2])
    monkeypatch.setenv(vgg.URL_ENV, url)
    assert weights_path() == torch_home / file.name
    net = VGGFeatures("vgg54")  # no state dict given: fetched, verified, then loaded
    torch.testing.assert_close(net.features[34].weight, state["features.34.weight"])
    assert seen.ranges == [f"bytes={len(body) // 2}-"]
    assert sorted(p.name for p in torch_home.iterdir() if p.suffix != ".lock") == [file.name]
    assert (torch_home / file.name).read_bytes() == body
    # A cached file is used as it is: no second request.
    assert load_vgg19_state_dict().keys() == state.keys()
    assert seen.count == 1


def test_wrong_bytes_are_refused_and_leave_nothing(serve, torch_home: Path, random_vgg) -> None:
    file, _ = random_vgg
    wrong = bytearray(file.read_bytes())
    wrong[-100] ^= 0xFF  # same size, one byte off: only the name's hash prefix can tell
    served, _ = serve(lambda h, i: send_body(h, bytes(wrong)))
    url = _url(served, file.name)
    prefix = file.stem.split("-")[1]
    with pytest.raises(VGGWeightsMissing) as err:
        load_vgg19_state_dict(url)
    message = str(err.value)
    assert message.startswith(f"VGG19 weights fetched from {url} failed verification: their "
                              f"sha256 {hashlib.sha256(wrong).hexdigest()} does not start with "
                              f"{prefix} as the name {file.name} requires; deleted them.")
    assert "content_loss: mse" in message and "\n" not in message
    assert [p.name for p in torch_home.iterdir() if p.suffix != ".lock"] == []


def test_an_unreachable_host_keeps_the_offline_advice(torch_home: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/vgg19-dcbb9e9d.pth"
    with pytest.raises(VGGWeightsMissing) as err:
        load_vgg19_state_dict(url, retries=0)
    path = torch_home / "vgg19-dcbb9e9d.pth"
    assert str(err.value) == (
        f"VGG19 ImageNet weights not found at {path}, and fetching them failed (giving up on "
        f"{url} after 1 attempt(s): connection failed: Connection refused). Copy "
        f"{vgg.VGG19_URL} there (or set TORCH_HOME to a directory whose hub/checkpoints/ holds "
        "it), or set finetune.content_loss: mse in params.yaml.")
    assert [p.name for p in torch_home.iterdir() if p.suffix != ".lock"] == []


def test_fetching_can_be_turned_off(torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(vgg.URL_ENV, "")
    with pytest.raises(VGGWeightsMissing, match=f"fetching is off: {vgg.URL_ENV} is empty"):
        load_vgg19_state_dict()
    assert weights_path() == torch_home / "vgg19-dcbb9e9d.pth"
    assert not torch_home.exists()


# ------------------------------------------- the paper's content loss, end to end via the CLI

def test_paper_content_loss_trains_through_the_cli(
        tmp_path: Path, torch_home: Path, random_vgg, mlflow_store: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """vgg22 and vgg54 with autocast and channels_last, as configs/paper.yaml sets them,
    against random weights under torchvision's file name (a cache hit is not re-hashed)."""
    import mlflow

    from srcore import cli

    file, _ = random_vgg
    root = tmp_path / "proj"
    make_prepared_sets(root)
    monkeypatch.chdir(root)  # MLflow's artifacts go under the test's folder
    args = ["--params", str(root / "params.yaml"), "--root", str(root)]

    def params(content_loss: str) -> None:
        raw = tiny_params_dict(data={"train": ["tr"], "val": ["va"], "test": ["te"]},
                               runtime={"precision": "auto", "channels_last": True},
                               finetune={"content_loss": content_loss})
        raw["tracking"]["register_models"] = False
        write_params(root / "params.yaml", raw)

    params("vgg22")
    assert cli.main([*args, "pretrain"]) == 0
    assert cli.main([*args, "finetune"]) == 2  # the loss needs the weights: none cached yet
    assert not torch_home.exists()  # and nothing written
    torch_home.mkdir(parents=True)
    shutil.copyfile(file, torch_home / Path(vgg.VGG19_URL).name)
    for content_loss in ("vgg22", "vgg54"):
        params(content_loss)
        (root / "models" / "srgan.pt").unlink(missing_ok=True)
        assert cli.main([*args, "finetune"]) == 0, content_loss
        assert (root / "models" / "srgan.pt").is_file()
        client = mlflow.MlflowClient()
        (experiment,) = [e for e in client.search_experiments()
                         if e.name == tiny_params_dict()["tracking"]["experiment"]]
        run = client.search_runs([experiment.experiment_id], "tags.stage = 'finetune'",
                                 order_by=["attributes.start_time DESC"], max_results=1)[0]
        assert run.data.params["finetune.content_loss"] == content_loss
        history = client.get_metric_history(run.info.run_id, "finetune/loss_g_content")
        assert history and all(torch.isfinite(torch.tensor(m.value)) for m in history)
