"""Resumable, verified HTTP(S) downloads.

Dataset archives are large and the hosts are flaky, so a download must survive dropped
connections (resume with ``Range``), transient server errors (retry with backoff) and
never leave a half-written or unverified file where later pipeline stages would trust it
(write to ``<dest>.part`` and ``os.replace`` only after the body is complete and verified).

Behaviour choices the caller should know:

* ``retries`` is the number of *extra* attempts: ``retries=3`` means at most 4 requests.
  Every attempt counts, including one that made progress before dropping, so a server
  that trickles bytes cannot loop forever.
* When retries are exhausted on connection errors/timeouts/408/429/5xx, a partial ``.part`` is
  **kept** so that the next call resumes from it. A ``.part`` is **deleted** on a checksum
  mismatch (it cannot be trusted) and when the server proves it inconsistent.
* An existing ``dest`` is not checked or skipped: the caller decides whether to download;
  if it does, ``dest`` is replaced atomically once the new file is verified.
* Only ``http://`` and ``https://`` are handled; ``file://`` and local paths are the
  caller's job.
* A 4xx answer (except 408 and 429) is final: it is never retried, and the ``DownloadError``
  says so with ``transient=False``, so an orchestrator does not retry it either.
* A body sent without ``Content-Length`` that the server cuts short looks complete at the
  socket: only a checksum (``sha256``) or the caller's own content check can tell.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests
from tqdm import tqdm
from urllib3.exceptions import HTTPError as Urllib3HTTPError

from srcore.data.manifest import sha256_file

__all__ = ["ChecksumMismatch", "DownloadError", "download", "sha256_file"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 16
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_HEX_RE = re.compile(r"^[0-9a-f]{0,64}$")
_CONTENT_RANGE_RE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$")
_UNSATISFIED_RANGE_RE = re.compile(r"^bytes\s+\*/(\d+)$")
#: 4xx answers that mean "not now" rather than "never": request timeout, rate limit.
_TRANSIENT_STATUS = frozenset({408, 429})


class DownloadError(RuntimeError):
    """A download failed; the message always names the URL and the reason.

    ``transient`` tells whether a later attempt may succeed (the network or the server was
    down: connection errors, timeouts, 408, 429, 5xx) or never will (any other 4xx, a wrong
    checksum, an unsupported URL, a local disk error).
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class ChecksumMismatch(DownloadError):
    """The whole body arrived but its sha256 is not the expected one; nothing was kept."""

    def __init__(self, url: str, wanted: str, actual: str) -> None:
        super().__init__(f"sha256 mismatch for {url}: expected {wanted}, got {actual}")
        self.actual = actual


class _Retryable(Exception):
    """Internal: this attempt failed in a way another attempt may fix."""


def _root_cause(exc: BaseException) -> str:
    """requests wraps urllib3 wraps the socket error; the innermost one says what happened
    ("Connection refused", "Name or service not known") without three layers of reprs."""
    for _ in range(10):
        inner = getattr(exc, "reason", None)
        if not isinstance(inner, BaseException):
            inner = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else None
        inner = inner or exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    return getattr(exc, "strerror", None) or str(exc)


def _part_path(dest: Path) -> Path:
    # Same directory as dest so the final os.replace is a same-filesystem atomic rename.
    return dest.with_name(dest.name + ".part")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _int_header(resp: requests.Response, name: str) -> int | None:
    value = resp.headers.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _attempt(
    session: requests.Session, url: str, part: Path, timeout: float, progress: bool
) -> None:
    """One request: append to or rewrite ``part`` until the body is complete.

    Returns normally only when ``part`` holds the whole body as far as the server's headers
    can tell; raises ``_Retryable`` for transient trouble and ``DownloadError`` otherwise.
    """
    offset = _size(part)
    # identity encoding: byte counts and Range offsets must refer to the stored bytes.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = session.get(url, headers=headers, stream=True, timeout=(timeout, timeout))
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise _Retryable(f"connection failed: {_root_cause(exc)}") from exc
    except requests.RequestException as exc:
        raise DownloadError(f"cannot download {url}: {exc}") from exc

    with resp:
        resume = _resume_point(resp, url, part, offset)
        if resume is None:
            return
        length = _int_header(resp, "Content-Length")
        written = _write_body(resp, url, part, resume, length, progress)
        if length is not None and written != length:
            raise _Retryable(f"short read: got {written} of {length} bytes")


