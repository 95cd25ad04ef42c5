"""Safe, atomic extraction of dataset archives (.zip, .tar, .tar.gz/.tgz, other tar codecs).

Archives come from the internet, so extraction must not be able to write outside the target
(path traversal, absolute paths, links), create special files, or fill the disk
(decompression bombs). Every entry is validated from metadata *before* anything is written,
bytes actually written are counted against the declared sizes, and the result is built in
a temporary directory next to ``target`` and renamed into place, so a refused or failed
archive leaves ``target`` untouched (or absent) and later stages never see half a dataset.

Behaviour choices the caller should know:

* The format is detected from content, not from the file name.
* All symlinks, hard links, device and FIFO entries are refused (simplest safe policy;
  image datasets do not need them). So are ``..`` components, absolute paths, drive
  letters, backslashes and duplicate file entries.
* ``target`` must not exist or be an empty directory unless ``overwrite=True``, in which
  case it is replaced as a whole only after the new tree is complete.
* Extracted files get default permissions (umask); archive modes/mtimes are not restored.
* ``verify_archive`` reads an archive to its end without writing anything: a downloaded file
  is only trusted once it proves complete (zip: central directory and every CRC; tar: every
  member and the end-of-archive marker; gz/bz2/xz: the codec's own end-of-stream check).
  Unreadable or cut archives raise ``CorruptArchiveError`` (a ``ValueError``).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO
from uuid import uuid4

__all__ = ["CorruptArchiveError", "UnsafeArchiveError", "extract_archive", "verify_archive"]

_MIB = 1 << 20
_CHUNK = 1 << 20
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_DEFAULT_MAX_TOTAL = 20 * 2**30
_DEFAULT_MAX_RATIO = 200.0
#: Compressed tars are read through their codec, so a cut stream fails the codec's own check.
_TAR_CODECS: tuple[tuple[bytes, Callable[[Path], IO[bytes]]], ...] = (
    (b"\x1f\x8b", gzip.GzipFile),
    (b"BZh", bz2.BZ2File),
    (b"\xfd7zXZ\x00", lzma.LZMAFile),
)
#: What the readers raise for a cut or damaged file (as opposed to a hostile one).
_READ_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.ReadError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError,
    gzip.BadGzipFile, NotImplementedError,
)


class UnsafeArchiveError(ValueError):
    """The archive (named entry) would escape the target, create a link, or is a bomb."""


class CorruptArchiveError(ValueError):
    """The file is not a complete, readable zip or tar archive (cut short, damaged, or neither).
    Unlike an unsafe archive, downloading it again may help."""


@dataclass(frozen=True)
class _Entry:
    """A validated archive member: where it goes and how big it claims to be."""

    name: str  # as stored in the archive, for error messages
    rel: PurePosixPath  # normalised, guaranteed to stay inside the target
    is_dir: bool
    size: int
    member: zipfile.ZipInfo | tarfile.TarInfo


def _safe_relpath(name: str) -> PurePosixPath | None:
    """Normalise an entry name, or raise if it could land outside the target.

    Returns None for entries that name the target itself (``./``), which carry nothing.
    Rejection is purely lexical, so no filesystem state (like an existing symlink) matters.
    """
    if not name or "\x00" in name:
        raise UnsafeArchiveError(f"archive entry {name!r} has an empty or NUL-containing name")
    if "\\" in name or _DRIVE_RE.match(name):
        raise UnsafeArchiveError(f"archive entry {name!r} uses a Windows path (drive/backslash)")
    if name.startswith("/"):
        raise UnsafeArchiveError(f"archive entry {name!r} is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"archive entry {name!r} escapes the target with '..'")
    return PurePosixPath(*parts) if parts else None


class _Budget:
    """Declared-size accounting shared by both formats, checked while listing entries."""

    def __init__(self, archive_size: int, max_total_bytes: int, max_ratio: float) -> None:
        self.archive_size = max(archive_size, 1)
        self.max_total_bytes = max_total_bytes
        self.max_ratio = max_ratio
        self.total = 0

    def add(self, name: str, size: int) -> None:
        if size < 0:
            raise UnsafeArchiveError(f"archive entry {name!r} declares a negative size")
        self.total += size
        if self.total > self.max_total_bytes:
            raise UnsafeArchiveError(
                f"archive entry {name!r} brings the uncompressed total to {self.total} bytes, "
                f"over the {self.max_total_bytes}-byte limit (decompression bomb?)"
            )

    def check_whole_ratio(self, name: str) -> None:
        # Tar has no per-entry compressed size, so compare the running total to the file.
        ratio = self.total / self.archive_size
        if self.total > _MIB and ratio > self.max_ratio:
            raise UnsafeArchiveError(
                f"archive entry {name!r} brings the expansion ratio to {ratio:.0f}x, "
                f"over the {self.max_ratio:g}x limit (decompression bomb?)"
            )


class _Layout:
    """Rejects duplicate files and file/directory clashes before anything is written."""

    def __init__(self) -> None:
        self.files: set[PurePosixPath] = set()
        self.dirs: set[PurePosixPath] = set()

    def add(self, name: str, rel: PurePosixPath, is_dir: bool) -> None:
        for parent in rel.parents:
            if parent in self.files:
                raise UnsafeArchiveError(f"archive entry {name!r} nests under a file entry")
            self.dirs.add(parent)
        if is_dir:
            if rel in self.files:
                raise UnsafeArchiveError(f"archive entry {name!r} clashes with a file entry")
            self.dirs.add(rel)
        else:
            if rel in self.files:
                raise UnsafeArchiveError(f"archive entry {name!r} is a duplicate file entry")
            if rel in self.dirs:
                raise UnsafeArchiveError(f"archive entry {name!r} clashes with a directory")
            self.files.add(rel)


def _zip_entries(zf: zipfile.ZipFile, budget: _Budget) -> list[_Entry]:
    layout = _Layout()
    entries: list[_Entry] = []
    for info in zf.infolist():
        name = info.filename
        rel = _safe_relpath(name)
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
            what = "a symlink" if stat.S_ISLNK(mode) else "a special file"
            raise UnsafeArchiveError(f"archive entry {name!r} is {what}; links are refused")
        if info.flag_bits & 0x1:
            raise UnsafeArchiveError(f"archive entry {name!r} is encrypted")
        is_dir = info.is_dir() or kind == stat.S_IFDIR
        size = 0 if is_dir else info.file_size
        budget.add(name, size)
        if size > _MIB:
            ratio = size / info.compress_size if info.compress_size else float("inf")
            if ratio > budget.max_ratio:
                raise UnsafeArchiveError(
                    f"archive entry {name!r} expands {ratio:.0f}x ({info.compress_size} -> "
                    f"{size} bytes), over the {budget.max_ratio:g}x limit (decompression bomb?)"
                )
        if rel is None:
            continue
        layout.add(name, rel, is_dir)
        entries.append(_Entry(name, rel, is_dir, size, info))
    return entries


def _tar_entries(tf: tarfile.TarFile, budget: _Budget, root: str) -> list[_Entry]:
    layout = _Layout()
    entries: list[_Entry] = []
    # Iterating (not getmembers) lets a bomb's first oversized header stop us early.
    for member in tf:
        name = member.name
        rel = _safe_relpath(name)
        if member.issym() or member.islnk():
            kind = "symlink" if member.issym() else "hard link"
            raise UnsafeArchiveError(
                f"archive entry {name!r} is a {kind} to {member.linkname!r}; links are refused"
            )
        if not (member.isfile() or member.isdir()):
            raise UnsafeArchiveError(
                f"archive entry {name!r} is a device/FIFO/special entry; refused"
            )
        try:  # the stdlib's own policy as a second opinion on top of ours
            tarfile.data_filter(member, root)
        except tarfile.FilterError as exc:
            raise UnsafeArchiveError(f"archive entry {name!r} refused by tarfile: {exc}") from exc
        size = member.size if member.isfile() else 0
        budget.add(name, size)
        budget.check_whole_ratio(name)
        if rel is None:
            continue
        layout.add(name, rel, member.isdir())
        entries.append(_Entry(name, rel, member.isdir(), size, member))
    return entries


def _copy_limited(src: IO[bytes], dst: Path, entry: _Entry, budget_left: int) -> int:
    """Copy at most the declared size; a stream that yields more is a lying header."""
    written = 0
    with open(dst, "xb") as out:
        for block in iter(lambda: src.read(_CHUNK), b""):
            written += len(block)
            if written > entry.size:
                raise UnsafeArchiveError(
                    f"archive entry {entry.name!r} holds more than its declared "
                    f"{entry.size} bytes (lying header)"
                )
            if written > budget_left:
                raise UnsafeArchiveError(
                    f"archive entry {entry.name!r} exceeds the total size limit while writing"
                )
            out.write(block)
    return written


OpenMember = Callable[[_Entry], IO[bytes]]


def _write_tree(
    entries: list[_Entry], open_member: OpenMember, root: Path, max_total_bytes: int
) -> list[PurePosixPath]:
    written_total = 0
    files: list[PurePosixPath] = []
    root_resolved = root.resolve()
    for entry in entries:
        path = root / entry.rel
        # Belt and braces: the lexical checks already guarantee this, and no links are ever
        # created, but resolve() would still catch a bug in either.
        if not path.resolve().is_relative_to(root_resolved):
            raise UnsafeArchiveError(f"archive entry {entry.name!r} resolves outside the target")
        if entry.is_dir:
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        with open_member(entry) as src:
            written_total += _copy_limited(src, path, entry, max_total_bytes - written_total)
        files.append(entry.rel)
    return files


def _zip_opener(zf: zipfile.ZipFile) -> OpenMember:
    def open_member(entry: _Entry) -> IO[bytes]:
        assert isinstance(entry.member, zipfile.ZipInfo)
        return zf.open(entry.member)

    return open_member


def _tar_opener(tf: tarfile.TarFile) -> OpenMember:
    def open_member(entry: _Entry) -> IO[bytes]:
        assert isinstance(entry.member, tarfile.TarInfo)
        stream = tf.extractfile(entry.member)
        if stream is None:  # only for non-regular members, which were refused already
            raise UnsafeArchiveError(f"archive entry {entry.name!r} has no data stream")
        return stream

    return open_member


def _check_target(target: Path, archive: Path, overwrite: bool) -> None:
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise FileExistsError(f"extraction target {target} exists and is not a directory")
    if not target.exists() or not any(target.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"extraction target {target} is not empty; pass overwrite=True to replace it"
        )
    if archive.resolve().is_relative_to(target.resolve()):
        raise FileExistsError(f"refusing to replace {target}: it contains the archive {archive}")


def _place(tmp: Path, target: Path) -> None:
    """Move the finished tree into place; a non-empty target is swapped out, then deleted."""
    if not target.exists() or not any(target.iterdir()):
        os.replace(tmp, target)  # POSIX rename (also onto an empty directory) is atomic
        return
    old = target.with_name(f".{target.name}.{uuid4().hex[:8]}.old")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _not_an_archive(archive: Path) -> CorruptArchiveError:
    return CorruptArchiveError(
        f"{archive} is neither a zip nor a tar archive (or it is cut short)"
    )


def extract_archive(
    archive: Path,
    target: Path,
    *,
    max_total_bytes: int = _DEFAULT_MAX_TOTAL,
    max_ratio: float = _DEFAULT_MAX_RATIO,
    overwrite: bool = False,
) -> list[Path]:
    """Validate every entry of ``archive``, then extract it atomically into ``target``.

    Returns the extracted regular files (paths under ``target``) in archive order.
    Raises ``UnsafeArchiveError`` naming the offending entry, ``CorruptArchiveError`` (a
    ``ValueError``) for an unrecognised or damaged file, ``FileExistsError`` for a non-empty
    target without ``overwrite``.
    """
    archive, target = Path(archive), Path(target)
    if not archive.is_file():
        raise FileNotFoundError(f"archive {archive} does not exist")
    _check_target(target, archive, overwrite)
    budget = _Budget(archive.stat().st_size, max_total_bytes, max_ratio)

    # Tar first: a plain .tar whose last member is a zip can fool is_zipfile (it scans the
    # tail for an end-of-central-directory record), while a zip never parses as a tar.
    try:
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive, "r:*") as tf:
                entries = _tar_entries(tf, budget, os.fspath(target))
                rels = _build(entries, _tar_opener(tf), target, max_total_bytes)
        elif zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                entries = _zip_entries(zf, budget)
                rels = _build(entries, _zip_opener(zf), target, max_total_bytes)
        else:
            raise _not_an_archive(archive)
    except _READ_ERRORS as exc:
        raise CorruptArchiveError(f"{archive} is damaged or cut short: {exc}") from exc
    return [target / rel for rel in rels]


def _build(
    entries: list[_Entry], open_member: OpenMember, target: Path, max_total_bytes: int
) -> list[PurePosixPath]:
    """Write into a sibling temp dir (same filesystem, so the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its 0700 mode would become the dataset directory's mode after the rename.
    tmp = target.with_name(f".{target.name}.{uuid4().hex[:8]}.extracting")
    tmp.mkdir()
    try:
        rels = _write_tree(entries, open_member, tmp, max_total_bytes)
        _place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return rels


class _TailReader:
    """A read-only stream that remembers the last block read: tarfile ends its iteration
    silently on a zero block, a cut header or garbage alike, and only the first is the
    end-of-archive marker of a complete tar."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.last = b""

    def read(self, size: int = -1) -> bytes:
        self.last = self.raw.read(size)
        return self.last

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()


def _open_tar_stream(archive: Path) -> IO[bytes]:
    with open(archive, "rb") as fh:
        magic = fh.read(6)
    for prefix, opener in _TAR_CODECS:
        if magic.startswith(prefix):
            return opener(archive)
    return open(archive, "rb")  # noqa: SIM115 - the caller closes it


def _verify_tar(archive: Path, budget: _Budget) -> bool:
    """False when ``archive`` is not a tar at all; raises when it is one but incomplete."""
    with _open_tar_stream(archive) as raw:
        reader = _TailReader(raw)
        try:
            tf = tarfile.open(fileobj=reader, mode="r:")  # type: ignore[call-overload]  # noqa: SIM115
        except tarfile.ReadError:
            return False
        with tf:
            entries = _tar_entries(tf, budget, os.fspath(archive.with_name(f".{archive.name}.d")))
            if reader.last != tarfile.NUL * tarfile.BLOCKSIZE:
                after = f"after entry {entries[-1].name!r}" if entries else "at its start"
                raise CorruptArchiveError(
                    f"{archive} is cut short or damaged {after}: no end-of-archive marker"
                )
        # Compressed: read on to the end of the stream, so the codec checks its trailer
        # (length and CRC); bounded, since padding after the marker is not content.
        for _ in range(16):
            if not raw.read(_CHUNK):
                break
    return True


def _verify_zip(archive: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        for entry in _zip_entries(zf, budget):
            if entry.is_dir:
                continue
            # Reads stop at the declared size (bounded by the budget); the CRC is checked at
            # the end of each entry.
            with zf.open(entry.member) as src:  # type: ignore[arg-type]
                while src.read(_CHUNK):
                    pass


def verify_archive(
    archive: Path,
    *,
    max_total_bytes: int = _DEFAULT_MAX_TOTAL,
    max_ratio: float = _DEFAULT_MAX_RATIO,
) -> None:
    """Read ``archive`` to its end, writing nothing, to prove it complete and safe to extract.

    Raises ``CorruptArchiveError`` when the file is not a complete zip or tar (a download cut
    short without Content-Length ends up here), ``UnsafeArchiveError`` under the same rules
    as ``extract_archive``. Bytes read are bounded by the same limits.
    """
    archive = Path(archive)
    budget = _Budget(archive.stat().st_size, max_total_bytes, max_ratio)
    try:
        if _verify_tar(archive, budget):
            return
        if not zipfile.is_zipfile(archive):
            raise _not_an_archive(archive)
        _verify_zip(archive, budget)
    except _READ_ERRORS as exc:
        raise CorruptArchiveError(f"{archive} is damaged or cut short: {exc}") from exc
