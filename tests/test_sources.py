"""Dataset registry and materialisation into data/<name>/."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from srcore.config import DatasetSpec
from srcore.data import sources
from tests.conftest import make_images


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