def _resume_point(resp: requests.Response, url: str, part: Path, offset: int) -> int | None:
    """Where the body in ``resp`` starts in ``part``; None when ``part`` is already complete.

    A server may ignore Range (200: start over) or answer a different range than asked
    (the partial file is then untrustworthy and discarded).
    """
    status = resp.status_code
    if status == 416 and offset:
        # Nothing left to send after `offset`: the part is complete if the server's
        # declared total agrees (or it declares none); verification happens later.
        match = _UNSATISFIED_RANGE_RE.match(resp.headers.get("Content-Range", "").strip())
        if match and int(match.group(1)) != offset:
            part.unlink(missing_ok=True)
            raise _Retryable(
                f"partial file has {offset} bytes but server reports "
                f"{match.group(1)}; discarded it"
            )
        return None
    if status in _TRANSIENT_STATUS or status >= 500:
        raise _Retryable(f"HTTP {status}")
    if status == 200:
        return 0
    if status == 206 and offset:
        match = _CONTENT_RANGE_RE.match(resp.headers.get("Content-Range", "").strip())
        if not match or int(match.group(1)) != offset:
            part.unlink(missing_ok=True)
            raise _Retryable(
                f"server answered Range bytes={offset}- with Content-Range "
                f"{resp.headers.get('Content-Range')!r}; discarded partial file"
            )
        return offset
    reason = " (a retry will not help)" if 400 <= status < 500 else ""
    raise DownloadError(f"HTTP {status} for {url}{reason}")


def _write_body(resp: requests.Response, url: str, part: Path, start: int,
                length: int | None, progress: bool) -> int:
    """Stream the body into ``part`` from byte ``start``; returns the bytes written."""
    total = start + length if length is not None else None
    written = 0
    try:
        fh = open(part, "ab" if start else "wb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:  # local disk trouble is not something a retry fixes
        raise DownloadError(f"cannot write {part} while downloading {url}: {exc}") from exc
    bar = tqdm(
        total=total,
        initial=start,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=part.name[: -len(".part")],
        disable=None if progress else True,  # None: off when stderr is not a tty
        leave=False,
    )
    with fh, bar:
        # raw.stream with decode_content=False: we asked for identity, and if a server
        # compresses anyway we store exactly the bytes that Content-Length and Range
        # count, so resume offsets stay consistent.
        chunks = resp.raw.stream(_CHUNK, decode_content=False)
        while True:
            try:
                chunk = next(chunks)
            except StopIteration:
                break
            except (requests.RequestException, Urllib3HTTPError, OSError) as exc:
                raise _Retryable(
                    f"connection dropped after {start + written} bytes: {exc}"
                ) from exc
            try:
                fh.write(chunk)
            except OSError as exc:
                raise DownloadError(
                    f"cannot write {part} while downloading {url}: {exc}"
                ) from exc
            written += len(chunk)
            bar.update(len(chunk))
    return written


def download(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    sha256_prefix: str | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    backoff: float = 1.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` with resume, retries and optional SHA-256 verification.

    ``dest`` appears only once the full body is on disk and (if ``sha256`` or
    ``sha256_prefix``, the leading hex digits torch.hub reads from a file name, is given)
    verified. Returns ``dest``. Raises ``DownloadError`` naming the URL on final failure.
    """
    expected = _check_request(url, sha256, sha256_prefix, retries)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(dest)
    _fetch_with_retries(url, part, retries=retries, timeout=timeout, backoff=backoff,
                        progress=progress)
    if expected is not None or sha256_prefix:
        actual = sha256_file(part)
        wanted = expected or f"a digest starting with {sha256_prefix}"
        if actual != (expected or actual) or not actual.startswith(sha256_prefix or ""):
            part.unlink(missing_ok=True)
            raise ChecksumMismatch(url, wanted, actual)
    os.replace(part, dest)
    return dest


def _check_request(url: str, sha256: str | None, sha256_prefix: str | None,
                   retries: int) -> str | None:
    """Refuse a bad request before any byte moves; returns the normalised expected digest."""
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise DownloadError(f"unsupported URL scheme {scheme!r} for {url} (need http/https)")
    expected = None
    if sha256 is not None:
        expected = sha256.strip().lower()
        if not _SHA256_RE.match(expected):
            raise DownloadError(f"invalid expected sha256 {sha256!r} for {url}")
    if sha256_prefix is not None and not _HEX_RE.match(sha256_prefix):
        raise DownloadError(f"invalid sha256 prefix {sha256_prefix!r} for {url}")
    if retries < 0:
        raise ValueError("retries must be >= 0")
    return expected


def _fetch_with_retries(url: str, part: Path, *, retries: int, timeout: float,
                        backoff: float, progress: bool) -> None:
    """Attempts with exponential backoff; the part file survives a final failure for resume."""
    last_reason = "no attempt made"
    with requests.Session() as session:
        for attempt in range(retries + 1):
            if attempt:
                delay = backoff * 2 ** (attempt - 1)
                log.warning(
                    "download %s failed (%s); retry %d/%d in %.2fs",
                    url, last_reason, attempt, retries, delay,
                )
                time.sleep(delay)
            try:
                _attempt(session, url, part, timeout, progress)
                return
            except _Retryable as exc:
                last_reason = str(exc)
    kept = f"; kept {_size(part)} bytes in {part} for resume" if part.exists() else ""
    raise DownloadError(
        f"giving up on {url} after {retries + 1} attempt(s): {last_reason}{kept}",
        transient=True,
    )
