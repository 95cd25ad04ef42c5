"""`srgan serve`: MLflow's scoring protocol in process, and under overload as a real server
process on 127.0.0.1: every request succeeds or is refused at once, goodput holds, a request
nobody waits for stops computing, and peak memory stays under the stated bound."""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from srcore import cli
from srcore.models.interpolate import blend
from srcore.models.srresnet import SRResNet
from srcore.server import Admission, Job, ServerOptions, build_app, parse_request
from srcore.training.checkpoints import save_generator
from srcore.upscale import upscale_image
from tests.conftest import free_port, stop_process, wait_for_http
from tests.test_upscale import assert_same_pixels

pytestmark = pytest.mark.usefixtures("one_thread")


def _smooth(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(np.sin(xx / (9 + 4 * c)) * np.cos(yy / 7) + 1) * 127.5
                     for c in range(3)], -1).astype(np.uint8)


def _b64_png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _png(text: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(text))) as im:
        assert im.format == "PNG"
        return np.asarray(im)


def _models(folder: Path, channels: int = 4, skip: bool = True) -> tuple[SRResNet, SRResNet]:
    """A tiny SRResNet and 'SRGAN' (other weights), saved as srresnet.pt and srgan.pt."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    pair = tuple(SRResNet(blocks=1, channels=channels, scale=4, global_skip=skip).eval()
                 for _ in range(2))
    save_generator(pair[0], folder / "srresnet.pt", {})
    save_generator(pair[1], folder / "srgan.pt", {})
    return pair  # type: ignore[return-value]


# ----------------------------------------------------------------------- in process


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SRResNet, SRResNet]:
    folder = tmp_path_factory.mktemp("models")
    srresnet, srgan = _models(folder)
    return folder, srresnet, srgan


def _client(folder: Path, **options: Any) -> TestClient:
    from srcore.server import Engine

    opts = ServerOptions(model=str(folder / "srgan.pt"), precision="fp32",
                         channels_last=False, **options)
    return TestClient(build_app(Engine(opts), opts))


def test_it_speaks_mlflows_scoring_protocol_with_alpha_and_tile(
        models: tuple[Path, SRResNet, SRResNet]) -> None:
    folder, srresnet, srgan = models
    rgb = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    image = _b64_png(rgb)
    with _client(folder) as client:
        for body in ({"dataframe_split": {"columns": ["image"], "data": [[image]]}},
                     {"dataframe_records": [{"image": image}]},
                     {"inputs": {"image": [image]}}, {"instances": [image]}):
            answer = client.post("/invocations", json=body)
            assert answer.status_code == 200, answer.text
            np.testing.assert_array_equal(_png(answer.json()["predictions"][0]["image"]),
                                          upscale_image(srgan, rgb, 4))
        answer = client.post("/invocations", json={
            "inputs": {"image": [image, image]}, "params": {"alpha": 0.5, "tile": 4}})
        half = upscale_image(blend(srresnet, srgan, 0.5), rgb, 4)
        assert [_png(p["image"]).shape for p in answer.json()["predictions"]] == [half.shape] * 2
        assert_same_pixels(_png(answer.json()["predictions"][0]["image"]), half)
        client.post("/invocations", json={"instances": [image], "params": {"alpha": 0.5}})
        stats = client.get("/stats").json()
        assert stats["blends_made"] == 1 and stats["completed"] == 6  # blended once, kept
        health = client.get("/health").json()
        assert health["precision"].startswith("fp32") and health["default_alpha"] == 1.0
        assert client.get("/version").json()["precision"] == health["precision"]
        assert client.get("/ping").status_code == 200


@pytest.mark.parametrize(("body", "status", "words"), [
    (b"{not json", 400, "not JSON"),
    (b'{"inputs": ["x"], "dataframe_records": []}', 400, "exactly one of"),
    (b'{"dataframe_split": {"columns": ["photo"], "data": [["x"]]}}', 400, "column 'image'"),
    (b'{"inputs": ["aGVsbG8="]}', 400, "cannot be decoded"),
    (b'{"inputs": {"image": [5]}}', 400, "expected a base64 string"),
    (b'{"inputs": [5]}', 400, 'expected records with an "image" field, {"image": [...]} or'),
    (b'{"inputs": ["x"], "params": {"alpha": NaN}}', 400, "params.alpha"),
    (b'{"inputs": ["x"], "params": {"alpha": 0.5, "tile": -1}}', 400, "params.tile"),
    (b'{"inputs": []}', 400, "no images"),
])
def test_bad_requests_get_one_line_and_400(models: tuple[Path, SRResNet, SRResNet],
                                           body: bytes, status: int, words: str) -> None:
    with _client(models[0]) as client:
        answer = client.post("/invocations", content=body,
                             headers={"Content-Type": "application/json"})
        assert answer.status_code == status and words in answer.json()["message"], answer.text
        assert client.get("/stats").json()["in_flight"] == 0


def test_size_limits_and_srresnet_less_models_are_refused_in_our_words(
        models: tuple[Path, SRResNet, SRResNet], tmp_path: Path) -> None:
    folder = models[0]
    image = _b64_png(np.zeros((20, 20, 3), np.uint8))
    with _client(folder, max_pixels=600, max_body_bytes=4000) as client:
        # together the two images hold 800 pixels: the second is over the request's budget
        answer = client.post("/invocations", json={"instances": [image, image]})
        assert answer.status_code == 400 and "image[1]" in answer.json()["message"]
        assert "srgan serve --max-pixels" in answer.json()["message"]
        answer = client.post("/invocations", json={"instances": [image] * 50})
        assert answer.status_code == 413 and "--max-body-bytes" in answer.json()["message"]
        answer = client.post("/invocations", content=b"x", headers={"Content-Type": "text/csv"})
        assert answer.status_code == 415
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "srgan.pt").write_bytes((folder / "srgan.pt").read_bytes())
    with _client(alone) as client:
        assert client.get("/health").json()["alphas"] == "1 only"
        answer = client.post("/invocations", json={"instances": [image],
                                                   "params": {"alpha": 0.5}})
        assert answer.status_code == 400 and "--srresnet" in answer.json()["message"]


def test_a_full_server_refuses_at_once_with_retry_after_and_a_deadline_stops_work(
        models: tuple[Path, SRResNet, SRResNet]) -> None:
    slow = {"instances": [_b64_png(_smooth(384, 384))], "params": {"tile": 8}}  # 2304 tiles
    with _client(models[0], queue=0, timeout_s=0.5) as client:
        answers: list[Any] = []
        first = threading.Thread(target=lambda: answers.append(
            client.post("/invocations", json=slow)))
        first.start()
        deadline = time.monotonic() + 10
        while client.get("/stats").json()["running"] == 0:
            assert time.monotonic() < deadline, "the first request never started"
            time.sleep(0.01)
        start = time.perf_counter()
        refused = client.post("/invocations", json=slow)
        assert time.perf_counter() - start < 0.5
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert "retry after" in refused.json()["message"]
        first.join(timeout=10)
        assert answers[0].status_code == 504 and "--timeout" in answers[0].json()["message"]
        while client.get("/stats").json()["in_flight"]:  # stops at the next tile
            assert time.monotonic() < deadline, "the timed-out request kept computing"
            time.sleep(0.01)
        stats = client.get("/stats").json()
        assert stats["timed_out"] == 1 and stats["cancelled"] == 1 and stats["refused"] == 1
        assert 0 < stats["tiles"] < 2304
        time.sleep(0.2)
        assert client.get("/stats").json()["tiles"] == stats["tiles"]


def test_a_diverged_or_missing_model_stops_serve_before_it_listens(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the CLI records its error in ./.srgan
    diverged = SRResNet(blocks=1, channels=4, scale=4).eval()
    with torch.no_grad():
        diverged.head[0].bias.fill_(float("inf"))
    save_generator(diverged, tmp_path / "srgan.pt", {})
    port = str(free_port())
    assert cli.main(["serve", "--model", str(tmp_path / "srgan.pt"), "--port", port]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'srgan.pt'}: 1 weight tensor(s) hold NaN or infinity" in err
    assert "diverged" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["serve", "--model", str(tmp_path / "nope.pt"), "--port", port]) == 2
    assert "nope.pt: missing" in capsys.readouterr().err


def test_a_generator_whose_output_overflows_is_a_500_naming_it(tmp_path: Path) -> None:
    huge = SRResNet(blocks=1, channels=4, scale=4).eval()
    with torch.no_grad():
        huge.head[0].weight.fill_(3e38)  # finite weights, infinite activations
    save_generator(huge, tmp_path / "srgan.pt", {})
    with _client(tmp_path) as client:
        answer = client.post("/invocations", json={"instances": [_b64_png(_smooth(8, 8))]})
        assert answer.status_code == 500
        assert answer.json()["message"].startswith(f"{tmp_path / 'srgan.pt'}: the generator")
        assert "diverged" in answer.json()["message"]


def test_a_registered_srgan_is_served_at_its_registered_alpha(
        mlflow_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from srcore import tracking

    monkeypatch.chdir(tmp_path)
    srresnet, srgan = _models(tmp_path / "files")
    with tracking.stage_run("t", "finetune") as tracker:
        tracker.log_generator(srgan, "srgan", register=True, blend_base=srresnet,
                              serve_alpha=0.3)
    tracking.promote("srgan", "1", "test")
    rgb = np.random.default_rng(4).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    from srcore.server import Engine

    opts = ServerOptions(precision="fp32", channels_last=False)  # models:/srgan@champion
    with TestClient(build_app(Engine(opts), opts)) as client:
        health = client.get("/health").json()
        assert health["model"] == "models:/srgan@champion" and health["default_alpha"] == 0.3
        answer = client.post("/invocations", json={"instances": [_b64_png(rgb)]})
        assert_same_pixels(_png(answer.json()["predictions"][0]["image"]),
                           upscale_image(blend(srresnet, srgan, 0.3), rgb, 4))


def test_admission_counts_and_estimates_retry_after_from_service_times() -> None:
    admission = Admission(slots=1, queue=1)
    jobs = [Job(deadline=math.inf) for _ in range(3)]
    assert admission.admit(jobs[0]) and admission.admit(jobs[1])
    assert not admission.admit(jobs[2])
    assert admission.retry_after() == 1  # nothing timed yet
    admission.start(jobs[0])
    admission.leave(jobs[0], service_s=2.2)
    admission.start(jobs[1])
    assert admission.retry_after() == 3  # one running, 2.2 s each
    admission.leave(jobs[1])
    admission.leave(jobs[1])  # twice is harmless
    state = admission.snapshot()
    assert state["in_flight"] == 0 and state["refused"] == 1 and state["received"] == 3


def test_parse_request_takes_records_columns_and_lists() -> None:
    assert parse_request(b'{"inputs": {"image": "a"}, "params": {"alpha": 1}}') == (
        ["a"], {"alpha": 1})
    assert parse_request(b'{"dataframe_split": {"columns": ["x", "image"], '
                         b'"data": [[1, "a"], [2, "b"]]}}')[0] == ["a", "b"]


# ------------------------------------------------------------ a real server, overloaded

LOAD_SIDE = 512
LOAD_REQUESTS = 16
LOAD_CONCURRENCY = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`srgan serve` in its own process: a tiny generator, one slot, a queue of two."""
    folder = tmp_path_factory.mktemp("served")
    _models(folder, channels=4, skip=False)
    port = free_port()
    log_path = folder / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "srcore.cli", "serve", "--model", str(folder / "srgan.pt"),
             "--port", str(port), "--slots", "1", "--queue", "2", "--timeout", "60",
             # the bound then fits this load: one 512x512 image a request, 2 MB a body
             "--max-pixels", str(LOAD_SIDE ** 2), "--max-body-bytes", str(2 * 2**20)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(f"{base}/ping", proc, log_path, 60)
            yield base
        finally:
            stop_process(proc, timeout_s=15)
    assert "peak memory bound" in log_path.read_text()


