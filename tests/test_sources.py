"""Dataset registry and materialisation into data/<name>/."""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from srcore.config import DatasetSpec
from srcore.data import sources
from srcore.data.download import DownloadError
from tests.conftest import make_images
from tests.test_download import Behaviour, Seen, http_servers, send_body, send_status


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_registry_holds_the_fields_datasets() -> None:
    expected = {"sample_train", "sample_test", "div2k_train", "div2k_valid", "set5", "set14",
                "bsd100", "urban100", "t91", "bsd200", "general100"}
    assert expected <= set(sources.REGISTRY)
    for name, source in sources.REGISTRY.items():
        assert source.embedded or source.urls, name
        for url in source.urls:
            assert url.startswith(("http://", "https://")), url


def test_sample_split_is_fixed_disjoint_and_rgb(tmp_path: Path) -> None:
    assert not set(sources.SAMPLE_TRAIN) & set(sources.SAMPLE_TEST)
    data = tmp_path / "data"
    train = sources.materialize(DatasetSpec(name="sample_train"), data, retries=0, timeout=1)
    test = sources.materialize(DatasetSpec(name="sample_test"), data, retries=0, timeout=1)
    assert len(list(train.iterdir())) == len(sources.SAMPLE_TRAIN)
    assert sorted(p.stem for p in test.iterdir()) == sorted(
        Path(n).stem for n in sources.SAMPLE_TEST)
    for p in [*train.iterdir(), *test.iterdir()]:
        with Image.open(p) as im:
            assert im.mode == "RGB", p  # grey photographs converted to RGB
    # Same bytes on every run: data.dvc's hash (and every DVC skip downstream) depends on it.
    first = _digests(train)
    sources.materialize(DatasetSpec(name="sample_train"), data, retries=0, timeout=1)
    assert _digests(train) == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_local_folder_and_file_url_sources(tmp_path: Path) -> None:
    src = tmp_path / "mine"
    make_images(src / "nested", 3)
    data = tmp_path / "data"
    out = sources.materialize(DatasetSpec(name="mine", url=str(src)), data, retries=0, timeout=1)
    assert sorted(p.name for p in out.iterdir()) == ["img00.png", "img01.png", "img02.png"]
    out2 = sources.materialize(DatasetSpec(name="mine2", url=f"file://{src}"), data,
                               retries=0, timeout=1)
    assert _digests(out2) == _digests(out)


def test_local_archive_source_is_extracted(tmp_path: Path) -> None:
    make_images(tmp_path / "imgs", 2)
    archive = tmp_path / "set.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "imgs", arcname="set/HR")
    out = sources.materialize(DatasetSpec(name="arch", url=str(archive)), tmp_path / "data",
                              retries=0, timeout=1)
    assert len(list(out.iterdir())) == 2


def test_unknown_name_and_missing_path_are_clear(tmp_path: Path) -> None:
    with pytest.raises(sources.SourceError, match="'nosuch' is not in the registry"):
        sources.materialize(DatasetSpec(name="nosuch"), tmp_path / "data", retries=0, timeout=1)
    with pytest.raises(sources.SourceError, match="does not exist"):
        sources.materialize(DatasetSpec(name="x", url=str(tmp_path / "missing")),
                            tmp_path / "data", retries=0, timeout=1)


def test_failed_fetch_keeps_the_previous_copy(tmp_path: Path) -> None:
    src = tmp_path / "mine"
    make_images(src, 2)
    data = tmp_path / "data"
    spec = DatasetSpec(name="mine", url=str(src))
    sources.materialize(spec, data, retries=0, timeout=1)
    before = _digests(data / "mine")
    for p in src.iterdir():
        p.unlink()
    with pytest.raises(sources.SourceError, match="no images"):
        sources.materialize(spec, data, retries=0, timeout=1)
    assert _digests(data / "mine") == before


def test_remote_source_downloads_through_a_local_server(tmp_path: Path, monkeypatch) -> None:
    import http.server
    import threading
    from functools import partial

    make_images(tmp_path / "www" / "pack" / "HR", 2)
    with tarfile.open(tmp_path / "www" / "pack.tar", "w") as tar:
        tar.add(tmp_path / "www" / "pack", arcname="pack")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "cache"))
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/pack.tar"
        out = sources.materialize(DatasetSpec(name="remote", url=url), tmp_path / "data",
                                  retries=1, timeout=5)
    finally:
        server.shutdown()
    arrays = [np.asarray(Image.open(p)) for p in sorted(out.iterdir())]
    assert len(arrays) == 2 and arrays[0].shape == (48, 64, 3)


# ----------------------------------------------- downloads through servers on 127.0.0.1
# Each server below misbehaves on purpose; `serve` starts one and counts its requests.


@pytest.fixture
def serve() -> Iterator[Callable[[Behaviour], tuple[str, Seen]]]:
    with http_servers() as start:
        yield start


