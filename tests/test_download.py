"""Tests for srcore.data.download against a throwaway HTTP server on 127.0.0.1.

Each test scripts the server's behaviour per request so that resume, retry, checksum and
timeout paths are exercised for real over a socket rather than through mocks.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from srcore.data.download import DownloadError, download, sha256_file

PAYLOAD = os.urandom(200_000)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@dataclass
class Seen:
    """What the server received, so tests can assert on the client's protocol behaviour."""

    paths: list[str] = field(default_factory=list)
    ranges: list[str | None] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.paths)


# A behaviour gets (handler, request index) and writes the whole response itself.
Behaviour = Callable[[BaseHTTPRequestHandler, int], None]


def send_body(h: BaseHTTPRequestHandler, body: bytes, *, honour_range: bool = True) -> None:
    """Serve ``body``, answering ``Range: bytes=N-`` with 206 like a real file server."""
    rng = h.headers.get("Range")
    if honour_range and rng and rng.startswith("bytes="):
        start = int(rng[len("bytes="):].split("-")[0])
        if start >= len(body):
            h.send_response(416)
            h.send_header("Content-Range", f"bytes */{len(body)}")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        chunk = body[start:]
        h.send_response(206)
        h.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
    else:
        chunk = body
        h.send_response(200)
    h.send_header("Content-Length", str(len(chunk)))
    h.end_headers()
    h.wfile.write(chunk)


def send_status(h: BaseHTTPRequestHandler, status: int) -> None:
    h.send_response(status)
    h.send_header("Content-Length", "0")
    h.end_headers()


@contextlib.contextmanager
def http_servers() -> Iterator[Callable[[Behaviour], tuple[str, Seen]]]:
    """Yields start(behaviour) -> (url, Seen); every server started stops on exit."""
    servers: list[ThreadingHTTPServer] = []
    release = threading.Event()  # lets deliberately hanging handlers exit at teardown

    def start(behaviour: Behaviour) -> tuple[str, Seen]:
        seen = Seen()
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                with lock:
                    index = seen.count
                    seen.paths.append(self.path)
                    seen.ranges.append(self.headers.get("Range"))
                # The client hanging up early is exactly what some tests provoke.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    behaviour(self, index)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.release = release  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/data.bin", seen

    try:
        yield start
    finally:
        release.set()
        for server in servers:
            server.shutdown()
            server.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[[Behaviour], tuple[str, Seen]]]:
    """Start a server with a given behaviour; returns (url, Seen)."""
    with http_servers() as start:
        yield start


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_plain_download_verified_and_atomic(serve, tmp_path: Path) -> None:
    url, seen = serve(lambda h, i: send_body(h, PAYLOAD))
    dest = tmp_path / "sub" / "data.bin"
    out = download(url, dest, sha256=PAYLOAD_SHA.upper(), backoff=0.01, progress=False)
    assert out == dest
    assert dest.read_bytes() == PAYLOAD
    assert sha256_file(dest) == PAYLOAD_SHA
    assert leftovers(dest.parent) == ["data.bin"]  # no .part left behind
    assert seen.count == 1 and seen.ranges == [None]