def _request(base: str, body: bytes) -> tuple[int, dict[str, str], bytes, float]:
    """POST /invocations on its own connection: (status, headers, body, seconds)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    start = time.perf_counter()
    try:
        conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return response.status, headers, data, time.perf_counter() - start
    finally:
        conn.close()


def _stats(base: str) -> dict[str, Any]:
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/stats")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def test_overload_is_refused_at_once_and_goodput_holds(server: str) -> None:
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [
        [_b64_png(_smooth(LOAD_SIDE, LOAD_SIDE))]]}}).encode()
    singles = [_request(server, body) for _ in range(3)]  # the first also warms up
    assert all(status == 200 for status, *_ in singles)
    one_at_a_time_s = statistics.median(seconds for *_, seconds in singles)
    before = _stats(server)

    start = time.perf_counter()
    with ThreadPoolExecutor(LOAD_CONCURRENCY) as pool:
        results = list(pool.map(lambda _: _request(server, body), range(LOAD_REQUESTS)))
    wall = time.perf_counter() - start

    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 503]
    assert len(ok) + len(refused) == LOAD_REQUESTS, sorted({r[0] for r in results})
    for _, _, data, _ in ok:
        image = _png(json.loads(data)["predictions"][0]["image"])
        assert image.shape == (4 * LOAD_SIDE, 4 * LOAD_SIDE, 3)
    for _, headers, data, seconds in refused:
        assert int(headers["retry-after"]) >= 1 and "busy" in json.loads(data)["message"]
        assert seconds < 1.0, f"a refusal took {seconds:.2f} s"
    # goodput: at least what one-at-a-time serving finishes in the same wall time
    one_at_a_time = int(wall / one_at_a_time_s)
    after = _stats(server)
    print(f"\nload: {len(ok)} of {LOAD_REQUESTS} succeeded and {len(refused)} were refused "
          f"(slowest refusal {max((r[3] for r in refused), default=0):.3f} s) in {wall:.1f} s; "
          f"one at a time: {one_at_a_time_s:.2f} s each, {one_at_a_time} in that time; peak "
          f"RSS {after['peak_rss_bytes'] / 2**20:.0f} MiB, bound "
          f"{after['memory_bound_bytes'] / 2**20:.0f} MiB")
    assert len(ok) >= max(1, one_at_a_time)
    assert after["completed"] - before["completed"] == len(ok)
    assert after["refused"] - before["refused"] == len(refused)
    assert after["in_flight"] == 0 and after["failed"] == before["failed"]
    assert after["peak_rss_bytes"] < after["memory_bound_bytes"]


def test_a_client_that_gives_up_stops_its_work(server: str) -> None:
    # tile 16 on 512x512: 1024 tiles, far more than run in the time the client waits
    body = json.dumps({"inputs": [_b64_png(_smooth(LOAD_SIDE, LOAD_SIDE))],
                       "params": {"tile": 16}}).encode()
    before = _stats(server)
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
    deadline = time.monotonic() + 20
    while _stats(server)["tiles"] < before["tiles"] + 5:  # it is computing
        assert time.monotonic() < deadline, "the request never started computing"
        time.sleep(0.02)
    conn.sock.close()  # the client gives up: closes its connection without reading
    conn.close()
    while (now := _stats(server))["in_flight"]:
        assert time.monotonic() < deadline, "the abandoned request kept computing"
        time.sleep(0.02)
    assert now["cancelled"] == before["cancelled"] + 1
    assert now["client_gone"] == before["client_gone"] + 1
    assert now["completed"] == before["completed"]
    assert now["tiles"] - before["tiles"] < 1024
    time.sleep(0.3)
    assert _stats(server)["tiles"] == now["tiles"]  # nothing more was computed