def _tar_of_images(tmp: Path, name: str, count: int, seed: int) -> bytes:
    make_images(tmp / name / "HR", count, seed=seed)
    archive = tmp / f"{name}.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tmp / name, arcname=name)
    return archive.read_bytes()


def _cut_without_length(h: BaseHTTPRequestHandler, body: bytes) -> None:
    """HTTP/1.0 without Content-Length: the body ends where the server hangs up, so the
    client cannot tell a cut from the end."""
    h.send_response(200)
    h.end_headers()
    h.wfile.write(body)


def _entries(cache: Path) -> list[str]:
    """Cache entries (one folder per URL), not their lock files."""
    return sorted(p.name for p in cache.iterdir() if p.suffix != ".lock")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fetch(name: str, url: str, data: Path, log: list[str] | None = None, **spec) -> Path:
    return sources.materialize(DatasetSpec(name=name, url=url, **spec), data, retries=1,
                               timeout=5, log=(log if log is not None else []).append)


def test_a_body_cut_without_content_length_is_fetched_again(serve, cache: Path,
                                                           tmp_path: Path) -> None:
    body = _tar_of_images(tmp_path / "www", "pack", 3, seed=0)
    url, seen = serve(lambda h, i: _cut_without_length(h, body[:len(body) // 2] if i == 0
                                                       else body))
    log: list[str] = []
    out = _fetch("remote", url, tmp_path / "proj" / "data", log)
    assert len(list(out.iterdir())) == 3
    assert seen.count == 2
    assert "deleted it, fetching it again" in log[0] and url in log[0]
    # Verified now: the next run uses the cache without asking the server again.
    _fetch("remote", url, tmp_path / "proj" / "data")
    assert seen.count == 2


def test_a_server_that_always_cuts_short_fails_in_one_line(serve, cache: Path,
                                                          tmp_path: Path) -> None:
    body = _tar_of_images(tmp_path / "www", "pack", 3, seed=0)
    url, seen = serve(lambda h, i: _cut_without_length(h, body[: len(body) - 4096]))
    data = tmp_path / "proj" / "data"
    for _ in range(2):  # the truncated file is never trusted: the rerun fails the same way
        with pytest.raises(sources.SourceError) as err:
            _fetch("remote", url, data)
        message = str(err.value)
        assert message.startswith(f"dataset 'remote' ({url}): the downloaded file is ")
        assert "cut short" in message
        assert message.endswith("fetched again, still bad: fix or remove the source")
        assert "\n" not in message
    assert seen.count == 4
    assert not (data / "remote").exists()
    assert _entries(cache) == []  # nothing left that a later run could trust


def test_a_cut_download_fails_the_cli_in_one_line(serve, cache: Path, tmp_path: Path,
                                                  mlflow_store: str, capsys) -> None:
    from srcore import cli
    from tests.conftest import tiny_params_dict, write_params

    body = _tar_of_images(tmp_path / "www", "pack", 2, seed=0)
    url, _ = serve(lambda h, i: _cut_without_length(h, body[:3000]))
    root = tmp_path / "proj"
    root.mkdir()
    write_params(root / "params.yaml", tiny_params_dict(
        data={"train": [{"name": "remote", "url": url}]}))
    argv = ["--params", str(root / "params.yaml"), "--root", str(root), "download", "--no-dvc"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # (MLflow may log its own INFO line when it creates the experiment.)
    (line,) = [line for line in err.splitlines() if line.startswith("srgan download:")]
    assert line.startswith(f"srgan download: error: dataset 'remote' ({url}): ")
    assert line.endswith("fix or remove the source")


def test_two_urls_ending_in_the_same_file_name_are_two_downloads(serve, cache: Path,
                                                                tmp_path: Path) -> None:
    body_a = _tar_of_images(tmp_path / "a", "set", 2, seed=0)
    body_b = _tar_of_images(tmp_path / "b", "set", 2, seed=7)
    url_a, seen_a = serve(lambda h, i: send_body(h, body_a))
    url_b, seen_b = serve(lambda h, i: send_body(h, body_b))
    assert url_a.rsplit("/", 1)[1] == url_b.rsplit("/", 1)[1]
    data = tmp_path / "proj" / "data"
    out_a, out_b = _fetch("a", url_a, data), _fetch("b", url_b, data)
    assert seen_a.count == 1 and seen_b.count == 1
    assert _digests(out_a) == _digests(tmp_path / "a" / "set" / "HR")
    assert _digests(out_b) == _digests(tmp_path / "b" / "set" / "HR")
    assert _digests(out_a) != _digests(out_b)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_cached_archive_damaged_on_disk_is_fetched_again(serve, cache: Path, tmp_path: Path,
                                                           damage: str) -> None:
    body = _tar_of_images(tmp_path / "www", "pack", 3, seed=0)
    url, seen = serve(lambda h, i: send_body(h, body))
    data = tmp_path / "proj" / "data"
    first = _digests(_fetch("remote", url, data))
    (cached,) = cache.rglob("data.bin")
    raw = bytearray(cached.read_bytes())
    if damage == "truncate":
        del raw[len(raw) // 2:]
    else:  # same size, one byte changed inside an image: only the digest can tell
        raw[1500] ^= 0xFF
    cached.write_bytes(bytes(raw))
    log: list[str] = []
    assert _digests(_fetch("remote", url, data, log)) == first
    assert seen.count == 2
    assert log and log[0].startswith("dataset 'remote': the cached download of")


def test_a_changed_sha256_refetches_and_never_reuses_the_old_tree(serve, cache: Path,
                                                                 tmp_path: Path) -> None:
    """The extracted folder belongs to one archive: a new archive is extracted afresh."""
    old = _tar_of_images(tmp_path / "v1", "pack", 2, seed=0)
    new = _tar_of_images(tmp_path / "v2", "pack", 2, seed=5)
    bodies = [old]
    url, seen = serve(lambda h, i: send_body(h, bodies[-1]))
    data = tmp_path / "proj" / "data"
    _fetch("remote", url, data)
    bodies.append(new)
    out = _fetch("remote", url, data, sha256=hashlib.sha256(new).hexdigest())
    assert seen.count == 2
    assert _digests(out) == _digests(tmp_path / "v2" / "pack" / "HR")


def test_a_404_is_not_retried_and_names_the_dataset(serve, cache: Path, tmp_path: Path) -> None:
    url, seen = serve(lambda h, i: send_status(h, 404))
    with pytest.raises(DownloadError) as err:
        sources.materialize(DatasetSpec(name="gone", url=url), tmp_path / "data", retries=3,
                            timeout=5)
    assert seen.count == 1
    assert err.value.transient is False
    assert str(err.value).startswith(f"dataset 'gone': HTTP 404 for {url}")
    assert str(err.value).endswith("fix the dataset's url or remove it")


def test_an_unreachable_host_is_a_transient_error(cache: Path, tmp_path: Path) -> None:
    from tests.conftest import free_port

    url = f"http://127.0.0.1:{free_port()}/set.zip"
    with pytest.raises(DownloadError) as err:
        sources.materialize(DatasetSpec(name="far", url=url), tmp_path / "data", retries=0,
                            timeout=5)
    assert err.value.transient is True
    assert str(err.value).startswith(f"dataset 'far': giving up on {url}")


def test_an_unsafe_remote_archive_names_dataset_and_url(serve, cache: Path,
                                                        tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        make_images(tmp_path / "imgs", 1)
        tar.add(tmp_path / "imgs" / "img00.png", arcname="../evil.png")
    body = archive.read_bytes()
    url, _ = serve(lambda h, i: send_body(h, body))
    with pytest.raises(sources.SourceError) as err:
        _fetch("x", url, tmp_path / "proj" / "data")
    assert str(err.value) == (
        f"dataset 'x' ({url}): archive entry '../evil.png' escapes the target with '..'; "
        "the archive is unsafe: fix or remove the source")
    assert _entries(cache) == []
    assert not (tmp_path / "proj" / "evil.png").exists()


def test_an_unsafe_local_archive_names_dataset_and_path(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    import zipfile

    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../evil.png", b"x")
    with pytest.raises(sources.SourceError) as err:
        _fetch("x", str(archive), tmp_path / "proj" / "data")
    assert str(err.value).startswith(f"dataset 'x' ({archive}): archive entry '../evil.png'")
    assert str(err.value).endswith("the archive is unsafe: fix or remove the source")


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_a_local_file_that_is_neither_image_nor_archive_is_one_line(tmp_path: Path,
                                                                    scheme: str) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not an archive\n" * 50)
    with pytest.raises(sources.SourceError) as err:
        _fetch("mine", f"{scheme}{notes}", tmp_path / "proj" / "data")
    message = str(err.value)
    assert message.startswith(f"dataset 'mine': {notes} is neither a zip nor a tar archive")
    assert message.endswith("its url: must name a folder of images, an image (.png, .bmp, .jpg, "
                            ".jpeg, .tif, .tiff, .webp) or a complete zip/tar archive")
    assert "\n" not in message
    assert not (tmp_path / "proj" / "data" / "mine").exists()


def test_relative_local_paths_resolve_against_the_project_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_images(tmp_path / "photos", 2)
    project, elsewhere = tmp_path / "work" / "proj", tmp_path / "elsewhere" / "cwd"
    elsewhere.mkdir(parents=True)
    make_images(elsewhere.parent / "photos", 5)  # what ../photos means from the cwd
    monkeypatch.chdir(elsewhere)
    out = _fetch("mine", "../../photos", project / "data")
    assert _digests(out) == _digests(tmp_path / "photos")
    with pytest.raises(sources.SourceError) as err:
        _fetch("gone", "../nowhere", project / "data")
    assert str(err.value) == f"dataset 'gone': {tmp_path / 'work' / 'nowhere'} does not exist"