def test_resume_after_dropped_connection(serve, tmp_path: Path) -> None:
    def behaviour(h: BaseHTTPRequestHandler, index: int) -> None:
        if index == 0:
            # Promise the full length, deliver half, hang up.
            h.send_response(200)
            h.send_header("Content-Length", str(len(PAYLOAD)))
            h.end_headers()
            h.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        send_body(h, PAYLOAD)

    url, seen = serve(behaviour)
    dest = tmp_path / "data.bin"
    download(url, dest, sha256=PAYLOAD_SHA, backoff=0.01, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert seen.count == 2
    assert seen.ranges[0] is None
    assert seen.ranges[1] == f"bytes={len(PAYLOAD) // 2}-"
    assert leftovers(tmp_path) == ["data.bin"]


def test_resume_from_existing_part_and_restart_when_range_ignored(serve, tmp_path: Path) -> None:
    dest = tmp_path / "data.bin"
    part = tmp_path / "data.bin.part"
    part.write_bytes(b"garbage that a Range-ignoring server must overwrite")
    url, seen = serve(lambda h, i: send_body(h, PAYLOAD, honour_range=False))
    download(url, dest, sha256=PAYLOAD_SHA, backoff=0.01, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert seen.ranges[0] is not None and seen.count == 1
    assert not part.exists()


def test_complete_part_answered_416_is_verified(serve, tmp_path: Path) -> None:
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD)
    url, seen = serve(lambda h, i: send_body(h, PAYLOAD))
    download(url, dest, sha256=PAYLOAD_SHA, backoff=0.01, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert seen.ranges == [f"bytes={len(PAYLOAD)}-"]


def test_retries_on_500_then_succeeds(serve, tmp_path: Path) -> None:
    def behaviour(h: BaseHTTPRequestHandler, index: int) -> None:
        if index < 2:
            send_status(h, 500)
        else:
            send_body(h, PAYLOAD)

    url, seen = serve(behaviour)
    dest = tmp_path / "data.bin"
    download(url, dest, sha256=PAYLOAD_SHA, retries=3, backoff=0.01, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert seen.count == 3


def test_gives_up_after_retries_on_503(serve, tmp_path: Path) -> None:
    url, seen = serve(lambda h, i: send_status(h, 503))
    dest = tmp_path / "data.bin"
    with pytest.raises(DownloadError, match="HTTP 503") as err:
        download(url, dest, retries=2, backoff=0.01, progress=False)
    assert url in str(err.value)
    assert seen.count == 3
    assert not dest.exists()


def test_checksum_mismatch_removes_everything(serve, tmp_path: Path) -> None:
    wrong = bytes(b ^ 0xFF for b in PAYLOAD[:1000]) + PAYLOAD[1000:]
    url, _ = serve(lambda h, i: send_body(h, wrong))
    dest = tmp_path / "data.bin"
    with pytest.raises(DownloadError, match="sha256") as err:
        download(url, dest, sha256=PAYLOAD_SHA, backoff=0.01, progress=False)
    message = str(err.value)
    assert url in message
    assert PAYLOAD_SHA in message and hashlib.sha256(wrong).hexdigest() in message
    assert not dest.exists()
    assert not (tmp_path / "data.bin.part").exists()


@pytest.mark.parametrize("status", [404, 403, 410, 400])
def test_a_client_error_fails_at_once_and_says_it_is_permanent(serve, tmp_path: Path,
                                                               status: int) -> None:
    url, seen = serve(lambda h, i: send_status(h, status))
    dest = tmp_path / "data.bin"
    with pytest.raises(DownloadError) as err:
        download(url, dest, retries=3, backoff=0.01, progress=False)
    assert str(err.value) == f"HTTP {status} for {url} (a retry will not help)"
    assert err.value.transient is False
    assert seen.count == 1  # never retried
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("status", [408, 429, 503])
def test_timeouts_rate_limits_and_5xx_are_retried_then_transient(serve, tmp_path: Path,
                                                                 status: int) -> None:
    url, seen = serve(lambda h, i: send_status(h, status))
    with pytest.raises(DownloadError) as err:
        download(url, tmp_path / "data.bin", retries=2, backoff=0.01, progress=False)
    assert err.value.transient is True
    assert str(err.value) == f"giving up on {url} after 3 attempt(s): HTTP {status}"
    assert seen.count == 3


def test_a_408_then_success_is_a_success(serve, tmp_path: Path) -> None:
    url, seen = serve(lambda h, i: send_status(h, 408) if i == 0 else send_body(h, PAYLOAD))
    download(url, tmp_path / "data.bin", sha256=PAYLOAD_SHA, backoff=0.01, progress=False)
    assert seen.count == 2


def test_connection_refused_is_transient(tmp_path: Path) -> None:
    from tests.conftest import free_port

    url = f"http://127.0.0.1:{free_port()}/data.bin"
    with pytest.raises(DownloadError, match="connection failed") as err:
        download(url, tmp_path / "data.bin", retries=1, backoff=0.01, progress=False)
    assert err.value.transient is True


def test_a_body_cut_without_content_length_fails_its_checksum(serve, tmp_path: Path) -> None:
    """Without Content-Length a cut looks like the end at the socket; only the digest (or the
    caller's content check, see test_sources) can tell, and nothing is left behind."""
    def behaviour(h: BaseHTTPRequestHandler, index: int) -> None:
        h.send_response(200)  # HTTP/1.0, no length: the body ends when the server hangs up
        h.end_headers()
        h.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])

    url, _ = serve(behaviour)
    with pytest.raises(DownloadError, match="sha256 mismatch") as err:
        download(url, tmp_path / "data.bin", sha256=PAYLOAD_SHA, backoff=0.01, progress=False)
    assert err.value.transient is False
    assert leftovers(tmp_path) == []


def test_unresponsive_server_times_out(serve, tmp_path: Path) -> None:
    def behaviour(h: BaseHTTPRequestHandler, index: int) -> None:
        h.server.release.wait(10)  # type: ignore[attr-defined]

    url, seen = serve(behaviour)
    dest = tmp_path / "data.bin"
    began = time.monotonic()
    with pytest.raises(DownloadError) as err:
        download(url, dest, timeout=0.5, retries=1, backoff=0.01, progress=False)
    elapsed = time.monotonic() - began
    assert url in str(err.value)
    assert elapsed < 4.0, elapsed
    assert seen.count == 2  # retries=1 means one extra attempt
    assert not dest.exists()


@pytest.mark.parametrize("url", ["ftp://example.org/x.zip", "file:///tmp/x.zip", "/tmp/x.zip"])
def test_rejects_non_http_urls(url: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="unsupported URL scheme"):
        download(url, tmp_path / "x.zip", progress=False)
    assert leftovers(tmp_path) == []
