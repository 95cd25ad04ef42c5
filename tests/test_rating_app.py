"""The rating page (srcore/rating/app.py): bad requests refused with a clear status and no
change, nothing on a page or an image saying which method made it, and `kill -9` of a real
`srgan rate` losing no committed score."""

from __future__ import annotations

import http.client
import json
import os
import signal
import sqlite3
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from srcore.rating import protocol
from srcore.rating.app import RatingSession, build_app
from srcore.rating.store import Key, Store
from tests.rating_project import METHOD_WORDS, make_project, rating_server, token_of


def _catalog() -> protocol.Catalog:
    rng = np.random.default_rng(0)
    # Set and image names that no page may show either.
    pairs = [protocol.ImagePair(s, name, hr, hr[::4, ::4].copy())
             for s, name, hr in (
                 ("calibset", "lighthouse", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)),
                 ("ratedset", "butterfly", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)),
                 ("ratedset", "zebra", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))]
    fake = {"srresnet": lambda lr: protocol.nearest_upscale(lr, 4) // 2,
            "srgan": lambda lr: protocol.nearest_upscale(lr, 4) // 3}
    return protocol.build_catalog(pairs[1:], pairs[:1], 4, fake,
                                  lambda lr: protocol.nearest_upscale(lr, 4) // 4)


@pytest.fixture
def app(tmp_path: Path) -> tuple[TestClient, Store, dict[str, str]]:
    store = Store(tmp_path / "ratings" / "ratings.sqlite")
    tokens = {name: store.add_rater(name) for name in ("alice", "bob")}
    client = TestClient(build_app(RatingSession(store, _catalog(), 0.2)))
    return client, store, tokens


def _display(html: str) -> str:
    return html.split('const display = "', 1)[1].split('"', 1)[0]


def _start(client: TestClient, token: str) -> str:
    """Calibrate and open the first image; returns its display id."""
    assert client.post(f"/r/{token}/calibrated", follow_redirects=False).status_code == 303
    page = client.get(f"/r/{token}")
    assert page.status_code == 200 and "How good is this image?" in page.text
    return _display(page.text)


def _state(store: Store) -> list[tuple[Any, ...]]:
    with sqlite3.connect(store.path) as db:
        return (db.execute("SELECT * FROM ratings").fetchall()
                + db.execute("SELECT display_id, used_at FROM displays ORDER BY 1").fetchall())


def test_bad_requests_are_refused_with_a_clear_status_and_change_nothing(app: Any) -> None:
    client, store, tokens = app
    alice, bob = tokens["alice"], tokens["bob"]
    shown = _start(client, alice)
    before = _state(store)
    cases = [
        ({"token": alice, "display": shown, "score": 0}, 422, "integer from 1 to 5"),
        ({"token": alice, "display": shown, "score": 6}, 422, "integer from 1 to 5"),
        ({"token": alice, "display": shown, "score": "five"}, 422, "integer from 1 to 5"),
        ({"token": alice, "display": shown, "score": 4.5}, 422, "integer from 1 to 5"),
        ({"token": alice, "display": shown}, 422, "score is missing"),
        ({"token": "not-a-token", "display": shown, "score": 3}, 403, "unknown rater token"),
        ({"token": bob, "display": shown, "score": 3}, 403, "another rater"),
        ({"token": alice, "display": "nope", "score": 3}, 404, "unknown image id"),
        ({"token": 5, "display": shown, "score": 3}, 400, "string 'token'"),
    ]
    for body, status, words in cases:
        answer = client.post("/api/score", json=body)
        assert (answer.status_code, words in answer.json()["error"]) == (status, True), body
    text = client.post("/api/score", content=b"score=3",
                       headers={"Content-Type": "text/plain"})
    assert text.status_code == 400 and text.json()["error"] == "the body is not JSON"
    big = client.post("/api/score", content=b"x" * (10 * 2**20))
    assert big.status_code == 413 and "over the limit" in big.json()["error"]
    assert _state(store) == before
    ok = client.post("/api/score", json={"token": alice, "display": shown, "score": 3})
    assert ok.status_code == 200 and ok.json() == {"saved": True, "next": f"/r/{alice}"}
    after = _state(store)
    replay = client.post("/api/score", json={"token": alice, "display": shown, "score": 3})
    assert replay.status_code == 409 and "replayed" in replay.json()["error"]
    assert _state(store) == after
    assert client.get("/img/no-such-id").status_code == 404
    assert client.get("/r/not-a-token").status_code == 403


def test_no_page_or_image_says_which_method_made_it(app: Any) -> None:
    client, store, tokens = app
    token = tokens["alice"]
    pages = [client.get("/").text, client.get(f"/r/{token}").text]  # calibration
    calibration_ids = [s.split('"')[0] for s in pages[1].split('src="/img/')[1:]]
    assert len(calibration_ids) == 2
    client.post(f"/r/{token}/calibrated")
    seen_ids = set(calibration_ids)
    rated = len(_catalog().rated)
    for _ in range(2 * rated + 1):  # every version and the repeats, then the last page
        page = client.get(f"/r/{token}").text
        pages.append(page)
        if "All done" in page:
            break
        shown = _display(page)
        assert shown not in seen_ids
        seen_ids.add(shown)
        image = client.get(f"/img/{shown}")
        assert image.headers["content-type"] == "image/png"
        assert image.headers["cache-control"] == "no-store"
        assert "content-disposition" not in image.headers
        assert client.post("/api/score", json={"token": token, "display": shown,
                                               "score": 3}).status_code == 200
    pages += [client.get(f"/r/{token}/again").text, client.get(f"/r/{token}/pause").text]
    assert "All done" in pages[-3]
    for page in pages:
        assert METHOD_WORDS.search(page) is None, METHOD_WORDS.search(page)
        for key in _catalog().images:
            assert key.image not in page and key.set_name not in page
    assert rated == 10  # 2 images x 5 versions, and ceil(0.2 * 10) shown twice
    assert len(store.rated(store.rater(token).rater_id)) == 12


def test_the_last_score_can_be_changed_and_replaces_the_earlier_one(app: Any) -> None:
    client, store, tokens = app
    token = tokens["bob"]
    shown = _start(client, token)
    client.post("/api/score", json={"token": token, "display": shown, "score": 2})
    again = client.get(f"/r/{token}/again").text
    assert "your new score replaces the earlier one" in again
    client.post("/api/score", json={"token": token, "display": _display(again), "score": 5})
    rows = store.ratings()
    assert [(r["score"], r["revisions"]) for r in rows] == [(5, 1)]


def test_a_10_mb_body_is_refused_from_its_header_without_being_read(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj")
    with rating_server(root, ["alice"]) as (base, links, _):
        conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=10)
        conn.putrequest("POST", "/api/score")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(10 * 2**20))
        conn.endheaders()
        conn.send(b"{" + b" " * 1000)  # 1 kB of the promised 10 MB, then wait for the answer
        answer = conn.getresponse()
        assert answer.status == 413
        assert "over the limit" in json.loads(answer.read())["error"]
        conn.close()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def _post(url: str, body: dict[str, Any]) -> int:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return int(resp.status)


def test_kill_9_mid_session_loses_no_committed_score(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj")
    db = root / "ratings" / "ratings.sqlite"
    given: list[int] = []
    with rating_server(root, ["alice"]) as (base, links, proc):
        token = token_of(links["alice"])
        urllib.request.urlopen(urllib.request.Request(
            f"{base}/r/{token}/calibrated", data=b"", method="POST"), timeout=10)
        for score in (1, 2, 3, 4, 5):
            shown = _display(_get(f"{base}/r/{token}"))
            assert _post(f"{base}/api/score", {"token": token, "display": shown,
                                               "score": score}) == 200
            given.append(score)
        _get(f"{base}/r/{token}")  # an image on screen, not yet scored
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    # Read the file as a new process would after the crash (the WAL is replayed).
    with sqlite3.connect(db) as conn:
        stored = [r[0] for r in conn.execute("SELECT score FROM ratings ORDER BY rated_at")]
    assert stored == given
    # A restarted server resumes where the rater stopped: image 6 of the plan.
    with rating_server(root, []) as (base, _, _):
        page = _get(f"{base}/r/{token}")
        assert "Image 6 of" in page


def test_the_store_refuses_a_rated_method_whose_weights_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from srcore import cli
    from srcore.models.srresnet import SRResNet
    from srcore.training.checkpoints import save_generator

    root = make_project(tmp_path / "proj")
    store = Store(root / "ratings" / "ratings.sqlite")
    token = store.add_rater("alice")
    rater = store.rater(token)
    store.record_method("srgan", "models/srgan.pt", "old-weights")
    store.submit(token, store.new_display(rater.rater_id, "rating", Key("te", "img00", "srgan")),
                 4)
    save_generator(SRResNet(blocks=1, channels=8, scale=4), root / "models" / "srgan.pt", {})
    monkeypatch.chdir(root)
    code = cli.main(["rate", "--no-dvc", "--port", "1"])
    assert code == 2
    failure = (root / ".srgan" / "errors" / "rate.txt").read_text()
    assert "'srgan' was rated (1 scores) with other weights" in failure


def test_stopping_the_server_versions_the_ratings_with_dvc_and_pushes_them(
        tmp_path: Path) -> None:
    import subprocess

    root = make_project(tmp_path / "proj")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"],
                ["dvc", "remote", "add", "-d", "local", str(tmp_path / "remote")]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    with rating_server(root, ["alice"], dvc=True) as (base, links, proc):
        token = token_of(links["alice"])
        urllib.request.urlopen(urllib.request.Request(
            f"{base}/r/{token}/calibrated", data=b"", method="POST"), timeout=10)
        shown = _display(_get(f"{base}/r/{token}"))
        assert _post(f"{base}/api/score", {"token": token, "display": shown, "score": 4}) == 200
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=60) == 0
    assert "path: ratings" in (root / "ratings.dvc").read_text()
    assert sorted(p.name for p in (root / "ratings").iterdir()) == ["ratings.sqlite"]
    assert len([p for p in (tmp_path / "remote").rglob("*") if p.is_file()]) == 2
    log = next(root.glob("rate-*.log")).read_text()
    assert "ratings versioned in ratings.dvc, 2 file(s) pushed" in log
