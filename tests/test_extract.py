"""Tests for srcore.data.extract: archives are built here, hostile ones included.

Every refusal test also checks the atomicity promise: the target is not created and
nothing lands outside the scratch directory.
"""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from srcore.data.extract import (
    CorruptArchiveError,
    UnsafeArchiveError,
    extract_archive,
    verify_archive,
)

FILES = {"imgs/0001.png": b"\x89PNG fake 1" * 100, "imgs/sub/0002.png": b"two" * 1000,
         "README.txt": b"hello\n"}


def make_zip(path: Path, entries: dict[str, bytes], *, level: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=level) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def tar_file_info(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, io.BytesIO(data)


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, io.BytesIO | None]],
             mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for info, data in members:
            tf.addfile(info, data)
    return path


def link_info(name: str, linkname: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def assert_untouched(scratch: Path, archive: Path, target: Path) -> None:
    """Refusal must leave only the archive in the scratch dir: no target, temp dir or escape."""
    assert not target.exists()
    assert sorted(p.name for p in scratch.iterdir()) == [archive.name]
    assert not (scratch.parent / "evil").exists()


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A subdirectory, so '../evil' relative to the target still lands inside tmp_path."""
    d = tmp_path / "scratch"
    d.mkdir()
    return d


def test_good_zip(scratch: Path) -> None:
    archive = make_zip(scratch / "data.zip", FILES)
    target = scratch / "out"
    out = extract_archive(archive, target)
    assert sorted(out) == sorted(target / n for n in FILES)
    for name, data in FILES.items():
        assert (target / name).read_bytes() == data
    assert sorted(p.name for p in scratch.iterdir()) == ["data.zip", "out"]  # no temp left


@pytest.mark.parametrize("mode,suffix", [("w:gz", ".tar.gz"), ("w", ".tar"), ("w:gz", ".bin")])
def test_good_tar(scratch: Path, mode: str, suffix: str) -> None:
    members: list[tuple[tarfile.TarInfo, io.BytesIO | None]] = []
    top = tarfile.TarInfo("./imgs")
    top.type = tarfile.DIRTYPE
    members.append((top, None))
    members += [tar_file_info(f"./{n}", d) for n, d in FILES.items()]
    archive = make_tar(scratch / f"data{suffix}", members, mode)  # .bin: detected by content
    target = scratch / "out"
    out = extract_archive(archive, target)
    assert sorted(out) == sorted(target / n for n in FILES)
    for name, data in FILES.items():
        assert (target / name).read_bytes() == data
    assert sorted(p.name for p in scratch.iterdir()) == [archive.name, "out"]


def test_existing_target_needs_overwrite(scratch: Path) -> None:
    archive = make_zip(scratch / "data.zip", FILES)
    target = scratch / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError):
        extract_archive(archive, target)
    assert (target / "stale.txt").exists()
    extract_archive(archive, target, overwrite=True)
    assert not (target / "stale.txt").exists()
    assert (target / "README.txt").read_bytes() == FILES["README.txt"]
    assert sorted(p.name for p in scratch.iterdir()) == ["data.zip", "out"]


def test_refused_archive_leaves_existing_target_untouched(scratch: Path) -> None:
    archive = make_zip(scratch / "bad.zip", {"ok.txt": b"x", "../evil": b"x"})
    target = scratch / "out"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    with pytest.raises(UnsafeArchiveError):
        extract_archive(archive, target, overwrite=True)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/tmp/evil", "C:evil", "a\\..\\evil"])
def test_zip_traversal_refused(scratch: Path, name: str) -> None:
    archive = scratch / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("fine.txt", b"fine")
        # ZipInfo keeps the raw name; writestr(str) would too, but be explicit.
        zf.writestr(zipfile.ZipInfo(name), b"evil")
    target = scratch / "out"
    with pytest.raises(UnsafeArchiveError) as err:
        extract_archive(archive, target)
    assert repr(name) in str(err.value)
    assert_untouched(scratch, archive, target)


def test_zip_symlink_entry_refused(scratch: Path) -> None:
    archive = scratch / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("passwd")
        info.create_system = 3  # Unix, so the mode bits in external_attr are meaningful
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    target = scratch / "out"
    with pytest.raises(UnsafeArchiveError, match="'passwd'.*symlink"):
        extract_archive(archive, target)
    assert_untouched(scratch, archive, target)


@pytest.mark.parametrize(
    "member,label",
    [
        (tar_file_info("../evil", b"evil"), "'../evil'"),
        (tar_file_info("ok/../../evil", b"evil"), "'ok/../../evil'"),
        (tar_file_info("/tmp/evil", b"evil"), "'/tmp/evil'"),
        (link_info("passwd", "/etc/passwd", tarfile.SYMTYPE), "'passwd'"),
        (link_info("up", "../../../../etc", tarfile.SYMTYPE), "'up'"),
        (link_info("hard", "../../etc/passwd", tarfile.LNKTYPE), "'hard'"),
        (link_info("fifo", "", tarfile.FIFOTYPE), "'fifo'"),
        (link_info("dev", "", tarfile.CHRTYPE), "'dev'"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-abs", "symlink-rel", "hardlink",
         "fifo", "chardev"],
)
def test_tar_unsafe_entries_refused(
    scratch: Path, member: tuple[tarfile.TarInfo, io.BytesIO | None], label: str
) -> None:
    info, data = member
    if data is not None:
        data.seek(0)
    # A harmless file first, so "nothing written" means the check happens before writing.
    archive = make_tar(scratch / "bad.tar.gz", [tar_file_info("fine.txt", b"fine"), (info, data)],
                       "w:gz")
    target = scratch / "out"
    with pytest.raises(UnsafeArchiveError) as err:
        extract_archive(archive, target)
    assert label in str(err.value)
    assert_untouched(scratch, archive, target)


def test_zip_bomb_ratio_refused(scratch: Path) -> None:
    archive = make_zip(scratch / "bomb.zip", {"ok.txt": b"ok", "zeros.bin": b"\0" * 50_000_000})
    assert archive.stat().st_size < 1_000_000
    target = scratch / "out"
    with pytest.raises(UnsafeArchiveError, match="'zeros.bin'.*limit") as err:
        extract_archive(archive, target, max_ratio=200)
    assert "x" in str(err.value)
    assert_untouched(scratch, archive, target)


def test_total_size_limit_refused(scratch: Path) -> None:
    entries = {f"f{i}.bin": bytes([i]) * 1000 for i in range(3)}
    target = scratch / "out"
    zip_archive = make_zip(scratch / "big.zip", entries, level=zipfile.ZIP_STORED)
    with pytest.raises(UnsafeArchiveError, match="'f2.bin'.*2500-byte limit"):
        extract_archive(zip_archive, target, max_total_bytes=2500)
    assert_untouched(scratch, zip_archive, target)
    zip_archive.unlink()

    tar_archive = make_tar(scratch / "big.tar", [tar_file_info(n, d) for n, d in entries.items()])
    with pytest.raises(UnsafeArchiveError, match="'f2.bin'.*2500-byte limit"):
        extract_archive(tar_archive, target, max_total_bytes=2500)
    assert_untouched(scratch, tar_archive, target)
    # Exactly at the limit is fine.
    assert len(extract_archive(tar_archive, target, max_total_bytes=3000)) == 3


def test_tar_gz_bomb_ratio_refused(scratch: Path) -> None:
    archive = make_tar(scratch / "bomb.tgz", [tar_file_info("zeros.bin", b"\0" * 20_000_000)],
                       "w:gz")
    target = scratch / "out"
    with pytest.raises(UnsafeArchiveError, match="'zeros.bin'.*ratio"):
        extract_archive(archive, target, max_ratio=200)
    assert_untouched(scratch, archive, target)


def test_zip_lying_header_stops_writing(scratch: Path) -> None:
    """A central directory that under-declares a size must not let more bytes through."""
    archive = make_zip(scratch / "liar.zip", {"a.bin": b"A" * 5000}, level=zipfile.ZIP_STORED)
    raw = bytearray(archive.read_bytes())
    cd = raw.rfind(b"PK\x01\x02")  # central directory header: uncompressed size at +24
    raw[cd + 24 : cd + 28] = (100).to_bytes(4, "little")
    archive.write_bytes(bytes(raw))
    target = scratch / "out"
    with pytest.raises((UnsafeArchiveError, CorruptArchiveError)):
        extract_archive(archive, target)
    assert_untouched(scratch, archive, target)


def test_not_an_archive(scratch: Path) -> None:
    junk = scratch / "junk.zip"
    junk.write_bytes(b"definitely not an archive" * 100)
    with pytest.raises(ValueError, match="neither a zip nor a tar"):
        extract_archive(junk, scratch / "out")
    assert_untouched(scratch, junk, scratch / "out")


def test_copy_refuses_more_bytes_than_declared(tmp_path: Path) -> None:
    """The byte counter is the last line against headers that under-declare sizes."""
    from pathlib import PurePosixPath

    from srcore.data.extract import _copy_limited, _Entry

    entry = _Entry("liar.bin", PurePosixPath("liar.bin"), False, 100, zipfile.ZipInfo("liar.bin"))
    with pytest.raises(UnsafeArchiveError, match="'liar.bin'.*declared 100 bytes"):
        _copy_limited(io.BytesIO(b"x" * 5000), tmp_path / "a", entry, budget_left=10**9)
    with pytest.raises(UnsafeArchiveError, match="'liar.bin'.*total size limit"):
        _copy_limited(io.BytesIO(b"x" * 100), tmp_path / "b", entry, budget_left=10)


# ------------------------------------------------------------ verify_archive: complete or not

def _three_member_tar(path: Path, mode: str) -> bytes:
    import random

    members = [tar_file_info(f"imgs/{i}.png", random.Random(i).randbytes(3000)) for i in range(3)]
    make_tar(path, members, mode)
    return path.read_bytes()


@pytest.mark.parametrize("mode,suffix", [("w", ".tar"), ("w:gz", ".tgz"), ("w:bz2", ".tbz2"),
                                         ("w:xz", ".txz")])
def test_verify_accepts_a_complete_tar_and_refuses_every_cut(scratch: Path, mode: str,
                                                             suffix: str) -> None:
    archive = scratch / f"data{suffix}"
    full = _three_member_tar(archive, mode)
    verify_archive(archive)
    # 3584 and 7168 end exactly on a member boundary: tarfile alone reads those as complete.
    cuts = [512, 3584, 7168, len(full) // 2] if mode == "w" else [100, len(full) // 2,
                                                                    len(full) - 9]
    for cut in cuts:
        archive.write_bytes(full[:cut])
        with pytest.raises(CorruptArchiveError, match="cut short") as err:
            verify_archive(archive)
        assert str(archive) in str(err.value), cut
    assert sorted(p.name for p in scratch.iterdir()) == [archive.name]  # wrote nothing


def test_verify_checks_zip_central_directory_and_crcs(scratch: Path) -> None:
    archive = make_zip(scratch / "data.zip", FILES)
    verify_archive(archive)
    full = archive.read_bytes()
    archive.write_bytes(full[:-10])  # the end-of-central-directory record is gone
    with pytest.raises(CorruptArchiveError, match="neither a zip nor a tar"):
        verify_archive(archive)
    damaged = bytearray(make_zip(scratch / "stored.zip", FILES,
                                 level=zipfile.ZIP_STORED).read_bytes())
    damaged[damaged.index(b"twotwo")] ^= 0xFF  # same size, one byte of data changed
    (scratch / "stored.zip").write_bytes(bytes(damaged))
    with pytest.raises(CorruptArchiveError, match="Bad CRC-32 for file 'imgs/sub/0002.png'"):
        verify_archive(scratch / "stored.zip")


def test_verify_refuses_unsafe_archives_like_extraction(scratch: Path) -> None:
    archive = make_tar(scratch / "bad.tar", [tar_file_info("../evil", b"evil")])
    with pytest.raises(UnsafeArchiveError, match="'../evil'"):
        verify_archive(archive)
    bomb = make_zip(scratch / "bomb.zip", {"zeros.bin": b"\0" * 50_000_000})
    with pytest.raises(UnsafeArchiveError, match="'zeros.bin'.*limit"):
        verify_archive(bomb, max_ratio=200)


def test_extracting_a_damaged_archive_names_it(scratch: Path) -> None:
    archive = scratch / "data.tgz"
    full = _three_member_tar(archive, "w:gz")
    archive.write_bytes(full[: len(full) // 2])
    target = scratch / "out"
    with pytest.raises(CorruptArchiveError, match="cut short") as err:
        extract_archive(archive, target)
    assert str(archive) in str(err.value)
    assert_untouched(scratch, archive, target)
